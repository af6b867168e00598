"""Several processes (torchrun, DistributedDataParallel over gloo) and mixed precision, on the
CPU: two processes end where one does, and the bf16 autocast path trains."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bench.data.shard import Shard
from bench.engine.training import BatchStream, LoopHooks, new_loop_state, train_loop
from bench.nets.basic import Linear
from tests.conftest import bench_env, run_id_of
from tests.test_methods import build

RUN = ["run", "--method", "edm", "--dataset", "gmm8", "--steps", "30", "--nfe", "1",
       "--device", "cpu", "--set", "train.batch_size=64", "--set", "eval.num_samples=256",
       "--set", "eval.batch_size=100", "--set", "train.log_every=10",
       "--set", "train.checkpoint_every=20"]


def free_port() -> int:
    """A TCP port nobody listens on right now (for torchrun's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun(nproc: int) -> list[str]:
    """`python -m torch.distributed.run` on this machine, with its own rendezvous port."""
    return ["-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}"]


def run_in(folder: Path, prefix: list[str], args: list[str]) -> subprocess.CompletedProcess[str]:
    """`python PREFIX -m bench ARGS` in folder, one CPU thread per process."""
    return subprocess.run([sys.executable, *prefix, "-m", "bench", *args], cwd=folder,
                          capture_output=True, text=True, timeout=300, check=False,
                          env=bench_env({"OMP_NUM_THREADS": "1"}))


def checkpoint_of(folder: Path) -> dict:
    """The one checkpoint a run in folder wrote."""
    found = list((folder / "runs" / "mlartifacts").rglob("last.pt"))
    assert len(found) == 1, found
    return torch.load(found[0], weights_only=True)


def assert_same_weights(one: dict, two: dict, steps: int = 30, atol: float = 1e-5,
                        modules: frozenset[str] = frozenset({"student", "ema"})) -> None:
    """Same iteration and, within atol, the same student and EMA (and the method's own trained
    modules named in `modules`). The sums over a batch are reassociated across processes, and
    Adam carries the rounding on: 1e-7 after 30 iterations, 1.4e-4 after 400 (measured on
    gmm8)."""
    assert one["loop"]["step"] == two["loop"]["step"] == steps
    assert one["modules"].keys() == two["modules"].keys() == modules
    for name, module in one["modules"].items():
        for key, value in module.items():
            assert torch.allclose(value, two["modules"][name][key], atol=atol), (name, key)


def runs_in(folder: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'runs' / 'mlflow.db'}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_two_gloo_processes_end_with_the_weights_of_one(workdir: Callable[[str], Path]) -> None:
    one, two = workdir("one"), workdir("two")
    single = run_in(one, [], RUN)
    assert single.returncode == 0, single.stderr
    double = run_in(two, torchrun(2), RUN)
    assert double.returncode == 0, double.stderr
    assert_same_weights(checkpoint_of(one), checkpoint_of(two))
    # rank 0 alone tracked: one run, one table, the global batch's loss logged
    runs = runs_in(two)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["world_size"] == "2"
    assert double.stdout.count("run id: ") == 1
    assert run_id_of(double.stdout) == runs[0].info.run_id
    single = runs_in(one)[0].data.metrics
    assert runs[0].data.metrics["train/loss"] == pytest.approx(single["train/loss"],
                                                               rel=1e-5)
    # evaluation: batches 0 and 2 on rank 0, 1 on rank 1, gathered: the scores of one process
    for metric in ("w2", "fd", "swd", "nll", "mode_recall"):
        assert runs[0].data.metrics[metric] == pytest.approx(single[metric], rel=1e-4), metric


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sct", "meanflow"])
def test_continuous_time_methods_under_two_processes_end_with_the_weights_of_one(
        workdir: Callable[[str], Path], name: str) -> None:
    # sCT and MeanFlow call their raw network: DDP wraps it in place of the student
    args = [RUN[0], "--method", name, *RUN[3:]]
    one, two = workdir("one"), workdir("two")
    assert run_in(one, [], args).returncode == 0
    double = run_in(two, torchrun(2), args)
    assert double.returncode == 0, double.stderr
    # sCT's learned weighting is trained too: its gradients are averaged over the ranks
    trained = {"student", "ema", *(["weighting"] if name == "sct" else [])}
    assert_same_weights(checkpoint_of(one), checkpoint_of(two), modules=frozenset(trained))


@pytest.mark.slow
def test_nproc_shortcut_matches_one_process(workdir: Callable[[str], Path]) -> None:
    one, two = workdir("one"), workdir("two")
    assert run_in(one, [], RUN).returncode == 0
    double = run_in(two, [], [*RUN, "--nproc", "2"])
    assert double.returncode == 0, double.stderr
    assert_same_weights(checkpoint_of(one), checkpoint_of(two))
    assert len(runs_in(two)) == 1


def test_uneven_batch_split_is_a_usage_error(workdir: Callable[[str], Path]) -> None:
    folder = workdir("odd")
    done = run_in(folder, torchrun(2), [*RUN, "--set", "train.batch_size=63"])
    assert done.returncode != 0
    assert "train.batch_size 63 does not split over 2 processes" in done.stderr
    assert runs_in(folder) == []


@pytest.mark.parametrize("name", ["edm", "pd", "cd", "ct", "ict", "ect", "sct", "scd",
                                  "meanflow"])
def test_shards_draw_the_rows_of_the_global_draw(name: str) -> None:
    """Rank r's per-sample losses are rows r of the one-process losses: same noise levels,
    same noise, same indices."""
    torch.manual_seed(0)
    method, cfg = build(name, ["net.dropout=0.0"])
    x0 = method.ctx.dataset.train()[:12]

    def losses(shard: Shard, rows: slice) -> torch.Tensor:
        method.shard = shard
        g = new_loop_state(method, cfg.train, 5, torch.device("cpu")).generator
        with torch.no_grad():
            return method.loss(x0[rows], None, 3, g)

    whole = losses(Shard(), slice(None))
    parts = [losses(Shard(r, 3), Shard(r, 3).rows(12)) for r in range(3)]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-6)


