"""`bench edit`: zero-shot editing with a tracked consistency-model run, measured against the
ground truth and logged as a nested MLflow run under the source run.

Images: held-out images (the test split when the dataset has one) are observed through the task
(a hole, their luminance, their patch means, noise, a coarse painting) and edited; PSNR against
the originals and the dataset's Frechet metric of the edited set are logged with step = NFE,
next to the same numbers for the no-model answer (`*_baseline`: the observation with its unknown
part filled with the training mean, the noisy or painted input itself, or for interpolation the
linear instead of the spherical path) and for the originals themselves (`*_truth`).

2-D mixtures (gmm8, gmm25): `inpaint` hides the second coordinate. Each observed point gets
EDIT_DRAWS edits, scored by the 1-D W2 to exact draws from the mixture's conditional p(y | x)
(`w2`, averaged over the observed points), next to the W2 of the same number of unconditional
samples' y (`w2_unconditional`) and of a second exact draw (`w2_noise_floor`, the sampling noise
of the score itself).

The edit run has no `method` tag (so `bench report` never mistakes it for a training run): it is
tagged `edit` (the task), `source_run`, `source_method` and `dataset`.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from bench.app.artifacts import save_conditional_scatter, save_panels
from bench.app.runner import Prepared, load_run, run_config
from bench.app.tracking import Tracker, git_commit, package_versions
from bench.core.errors import BenchError, UsageError
from bench.data.datasets import Dataset, GaussianMixture, PointsDataset, get_dataset
from bench.diffusion.editing import (
    MASKS,
    ColourBasis,
    PatchBasis,
    PixelBasis,
    Replacement,
    colour_known,
    denoise,
    edit_consistency,
    edit_levels,
    gmm_conditional_sample,
    inpaint_mask,
    interpolate,
    patch_known,
    per_row_w2,
    psnr,
    stroke_edit,
    stroke_painting,
)
from bench.diffusion.rng import StackedGenerator, sample_seed
from bench.diffusion.samplers import CallCounter, Model
from bench.engine.evaluation import sample_labels
from bench.metrics.base import MetricSuite
from methods import all_methods, get_method

Reporter = Callable[[str], None]

TASKS = ("inpaint", "colorize", "superres", "denoise", "interpolate", "stroke")
ONE_CALL_TASKS = ("denoise", "interpolate")  # always exactly one network call
DEFAULT_SIGMA = {"denoise": 0.5, "stroke": 1.0}  # observation noise / SDEdit start level
REPLACEMENT_TASKS = ("inpaint", "colorize", "superres")  # Algorithm 4
# Algorithm 4's default first level t_1 on images, in units of the data's std: low enough that the
# observed part reaches the network (from sigma_max, 1 NFE is an unconditional sample), high
# enough that the hidden part is generated rather than copied from the fill; `--sigma` moves
# along that trade (see default_sigma).
START_OVER_SIGMA_DATA = 0.5
BASELINES = {"inpaint": "mean fill", "colorize": "mean fill", "superres": "mean fill",
             "denoise": "noisy input", "stroke": "stroke input", "interpolate": "lerp"}
INTERPOLATION_POINTS = 8  # images per interpolation path, endpoints included
EDIT_DRAWS = 2000  # edits per observed point on 2-D data
MEAN_IMAGES = 5000  # training images averaged into the mean-fill image
GRID_IMAGES = 16  # images per panel of the picture
_TRUTH_STREAM = 0x45444954  # sample_seed stream of the held-out image shuffle / 2-D observations
_EXACT_STREAM = 0x45584143  # sample_seed stream of the exact conditional draws


@dataclass(frozen=True)
class EditRequest:
    """What `bench edit` was asked to do."""

    run_id: str  # the source run (cd, ct or ict)
    task: str  # one of TASKS
    n: int = 16  # edited images (2-D data: observed points)
    mask: str = "center"  # inpainting mask: center, half or random
    nfe: tuple[int, ...] | None = None  # None: the run's eval.nfe (1 for one-call tasks)
    factor: int = 2  # super-resolution / stroke patch size
    sigma: float | None = None  # denoise: noise level; stroke: start level; Algorithm 4: t_1
    # (None: the task's default, see default_sigma)
    seed: int = 0  # image / point i uses (seed, i) only
    batch_size: int = 256  # images per network call


@dataclass
class EditResult:
    """One NFE's numbers."""

    nfe: int  # measured network calls per edit
    metrics: dict[str, float]
    seconds_per_sample: float
    sigmas: list[float]


