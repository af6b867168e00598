"""Evaluation: for each NFE, generate with per-sample seeds, stream the samples into the
metrics, count the network calls and time the sampling."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bench.core.config import RunConfig
from bench.core.errors import UsageError
from bench.core.memory import release_free_memory
from bench.data.datasets import Dataset, Digits, GaussianMixture, PointsDataset
from bench.data.shard import Shard
from bench.diffusion.rng import SobolGenerator, StackedGenerator, sample_seed
from bench.diffusion.samplers import CallCounter
from bench.engine.distributed import gather_to_main
from bench.engine.fid import prepare_fid
from bench.metrics.base import (
    POINT_METRICS,
    FeatureFrechet,
    MetricAccumulator,
    MetricSuite,
    PointMetrics,
    feature_stats,
    load_or_train_digits_classifier,
)
from methods.base import Method

PREVIEW_POINTS = 2000  # points kept for the scatter plot
SEED_STRIDE = 1000  # evaluation seed set k samples with eval.seed + SEED_STRIDE k
SEEDS_STD = "_seeds_std"  # suffix of a metric's standard deviation over the seed sets
SEEDS_BEST = "_seeds_best"  # suffix of its best value over the seed sets
PREVIEW_IMAGES = 64  # images kept for the sample grid
PROGRESS_SECONDS = 30.0  # a long evaluation says how far it is this often

LOWER_IS_BETTER = {"w2": True, "fd": True, "swd": True, "nll": True, "mode_recall": False,
                   "hq_fraction": False, "fcd": True, "fid": True, "is": False, "kid": True,
                   "precision": False, "recall": False,
                   "fd_dinov2": True}


def default_metrics(dataset: Dataset) -> list[str]:
    """The metrics a dataset is scored with unless eval.metrics says otherwise."""
    if dataset.kind == "points":
        extra = ["nll", "mode_recall"] if isinstance(dataset, GaussianMixture) else []
        return ["w2", "fd", "swd", *extra]
    if isinstance(dataset, Digits):
        return ["fcd"]
    return ["fid"]


def uses_qmc(dataset: Dataset, cfg: RunConfig) -> bool:
    """Whether evaluation draws quasi-random noise (eval.noise; "auto" = on for 2-D data)."""
    if cfg.eval.noise == "qmc" and not isinstance(dataset, PointsDataset):
        raise UsageError(f"eval.noise = qmc is for 2-D datasets; {dataset.name} is not one "
                         "(use random)")
    qmc = cfg.eval.noise == "qmc" or (cfg.eval.noise == "auto"
                                      and isinstance(dataset, PointsDataset))
    most = 2**torch.quasirandom.SobolEngine.MAXBIT  # points of one Sobol sequence
    if qmc and cfg.eval.num_samples > most:
        raise UsageError(f"quasi-random noise (eval.noise = {cfg.eval.noise}) draws at most "
                         f"{most} samples; lower eval.num_samples or set eval.noise = random")
    return qmc


def points_reference(dataset: PointsDataset, cfg: RunConfig, n: int) -> torch.Tensor:
    """The reference draw the metrics compare with: stratified when the noise is quasi-random."""
    if uses_qmc(dataset, cfg):
        return dataset.reference_qmc(n, cfg.eval.reference_seed)
    return dataset.reference(n, cfg.eval.reference_seed)


def prepare_metrics(dataset: Dataset, cfg: RunConfig, cache_dir: Path) -> MetricSuite:
    """Validate the requested metrics and precompute reference statistics."""
    uses_qmc(dataset, cfg)  # an impossible eval.noise fails here, before any training
    if cfg.eval.bootstrap and dataset.kind != "points":
        raise UsageError(f"eval.bootstrap resamples 2-D points; {dataset.name} holds "
                         f"{dataset.kind} (use eval.seeds for an interval)")
    names = list(cfg.eval.metrics) or default_metrics(dataset)
    valid = default_metrics(dataset)
    if dataset.kind == "points":
        valid = [m for m in POINT_METRICS
                 if isinstance(dataset, GaussianMixture) or m not in ("nll", "mode_recall",
                                                                      "hq_fraction")]
    unknown = [m for m in names if m not in valid]
    if unknown:
        raise UsageError(f"metric(s) {', '.join(unknown)} not available for {dataset.name}; "
                         f"valid: {', '.join(valid)}")
    if isinstance(dataset, PointsDataset):
        reference = points_reference(dataset, cfg, cfg.eval.num_samples)
        gmm = dataset if isinstance(dataset, GaussianMixture) else None

        def new_points() -> list[MetricAccumulator]:
            return [PointMetrics(
                reference,
                gmm.log_prob if gmm is not None else None,
                gmm.modes if gmm is not None else None,
                gmm.std if gmm is not None else None,
                names,
                bootstrap=cfg.eval.bootstrap,
            )]

        floors = {"nll": -gmm.max_log_prob()} if gmm is not None and "nll" in names else {}
        return MetricSuite(names, new_points, floors=floors)
    if isinstance(dataset, Digits):
        classifier, accuracy = load_or_train_digits_classifier(
            cache_dir, dataset.train(), dataset.train_labels(), dataset.test(),
            dataset.test_labels())
        reference = dataset.reference(cfg.eval.num_samples, cfg.eval.reference_seed)
        stats = feature_stats(classifier.features, reference)

        def new_fcd() -> list[MetricAccumulator]:
            return [FeatureFrechet(classifier.features, stats, name="fcd")]

        return MetricSuite(names, new_fcd, {"fcd_classifier_test_accuracy": f"{accuracy:.4f}"})
    return prepare_fid(dataset, cfg, cache_dir)


def evaluation_seeds(cfg: RunConfig) -> list[int]:
    """The sampling seed of each evaluation seed set (eval.seeds of them, eval.seed first)."""
    return [cfg.eval.seed + SEED_STRIDE * k for k in range(cfg.eval.seeds)]


@dataclass
class EvalResult:
    """One NFE's numbers: `metrics` holds each metric's mean over the seed sets (the value
    itself with one set), `per_seed` the values of each set in evaluation_seeds() order."""

    nfe: int  # requested
    nfe_measured: int  # network calls per sample, counted
    metrics: dict[str, float]
    seconds_per_sample: float
    sigmas: list[float]
    preview: torch.Tensor  # a few samples on the CPU, for pictures (from the first seed set)
    per_seed: list[dict[str, float]] = field(default_factory=list)

    def spread(self) -> dict[str, float]:
        """With two or more seed sets, for each evaluation metric (LOWER_IS_BETTER's; not
        is_std or kid_std, which are IS's and KID's own spreads within one set):
        `<metric>_seeds_std` (sample standard deviation over the sets), `<metric>_seeds_best`
        (the best set's value: the minimum, or the maximum where higher is better, as papers
        report min-of-seeds) and `<metric>_seed<k>` per set; nothing with one set."""
        if len(self.per_seed) < 2:
            return {}
        out: dict[str, float] = {}
        for name in self.metrics:
            if name not in LOWER_IS_BETTER:
                continue
            values = [s[name] for s in self.per_seed if name in s]
            if len(values) < 2:
                continue
            out[f"{name}{SEEDS_STD}"] = statistics.stdev(values)
            out[f"{name}{SEEDS_BEST}"] = (min(values) if LOWER_IS_BETTER.get(name, True)
                                   else max(values))
            out.update({f"{name}_seed{k}": v for k, v in enumerate(values)})
        return out


def mean_metrics(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the seed sets that have it (in the first set's order)."""
    names = dict.fromkeys(k for s in per_seed for k in s)
    return {k: statistics.fmean(s[k] for s in per_seed if k in s) for k in names}


