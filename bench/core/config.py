"""Typed run configuration and its layered resolution.

Precedence, lowest first: the dataclass defaults below < the shipped bench.toml < ./bench.toml
< the bench.toml presets [preset."*".<dataset>] < [preset.<method>."*"]
< [preset.<method>.<dataset>] < --config FILE
< command-line flags < repeatable --set key=value (values parsed as TOML literals).
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.core.errors import UsageError

PACKAGE_DEFAULTS = Path(__file__).resolve().parents[1] / "_defaults" / "bench.toml"
SOURCE_DEFAULTS = Path(__file__).resolve().parents[2] / "bench.toml"
ALL = "*"  # preset key matching every method ([preset."*".<dataset>]) or every dataset
LR_SCHEDULES = ("constant", "cosine", "linear")  # learning rate after warm-up
INDEX_SAMPLINGS = ("uniform", "lognormal")  # how the consistency index n is drawn
WEIGHTINGS = ("uniform", "inverse_gap")  # consistency-loss weightings lambda(t_n)
EVAL_NOISES = ("auto", "random", "qmc")  # evaluation noise: eval.noise
PRECISIONS = ("fp32", "bf16", "fp16")  # train.precision: autocast of the forward passes
DISTANCES = ("l2", "l1", "pseudo_huber", "lpips")  # consistency-loss distances
NET_KINDS = ("auto", "mlp", "unet", "adm", "ddpmpp", "ncsnpp")  # net.kind (bench.nets.build)


@dataclass
class DataConfig:
    path: str = ""  # local folder or file of a path dataset ("" = unset)


@dataclass
class NetConfig:
    kind: str = "auto"  # "mlp", "unet", "adm", "ddpmpp", "ncsnpp"; "auto": mlp/unet by data
    width: int = 128  # MLP hidden width
    depth: int = 3  # MLP residual blocks
    emb_dim: int = 0  # noise-embedding width; 0 = 128 (MLP) or 4 * model_channels (UNet)
    model_channels: int = 64  # UNet base channels
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # per-level widths;
    # [] = the official ADM default for the resolution (adm) or [2, 2, 2] (ddpmpp, ncsnpp)
    num_res_blocks: int = 2  # UNet residual blocks per level
    attn_resolutions: list[int] = field(default_factory=lambda: [16])  # UNet attention levels
    dropout: float = 0.0  # dropout probability inside blocks
    num_heads: int = 1  # attention heads
    num_head_channels: int = 0  # adm: channels per attention head (> 0 overrides num_heads)
    scale_shift_norm: bool = True  # unet, adm: embedding as GroupNorm scale and shift
    resblock_updown: bool = False  # adm: residual blocks for up/downsampling
    class_conditional: bool = False  # condition on labels when the dataset has them


@dataclass
class DiffusionConfig:
    sigma_min: float = 0.002  # smallest noise level (Karras et al. 2022)
    sigma_max: float = 80.0  # largest noise level
    rho: float = 7.0  # Karras grid curvature
    sigma_data: float = 0.0  # data std for preconditioning; 0 = the dataset's own value


@dataclass
class TrainConfig:
    steps: int = 4000  # optimizer iterations
    batch_size: int = 512  # samples per iteration
    optimizer: str = "adam"  # "adam" or "radam"
    lr: float = 1e-3  # peak learning rate
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.999  # Adam beta2
    weight_decay: float = 0.0  # decoupled weight decay (AdamW style when > 0)
    warmup_steps: int = 100  # linear learning-rate warm-up
    lr_schedule: str = "constant"  # after warm-up: "constant", or "cosine"/"linear" decay to 0
    grad_clip: float = 0.0  # max gradient norm; 0 disables clipping
    ema_rate: float = 0.999  # evaluation EMA of the student per iteration; 0 disables
    checkpoint_every: int = 1000  # iterations between checkpoints (0 = only at the end)
    log_every: int = 50  # iterations between logged training metrics
    eval_every: int = 0  # iterations between intermediate evaluations (0 = only at the end)
    nonfinite: str = "stop"  # on a non-finite loss: "stop" the run or "skip" the step
    precision: str = "fp32"  # forward passes: "fp32", "bf16" autocast, "fp16" (CUDA, scaled)
    channels_last: bool = False  # image networks and batches in NHWC memory order
    compile: bool = False  # torch.compile the student's forward


@dataclass
class EvalConfig:
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4])  # NFEs to evaluate
    num_samples: int = 2000  # generated samples per NFE
    batch_size: int = 1000  # samples per generation batch
    metrics: list[str] = field(default_factory=list)  # [] = the dataset's default metrics
    seed: int = 0  # sampling seed: sample i uses (seed, i), identical across methods
    noise: str = "auto"  # "random", "qmc" (scrambled Sobol, 2-D data only), "auto" = qmc on 2-D
    reference_seed: int = 1  # seed of the reference draw of the data
    inception_weights: str = ""  # local Inception-v3 weights for FID ("" = torch hub cache)
    metric_tool: str = "torch-fidelity"  # image metrics: "torch-fidelity" or "clean-fid"
    clean_fid_mode: str = "clean"  # clean-fid: "clean", "legacy_tensorflow", "legacy_pytorch"
    reference_split: str = "train"  # image metrics: split the reference statistics come from
    image_metrics: list[str] = field(default_factory=lambda: ["fid"])  # of fid, is, kid, prc
    save_png: bool = False  # also write every evaluated image as a PNG (image datasets)
    reference_stats: str = ""  # published .npz with mu and sigma (clean-fid, guided-diffusion)
    reference_num_samples: int = 0  # reference images for the statistics; 0 = the whole split


@dataclass
class SampleConfig:
    sigmas: list[float] = field(default_factory=list)  # explicit consistency-sampling levels
    # torch.compile the sampling network (on CUDA in "reduce-overhead" mode: CUDA graphs)
    compile: bool = False


@dataclass
class EDMConfig:
    p_mean: float = -1.2  # mean of ln(sigma) during teacher training
    p_std: float = 1.2  # std of ln(sigma) during teacher training


@dataclass
class CDConfig:
    n_scales: int = 18  # N: levels of the Karras discretisation
    solver: str = "heun"  # teacher ODE solver for one step: "heun" (2 calls) or "euler" (1)
    distance: str = "l2"  # "l2", "l1", "pseudo_huber" or "lpips"
    weighting: str = "uniform"  # lambda(t_n): "uniform" (the paper) or "inverse_gap" (iCT)
    indices: str = "uniform"  # n: "uniform" (the paper) or "lognormal" (iCT, p_mean/p_std)
    p_mean: float = -1.1  # lognormal index distribution: mean of ln(sigma)
    p_std: float = 2.0  # lognormal index distribution: std of ln(sigma)
    target_mu: float = 0.0  # target EMA rate mu (0 = the target is the student, stop-grad)
    huber_c: float = 0.0  # pseudo-Huber c; 0 = 0.00054 sqrt(dim)


@dataclass
class CTConfig:
    s0: int = 2  # initial discretisation steps of the N(k) curriculum
    s1: int = 150  # final discretisation steps
    mu0: float = 0.9  # target EMA rate at the start
    distance: str = "l2"  # "l2", "l1", "pseudo_huber" or "lpips"
    weighting: str = "uniform"  # lambda(t_n): "uniform" (the paper) or "inverse_gap" (iCT)
    indices: str = "uniform"  # n: "uniform" (the paper) or "lognormal" (iCT, p_mean/p_std)
    p_mean: float = -1.1  # lognormal index distribution: mean of ln(sigma)
    p_std: float = 2.0  # lognormal index distribution: std of ln(sigma)
    mu_official: bool = False  # mu(k) with N(k) - 1 in the denominator, as the official code
    huber_c: float = 0.0  # pseudo-Huber c; 0 = 0.00054 sqrt(dim)


@dataclass
class ICTConfig:
    s0: int = 10  # initial discretisation steps of the doubling curriculum
    s1: int = 1280  # final discretisation steps
    p_mean: float = -1.1  # lognormal noise-index distribution: mean of ln(sigma)
    p_std: float = 2.0  # lognormal noise-index distribution: std of ln(sigma)
    huber_c: float = 0.0  # pseudo-Huber c; 0 = 0.00054 sqrt(dim)


@dataclass
class PDConfig:
    initial_steps: int = 16  # teacher Euler steps at the first stage (a power of two >= 2)
    iters_per_stage: int = 400  # optimizer iterations per halving stage (paper: 50k)
    last_stage_factor: float = 2.0  # the final (1-step) stage trains this many times longer


@dataclass
class TrackingConfig:
    runs_dir: str = "runs"  # everything a run writes goes here
    uri: str = ""  # MLflow tracking URI; "" = sqlite:///<runs_dir>/mlflow.db


@dataclass
class RunConfig:
    method: str = ""  # registered method name (bench methods)
    dataset: str = ""  # registered dataset name, folder:PATH or points:PATH (bench datasets)
    seed: int = 0  # training seed
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    teacher: str = "auto"  # run id, checkpoint path, "analytic" or "auto"
    sampler: str = ""  # "euler" or "heun" for diffusion models; "" = the method's default
    data: DataConfig = field(default_factory=DataConfig)
    net: NetConfig = field(default_factory=NetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)
    cd: CDConfig = field(default_factory=CDConfig)
    ct: CTConfig = field(default_factory=CTConfig)
    ict: ICTConfig = field(default_factory=ICTConfig)
    pd: PDConfig = field(default_factory=PDConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        """Check value ranges and choices; raise UsageError naming the key."""
        checks: list[tuple[bool, str]] = [
            (self.seed >= 0, "seed must be >= 0"),
            (self.sampler in ("", "euler", "heun"), "sampler must be 'euler' or 'heun'"),
            (self.net.kind in NET_KINDS, f"net.kind must be one of {', '.join(NET_KINDS)}"),
            (self.net.num_head_channels >= 0, "net.num_head_channels must be >= 0"),
            (0.0 <= self.net.dropout < 1.0, "net.dropout must be in [0, 1)"),
            (self.train.steps >= 0, "train.steps must be >= 0"),
            (self.train.batch_size >= 1, "train.batch_size must be >= 1"),
            (self.train.lr > 0, "train.lr must be > 0"),
            (self.train.optimizer in ("adam", "radam"), "train.optimizer must be adam or radam"),
            (0.0 <= self.train.ema_rate < 1.0, "train.ema_rate must be in [0, 1)"),
            (self.train.grad_clip >= 0, "train.grad_clip must be >= 0"),
            (self.train.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
            (self.train.checkpoint_every >= 0, "train.checkpoint_every must be >= 0"),
            (self.train.log_every >= 1, "train.log_every must be >= 1"),
            (self.train.lr_schedule in LR_SCHEDULES,
             f"train.lr_schedule must be one of {', '.join(LR_SCHEDULES)}"),
            (self.train.eval_every >= 0, "train.eval_every must be >= 0"),
            (self.train.nonfinite in ("stop", "skip"), "train.nonfinite must be stop or skip"),
            (self.train.precision in PRECISIONS,
             f"train.precision must be one of {', '.join(PRECISIONS)}"),
            (len(self.eval.nfe) > 0, "eval.nfe must not be empty"),
            (all(n >= 1 for n in self.eval.nfe), "eval.nfe values must be >= 1"),
            (self.eval.num_samples >= 2, "eval.num_samples must be >= 2"),
            (self.eval.batch_size >= 1, "eval.batch_size must be >= 1"),
            (self.eval.seed >= 0 and self.eval.reference_seed >= 0, "eval seeds must be >= 0"),
            (self.eval.noise in EVAL_NOISES,
             f"eval.noise must be one of {', '.join(EVAL_NOISES)}"),
            (all(s > 0 for s in self.sample.sigmas), "sample.sigmas must be > 0"),
            (
                0 < self.diffusion.sigma_min < self.diffusion.sigma_max,
                "diffusion.sigma_min must be in (0, sigma_max)",
            ),
            (self.diffusion.sigma_data >= 0, "diffusion.sigma_data must be >= 0"),
            (self.pd.initial_steps >= 2 and self.pd.initial_steps.bit_count() == 1,
             "pd.initial_steps must be a power of two >= 2"),
            (self.pd.iters_per_stage >= 1, "pd.iters_per_stage must be >= 1"),
            (self.pd.last_stage_factor > 0, "pd.last_stage_factor must be > 0"),
            (self.eval.metric_tool in ("torch-fidelity", "clean-fid"),
             "eval.metric_tool must be torch-fidelity or clean-fid"),
            (self.eval.clean_fid_mode in ("clean", "legacy_tensorflow", "legacy_pytorch"),
             "eval.clean_fid_mode must be clean, legacy_tensorflow or legacy_pytorch"),
            (self.cd.n_scales >= 2, "cd.n_scales must be >= 2"),
            (self.cd.solver in ("heun", "euler"), "cd.solver must be heun or euler"),
            (self.cd.distance in DISTANCES, f"cd.distance must be one of {', '.join(DISTANCES)}"),
            (self.ct.distance in DISTANCES, f"ct.distance must be one of {', '.join(DISTANCES)}"),
            (self.cd.weighting in WEIGHTINGS,
             f"cd.weighting must be one of {', '.join(WEIGHTINGS)}"),
            (self.ct.weighting in WEIGHTINGS,
             f"ct.weighting must be one of {', '.join(WEIGHTINGS)}"),
            (self.cd.indices in INDEX_SAMPLINGS,
             f"cd.indices must be one of {', '.join(INDEX_SAMPLINGS)}"),
            (self.ct.indices in INDEX_SAMPLINGS,
             f"ct.indices must be one of {', '.join(INDEX_SAMPLINGS)}"),
            (self.cd.p_std > 0, "cd.p_std must be > 0"),
            (self.ct.p_std > 0, "ct.p_std must be > 0"),
            (0.0 <= self.cd.target_mu < 1.0, "cd.target_mu must be in [0, 1)"),
            (0.0 < self.ct.mu0 < 1.0, "ct.mu0 must be in (0, 1)"),
            (2 <= self.ct.s0 <= self.ct.s1, "ct.s0 and ct.s1 must satisfy 2 <= s0 <= s1"),
            (1 <= self.ict.s0 <= self.ict.s1, "ict.s0 and ict.s1 must satisfy 1 <= s0 <= s1"),
            (self.ict.p_std > 0, "ict.p_std must be > 0"),
            (min(self.cd.huber_c, self.ct.huber_c, self.ict.huber_c) >= 0,
             "huber_c must be >= 0"),
            (self.eval.reference_num_samples >= 0, "eval.reference_num_samples must be >= 0"),
            (self.eval.reference_split in ("train", "test"),
             "eval.reference_split must be train or test"),
            (set(self.eval.image_metrics) <= {"fid", "is", "kid", "prc"},
             "eval.image_metrics must be a subset of fid, is, kid, prc"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        sigmas = self.sample.sigmas
        if any(a <= b for a, b in zip(sigmas, sigmas[1:], strict=False)):
            raise UsageError("sample.sigmas must be strictly decreasing")


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass, with one-line errors naming the key


def defaults_dict() -> dict[str, Any]:
    """The built-in defaults as a nested dict."""
    return dataclasses.asdict(RunConfig())


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as a nested dict of TOML-serialisable values."""
    return dataclasses.asdict(cfg)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"train.steps": 4000, ...}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check value against the annotated type tp; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UsageError(f"config key '{key}' expects a list of {_type_name(inner)}, "
                             f"got {value!r}")
        return [_coerce(key, v, inner) for v in value]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported config type for {key}")
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise UsageError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            raise UsageError(_unknown_key_message(f"{prefix}{key}", prefix, sorted(names)))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise UsageError(f"config key '{prefix}{key}' is a table, got {value!r}")
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")  # type: ignore[arg-type]
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, tp)
    return cls(**kwargs)