def test_batch_stream_shards_split_the_global_batch() -> None:
    data = torch.arange(40.0)[:, None]
    streams = [BatchStream(lambda i: data[i], 40, None, 8, 3, torch.device("cpu"), Shard(r, 2))
               for r in range(2)]
    whole = BatchStream(lambda i: data[i], 40, None, 8, 3, torch.device("cpu"))
    for step in (0, 4, 7):
        parts = torch.cat([s.batch(step)[0] for s in streams])
        assert torch.equal(parts, whole.batch(step)[0])


@pytest.mark.parametrize("name", ["edm", "cd"])
def test_bf16_autocast_trains_on_the_cpu(name: str) -> None:
    torch.manual_seed(0)
    method, cfg = build(name, ["train.precision=\"bf16\"", "train.steps=6",
                               "train.log_every=3", "train.warmup_steps=0"])
    assert cfg.train.precision == "bf16"
    state = new_loop_state(method, cfg.train, 0, torch.device("cpu"))
    data = method.ctx.dataset.train()
    stream = BatchStream(lambda i: data[i], len(data), None, 32, 0, torch.device("cpu"))
    dtypes: list[torch.dtype] = []
    linear = next(m for m in method.student.modules() if isinstance(m, Linear))
    linear.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    logged: list[float] = []
    before = [p.detach().clone() for p in method.student.parameters()]
    train_loop(method, cfg.train, stream, state,
               LoopHooks(log=lambda metrics, step: logged.append(metrics["loss"])))
    assert state.step == 6 and len(logged) == 2
    assert all(torch.isfinite(torch.tensor(v)) for v in logged)
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the forward really ran in bf16
    assert all(p.dtype == torch.float32 for p in method.student.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, method.student.parameters(),
                                                     strict=True))


def test_fp16_on_the_cpu_is_a_one_line_usage_error(workdir: Callable[[str], Path]) -> None:
    done = run_in(workdir("fp16"), [], ["run", "--method", "edm", "--dataset", "gmm8", "--steps",
                                        "2", "--device", "cpu", "--set",
                                        "train.precision=\"fp16\""])
    assert done.returncode == 2
    assert done.stderr.strip() == ("bench: error: train.precision = fp16 needs CUDA (its "
                                   "gradient scaler), not cpu; use bf16 on the CPU")


def test_unknown_precision_is_refused(bench: Callable[..., subprocess.CompletedProcess[str]],
                                      ) -> None:
    done = bench("run", "--method", "edm", "--dataset", "gmm8", "--set",
                 "train.precision=\"fp8\"")
    assert done.returncode == 2
    assert "train.precision must be one of fp32, bf16, fp16" in done.stderr


@pytest.mark.slow
def test_killed_run_resumes_under_two_processes(workdir: Callable[[str], Path]) -> None:
    """SIGTERM a one-process run mid-training, resume it under torchrun with two processes:
    it ends with the weights of an uninterrupted one-process run."""
    import signal

    from tests.test_faults import spawn, wait_for_checkpoint

    args = [*RUN[:RUN.index("--steps") + 1], "400", *RUN[RUN.index("--steps") + 2:]]
    reference, killed = workdir("reference"), workdir("killed")
    assert run_in(reference, [], args).returncode == 0
    proc = spawn(args, killed)
    wait_for_checkpoint(killed, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err  # 143, as a shell reports it
    (run,) = runs_in(killed)
    assert run.info.status == "KILLED"
    resumed = run_in(killed, torchrun(2), ["run", "--resume", run.info.run_id])
    assert resumed.returncode == 0, resumed.stderr
    (run,) = runs_in(killed)
    assert run.info.status == "FINISHED"
    assert_same_weights(checkpoint_of(reference), checkpoint_of(killed), 400, atol=1e-3)
