"""bench perf's machinery end to end on the MLP case (the figures themselves come from
`bench perf` on a quiet machine: no timing is asserted here), and the sync-free non-finite
check of the training loop."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest
import torch
from rich.console import Console

from bench.engine.training import BatchStream, LoopHooks, NonFiniteLoss, new_loop_state, train_loop
from bench.perf.run import SAMPLE_NFES, cases, print_rows, run_perf, train_methods, write_json


def test_every_figure_on_the_mlp_case(tmp_path: Path) -> None:
    rows = run_perf(2, lambda line: None, case_names=["gmm8-mlp"], min_seconds=0.0,
                    block_seconds=0.0)
    keys = [(r["figure"], r["method"], r["nfe"]) for r in rows]
    assert train_methods() == ["edm", "pd", "cd", "scd", "ct", "ict", "ect", "sct",
                             "meanflow"]  # registration order
    expected = ([("train_overhead", m, None) for m in train_methods()]
                + [("sample_overhead", "cd", n) for n in SAMPLE_NFES]
                + [("eval_overhead", "cd", None), ("peak_memory_ratio", "cd", None)])
    assert keys == expected
    for row in rows:
        assert row["case"] == "gmm8-mlp"
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        assert row["target"] == {"train_overhead": 1.03 if row["method"] == "cd" else 1.05,
                                 "sample_overhead": 1.02, "eval_overhead": 1.05,
                                 "peak_memory_ratio": 1.10}[row["figure"]]
        if row["figure"] == "train_overhead":  # the store's writes are counted at their rate
            assert row["store_seconds_per_value"] > 0
            assert row["log_seconds_per_iteration"] > row["store_seconds_per_value"] / 50
        if row["figure"] == "peak_memory_ratio":
            assert row["bench_bytes"] > row["extra_bytes"] > 0
        else:
            assert row["bench_seconds"] > 0 and row["bare_seconds"] > 0
        assert row["denominator"]
        if row["figure"] == "peak_memory_ratio":
            assert "ratio_ci" not in row and row["threshold_in_ci"] is None
        else:  # the interval of every timed ratio, over the same rounds
            low, high = row["ratio_ci"]
            assert 0 < low <= high and math.isfinite(high)
        if row["figure"] in ("train_overhead", "sample_overhead"):
            low, high = row["vs_floor_ci"]
            assert 0 < low <= high and math.isfinite(high)
            assert row["threshold_in_ci"] == (low <= 1.03 <= high)
            # the MLP's training and sampling are judged against their floor, always timed
            assert row["judge"] == "floor" and row["floor_target"] == 1.03
            assert math.isfinite(row["floor_ratio"]) and row["floor_ratio"] > 0, row
            assert row["floor_seconds"] > 0 and row["floor"]
            # bench, floor and bare sides alternated in one loop: bench / floor of its medians
            assert math.isfinite(row["vs_floor"]) and row["vs_floor"] > 0
            assert row["pass"] == (row["vs_floor"] <= 1.03)
        else:
            assert "floor_ratio" not in row
            assert row["judge"] == "target" and row["pass"] == (row["ratio"] <= row["target"])
    console = Console(file=io.StringIO(), width=160)
    print_rows(rows, console)
    table = console.file.getvalue()  # type: ignore[attr-defined]
    assert all(figure in table for figure in ("train", "sample", "eval", "memory"))
    assert table.count("pass") + table.count("FAIL") == len(rows)
    assert "95% interval" in table
    unsure = sum(bool(r["threshold_in_ci"]) for r in rows)
    assert table.count("pass*") + table.count("FAIL*") == unsure
    path = tmp_path / "perf.json"
    write_json(rows, path, seconds=1.0)
    document = json.loads(path.read_text())
    assert document["rows"] == rows
    assert {"cpu", "threads", "torch", "device"} <= set(document["machine"])


def test_floors_are_timed_when_asked_and_name_what_they_add(tmp_path: Path) -> None:
    """floor True times every training and sampling floor, False none; the training floor
    names the passes, the optimizer step and each average of the method."""
    from bench.app.tracking import Tracker, default_tracking_uri
    from bench.perf.run import LOSS_FLOOR, _case, sample_overhead, train_overhead

    case = _case("gmm8-mlp")
    tracker = Tracker(default_tracking_uri(tmp_path), tmp_path)
    cpu = torch.device("cpu")
    by_target = dataclasses.replace(case, by_floor=False)
    row = train_overhead(by_target, "ct", 3, tracker, cpu, 0.0, 0.0, floor=True)
    assert row["floor"] == ("student fwd+bwd + target fwd + fused Adam step + eval EMA lerp + "
                            "target lerp")
    assert row["floor_seconds"] > 0 and row["floor_ratio"] > 0
    # a case judged by its floor: the method's own iteration without the loop
    row = train_overhead(case, "ct", 3, tracker, cpu, 0.0, 0.0)
    assert row["floor"] == LOSS_FLOOR and row["vs_floor"] > 0
    row = sample_overhead(case, 2, 3, cpu, 0.0, 0.0, floor=True)
    assert row["floor"] == "the bare loop with bench's per-sample noise streams"
    assert row["floor_seconds"] > 0 and row["floor_ratio"] > 0
    # a row judged by its floor has it even with floor False; one judged by its target not
    assert "floor_ratio" in sample_overhead(case, 1, 3, cpu, 0.0, 0.0, floor=False)
    for floorless in (train_overhead(by_target, "edm", 3, tracker, cpu, 0.0, 0.0, floor=False),
                      sample_overhead(by_target, 1, 3, cpu, 0.0, 0.0, floor=False)):
        assert "floor_ratio" not in floorless and floorless["judge"] == "target"


@pytest.mark.parametrize(("name", "averages"), [
    ("edm", ["eval EMA"]), ("cd", ["eval EMA"]), ("ct", ["eval EMA", "target"]),
    ("ict", ["eval EMA"]), ("pd", ["eval EMA", "stage average"])])
def test_the_training_floor_steps_the_optimizer_and_every_average(name: str,
                                                                   averages: list[str]) -> None:
    """The floor's iteration really trains its student copy (make_optimizer's fused Adam step)
    and moves each parameter average towards it, as many averages as the method's loop keeps
    (CD's target is the student itself unless cd.target_mu > 0)."""
    from bench.perf.run import _case, _config, _method, floor_training_step, parameter_averages

    case = _case("gmm8-mlp")
    cpu = torch.device("cpu")
    cfg = _config(case, name, cpu)
    method = _method(case, name, cfg, cpu)
    assert parameter_averages(method, name, cfg) == averages
    x0 = case.dataset.train_batch(torch.arange(64))
    step, what, modules = floor_training_step(method, name, x0, cfg)
    assert what.endswith(" + ".join(["fused Adam step", *(f"{a} lerp" for a in averages)]))
    assert len(modules) == 1 + len(averages)
    before = [torch.nn.utils.parameters_to_vector(m.parameters()).clone() for m in modules]
    assert all(torch.equal(b, before[0]) for b in before[1:])  # averages start at the student
    step()
    after = [torch.nn.utils.parameters_to_vector(m.parameters()) for m in modules]
    assert not torch.equal(after[0], before[0])  # the optimizer stepped the student
    expected = torch.lerp(before[0], after[0], 1.0 - cfg.train.ema_rate)
    for average in after[1:]:
        assert torch.equal(average, expected)
    original = torch.nn.utils.parameters_to_vector(method.student.parameters())
    assert not torch.equal(original, after[0])  # a copy trained, not the method's student


# what makes the host wait for the device on CUDA: reading a value, or an op whose output size
# depends on the data
HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select",
              "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive"}