@dataclass
class EditOutcome:
    """What `bench edit` prints."""

    run_id: str  # the nested edit run
    source_run: str
    task: str
    dataset: str
    baseline: str  # what the *_baseline metrics measure
    results: list[EditResult] = field(default_factory=list)
    seconds: float = 0.0


# --- validation -------------------------------------------------------------------------------


def check_request(request: EditRequest, dataset: Dataset, method_name: str) -> None:
    """Every mismatch of task, flags, method and dataset is a one-line usage error."""
    if request.task not in TASKS:
        raise UsageError(f"unknown task {request.task!r}; valid: {', '.join(TASKS)}")
    if not get_method(method_name).can_edit:
        editable = ", ".join(cls.name for cls in all_methods() if cls.can_edit)
        raise UsageError(f"bench edit needs a consistency model run ({editable}); run "
                         f"{request.run_id} is {method_name}")
    if request.mask not in MASKS:
        raise UsageError(f"unknown mask {request.mask!r}; valid: {', '.join(MASKS)}")
    if request.n < 1:
        raise UsageError(f"--n must be >= 1, got {request.n}")
    if request.task in ONE_CALL_TASKS and request.nfe and set(request.nfe) != {1}:
        raise UsageError(f"{request.task} makes exactly one network call: use --nfe 1")
    if request.sigma is not None and request.sigma <= 0:
        raise UsageError(f"--sigma must be > 0, got {request.sigma}")
    if request.task == "interpolate" and request.sigma is not None:
        raise UsageError("interpolate always starts at sigma_max: drop --sigma")
    if isinstance(dataset, PointsDataset):
        if request.task != "inpaint":
            raise UsageError(f"{dataset.name} is 2-D data: only --task inpaint (the second "
                             f"coordinate given the first) applies")
        if not isinstance(dataset, GaussianMixture):
            raise UsageError(f"inpainting 2-D data is scored against an exact conditional: "
                             f"use gmm8 or gmm25, not {dataset.name}")
        return
    channels, height, width = dataset.shape
    if request.task == "colorize" and channels != 3:
        raise UsageError(f"colorisation needs a colour dataset; {dataset.name} has {channels} "
                         f"channel{'s' if channels != 1 else ''}")
    if request.task in ("superres", "stroke") and (
            request.factor < 2 or height % request.factor or width % request.factor):
        raise UsageError(f"--factor must be >= 2 and divide the image side {height}x{width}, "
                         f"got {request.factor}")


def default_sigma(task: str, dataset: Dataset, sigma_max: float) -> float | None:
    """The level a task starts from when --sigma is not given (None: interpolation, which
    always starts at sigma_max).

    Algorithm 4 on images starts at half sigma_data, where the edit is scored against the one
    true image (PSNR) and the observation must reach the network; on 2-D mixtures it starts at
    sigma_max, where the edit is scored as a sample of the exact conditional (W2): a low first
    level there noises the observed coordinate enough to send the point to a mode that the
    replacement then contradicts, while the hidden one cannot leave the fill."""
    if task in REPLACEMENT_TASKS:
        if isinstance(dataset, PointsDataset):
            return sigma_max
        return min(START_OVER_SIGMA_DATA * dataset.sigma_data, sigma_max)
    return DEFAULT_SIGMA.get(task)


# --- the command ------------------------------------------------------------------------------