def _unknown_key_message(key: str, prefix: str, valid: list[str]) -> str:
    where = f"[{prefix[:-1]}]" if prefix else "the top level"
    return f"unknown config key '{key}' (valid in {where}: {', '.join(valid)})"


def from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from a nested dict (unknown keys and wrong types fail)."""
    cfg = _build(RunConfig, data, "")
    cfg.validate()
    return cfg


def merge(base: dict[str, Any], layer: Mapping[str, Any], source: str, prefix: str = "") -> None:
    """Deep-merge layer into base in place; keys must already exist in base."""
    for key, value in layer.items():
        name = f"{prefix}{key}"
        if key not in base:
            valid = sorted(base)
            raise UsageError(f"{source}: " + _unknown_key_message(name, prefix, valid))
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise UsageError(f"{source}: config key '{name}' is a table, got {value!r}")
            merge(base[key], value, source, f"{name}.")
        else:
            base[key] = copy.deepcopy(value)


def parse_set(item: str) -> tuple[list[str], Any]:
    """Parse one `key=value` override; the value is a TOML literal or else a bare string."""
    if "=" not in item:
        raise UsageError(f"--set expects key=value, got {item!r}")
    key, raw = (part.strip() for part in item.split("=", 1))
    if not key or any(not part for part in key.split(".")):
        raise UsageError(f"--set expects key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def nest(path: list[str], value: Any) -> dict[str, Any]:
    """["train", "steps"], 5 -> {"train": {"steps": 5}}."""
    out: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        out = {part: out}
    return out


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """Read a TOML file; a missing or malformed file is a one-line error."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{what} {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None