def _host_reads(name: str, image: bool, nonfinite: Literal["stop", "skip"]) -> int:
    """Host reads of three training iterations of `name` (one train_loop call), outside
    torch.optim's step (whose fused CPU kernel reads each step count; on CUDA it does not)."""
    from torch.profiler import ProfilerActivity, profile

    from bench.perf.run import PerfCase, SyntheticImages, _case, _config, _method

    cpu = torch.device("cpu")
    labels = None
    if image:
        dataset = SyntheticImages((3, 8, 8), size=32)
        dataset.num_classes = 10
        labels = torch.arange(32) % 10
        case = PerfCase("tiny-unet", dataset, [
            "net.model_channels=8", "net.channel_mult=[1,2]", "net.num_res_blocks=1",
            "net.attn_resolutions=[4]", "net.dropout=0.1", "net.class_conditional=true"], 4, [])
    else:
        case = _case("gmm8-mlp")
    cfg = _config(case, name, cpu)
    cfg.train.nonfinite = nonfinite
    method = _method(case, name, cfg, cpu)
    state = new_loop_state(method, cfg.train, 0, cpu)
    stream = BatchStream(case.dataset.train_batch, len(case.dataset), labels, 4 if image else 64,
                         0, cpu)
    train_loop(method, cfg.train, stream, state, LoopHooks(), until=1)  # optimizer state made
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_loop(method, cfg.train, stream, state, LoopHooks(), until=4)

    def in_optimizer(event: object) -> bool:
        parent = event.cpu_parent  # type: ignore[attr-defined]
        while parent is not None:
            if parent.name.startswith("Optimizer.step"):
                return True
            parent = parent.cpu_parent
        return False

    return sum(1 for e in prof.events() if e.name in HOST_READS and not in_optimizer(e))


