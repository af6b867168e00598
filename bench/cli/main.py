"""The `bench` command line: each command parses, validates and calls one library function.

Heavy imports (torch, mlflow) happen inside the commands so that `bench --help` is instant.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="bench",
    help="Train, evaluate and compare consistency models and diffusion baselines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)



@app.callback()
def _registry() -> None:
    # before any command: the methods (built-in, then plug-ins), whose config sections every
    # config, bench.toml and preset is checked against
    import methods  # noqa: F401


SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config key: --set train.lr=3e-4 (repeatable; TOML values).")]
TrackingOption = Annotated[str | None, typer.Option(
    "--tracking-uri", help="MLflow tracking URI (default sqlite:///runs/mlflow.db).")]
NfeOption = Annotated[str | None, typer.Option(
    "--nfe", help="Comma-separated NFEs to evaluate, e.g. 1,2,4.")]


def parse_nfe(text: str | None) -> list[int] | None:
    """'1,2,4' -> [1, 2, 4]; anything else is a usage error."""
    from bench.core.errors import UsageError

    if text is None:
        return None
    values = []
    for part in text.split(","):
        part = part.strip()
        if not (part.isascii() and part.isdigit()) or len(part) > 18 or int(part) < 1:
            raise UsageError(f"--nfe expects positive integers separated by commas, got {text!r}")
        values.append(int(part))
    return values


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _report(message: str) -> None:
    from bench.app.tracking import mask_credentials

    _console(stderr=True).print(f"[dim]{mask_credentials(message)}[/dim]", markup=True)


def _tracker(flag: str | None, sets: list[str] | None = None) -> Any:
    """The tracker for the store named by the flag, the environment or bench.toml."""
    from bench.app.tracking import Tracker, resolve_tracking_uri
    from bench.core.config import default_bench_files, resolve

    resolved = resolve(bench_files=default_bench_files(Path.cwd()), sets=sets or [])
    runs_dir = Path(resolved.config.tracking.runs_dir)
    uri = resolve_tracking_uri(flag, resolved.config.tracking.uri, runs_dir)
    return Tracker(uri, runs_dir, outbox_wait=resolved.config.tracking.outbox_wait)


class _Progress:
    """A rich progress bar fed by the training loop's log steps."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4g}"), TextColumn("{task.fields[rate]} it/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=_console(stderr=True),
            transient=False)
        self.task: Any = None
        self.last: tuple[float, int] | None = None

    def __enter__(self) -> _Progress:  # shown from the first step on: a command that fails
        return self  # before training prints no empty bar (nor the blank line it leaves)

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.progress.stop()

    def __call__(self, step: int, total: int, loss: float) -> None:
        import time

        now = time.perf_counter()
        rate = "-"
        if self.last is not None and step > self.last[1]:
            rate = f"{(step - self.last[1]) / max(now - self.last[0], 1e-9):.0f}"
        self.last = (now, step)
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("train", total=total, loss=loss, rate=rate)
        self.progress.update(self.task, completed=step, loss=loss, rate=rate)


def _print_metric_table(title: str, rows: list[tuple[int, dict[str, float], float]],
                        run_id: str, seconds: float,
                        spreads: list[dict[str, float]] | None = None) -> None:
    """One row per NFE (nfe, metrics, seconds per sample), then the run id and duration; a
    metric with a standard deviation over seed sets in `spreads` shows as mean ± std."""
    from rich.table import Table

    table = Table(title=title)
    metrics = list(dict.fromkeys(k for _, values, _ in rows for k in values))
    table.add_column("NFE", justify="right")
    for m in metrics:
        table.add_column(m, justify="right")
    table.add_column("s/sample", justify="right")
    for i, (nfe, values, per_sample) in enumerate(rows):
        spread = spreads[i] if spreads else {}
        cells = [("-" if m not in values else
                  f"{values[m]:.4f} ± {spread[f'{m}_seeds_std']:.4f}"
                  if f"{m}_seeds_std" in spread else f"{values[m]:.4f}") for m in metrics]
        table.add_row(str(nfe), *cells, f"{per_sample:.2e}")
    console = _console()
    console.print(table)
    if spreads and any(spreads):
        console.print("mean ± standard deviation over the evaluation seed sets")
    console.print(f"run id: {run_id}  ({seconds:.1f} s)")


def _print_outcome(outcome: Any) -> None:
    if not outcome.results:
        _console().print(f"evaluation off (eval.nfe = []): `bench eval --run {outcome.run_id} "
                         f"--nfe 1,2` evaluates it later, where the metric weights are")
        _console().print(f"run id: {outcome.run_id}  ({outcome.seconds:.1f} s)")
        return
    rows = [(r.nfe_measured, r.metrics, r.seconds_per_sample) for r in outcome.results]
    _print_metric_table(f"{outcome.method} on {outcome.dataset}", rows, outcome.run_id,
                        outcome.seconds, [r.spread() for r in outcome.results])