def sample_labels(seed: int, indices: range, num_classes: int) -> torch.Tensor:
    """Per-sample class labels: label i depends on (seed, i) only."""
    return torch.tensor([sample_seed(seed + 1, i) % num_classes for i in indices],
                        dtype=torch.long)


def generate(
    method: Method,
    model: nn.Module,
    dataset: Dataset,
    nfe: int,
    num_samples: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    conditional: bool,
    consume: Callable[[torch.Tensor], None],
    qmc: bool = False,
    shard: Shard = Shard(),
    first: int = 0,
) -> tuple[int, float]:
    """Generate num_samples in batches into `consume`, clipped to the dataset's range when it
    has one (images); return (calls per sample, seconds of sampling). With qmc, sample i's
    noise is point i of a scrambled Sobol sequence (SobolGenerator), still per-sample.

    Under several processes rank r generates batches r, r + W, ... (the same batches as one
    process) and rank 0 gathers them and consumes them in order, so the metrics are those of
    one process; the other ranks consume nothing. Seconds are summed over the ranks. `first`
    starts at that sample index (one rank's batch)."""
    if shard.distributed:  # round k: rank r makes batch k W + r, rank 0 gathers the round
        starts = list(range(0, num_samples, batch_size))
        calls, seconds = 0, 0.0
        for k in range(0, len(starts), shard.world_size):
            mine: list[torch.Tensor] = []
            made = (0, 0.0)
            if k + shard.rank < len(starts):
                start = starts[k + shard.rank]
                made = generate(method, model, dataset, nfe,
                                min(start + batch_size, num_samples), batch_size, seed, device,
                                conditional, mine.append, qmc, first=start)
            for x, part_calls, part_seconds in gather_to_main(
                    (mine[0].cpu() if mine else None, *made), shard):
                if x is None:
                    continue
                if calls and part_calls != calls:
                    raise RuntimeError(f"uneven network calls across batches: {part_calls} "
                                       f"and {calls}")
                consume(x.to(device))
                calls, seconds = part_calls, seconds + part_seconds
        return calls, seconds
    calls = 0
    batches = 0
    seconds = 0.0
    if model.training:  # Module.eval() walks every submodule: not on every call
        model.eval()
    for start in range(first, num_samples, batch_size):
        indices = range(start, min(start + batch_size, num_samples))
        with torch.inference_mode():  # the draws' tensor ops skip autograd, as sampling's do
            rng = (SobolGenerator(seed, indices, device) if qmc
                   else StackedGenerator(seed, indices, device))
            rng.reserve(dataset.shape, method.noise_draws(nfe))
            noise = rng.randn(dataset.shape)
        labels = (sample_labels(seed, indices, dataset.num_classes).to(device)
                  if conditional else None)

        def denoise(x: torch.Tensor, s: torch.Tensor,
                    labels: torch.Tensor | None = labels) -> torch.Tensor:
            return model(x, s, labels)

        counter = CallCounter(denoise)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            x = method.sample(counter, noise, nfe, rng)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        calls += counter.calls
        batches += 1
        if dataset.clamp is not None:  # scored as they would be saved: inside the data range
            x = x.clamp(*dataset.clamp)
        consume(x)
        if device.type == "cpu":  # what the batches freed leaves the resident set
            release_free_memory()
    if calls % batches:
        raise RuntimeError(f"uneven network calls across batches: {calls} over {batches}")
    return calls // batches, seconds