@pytest.mark.parametrize("image", [False, True], ids=["mlp", "conditional-unet"])
def test_training_iterations_never_wait_for_the_device(image: bool) -> None:
    """Every training method's iterations read nothing back from the device (on CUDA each read
    would stall the queue of kernels): with train.nonfinite = "stop" three iterations make one
    host read, the loop's finiteness check when it returns; "skip" reads every iteration's
    loss (three), which shows the count sees such reads. Counted with torch's profiler on the
    CPU, on the 2-D MLP and on a small class-conditional UNet with dropout."""
    from bench.perf.run import train_methods

    reads = {name: _host_reads(name, image, "stop") for name in train_methods()}
    assert reads == dict.fromkeys(train_methods(), 1)
    assert _host_reads("ict", image, "skip") == 3


class _Exploding:
    """Wraps a method so that its loss turns non-finite from iteration `at` on."""

    def __init__(self, method: object, at: int) -> None:
        self.method = method
        self.at = at

    def __getattr__(self, name: str) -> object:
        return getattr(self.method, name)

    def loss(self, x0: torch.Tensor, labels: torch.Tensor | None, step: int,
             generator: torch.Generator) -> torch.Tensor:
        loss = self.method.loss(x0, labels, step, generator)  # type: ignore[attr-defined]
        return loss * float("nan") if step >= self.at else loss


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_a_non_finite_loss_stops_the_loop_before_any_checkpoint(tmp_path: Path,
                                                                grad_clip: float) -> None:
    """Checked on the loss, or on the gradient norm when clipping: either way the first
    non-finite iteration is named and no later checkpoint is written."""
    from bench.perf.run import _config, _method

    case = cases()[0]
    device = torch.device("cpu")
    cfg = _config(case, "edm", device)
    method = _method(case, "edm", cfg, device)
    state = new_loop_state(method, cfg.train, 0, device)
    stream = BatchStream(case.dataset.train_batch, len(case.dataset), None, 64, 0, device)
    saved: list[int] = []
    hooks = LoopHooks(checkpoint=lambda s: saved.append(s.step))
    train = cfg.train
    train.checkpoint_every, train.log_every, train.grad_clip = 4, 50, grad_clip
    with pytest.raises(NonFiniteLoss, match=r"\(nan\) at iteration 6;"):
        train_loop(_Exploding(method, 6), train, stream, state, hooks,  # type: ignore[arg-type]
                   until=20)
    assert saved == [4]  # the checkpoint due at 8 would hold non-finite weights: never written


def test_one_hash_for_ints_numpy_and_tensors_and_one_noise_path_for_both() -> None:
    """mix32 is the lowbias32 hash (a reference written from its definition) on Python ints,
    numpy uint32 and int64 arrays and torch int64 tensors alike; on the CPU the noise is hashed
    in numpy's uint32, on any other device in int64 tensor ops: the same code and the same
    values, in float32 and float64."""
    import numpy as np

    from bench.diffusion.rng import StackedGenerator, _index_array, _Streams, mix32

    def lowbias32(x: int) -> int:
        x ^= x >> 16
        x = x * 0x7FEB352D % 2**32
        x ^= x >> 15
        x = x * 0x846CA68B % 2**32
        return x ^ (x >> 16)

    edge = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 123456789, 0x846CA68B]
    expected = [lowbias32(x) for x in edge]
    assert [mix32(x) for x in edge] == expected
    assert mix32(np.array(edge, dtype=np.int64)).tolist() == expected
    assert mix32(np.array(edge, dtype=np.uint32)).tolist() == expected
    assert mix32(torch.tensor(edge, dtype=torch.int64)).tolist() == expected
    for seed, indices in ((0, range(0, 50)), (2**40 + 3, [7, 2**32 - 1, 0, 5])):
        numpy_path = StackedGenerator(seed, indices)
        assert isinstance(numpy_path._streams.key1, np.ndarray)
        assert numpy_path._streams.key1.dtype == np.uint32
        tensor_path = StackedGenerator(seed, indices)  # keyed and hashed in tensor ops
        tensor_path._streams = _Streams(seed, torch.from_numpy(_index_array(indices)))
        for shape, dtype in (((3, 8, 8), torch.float32), ((2,), torch.float64),
                             ((3, 8, 8), torch.float64)):
            assert torch.equal(numpy_path.randn(shape, dtype), tensor_path.randn(shape, dtype))