# ---------------------------------------------------------------------------------------------
# bench.toml: sections that mirror RunConfig, per-dataset data tables and presets


@dataclass
class BenchFile:
    """One bench.toml, split into its plain settings, dataset paths and presets."""

    source: str
    settings: dict[str, Any]
    data_tables: dict[str, dict[str, Any]]  # [data.<dataset>] tables
    presets: dict[str, dict[str, dict[str, Any]]]  # [preset.<method>.<dataset>] tables


def load_bench_file(path: Path) -> BenchFile:
    """Parse a bench.toml into settings, per-dataset data tables and presets."""
    raw = read_toml(path, "bench.toml")
    settings = {k: v for k, v in raw.items() if k != "preset"}
    if not isinstance(settings.get("data", {}), dict):
        raise UsageError(f"{path}: [data] must be a table ([data.<dataset>] path = ...)")
    data = dict(settings.get("data", {}))
    known = {f.name for f in dataclasses.fields(DataConfig)}
    data_tables = {k: v for k, v in data.items() if k not in known and isinstance(v, dict)}
    settings["data"] = {k: v for k, v in data.items() if k not in data_tables}
    presets = raw.get("preset", {})
    if not isinstance(presets, dict) or not all(isinstance(v, dict) for v in presets.values()):
        raise UsageError(f"{path}: [preset] must hold [preset.<method>.<dataset>] tables")
    # check every table against the schema (keys and types) early, so a typo fails before any
    # work starts, even when a later layer overrides the value
    _check_layer(settings, str(path))
    for name, table in data_tables.items():
        _check_layer({"data": table}, f"{path} [data.{name}]")
    for method, per_dataset in presets.items():
        for dataset, table in per_dataset.items():
            if not isinstance(table, dict):
                raise UsageError(f"{path}: preset.{method}.{dataset} must be a table")
            body = {k: v for k, v in table.items() if k != "description"}
            _check_layer(body, f"{path} [preset.{method}.{dataset}]")
    return BenchFile(str(path), settings, data_tables, presets)