def sampling_model(model: nn.Module, cfg: RunConfig, device: torch.device,
                   compiled: dict[int, nn.Module] | None = None) -> nn.Module:
    """The network the samplers call: `model` itself, or with sample.compile its
    torch.compile (in "reduce-overhead" mode on CUDA, which replays CUDA graphs; static shapes,
    so a shorter last batch compiles once more). `compiled` caches by model across NFEs."""
    if not cfg.sample.compile:
        return model
    cache = {} if compiled is None else compiled
    if id(model) not in cache:
        model.eval()
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        cache[id(model)] = torch.compile(model, mode=mode, dynamic=False)  # type: ignore[assignment]
    return cache[id(model)]


class SampleProgress:
    """Lines on the samples one NFE's evaluation has made ("NFE 2: 12,800 / 150,000 samples
    (8%), about 9 min left"), at most one per `every` seconds and none for an evaluation
    shorter than that: a 50k-sample FID says how far it is, a 2-D one stays quiet."""

    def __init__(self, report: Callable[[str], None] | None, nfe: int, total: int,
                 every: float = PROGRESS_SECONDS) -> None:
        self.report, self.nfe, self.total, self.every = report, nfe, total, every
        self.done = 0
        self.start = self.last = time.perf_counter()

    def add(self, count: int) -> None:
        """Count `count` more samples; report when `every` seconds passed since the last line."""
        self.done += count
        now = time.perf_counter()
        if self.report is None or self.done >= self.total or now - self.last < self.every:
            return
        self.last = now
        left = (self.total - self.done) * (now - self.start) / self.done
        self.report(f"NFE {self.nfe}: {self.done:,} / {self.total:,} samples "
                    f"({100 * self.done // self.total}%), about {_duration(left)} left")