def test_the_noise_of_a_seed_never_moves() -> None:
    """The first two draws of seed 0's streams 0, 5 and 2^32 - 1, as the hash in int64 arrays
    made them before it moved to uint32 (to float64 rounding of log and cos): a change that
    moves them moves every sampled file and metric."""
    from bench.diffusion.rng import StackedGenerator

    streams = StackedGenerator(0, [0, 5, 2**32 - 1])
    first = torch.tensor([
        [-0.48863177087228765, 0.608023942160273, -0.31186769368427397, -2.0832846930838183],
        [2.658154646262548, -0.220626756119851, -0.6082719346817684, 0.8651649563030163],
        [-0.9698533660279072, 1.7365363042106006, 1.7615045586138578, 0.15416774893047197]],
        dtype=torch.float64)
    second = torch.tensor([[1.4754214476648213, 2.293489632106823],
                           [-0.2964085775766592, 0.5452197006946561],
                           [1.7266331913170867, -1.828817574667896]], dtype=torch.float64)
    for shape, expected in (((4,), first), ((2,), second)):
        torch.testing.assert_close(streams.randn(shape, torch.float64), expected, rtol=1e-13,
                                   atol=1e-13)


@pytest.mark.parametrize(("optimizer", "weight_decay", "expected"), [
    ("adam", 0.0, torch.optim.Adam), ("adam", 0.01, torch.optim.AdamW),
    ("radam", 0.0, torch.optim.RAdam), ("radam", 0.01, torch.optim.RAdam)])
def test_make_optimizer_is_torchs_fused_optimizer_where_torch_has_one(
        optimizer: str, weight_decay: float, expected: type[torch.optim.Optimizer]) -> None:
    """Adam and AdamW run torch's fused implementation on the CPU, RAdam (no fused one) its
    foreach implementation, with the configured hyperparameters; parameters on a device
    without fused kernels get foreach."""
    import inspect

    from bench.core.config import TrainConfig
    from bench.engine.training import make_optimizer

    cfg = TrainConfig(optimizer=optimizer, weight_decay=weight_decay, lr=3e-3, beta1=0.8,
                      beta2=0.95)
    net = torch.nn.Linear(3, 2)
    opt = make_optimizer(list(net.parameters()), cfg)
    group = opt.param_groups[0]
    assert type(opt) is expected
    fused = "fused" in inspect.signature(expected).parameters
    assert (bool(group.get("fused")), bool(group["foreach"])) == (fused, not fused)
    assert (group["lr"], group["betas"], group["weight_decay"]) == (3e-3, (0.8, 0.95),
                                                                    weight_decay)
    if optimizer == "radam":
        assert group["decoupled_weight_decay"] == (weight_decay > 0)
    meta = make_optimizer(list(torch.nn.Linear(3, 2, device="meta").parameters()), cfg)
    assert not meta.param_groups[0].get("fused") and meta.param_groups[0]["foreach"]