def _check_layer(layer: Mapping[str, Any], source: str) -> None:
    """Unknown keys and wrong types of one layer are errors naming the source and the key."""
    data = defaults_dict()
    merge(data, layer, source)
    try:
        _build(RunConfig, data, "")
    except UsageError as exc:
        raise UsageError(f"{source}: {exc}") from None


def default_bench_files(cwd: Path) -> list[BenchFile]:
    """The shipped bench.toml, then ./bench.toml if it is a different file."""
    files: list[Path] = []
    for candidate in (PACKAGE_DEFAULTS, SOURCE_DEFAULTS):
        if candidate.is_file():
            files.append(candidate)
            break
    local = cwd / "bench.toml"
    if local.is_file() and not any(local.resolve() == f.resolve() for f in files):
        files.append(local)
    return [load_bench_file(f) for f in files]


@dataclass
class Resolved:
    """A resolved config and where its layers came from."""

    config: RunConfig
    sources: list[str]
    preset: str | None  # the presets applied, least specific first
    preset_description: str | None  # the description of the most specific one


def resolve(
    *,
    bench_files: Iterable[BenchFile],
    config_file: Path | None = None,
    flags: Mapping[str, Any] | None = None,
    sets: Iterable[str] = (),
) -> Resolved:
    """Resolve the layers into a validated RunConfig."""
    files = list(bench_files)
    file_layer = read_toml(config_file, "config file") if config_file else {}
    flag_layer: dict[str, Any] = {}
    for key, value in (flags or {}).items():
        if value is not None:
            merge_free(flag_layer, nest(key.split("."), value))
    set_layer: dict[str, Any] = {}
    for item in sets:
        path, value = parse_set(item)
        merge_free(set_layer, nest(path, value))

    def pick(key: str) -> str:
        for layer in (set_layer, flag_layer, file_layer, *(f.settings for f in reversed(files))):
            if isinstance(layer.get(key), str) and layer[key]:
                return str(layer[key])
        return ""

    method, dataset = pick("method"), pick("dataset")
    data = defaults_dict()
    sources = ["defaults"]
    for f in files:
        merge(data, f.settings, f.source)
        sources.append(f.source)
    dataset_key = (dataset.split(":", 1)[0] if dataset.startswith(("folder:", "points:"))
                   else dataset)
    for f in files:
        if dataset_key in f.data_tables:
            merge(data["data"], f.data_tables[dataset_key], f.source, "data.")
    applied: list[str] = []
    description = None
    for method_key, data_key in ((ALL, dataset_key), (method, ALL), (method, dataset_key)):
        for f in files:
            table = f.presets.get(method_key, {}).get(data_key)
            if table is None:
                continue
            body = {k: v for k, v in table.items() if k != "description"}
            merge(data, body, f"{f.source} [preset.{method_key}.{data_key}]")
            name = f"{method_key}.{data_key}"
            if name not in applied:
                applied.append(name)
            description = table.get("description", description)
    for layer, name in ((file_layer, str(config_file)), (flag_layer, "flags"),
                        (set_layer, "--set")):
        if layer:
            merge(data, layer, name)
            sources.append(name)
    cfg = from_dict(data)
    return Resolved(cfg, sources, ", ".join(applied) or None, description)


def merge_free(base: dict[str, Any], layer: Mapping[str, Any]) -> None:
    """Deep-merge without schema checks (for building override layers)."""
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            merge_free(base[key], value)
        else:
            base[key] = copy.deepcopy(value) if isinstance(value, Mapping | list) else value


def dumps(cfg: RunConfig) -> str:
    """The config as TOML text that `--config` accepts back."""
    import tomli_w

    return tomli_w.dumps(to_dict(cfg))