def _duration(seconds: float) -> str:
    """'40 s', '12 min', '2.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def evaluate(
    method: Method,
    ema: nn.Module | None,
    dataset: Dataset,
    cfg: RunConfig,
    nfes: list[int],
    suite: MetricSuite,
    device: torch.device,
    on_result: Callable[[EvalResult], None] | None = None,
    shard: Shard = Shard(),
    report: Callable[[str], None] | None = None,
    report_every: float = PROGRESS_SECONDS,
) -> list[EvalResult]:
    """Evaluate the method's model (built from the EMA) at every NFE; on_result per NFE.
    Under several processes every rank generates its share and rank 0 alone scores (the
    others return no results). `report` gets a progress line every `report_every` seconds
    of a long NFE (SampleProgress)."""
    results = []
    conditional = cfg.net.class_conditional and dataset.num_classes > 0
    keep = PREVIEW_POINTS if dataset.kind == "points" else PREVIEW_IMAGES
    qmc = uses_qmc(dataset, cfg)
    compiled: dict[int, nn.Module] = {}  # one compiled network per evaluation model
    seeds = evaluation_seeds(cfg)
    for nfe in nfes:
        model = sampling_model(method.evaluation_model(ema, nfe), cfg, device, compiled)
        preview: list[torch.Tensor] = []
        per_seed: list[dict[str, float]] = []
        measured, seconds = 0, 0.0
        made = SampleProgress(report if shard.is_main else None, nfe,
                              cfg.eval.num_samples * len(seeds), report_every)
        for k, seed in enumerate(seeds):
            accumulators = suite.new()

            def consume(x: torch.Tensor, accumulators: list[MetricAccumulator] = accumulators,
                        preview: list[torch.Tensor] = preview, first: bool = k == 0,
                        made: SampleProgress = made) -> None:
                for acc in accumulators:
                    acc.update(x)
                made.add(x.shape[0])
                have = sum(p.shape[0] for p in preview)
                if first and have < keep:
                    preview.append(x[: keep - have].detach().cpu())

            calls, spent = generate(method, model, dataset, nfe, cfg.eval.num_samples,
                                    cfg.eval.batch_size, seed, device, conditional, consume, qmc,
                                    shard)
            if measured and calls != measured:
                raise RuntimeError(f"network calls differ between seed sets: {calls} and "
                                   f"{measured}")
            measured, seconds = calls, seconds + spent
            if shard.is_main:
                values: dict[str, float] = {}
                for acc in accumulators:
                    values.update(acc.compute())
                per_seed.append(values)
        if not shard.is_main:
            continue
        result = EvalResult(nfe, measured, mean_metrics(per_seed),
                            seconds / (cfg.eval.num_samples * len(seeds)),
                            method.sample_sigmas(nfe), torch.cat(preview), per_seed)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