@app.command()
def run(
    method: Annotated[str | None, typer.Option(help="Method (see `bench methods`).")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="Dataset (see `bench datasets`) or folder:PATH.")] = None,
    teacher: Annotated[str | None, typer.Option(
        help="Teacher: MLflow run id, checkpoint path, analytic or auto.")] = None,
    nfe: NfeOption = None,
    steps: Annotated[int | None, typer.Option(help="Training iterations.", min=0)] = None,
    seed: Annotated[int | None, typer.Option(help="Training seed.", min=0)] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="A config.toml (e.g. one saved by an earlier run).")] = None,
    set_: SetOption = None,
    tracking_uri: TrackingOption = None,
    resume: Annotated[str | None, typer.Option(
        help="Continue a killed or failed run (its id) from its last checkpoint.")] = None,
    nproc: Annotated[int | None, typer.Option(
        help="Train with this many processes on this machine (DistributedDataParallel "
             "under torchrun).", min=1)] = None,
    no_eval: Annotated[bool, typer.Option(
        "--no-eval", help="Evaluation off (eval.nfe = []): train here, `bench eval` later "
                          "where the metric weights are.")] = False,
) -> None:
    """Train (if the method trains) and evaluate one method on one dataset."""
    from bench.app.tracking import RUN_ID_PATTERN
    from bench.core.config import default_bench_files, resolve

    if nproc is not None:
        _relaunch(nproc)
    shard = _shard()
    if no_eval and nfe is not None:
        from bench.core.errors import UsageError

        raise UsageError("--no-eval and --nfe contradict each other: give one")
    flags = {"method": method, "dataset": dataset, "teacher": teacher,
             "eval.nfe": [] if no_eval else parse_nfe(nfe), "train.steps": steps, "seed": seed,
             "device": device}
    if resume:
        from bench.core.errors import BenchError, UsageError

        if not RUN_ID_PATTERN.match(resume):  # before the slow imports
            raise BenchError(f"unknown run id {resume!r} (run ids are 32 hex characters)")
        if config is not None:
            raise UsageError("--config cannot be given with --resume: a resumed run keeps its "
                             "own config")
        from bench.app import runner

        tracker = _tracker(tracking_uri)
        if not shard.is_main:  # another rank of a torchrun: rank 0 reports
            runner.resume(tracker, resume, _report, shard=shard, flags=flags, sets=set_)
            return
        with _Progress() as progress:
            outcome = runner.resume(tracker, resume, _report, progress, shard, flags, set_)
        _print_outcome(outcome)
        return
    resolved = resolve(bench_files=default_bench_files(Path.cwd()), config_file=config,
                       flags=flags, sets=set_ or [])
    shard.local_size(resolved.config.train.batch_size)  # an uneven split fails at once
    from bench.app import runner  # torch, mlflow: after the config is known to be valid

    announce = None
    if resolved.preset:
        announce = f"presets: {resolved.preset}" + (
            f" ({resolved.preset_description})" if resolved.preset_description else "")
    tracker = _tracker(tracking_uri, set_)
    if not shard.is_main:  # another rank of a torchrun: rank 0 reports
        runner.start(resolved.config, tracker, _report, shard=shard)
        return
    with _Progress() as progress:
        outcome = runner.start(resolved.config, tracker, _report, progress, announce=announce,
                               shard=shard)
    _print_outcome(outcome)


def _shard() -> Any:
    """This process's rank and the number of processes, from torchrun's environment."""
    from bench.engine.distributed import shard_from_env

    return shard_from_env()


def _relaunch(nproc: int) -> None:
    """Run this same command again under torch.distributed.run with nproc processes on this
    machine (a free rendezvous port is picked); --nproc 1 simply continues."""
    from bench.core.errors import UsageError

    if "WORLD_SIZE" in os.environ:
        raise UsageError("--nproc inside torchrun: pass one or the other")
    if nproc == 1:
        return
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "bench", *args]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