def test_a_checkpoint_with_shared_step_counts_loads_and_continues_identically(
        tmp_path: Path) -> None:
    """Checkpoints of earlier versions hold every parameter's Adam step count as a view of
    one tensor. Such a checkpoint loads (weights_only) with each count a tensor of its own,
    and the loaded optimizer continues exactly as the one that never stopped."""
    import copy

    from bench.core.config import TrainConfig
    from bench.engine.checkpoint import load_checkpoint, save_checkpoint
    from bench.engine.training import LoopState, load_loop_state, loop_state_dict, make_optimizer

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 3))
    cfg = TrainConfig(lr=1e-2)
    opt = make_optimizer(list(net.parameters()), cfg)

    def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, k: int) -> None:
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(k))
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    for k in range(3):
        train(net, opt, k)
    twin = copy.deepcopy(net)
    saved = loop_state_dict(LoopState(3, opt, None, torch.Generator()))
    states = list(saved["optimizer"]["state"].values())
    shared = torch.stack([s["step"] for s in states])  # the earlier layout
    for i, s in enumerate(states):
        s["step"] = shared[i]
    save_checkpoint({"loop": saved}, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")["loop"]
    steps = [s["step"] for s in loaded["optimizer"]["state"].values()]
    assert len({t.untyped_storage().data_ptr() for t in steps}) == 1  # still one tensor
    twin_opt = make_optimizer(list(twin.parameters()), cfg)
    state = LoopState(0, twin_opt, None, torch.Generator())
    load_loop_state(state, loaded)
    assert state.step == 3
    own = [s["step"] for s in twin_opt.state.values()]
    assert len({t.untyped_storage().data_ptr() for t in own}) == len(own)
    for k in range(3, 6):
        train(net, opt, k)
        train(twin, twin_opt, k)
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(opt.state.values(), twin_opt.state.values(), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert all(float(s["step"]) == 6 for s in twin_opt.state.values())


def test_param_average_is_lerp_per_element_and_follows_swapped_tensors() -> None:
    """An update is lerp(average, model, 1 - rate) element by element (the same bits as
    torch.lerp), buffers are copied, an average keeps following a model whose tensors are
    swapped after it was built (as .to() does), and modules that differ are refused."""
    import copy

    from bench.nets.averaging import ParamAverage

    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Linear(8, 2))
    avg = copy.deepcopy(model)
    reference = [p.detach().clone() for p in avg.parameters()]
    pointers = [p.data_ptr() for p in [*model.parameters(), *avg.parameters()]]
    average = ParamAverage(avg, model)
    for k, rate in enumerate((0.9, 0.999, 0.3)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * (k + 1))
            model[1].running_mean.add_(1.0)
        average.update(rate)
        reference = [torch.lerp(r, p.detach(), 1.0 - rate)
                     for r, p in zip(reference, model.parameters(), strict=True)]
        for r, a in zip(reference, avg.parameters(), strict=True):
            assert torch.equal(a, r)
        assert torch.equal(avg[1].running_mean, model[1].running_mean)
    assert [p.data_ptr() for p in [*model.parameters(), *avg.parameters()]] == pointers
    for p in model.parameters():  # new tensors under the same Parameter objects
        p.data = p.data.clone() + 1.0
    average.update(0.0)
    for p, a in zip(model.parameters(), avg.parameters(), strict=True):
        assert torch.equal(a, p)
    with pytest.raises(ValueError, match="differ in structure"):
        ParamAverage(torch.nn.Linear(2, 8), torch.nn.Linear(8, 2))


def test_training_leaves_the_students_parameter_storage_alone() -> None:
    """The loop trains the student's own parameter tensors: none is moved into a shared
    buffer, before or after iterations (the eval EMA and a CT target alike)."""
    from bench.perf.run import _config, _method

    case = cases()[0]
    device = torch.device("cpu")
    cfg = _config(case, "ct", device)
    method = _method(case, "ct", cfg, device)
    student = method.student
    pointers = [p.data_ptr() for p in student.parameters()]
    state = new_loop_state(method, cfg.train, 0, device)
    stream = BatchStream(case.dataset.train_batch, len(case.dataset), None, 64, 0, device)
    before = [p.detach().clone() for p in student.parameters()]
    train_loop(method, cfg.train, stream, state, LoopHooks(), until=2)
    assert [p.data_ptr() for p in student.parameters()] == pointers
    assert not any(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    for module in (student, state.ema, method.target):
        for p in module.parameters():  # each parameter alone in its storage
            assert p.untyped_storage().nbytes() == p.numel() * p.element_size()


def test_reserved_draws_equal_the_draws_made_one_by_one() -> None:
    """reserve() computes later draws in one pass: every draw keeps its value, whatever is
    asked for in between (another shape drops what was reserved; nothing is skipped)."""
    from bench.diffusion.rng import StackedGenerator

    indices = range(3, 40)
    plain = StackedGenerator(7, indices)
    expected = [plain.randn((2,)) for _ in range(3)] + [plain.randn((3,)), plain.randn((2,))]
    ahead = StackedGenerator(7, indices)
    ahead.reserve((2,), 4)
    got = [ahead.randn((2,)) for _ in range(3)] + [ahead.randn((3,)), ahead.randn((2,))]
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)
    fresh = StackedGenerator(7, indices)
    fresh.reserve((2,), 3)
    assert torch.equal(fresh.randn((2,), torch.float64),
                       StackedGenerator(7, indices).randn((2,), torch.float64))


def test_the_epoch_order_is_randperms_held_in_int32() -> None:
    """The loop's epoch permutation is held as int32 (half the memory over a whole epoch) and
    is the same order as torch's int64 randperm of the epoch's seed, so batches are unchanged."""
    from bench.diffusion.rng import sample_seed

    data = torch.arange(1000.0).reshape(500, 2)
    stream = BatchStream(lambda i: data[i], 500, None, 64, 7, torch.device("cpu"))
    for epoch, step in ((0, 0), (0, 3), (1, 8), (2, 16)):  # steps wholly inside an epoch
        perm = torch.randperm(500, generator=torch.Generator().manual_seed(sample_seed(7, epoch)))
        start = step * 64 - epoch * 500
        wanted = perm[start:start + 64]
        got = stream.indices(step)
        assert got.dtype == torch.int32
        assert torch.equal(got.long(), wanted)
        assert torch.equal(stream.batch(step)[0], data[wanted])


def test_the_ratio_interval_holds_the_ratio_and_narrows_with_the_rounds() -> None:
    """The interval of a ratio of medians (rounds resampled whole, seeded) holds the ratio and
    the true one, and narrows as the rounds grow."""
    import numpy as np

    from bench.perf.run import ratio_interval

    def rounds(n: int, seed: int) -> tuple[list[float], list[float]]:
        rng = np.random.default_rng(seed)
        bare = 0.2 * (1 + 0.03 * rng.standard_normal(n))
        bench = 1.03 * 0.2 * (1 + 0.03 * rng.standard_normal(n))
        return bench.tolist(), bare.tolist()

    bench, bare = rounds(20, 0)
    low, high = ratio_interval(bench, bare)
    ratio = float(np.median(bench) / np.median(bare))
    assert low <= ratio <= high and low <= 1.03 <= high
    assert ratio_interval(bench, bare) == [low, high]  # seeded
    wide = [ratio_interval(*rounds(20, seed)) for seed in range(5)]
    narrow = [ratio_interval(*rounds(320, seed)) for seed in range(5)]
    assert (np.median([h - lo for lo, h in narrow])
            < 0.5 * np.median([h - lo for lo, h in wide]))
    assert all(lo <= 1.03 <= h for lo, h in narrow)
    with pytest.raises(ValueError, match="paired rounds"):
        ratio_interval([1.0, 2.0], [1.0])


@pytest.mark.parametrize(("ratio", "extended"), [(1.10, False), (0.95, False), (1.03, True)])
def test_rounds_go_on_while_the_interval_holds_the_threshold(ratio: float,
                                                             extended: bool) -> None:
    """A verdict left open by the noise gets more rounds (up to EXTEND_FACTOR times); one
    clear of its threshold, above or below, stops at the rounds asked for."""
    import numpy as np

    from bench.perf.run import EXTEND_FACTOR, _alternated, _settled

    def side(scale: float, seed: int) -> Callable[[], float]:
        rng = np.random.default_rng(seed)
        return lambda: scale * float(1 + 0.02 * rng.standard_normal())

    times = _alternated([side(ratio, 0), side(1.0, 1)], 20, 0.0, _settled(0, 1, 1.03))
    assert len(times[0]) == len(times[1]) == (20 * EXTEND_FACTOR if extended else 20)
    assert len(_alternated([side(1.03, 0), side(1.0, 1)], 20, 0.0)[0]) == 20  # not judged


def test_sides_take_turns_in_varied_order_once_per_round() -> None:
    """Every side runs once per round, and no side always runs right after the same one (a
    fixed order let one side pay for its predecessor's leftovers)."""
    import statistics

    from bench.perf.run import _alternated

    calls: list[int] = []

    def side(k: int) -> Callable[[], float]:
        def run() -> float:
            calls.append(k)
            return float(k + 1)
        return run

    times = _alternated([side(0), side(1), side(2)], 30, 0.0)
    rounds, medians = len(times[0]), [statistics.median(t) for t in times]
    assert rounds == 30 and medians == [1.0, 2.0, 3.0]
    assert len(calls) == 90
    for r in range(rounds):
        assert sorted(calls[3 * r:3 * r + 3]) == [0, 1, 2]
    for k in range(3):
        before = {calls[i - 1] for i in range(1, len(calls)) if calls[i] == k}
        assert len(before) > 1, (k, before)
    first = list(calls)
    calls.clear()
    _alternated([side(0), side(1), side(2)], 30, 0.0)
    assert calls == first  # seeded: the same orders every run