def edit_run(tracker: Tracker, request: EditRequest, report: Reporter) -> EditOutcome:
    """Edit with a tracked cd/ct/ict run, log a nested run with metrics and pictures."""
    t0 = time.perf_counter()
    cfg = run_config(tracker, request.run_id)
    dataset = get_dataset(cfg.dataset, cfg.data.path or None)
    check_request(request, dataset, cfg.method)
    source = tracker.get_run(request.run_id)
    if source.status != "FINISHED":
        report(f"run {request.run_id} is {source.status}: editing with its last checkpoint")
    if not isinstance(dataset, PointsDataset):
        held_out(dataset, request.n, request.seed)  # a bad --n fails before any loading
    nfes = list(request.nfe or ([1] if request.task in ONE_CALL_TASKS else cfg.eval.nfe))
    levels = cfg.diffusion  # the run's sigma_min and sigma_max, checked before any loading
    sigma = (request.sigma if request.sigma is not None
             else default_sigma(request.task, dataset, levels.sigma_max))
    if sigma is not None and not levels.sigma_min < sigma <= levels.sigma_max:
        raise UsageError(f"--sigma must lie in ({levels.sigma_min:g}, {levels.sigma_max:g}], "
                         f"got {sigma:g}")
    p, state = load_run(tracker, request.run_id, report, nfes)
    outcome = EditOutcome("", request.run_id, request.task, dataset.name,
                          BASELINES[request.task])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "edit"
        out.mkdir()
        editor = (_PointsEditor if isinstance(dataset, GaussianMixture) else _ImageEditor)(
            p, state.ema, request, sigma, out)
        tags = {"edit": request.task, "source_run": request.run_id,
                "source_method": cfg.method, "dataset": dataset.name,
                "edit_baseline": outcome.baseline, "device": str(p.device),
                "git_commit": git_commit(), "versions": package_versions()}
        run_id = tracker.start_run(experiment=dataset.name, run_name=f"edit-{request.task}",
                                   tags=tags, parent_run_id=request.run_id)
        outcome.run_id = run_id
        report(f"edit run {run_id} (nested under {request.run_id})")
        try:
            tracker.log_params(run_id, {
                "edit.task": request.task, "edit.n": request.n, "edit.nfe": nfes,
                "edit.mask": request.mask if request.task == "inpaint" else "-",
                "edit.factor": request.factor if request.task in ("superres", "stroke") else "-",
                "edit.sigma": "-" if sigma is None else sigma, "edit.seed": request.seed})
            for nfe in nfes:
                result = editor.run(nfe)
                tracker.log_metrics(run_id, {**result.metrics,
                                             "seconds_per_sample": result.seconds_per_sample,
                                             "nfe_measured": result.nfe}, result.nfe)
                tracker.set_tags(run_id, {f"sigmas_nfe{result.nfe}": json.dumps(
                    [round(s, 6) for s in result.sigmas])})
                outcome.results.append(result)
                report(f"NFE {result.nfe}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in result.metrics.items()))
            (out / "results.csv").write_text("task,nfe,metric,value\n" + "".join(
                f"{request.task},{r.nfe},{k},{v!r}\n" for r in outcome.results
                for k, v in r.metrics.items()))
            tracker.log_artifact(run_id, out, "edit")
        except BaseException as exc:
            message = (str(exc).strip().splitlines()[0] if str(exc).strip()
                       else type(exc).__name__)
            tracker.set_tags(run_id, {"error": f"{type(exc).__name__}: {message}"})
            tracker.end_run(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
    tracker.end_run(run_id, "FINISHED")
    outcome.seconds = time.perf_counter() - t0
    return outcome


def _counted(model: nn.Module, labels: Tensor | None) -> CallCounter:
    return CallCounter(lambda x, s: model(x, s, labels))


# --- images -----------------------------------------------------------------------------------


def held_out(dataset: Dataset, n: int, seed: int) -> tuple[Tensor, Tensor | None]:
    """n images the model was not trained on when the dataset has a test split (first n of a
    seed-fixed shuffle of it), else n reference images; with their labels when known."""
    test = getattr(dataset, "test", None)
    if callable(test):
        images: Tensor = test()
        labels: Tensor | None = dataset.test_labels()  # type: ignore[attr-defined]
    else:
        images, labels = dataset.reference(max(n, 1), seed), None
    if n > images.shape[0]:
        raise UsageError(f"--n {n} is more than the {images.shape[0]} held-out images of "
                         f"{dataset.name}")
    generator = torch.Generator().manual_seed(sample_seed(seed, _TRUTH_STREAM))
    order = torch.randperm(images.shape[0], generator=generator)[:n]
    return images[order], None if labels is None else labels[order]


@dataclass
class _Batch:
    observation: Tensor  # the observation as a picture (unknown coefficients 0)
    baseline: Tensor  # the no-model answer (for Algorithm 4 also the editor's input)
    result: Tensor  # the edit


class _ImageEditor:
    """Runs one image task at each NFE and scores it."""

    def __init__(self, p: Prepared, ema: nn.Module | None, request: EditRequest,
                 sigma: float | None, out: Path) -> None:
        self.p, self.ema, self.request, self.sigma, self.out = p, ema, request, sigma, out
        self.method = p.method  # can_edit: its evaluation model is a consistency function
        self.levels_of = p.config.diffusion  # the run's sigma_min, sigma_max and rho
        self.dataset = p.dataset
        self.clamp = p.dataset.clamp or (-1.0, 1.0)
        device = p.device
        self.truth, labels = held_out(p.dataset, request.n, request.seed)
        self.truth = self.truth.to(device)
        self.conditional = bool(p.spec["num_classes"])
        if self.conditional and labels is None:
            labels = sample_labels(request.seed, range(request.n), p.dataset.num_classes)
        self.labels = labels.to(device) if labels is not None and self.conditional else None
        self.mean = p.dataset.reference(MEAN_IMAGES, 0).mean(0, keepdim=True).to(device)
        self.truth_metrics = _frechet(p.suite, [self.truth], "_truth")

    def levels(self, nfe: int) -> list[float]:
        """Algorithm 4 and stroke: nfe levels from sigma down; denoise: [sigma]; interpolate:
        [sigma_max]."""
        d = self.levels_of
        if self.sigma is None:  # interpolate
            return [d.sigma_max]
        if self.request.task == "denoise":
            return [self.sigma]
        return edit_levels(nfe, d.sigma_min, self.sigma, d.rho)

    def replacement(self, indices: range) -> Replacement:
        """The task's basis and known coefficients."""
        task = self.request.task
        device = self.truth.device
        if task == "colorize":
            return Replacement(ColourBasis(), colour_known().to(device))
        if task == "superres":
            f = self.request.factor
            return Replacement(PatchBasis(f), patch_known(f).to(device))
        mask = inpaint_mask(self.request.mask, self.dataset.shape, self.request.seed, indices)
        return Replacement(PixelBasis(), mask.to(device))

    def batch(self, model: Model, free: Model, indices: range, sigmas: list[float]) -> _Batch:
        """Observe, edit and answer without the model for images `indices`; `free` is the
        uncounted model (the linear-interpolation baseline uses it)."""
        d, task = self.levels_of, self.request.task
        y = self.truth[indices.start:indices.stop]
        rng = StackedGenerator(self.request.seed, indices, y.device)
        if task == "denoise":
            noisy = y + sigmas[0] * rng.randn_like(y)
            return _Batch(noisy, noisy.clamp(*self.clamp),
                          denoise(model, noisy, sigmas[0], self.clamp))
        if task == "stroke":
            stroke = stroke_painting(y, self.request.factor, value_range=self.clamp)
            return _Batch(stroke, stroke, stroke_edit(model, stroke, sigmas, rng, d.sigma_min,
                                                      self.clamp))
        if task == "interpolate":
            z0 = rng.randn(y.shape[1:])
            z1 = rng.randn(y.shape[1:])
            alphas = [i / (INTERPOLATION_POINTS - 1) for i in range(INTERPOLATION_POINTS)]
            slerped = interpolate(model, z0, z1, alphas, d.sigma_max, self.clamp)
            lerped = interpolate(free, z0, z1, alphas, d.sigma_max, self.clamp,
                                 spherical=False)
            ends = slerped[:, [0, -1]].flatten(0, 1)
            return _Batch(ends, lerped.flatten(0, 1), slerped.flatten(0, 1))
        replacement = self.replacement(indices)
        mean_fill = replacement.observe(y, self.mean)
        return _Batch(replacement.observe(y, torch.zeros_like(self.mean)), mean_fill,
                      edit_consistency(model, mean_fill, replacement, sigmas, rng,
                                       d.sigma_min, self.clamp))

    def run(self, nfe: int) -> EditResult:
        """Edit every image at nfe, score, and draw the picture."""
        sigmas = self.levels(nfe)
        model = self.method.evaluation_model(self.ema, nfe)
        model.eval()
        batches: list[_Batch] = []
        calls, seconds = 0, 0.0
        n, size = self.request.n, self.request.batch_size
        n_batches = 0
        for start in range(0, n, size):
            indices = range(start, min(start + size, n))
            labels = None if self.labels is None else self.labels[start:indices.stop]
            if self.request.task == "interpolate" and labels is not None:
                labels = labels.repeat_interleave(INTERPOLATION_POINTS)
            counter = _counted(model, labels)
            free = _counted(model, labels)
            t0 = time.perf_counter()
            with torch.inference_mode():
                batches.append(self.batch(counter, free, indices, sigmas))
            seconds += time.perf_counter() - t0  # the lerp baseline of interpolate included
            calls += counter.calls
            n_batches += 1
        observation, baseline, result = (torch.cat([getattr(b, k) for b in batches])
                                         for k in ("observation", "baseline", "result"))
        metrics: dict[str, float] = {}
        if self.request.task != "interpolate":
            metrics["psnr"] = float(psnr(result, self.truth, self.clamp).mean())
            metrics["psnr_baseline"] = float(psnr(baseline, self.truth, self.clamp).mean())
        metrics.update(_frechet(self.p.suite, [result], ""))
        metrics.update(_frechet(self.p.suite, [baseline], "_baseline"))
        metrics.update(self.truth_metrics)
        measured = round(calls / n_batches)
        self.picture(measured, observation, baseline, result)
        return EditResult(measured, metrics, seconds / n, sigmas)

    def picture(self, nfe: int, observation: Tensor, baseline: Tensor, result: Tensor) -> None:
        """truth | observation | baseline | result."""
        task = self.request.task
        path = self.out / f"nfe{nfe:03d}.png"
        if task == "interpolate":
            rows = min(self.request.n, GRID_IMAGES // 2) * INTERPOLATION_POINTS
            save_panels([("slerp (CM, 1 call)", result[:rows]), ("lerp", baseline[:rows])],
                        INTERPOLATION_POINTS, path, self.clamp)
            return
        k = min(self.request.n, GRID_IMAGES)
        cols = max(1, round(k ** 0.5))
        panels = [("truth", self.truth[:k]), (f"observed ({task})", observation[:k])]
        if task not in ("stroke", "denoise"):  # their baseline is the observation itself
            panels.append((BASELINES[task], baseline[:k]))
        panels.append((f"edit, NFE {nfe}", result[:k]))
        save_panels(panels, cols, path, self.clamp)


def _frechet(suite: MetricSuite, sets: list[Tensor], suffix: str) -> dict[str, float]:
    """The dataset's metric suite (fcd for digits) over the images, names suffixed."""
    accumulators = suite.new()
    for images in sets:
        for acc in accumulators:
            acc.update(images)
    metrics: dict[str, float] = {}
    for acc in accumulators:
        metrics.update({f"{k}{suffix}": v for k, v in acc.compute().items()})
    return metrics


# --- 2-D mixtures -----------------------------------------------------------------------------


class _PointsEditor:
    """Inpaints the second coordinate of points of a Gaussian mixture given the first."""

    def __init__(self, p: Prepared, ema: nn.Module | None, request: EditRequest,
                 sigma: float | None, out: Path) -> None:
        gmm = p.dataset
        assert isinstance(gmm, GaussianMixture)
        self.p, self.ema, self.request, self.sigma, self.out = p, ema, request, sigma, out
        self.method = p.method  # can_edit: its evaluation model is a consistency function
        self.levels_of = p.config.diffusion  # the run's sigma_min, sigma_max and rho
        self.gmm = gmm
        generator = torch.Generator().manual_seed(sample_seed(request.seed, _TRUTH_STREAM))
        self.observed = gmm.sample(request.n, generator).to(torch.float64)
        self.known = torch.tensor([True, False])
        exact_gen = torch.Generator().manual_seed(sample_seed(request.seed, _EXACT_STREAM))
        self.exact = gmm_conditional_sample(gmm, self.observed, self.known, EDIT_DRAWS,
                                            exact_gen)
        self.exact_again = gmm_conditional_sample(gmm, self.observed, self.known, EDIT_DRAWS,
                                                  exact_gen)
        self.floor = _mean(per_row_w2(self.exact[..., 1], self.exact_again[..., 1]))

    def run(self, nfe: int) -> EditResult:
        """EDIT_DRAWS edits and unconditional samples per observed point, scored by W2."""
        m, d, device = self.method, self.levels_of, self.p.device
        assert self.sigma is not None  # inpaint always has a start level
        sigmas = edit_levels(nfe, d.sigma_min, self.sigma, d.rho)
        model = m.evaluation_model(self.ema, nfe)
        model.eval()
        n, draws = self.request.n, EDIT_DRAWS
        data_mean = (self.gmm.weights @ self.gmm.means).to(torch.float32).to(device)
        replacement = Replacement(PixelBasis(), self.known.to(device))
        observed = self.observed.to(torch.float32).to(device).repeat_interleave(draws, 0)
        y = replacement.observe(observed, data_mean[None])
        indices = range(n * draws)
        counter = _counted(model, None)
        t0 = time.perf_counter()
        with torch.inference_mode():
            edited = edit_consistency(counter, y, replacement, sigmas,
                                      StackedGenerator(self.request.seed, indices, device),
                                      d.sigma_min)
        seconds = time.perf_counter() - t0
        free = _counted(model, None)
        rng = StackedGenerator(self.request.seed, indices, device)  # the same noise
        with torch.inference_mode():
            unconditional = m.sample(free, rng.randn(self.gmm.shape), nfe, rng)
        if counter.calls != free.calls:
            raise BenchError(f"edit made {counter.calls} calls, sampling {free.calls}")
        edited = edited.double().cpu().reshape(n, draws, 2)
        unconditional = unconditional.double().cpu().reshape(n, draws, 2)
        metrics = {
            "w2": _mean(per_row_w2(edited[..., 1], self.exact[..., 1])),
            "w2_unconditional": _mean(per_row_w2(unconditional[..., 1], self.exact[..., 1])),
            "w2_noise_floor": self.floor,
        }
        uncond_at_x = torch.stack([self.observed[:, None, 0].expand(n, draws),
                                   unconditional[..., 1]], dim=2)
        save_conditional_scatter(
            self.observed[:, 0],
            [("exact p(y | x)", self.exact), (f"edit, NFE {counter.calls}", edited),
             ("unconditional y", uncond_at_x)],
            f"{self.gmm.name}: y given x, {n} observed x, {draws} draws each",
            self.out / f"nfe{counter.calls:03d}.png")
        return EditResult(counter.calls, metrics, seconds / (n * draws), sigmas)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