@app.command("import")
def import_(
    checkpoint: Annotated[Path, typer.Option(
        help="A checkpoint released with the consistency-models PyTorch code (state dict).")],
    kind: Annotated[str, typer.Option(
        help="The method it was trained with (`bench methods`: the ones marked 'import').")],
    dataset: Annotated[str, typer.Option(help="imagenet64, lsun-bedroom or lsun-cat.")],
    name: Annotated[str | None, typer.Option(help="Run name.")] = None,
    teacher: Annotated[str, typer.Option(
        help="Distillation: the teacher's run id, or auto (the newest finished teacher run)."
    )] = "auto",
    set_: SetOption = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Turn an official checkpoint into a finished run that `bench eval` can evaluate."""
    from bench.app.importer import ImportRequest, import_checkpoint

    request = ImportRequest(checkpoint=checkpoint, kind=kind, dataset=dataset, name=name,
                            teacher=teacher, sets=tuple(set_ or ()))
    run_id = import_checkpoint(_tracker(tracking_uri, set_), request, Path.cwd(), _report)
    _console().print(f"run id: {run_id}")


@app.command()
def sweep(
    method: Annotated[str, typer.Option(help="Method (see `bench methods`).")],
    dataset: Annotated[str, typer.Option(help="Dataset (see `bench datasets`).")],
    space: Annotated[list[str], typer.Option(
        help="Search space: a built-in name (`bench methods` lists each method's) or a .toml "
             "file; repeat to combine.")],
    trials: Annotated[int, typer.Option(
        help="Finished (complete or pruned) trials the study should hold.", min=1)],
    objective: Annotated[list[str] | None, typer.Option(
        help="METRIC@NFE to optimise, e.g. w2@1 (default: the dataset's metric at NFE 1); "
             "several (repeated or comma-separated) make a multi-objective study.")] = None,
    storage: Annotated[str | None, typer.Option(
        help="Optuna storage: journal file path or URL (sqlite:///, postgresql://, mysql://); "
             "default runs/optuna.journal.")] = None,
    study: Annotated[str | None, typer.Option(
        help="Study name (default <method>-<dataset>-<space>); same storage and name = "
             "the same study, resumed or joined.")] = None,
    workers: Annotated[int, typer.Option(help="Worker processes on this machine.", min=1)] = 1,
    pruner: Annotated[str, typer.Option(help="median, hyperband or none.")] = "median",
    timeout: Annotated[float | None, typer.Option(
        help="Start no new trial after this many seconds.", min=0)] = None,
    heartbeat: Annotated[float, typer.Option(
        help="Seconds between a worker's heartbeats; a trial silent for 4x this long on a "
             "database (12x on a journal file) is failed and run again.", min=1)] = 15.0,
    set_: SetOption = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Optuna sweep: each trial is a `bench run` with --set overrides, nested in MLflow."""
    from sweeps import SweepRequest, run_sweep
    from sweeps.summary import print_summary

    request = SweepRequest(method=method, dataset=dataset, spaces=tuple(space), trials=trials,
                           objectives=tuple(objective or ()), storage=storage, study=study,
                           workers=workers, pruner=pruner, timeout=timeout,
                           heartbeat=heartbeat, sets=tuple(set_ or ()),
                           tracking_uri=tracking_uri)
    summary = run_sweep(request, _report)
    print_summary(summary, _console())
    if summary.timed_out and not summary.complete:
        _report(f"--timeout reached with {summary.finished} of {summary.target} trials "
                f"finished; re-run the same command to continue")
    elif not summary.complete:
        from bench.core.errors import BenchError

        raise BenchError(f"study {summary.study!r} has {summary.finished} of {summary.target} "
                         f"finished trials; re-run the same command to continue")


@app.command()
def sync(tracking_uri: TrackingOption = None) -> None:
    """Deliver the tracking writes (metrics, tags, checkpoints, a run's end) that runs of this
    folder kept in runs/outbox while their tracking server was unreachable."""
    tracker = _tracker(tracking_uri)
    left = tracker.deliver_outbox(_report)
    if left:
        from bench.core.errors import BenchError

        raise BenchError(f"{left} run(s) still have writes waiting in "
                         f"{tracker.outbox.folder}; run `bench sync` again")
    _report(f"nothing waits in {tracker.outbox.folder}")


@app.command("eval")
def eval_(
    run_id: Annotated[str, typer.Option("--run", help="MLflow run id.")],
    nfe: NfeOption = None,
    seeds: Annotated[int | None, typer.Option(
        help="Evaluation seed sets (default: the run's eval.seeds): each metric's mean, "
             "standard deviation and best over the sets are logged.", min=1, max=1000)] = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Evaluate a tracked run again (at other NFEs, or under more seeds), logging into the
    same run."""
    from bench.app import runner

    nfes = parse_nfe(nfe)
    outcome = runner.evaluate_run(_tracker(tracking_uri), run_id, nfes, _report, seeds)
    _print_outcome(outcome)


@app.command()
def sample(
    run_id: Annotated[str, typer.Option("--run", help="MLflow run id.")],
    nfe: Annotated[int, typer.Option(help="Network calls per sample.", min=1)],
    n: Annotated[int, typer.Option("--n", help="Number of samples.", min=1)],
    out: Annotated[Path, typer.Option(help="Output .npz file (array x).")],
    seed: Annotated[int, typer.Option(help="Sampling seed: sample i uses (seed, i).",
                                      min=0)] = 0,
    batch_size: Annotated[int, typer.Option(help="Samples per batch.", min=1)] = 500,
    compile_net: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the network first (CUDA: with CUDA graphs); pays "
                          "off on long sampling jobs.")] = False,
    tracking_uri: TrackingOption = None,
) -> None:
    """Write samples of a tracked run to an .npz file; the same seed gives the same file."""
    from bench.core.outputs import check_output_file

    check_output_file(out, "--out")  # before the run is loaded and sampled
    from bench.app import runner

    path = runner.sample_run(_tracker(tracking_uri), run_id, nfe, n, seed, batch_size, out,
                             _report, compile_net)
    _console().print(f"wrote {path}  (run id: {run_id})")


@app.command("ode-error")
def ode_error(
    run_id: Annotated[str, typer.Option("--run", help="MLflow run id (gmm8 or gmm25).")],
    nfe: NfeOption = None,
    ddim_nfe: Annotated[str, typer.Option(help="DDIM NFEs to compare with.")] = "1,2,4,8,16",
    tracking_uri: TrackingOption = None,
) -> None:
    """Mean L2 distance to the exact PF-ODE solution of the same noise, next to DDIM."""
    from rich.table import Table

    from bench.app import runner

    errors = runner.ode_error_run(_tracker(tracking_uri), run_id, parse_nfe(nfe),
                                  parse_nfe(ddim_nfe) or [], _report)
    table = Table(title="distance to the exact PF-ODE solution (2,000 noises, Heun 512 steps)")
    table.add_column("sampler")
    table.add_column("NFE", justify="right")
    table.add_column("mean L2 error", justify="right")
    for k, v in errors.run.items():
        table.add_row("this run", str(k), f"{v:.4f}")
    for k, v in errors.ddim.items():
        table.add_row("ddim (exact denoiser)", str(k), f"{v:.4f}")
    _console().print(table)
    _console().print(f"run id: {run_id}")


@app.command()
def edit(
    run_id: Annotated[str, typer.Option("--run", help="MLflow run id of a cd, ct or ict run.")],
    task: Annotated[str, typer.Option(
        help="inpaint, colorize, superres, denoise, interpolate or stroke.")],
    n: Annotated[int, typer.Option("--n", help="Images to edit (2-D data: observed points).",
                                   min=1)] = 16,
    mask: Annotated[str, typer.Option(help="Inpainting mask: center, half or random.")
                    ] = "center",
    nfe: NfeOption = None,
    factor: Annotated[int, typer.Option(help="Super-resolution / stroke patch size.", min=2)
                      ] = 2,
    sigma: Annotated[float | None, typer.Option(
        help="denoise: noise level (0.5); stroke: start level (1.0); inpaint, colorize, "
             "superres: first level t_1 (default: half the dataset's sigma_data; 80 for "
             "the paper's sigma_max start).")] = None,
    seed: Annotated[int, typer.Option(help="Editing seed: image i uses (seed, i).", min=0)] = 0,
    tracking_uri: TrackingOption = None,
) -> None:
    """Zero-shot editing (Song et al. 2023, Algorithm 4), scored and logged as a nested run."""

    from bench.app.edit import EditRequest, edit_run

    nfes = parse_nfe(nfe)
    request = EditRequest(run_id=run_id, task=task, n=n, mask=mask,
                          nfe=tuple(nfes) if nfes else None, factor=factor, sigma=sigma,
                          seed=seed)
    outcome = edit_run(_tracker(tracking_uri), request, _report)
    rows = [(r.nfe, r.metrics, r.seconds_per_sample) for r in outcome.results]
    _print_metric_table(f"{outcome.task} on {outcome.dataset} with run {outcome.source_run} "
                        f"(baseline: {outcome.baseline})", rows, outcome.run_id, outcome.seconds)


@app.command()
def refstats(
    dataset: Annotated[str, typer.Option(help="Dataset (see `bench datasets`) or folder:PATH.")],
    config: Annotated[Path | None, typer.Option("--config", help="A config.toml.")] = None,
    set_: SetOption = None,
) -> None:
    """Compute and cache the image-metric reference statistics of a dataset."""
    from bench.core.config import default_bench_files, resolve
    from bench.data.datasets import get_dataset
    from bench.engine.fid import precompute_reference_stats

    cfg = resolve(bench_files=default_bench_files(Path.cwd()), config_file=config,
                  flags={"dataset": dataset}, sets=set_ or []).config
    data = get_dataset(cfg.dataset, cfg.data.path or None)
    if data.kind != "image":
        from bench.core.errors import UsageError

        raise UsageError(f"bench refstats computes image-metric reference statistics; "
                         f"{data.name} holds {data.kind}, whose metrics need none")
    for path in precompute_reference_stats(data, cfg, Path(cfg.tracking.runs_dir) / "cache"):
        _console().print(f"reference statistics: {path}")


@app.command()
def datasets() -> None:
    """List the datasets: name, shape, size, sigma_data and availability here.

    Image folders (folder:PATH, lsun-*, imagenet64 as class subfolders) are read recursively;
    links are followed, but each real folder and each real file only once, so link loops end
    and no image counts twice.
    """
    from rich.table import Table

    from bench.core.config import default_bench_files
    from bench.data.datasets import list_datasets

    paths: dict[str, str] = {}
    for f in default_bench_files(Path.cwd()):
        for name, section in f.data_tables.items():
            if section.get("path"):
                paths[name] = str(section["path"])
    table = Table(title="datasets")
    for col in ("name", "kind", "shape", "size", "sigma_data", "available"):
        table.add_column(col)
    for info in list_datasets(paths):
        available = "yes" if info.available else f"no: {info.note}"
        table.add_row(info.name, info.kind, "x".join(map(str, info.shape)),
                      "-" if info.size is None else str(info.size), f"{info.sigma_data:g}",
                      available)
    _console().print(table)


@app.command()
def methods() -> None:
    """List the registered methods."""
    from rich.table import Table

    from methods import all_methods

    table = Table(title="methods")
    for col in ("name", "label", "group", "trains", "teacher", "can", "spaces"):
        table.add_column(col, no_wrap=col in ("name", "label"))
    for cls in all_methods():
        can = [c for c, ok in (("edit", cls.can_edit), ("import", cls.official_import),
                               ("suite", cls.in_suite)) if ok]
        table.add_row(cls.name, cls.display_label(), cls.group, "yes" if cls.trains else "no",
                      "needed" if cls.needs_teacher else
                      ("provides" if cls.provides_teacher else "-"),
                      ", ".join(can) or "-", ", ".join(p.stem for p in cls.search_spaces) or "-")
    console = _console()
    console.print(table)
    for cls in all_methods():  # the summaries, and the module each method comes from
        console.print(f"[bold]{cls.name}[/bold] ({cls.__module__}): {cls.summary}",
                      highlight=False)


@app.command()
def ui(
    host: Annotated[str, typer.Option(help="Interface to bind (default loopback only).")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.", min=1, max=65535)] = 5000,
    tracking_uri: TrackingOption = None,
) -> None:
    """Open the MLflow UI on the same store (Ctrl-C or SIGTERM stops the server and all its
    workers)."""
    from bench.app.ui import check_port_free, serve

    check_port_free(host, port)
    tracker = _tracker(tracking_uri)
    pages = {}
    for name in tracker.experiment_names():  # each opens on its runs (older stores too)
        if name != "Default":
            pages[name] = tracker.experiment_id(name)
    cmd = ui_command(tracker.uri, tracker.runs_dir / "mlartifacts", host, port)
    stopped_by = serve(cmd, host, port, _report, runs_pages=pages)
    if stopped_by is not None:  # 128 + the signal, as a shell reports a process it ended
        print(f"bench: interrupted ({stopped_by.name}); MLflow UI stopped", file=sys.stderr)
        raise SystemExit(128 + stopped_by)


@app.command()
def servers(
    storage: Annotated[str | None, typer.Option(
        help="The Optuna storage every host's `bench sweep` joins (postgresql://...).")] = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Check the shared servers from this host (Optuna storage, MLflow tracking server and its
    artifact proxy) and print the flags every host passes to bench sweep, bench run, torchrun."""
    import shlex

    from rich.table import Table

    from bench.app.tracking import mask_credentials, resolve_tracking_uri
    from bench.core.config import default_bench_files, resolve
    from bench.core.errors import BenchError
    from sweeps.servers import check_storage, check_tracking, this_host_address

    cfg = resolve(bench_files=default_bench_files(Path.cwd()), sets=[]).config
    runs_dir = Path(cfg.tracking.runs_dir)
    uri = resolve_tracking_uri(tracking_uri, cfg.tracking.uri, runs_dir)
    checks = ([check_storage(storage)] if storage else []) + check_tracking(uri, runs_dir)
    table = Table(title="shared servers, checked from this host")
    for column in ("", "what", "where", "detail"):
        table.add_column(column)
    for c in checks:
        table.add_row("[green]ok[/green]" if c.ok else "[red]FAIL[/red]", c.what, c.target,
                      c.detail)
    _console().print(table)
    flags = ["--tracking-uri", mask_credentials(uri)]
    if storage:
        flags = ["--storage", mask_credentials(storage), *flags]
    address = this_host_address(uri, storage or "")
    _console().print("every host (its own working folder; *** = the password):")
    _console().print(f"  bench sweep --method M --dataset D --space S --trials N --workers K "
                     f"{shlex.join(flags)}", markup=False, soft_wrap=True)
    _console().print("two hosts training one run (node rank 0 on this host, 1 on the other):",
                     markup=False)
    _console().print(f"  torchrun --nnodes 2 --node-rank 0|1 --nproc-per-node G --master-addr "
                     f"{address} --master-port 29500 -m bench run --method M --dataset D "
                     f"--tracking-uri {shlex.quote(mask_credentials(uri))}", markup=False,
                     soft_wrap=True)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise BenchError(f"{failed[0].what}: {failed[0].detail}")


def ui_command(store_uri: str, artifacts: Path, host: str, port: int) -> list[str]:
    """The `mlflow ui` command line `bench ui` runs: bound to `host` only."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store_uri,
            "--default-artifact-root", artifacts.resolve().as_uri(), "--host", host,
            "--port", str(port)]


@app.command()
def perf(
    out: Annotated[Path | None, typer.Option(help="Also write the rows as JSON.")] = None,
    rounds: Annotated[int, typer.Option(
        help="Timed rounds per side and figure (medians over at least this many).", min=3)
    ] = 20,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    case: Annotated[list[str] | None, typer.Option(
        "--case", help="Only this configuration (repeatable): gmm8-mlp, unet16-c32.")] = None,
    floors: Annotated[bool, typer.Option(
        "--floors", help="Time the floor of every training and sampling figure (by default "
                         "only of those that miss their target).")] = False,
    scaling: Annotated[str | None, typer.Option(
        "--scaling", help="Instead: how cost grows with the work, for these parts "
                          "(comma-separated: eval, train, store, sweep; 'all').")] = None,
) -> None:
    """Overhead of training, sampling and evaluation over bare PyTorch loops, and peak memory."""
    import time

    from bench.core.outputs import check_output_file

    if out is not None:  # before minutes of measurements
        check_output_file(out, "--out")

    from bench.app.runner import resolve_device
    from bench.core.errors import UsageError
    from bench.perf.run import cases, print_rows, run_perf, write_json

    if scaling is not None:
        from bench.perf.scaling import print_scaling, run_scaling

        every = ("eval", "train", "store", "sweep")
        parts = every if scaling == "all" else tuple(p.strip() for p in scaling.split(","))
        if not parts or any(p not in every for p in parts):
            raise UsageError(f"--scaling {scaling!r}: parts are {', '.join(every)} or all")
        start = time.perf_counter()
        found = run_scaling(_report, parts)
        seconds = time.perf_counter() - start
        print_scaling(found, _console())
        _report(f"{seconds:.0f} s")
        if out is not None:
            write_json(found, out, resolve_device("cpu"), seconds)
            _report(f"wrote {out}")
        return

    known = [c.name for c in cases()]
    unknown = [c for c in case or [] if c not in known]
    if unknown:
        raise UsageError(f"unknown case {unknown[0]!r}; valid: {', '.join(known)}")
    start = time.perf_counter()
    rows = run_perf(rounds, _report, resolve_device(device), case or None,
                    floor=True if floors else None)
    seconds = time.perf_counter() - start
    print_rows(rows, _console())
    _report(f"{seconds:.0f} s")
    if out is not None:
        write_json(rows, out, resolve_device(device), seconds)
        _report(f"wrote {out}")


@app.command()
def doctor(
    json_out: Annotated[Path | None, typer.Option(
        "--json", help="Also write the rows as JSON to this file.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    iterations: Annotated[int | None, typer.Option(
        help="Timed training iterations per method and precision (default 20 on a GPU, 3 on "
             "the CPU).", min=1)] = None,
    batch: Annotated[int | None, typer.Option(
        help="Training batch (default 2 on the CPU, 16 on a GPU).", min=1)] = None,
    method: Annotated[list[str] | None, typer.Option(
        "--method", help="Only this training method (repeatable).")] = None,
    only: Annotated[str | None, typer.Option(
        help="Only these groups of checks, comma-separated: train, sample, ddp, weights.")
    ] = None,
) -> None:
    """Check this machine for the real job: device, each method's training on its paper
    network in fp32/bf16/fp16, sampling with and without compile, DDP, metric weights."""
    import time

    from bench.core.outputs import check_output_file

    if json_out is not None:  # before the checks
        check_output_file(json_out, "--json")

    from bench.app.runner import resolve_device
    from bench.core.errors import BenchError, UsageError
    from bench.perf.doctor import GROUPS, DoctorOptions, print_checks, run_doctor, write_json
    from bench.perf.run import train_methods

    known = train_methods()
    unknown = [m for m in method or [] if m not in known]
    if unknown:
        raise UsageError(f"unknown training method {unknown[0]!r}; valid: {', '.join(known)}")
    groups = tuple(g.strip() for g in only.split(",") if g.strip()) if only else GROUPS
    wrong = [g for g in groups if g not in GROUPS]
    if wrong or not groups:
        raise UsageError(f"--only {only!r}: groups are {', '.join(GROUPS)}")
    where = resolve_device(device)
    start = time.perf_counter()
    rows = run_doctor(DoctorOptions(where, iterations, batch, method or None, only=groups),
                      _report)
    seconds = time.perf_counter() - start
    print_checks(rows, _console(), seconds, where)
    if json_out is not None:
        write_json(rows, json_out, where, seconds)
        _report(f"wrote {json_out}")
    failed = [r for r in rows if r.status == "FAIL"]
    if failed:
        raise BenchError(f"{len(failed)} of {len(rows)} checks failed (first: {failed[0].group} "
                         f"{failed[0].subject} {failed[0].precision}: {failed[0].detail})")


@app.command()
def report(
    dataset: Annotated[list[str] | None, typer.Option(
        "--dataset", help="Dataset to report (repeatable; default: every dataset with runs).")
    ] = None,
    select: Annotated[str, typer.Option(
        help="Which finished run per method: latest, or best (primary metric).")] = "latest",
    format_: Annotated[str, typer.Option(
        "--format", help="Comma-separated outputs: md, tex, html, csv.")] = "md,tex,html,csv",
    out: Annotated[Path | None, typer.Option(
        help="Output folder (default runs/reports).")] = None,
    compare: Annotated[tuple[str, str] | None, typer.Option(
        help="Compare two runs instead (RUN_A RUN_B): their difference at each NFE with its 95% "
             "interval over the evaluation seed sets.", metavar="RUN_A RUN_B")] = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Paper-style tables, plots and an HTML page from the tracking store alone."""
    from bench.core.outputs import check_output_folder

    if compare is not None:
        _print_comparison(_tracker(tracking_uri), *compare)
        return

    if out is not None:  # before the store is read
        check_output_folder(out, "--out")
    from reports.build import build_report, parse_formats
    from reports.store import check_dataset_name, check_select
    from reports.tables import to_rich

    formats = parse_formats(format_)
    chosen = check_select(select)
    for name in dataset or []:
        check_dataset_name(name)
    tracker = _tracker(tracking_uri)
    output = build_report(tracker, dataset or None, chosen, formats,
                          out or tracker.runs_dir / "reports")
    console = _console()
    for table in output.tables:
        console.print(to_rich(table, console))
    console.print(f"wrote {len(output.files)} files to {output.out_dir}")
    if (output.out_dir / "report.html").is_file():
        console.print(f"report: {output.out_dir / 'report.html'}")
    console.print(f"run id: {output.run_id}")


def _print_comparison(tracker: Any, run_a: str, run_b: str) -> None:
    from rich.table import Table

    from reports.compare import LEVEL, compare_runs

    rows = compare_runs(tracker, run_a, run_b)
    table = Table(title=f"A = {run_a[:8]}, B = {run_b[:8]}")
    for name in ("metric", "NFE", "A", "B", "A - B", f"{LEVEL:.0%} interval", "verdict"):
        table.add_column(name, justify="left" if name in ("metric", "verdict") else "right")

    def shown(value: float, std: float | None, n: int) -> str:
        return f"{value:.4g}" if std is None else f"{value:.4g} ± {std:.2g} (n={n})"

    for d in rows:
        interval = "-" if d.low is None else f"[{d.low:.3g}, {d.high:.3g}]"
        table.add_row(d.metric, str(d.nfe), shown(d.a, d.a_std, d.a_seeds),
                      shown(d.b, d.b_std, d.b_seeds), f"{d.diff:.3g}", interval, d.verdict)
    console = _console()
    console.print(table)
    console.print("x ± s (n=): mean and standard deviation over n evaluation seed sets; "
                  "interval: Welch's, for the difference of the means")


@app.command()
def suite(
    dataset: Annotated[str, typer.Option(help="Dataset (see `bench datasets`).")] = "gmm8",
    methods_: Annotated[str | None, typer.Option(
        "--methods", help="Comma-separated methods, run teacher first, then in registration "
                          "order (default: every method `bench methods` marks 'suite').")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Config override for every run (key=value) or one method "
                      "(cd:train.steps=500); repeatable.")] = None,
    seeds: Annotated[int, typer.Option(
        help="Training seeds per method (seed, seed + 1, ...): the report shows mean ± std "
             "over them.", min=1, max=100)] = 1,
    tracking_uri: TrackingOption = None,
) -> None:
    """Train the teacher, run every method (skipping finished ones), then the report."""
    from reports.suite import check_suite, parse_methods, run_suite, split_sets, summary_table
    from reports.tables import to_rich

    chosen = parse_methods(methods_)
    check_suite(dataset, chosen, set_ or [], Path.cwd())
    tracker = _tracker(tracking_uri, split_sets(set_ or [])[0])
    outcome = run_suite(tracker, dataset, chosen, set_ or [], Path.cwd(), _report, _Progress,
                        seeds)
    console = _console()
    if outcome.report is not None:
        for table in outcome.report.tables:
            console.print(to_rich(table, console))
        page = outcome.report.out_dir / "report.html"
        console.print(f"report: {page if page.is_file() else outcome.report.out_dir}  "
                      f"(run id: {outcome.report.run_id})")
    console.print(summary_table(outcome))
    outcome.raise_for_failures()


def main(argv: list[str] | None = None) -> None:
    """The commands, run: one-line errors (exit 2 usage, 1 otherwise; 130 for Ctrl-C, 143 for
    SIGTERM); --debug shows tracebacks (and the warnings of the libraries underneath). The
    `bench` entry point (bench.cli.main) installs the signal guard before importing this."""
    from bench.engine.signals import EXIT_CODES, GUARD, exit_code, signal_name

    GUARD.install()  # SIGTERM ends a command like Ctrl-C does, from its first line
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("BENCH_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    try:
        from bench.core.memory import configure_malloc

        configure_malloc()  # before torch starts its threads
        quiet_dependencies(debug)
        command = typer.main.get_command(app)
        # make_context + invoke instead of command.main(): its main turns Ctrl-C into an
        # exit code that non-standalone mode returns instead of raising
        with command.make_context("bench", args) as ctx:
            command.invoke(ctx)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("bench: aborted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as exc:
        if debug:
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":  # `bench` alone: the help text
            print(exc.format_message())
            sys.exit(0)
        from bench.app.tracking import mask_credentials

        print(f"bench: error: {mask_credentials(exc.format_message())}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        print(f"bench: interrupted ({signal_name(exc)})", file=sys.stderr)
        sys.exit(exit_code(exc))
    except Exception as exc:
        from bench.app.tracking import mask_credentials  # no password in any error line
        from bench.core.errors import BenchError

        if debug:
            raise
        if isinstance(exc, BenchError):
            print(f"bench: error: {mask_credentials(str(exc))}", file=sys.stderr)
            sys.exit(exc.exit_code)
        if GUARD.delivered is not None:  # a library turned the interrupt into its own error
            print(f"bench: interrupted ({GUARD.delivered})", file=sys.stderr)
            sys.exit(EXIT_CODES.get(GUARD.delivered, 130))
        print(f"bench: {describe_failure(exc)}", file=sys.stderr)
        sys.exit(1)


def describe_failure(exc: BaseException) -> str:
    """One line for an unexpected error: what ran out (disk, memory) when that is the cause,
    else the error's type and first line."""
    from bench.app.tracking import mask_credentials
    from bench.core.errors import resource_exhausted

    resource = resource_exhausted(exc)
    if resource is not None and resource.startswith("out of"):
        return (f"error: {mask_credentials(resource)} (lower the sizes in the config: batch "
                f"sizes, network widths, NFE or sample counts)")
    if resource is not None:
        return f"error: {mask_credentials(resource)}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (f"internal error: {type(exc).__name__}: {mask_credentials(first)} (run with "
            f"--debug for the traceback)")


def quiet_dependencies(debug: bool) -> None:
    """Keep the warnings of torch, SQLAlchemy, MLflow, tqdm and the others off the terminal
    (--debug shows them): each is something for us to act on, not the user."""
    import logging
    import warnings

    if debug:
        return
    warnings.simplefilter("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # subprocesses (torchrun, workers)
    for name in ("mlflow", "alembic", "sqlalchemy", "optuna", "torch", "urllib3", "matplotlib",
                 "PIL", "py.warnings"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # MLflow logs a store error with its traceback before raising it; bench says it in one line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


if __name__ == "__main__":
    main()
