"""Typed run configuration and its layered resolution.

Precedence, lowest first: the model defaults below < the shipped bench.toml < ./bench.toml
< the bench.toml presets [preset."*".<dataset>] < [preset.<method>."*"]
< [preset.<method>.<dataset>] < --config FILE
< command-line flags < repeatable --set key=value (values parsed as TOML literals).
At each preset level a method's own presets file (`register_presets`) comes before the
bench.toml files.

The sections shared by every run are defined here; each method declares its own section (a
`Section` subclass in its module, registered with `register_section`), so a run's config holds
the shared sections and one section per registered method. Validation is pydantic's (strict
types, no unknown keys, bounds on the fields, finite floats, integers within int64); its errors
become one line naming the key.
"""

from __future__ import annotations

import copy
import sys
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import annotated_types
import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from bench.core.errors import UsageError

PACKAGE_DEFAULTS = Path(__file__).resolve().parents[1] / "_defaults" / "bench.toml"
SOURCE_DEFAULTS = Path(__file__).resolve().parents[2] / "bench.toml"
ALL = "*"  # preset key matching every method ([preset."*".<dataset>]) or every dataset
INT64_MAX = 2**63 - 1  # every integer key fits a signed 64-bit integer (seeds, tensor sizes)
CONFIG_MAX_BYTES = 16 * 2**20  # a bench.toml or --config file larger than this is refused

NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Rate = Annotated[float, Field(ge=0, lt=1)]  # a probability or an averaging rate in [0, 1)
ImageMetric = Literal["fid", "is", "kid", "prc", "fd_dinov2"]


def _default_image_metrics() -> list[ImageMetric]:
    """eval.image_metrics unless set: FID only."""
    return ["fid"]


def _outside_int64(value: Any) -> bool:
    """Whether an integer, or any integer in a list, lies outside the signed 64-bit range."""
    if isinstance(value, list):
        return any(_outside_int64(v) for v in value)
    return isinstance(value, int) and not -INT64_MAX - 1 <= value <= INT64_MAX


class Section(BaseModel):
    """One table of the config: typed fields with defaults; unknown keys and wrong types fail;
    floats are finite (no nan, inf or 1e400) and integers fit in 64 bits."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True,
                              allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _int64(cls, value: Any) -> Any:
        if _outside_int64(value):
            raise PydanticCustomError("int64_range", "integer outside the int64 range")
        return value


class DataConfig(Section):
    path: str = ""  # local folder or file of a path dataset ("" = unset)
    # random horizontal flips of the training images (both official CM codes flip every
    # image dataset); each batch's flips are a function of (seed, iteration)
    hflip: bool = False


class NetConfig(Section):
    # "mlp", "unet", "adm", "ddpmpp", "ncsnpp" (bench.nets.build); "auto": mlp/unet by data
    kind: Literal["auto", "mlp", "unet", "adm", "ddpmpp", "ncsnpp"] = "auto"
    width: PosInt = 128  # MLP hidden width
    depth: PosInt = 3  # MLP residual blocks
    emb_dim: NonNegInt = 0  # noise-embedding width; 0 = 128 (MLP) or 4 * model_channels (UNet)
    model_channels: PosInt = 64  # UNet base channels
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 2])  # per-level widths;
    # [] = the official ADM default for the resolution (adm) or [2, 2, 2] (ddpmpp, ncsnpp)
    num_res_blocks: PosInt = 2  # UNet residual blocks per level
    attn_resolutions: list[int] = Field(default_factory=lambda: [16])  # UNet attention levels
    dropout: Rate = 0.0  # dropout probability inside blocks
    num_heads: PosInt = 1  # attention heads
    num_head_channels: NonNegInt = 0  # adm: channels per attention head (> 0 overrides heads)
    scale_shift_norm: bool = True  # unet, adm: embedding as GroupNorm scale and shift
    resblock_updown: bool = False  # adm: residual blocks for up/downsampling
    class_conditional: bool = False  # condition on labels when the dataset has them
    fourier_scale: PosFloat = 16.0  # ncsnpp: std of the Fourier noise-embedding frequencies
    # ddpmpp, ncsnpp: "positional" or "fourier" instead of the variant's own noise embedding
    noise_embedding: Literal["default", "positional", "fourier"] = "default"
    double_norm: bool = False  # unet, adm: pixel-normalised AdaGN scale and shift (sCM)
    # time inputs of the network; 0 = what the method's parameterisation takes (MeanFlow: 2)
    time_inputs: int = Field(default=0, ge=0, le=2)


class DiffusionConfig(Section):
    sigma_min: PosFloat = 0.002  # smallest noise level (Karras et al. 2022)
    sigma_max: float = 80.0  # largest noise level
    rho: float = 7.0  # Karras grid curvature
    sigma_data: NonNegFloat = 0.0  # data std for preconditioning; 0 = the dataset's own value

    @model_validator(mode="after")
    def _ordered(self) -> DiffusionConfig:
        if not self.sigma_min < self.sigma_max:
            raise ValueError("diffusion.sigma_min must be in (0, sigma_max)")
        return self


class TrainConfig(Section):
    steps: NonNegInt = 4000  # optimizer iterations
    batch_size: PosInt = 512  # samples per iteration
    optimizer: Literal["adam", "radam"] = "adam"
    lr: PosFloat = 1e-3  # peak learning rate
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.999  # Adam beta2
    weight_decay: float = 0.0  # decoupled weight decay (AdamW style when > 0)
    warmup_steps: NonNegInt = 100  # linear learning-rate warm-up
    # after warm-up: "constant", or "cosine"/"linear" decay to 0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    grad_clip: NonNegFloat = 0.0  # max gradient norm; 0 disables clipping
    ema_rate: Rate = 0.999  # evaluation EMA of the student per iteration; 0 disables
    checkpoint_every: NonNegInt = 1000  # iterations between checkpoints (0 = only at the end)
    # checkpoints kept: the last (last.pt) and, above 1, the ones before it as iter-<step>.pt
    keep_checkpoints: PosInt = 1
    # also keep best.pt: the weights at the evaluation with the best primary metric (its
    # first NFE), tagged best_step, best_metric and best_value
    keep_best: bool = False
    log_every: PosInt = 50  # iterations between logged training metrics
    eval_every: NonNegInt = 0  # iterations between intermediate evaluations (0 = at the end)
    nonfinite: Literal["stop", "skip"] = "stop"  # on a non-finite loss: stop, or skip the step
    # forward passes: "fp32", "bf16" autocast, "fp16" (CUDA, scaled)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False  # image networks and batches in NHWC memory order
    compile: bool = False  # torch.compile the student's forward


class EvalConfig(Section):
    # NFEs to evaluate; [] = evaluation off (train now, `bench eval --run ID --nfe ...` later,
    # where the metric weights are)
    nfe: list[PosInt] = Field(default_factory=lambda: [1, 2, 4])
    num_samples: Annotated[int, Field(ge=2)] = 2000  # generated samples per NFE
    batch_size: PosInt = 1000  # samples per generation batch
    metrics: list[str] = Field(default_factory=list)  # [] = the dataset's default metrics
    seed: NonNegInt = 0  # sampling seed: sample i uses (seed, i), identical across methods
    # evaluation seed sets: set k draws its noise from seed + 1000 k; each metric is logged per
    # set and as the mean (the tables' number), standard deviation and best (min) over sets
    seeds: PosInt = 1
    # 2-D data: resamples of the generated points for each metric's 95% bootstrap interval,
    # logged as <metric>_boot_low / _boot_high (0 = none; each resample costs one evaluation)
    bootstrap: NonNegInt = 0
    # "random", "qmc" (scrambled Sobol, 2-D data only), "auto" = qmc on 2-D
    noise: Literal["auto", "random", "qmc"] = "auto"
    reference_seed: NonNegInt = 1  # seed of the reference draw of the data
    inception_weights: str = ""  # local Inception-v3 weights for FID ("" = torch hub cache)
    # image metrics: "torch-fidelity" or "clean-fid"
    metric_tool: Literal["torch-fidelity", "clean-fid"] = "torch-fidelity"
    # clean-fid: "clean", "legacy_tensorflow", "legacy_pytorch"
    clean_fid_mode: Literal["clean", "legacy_tensorflow", "legacy_pytorch"] = "clean"
    # image metrics: split the reference statistics come from
    reference_split: Literal["train", "test"] = "train"
    # a subset of fid, is, kid, prc (Inception-v3) and fd_dinov2 (DINOv2)
    image_metrics: list[ImageMetric] = Field(default_factory=_default_image_metrics)
    dinov2_weights: str = ""  # local DINOv2 weights for fd_dinov2 ("" = torch hub cache)
    # DINOv2 size for fd_dinov2: the metric is defined on vit-l14
    dinov2_model: Literal["vit-s14", "vit-b14", "vit-l14", "vit-g14"] = "vit-l14"
    save_png: bool = False  # also write every evaluated image as a PNG (image datasets)
    reference_stats: str = ""  # published .npz with mu and sigma (clean-fid, guided-diffusion)
    reference_num_samples: NonNegInt = 0  # reference images for the statistics; 0 = all


class SampleConfig(Section):
    sigmas: list[PosFloat] = Field(default_factory=list)  # explicit consistency levels
    # torch.compile the sampling network (on CUDA in "reduce-overhead" mode: CUDA graphs)
    compile: bool = False

    @model_validator(mode="after")
    def _decreasing(self) -> SampleConfig:
        if any(a <= b for a, b in zip(self.sigmas, self.sigmas[1:], strict=False)):
            raise ValueError("sample.sigmas must be strictly decreasing")
        return self


class TrackingConfig(Section):
    runs_dir: str = "runs"  # everything a run writes goes here
    uri: str = ""  # MLflow tracking URI; "" = sqlite:///<runs_dir>/mlflow.db
    # a tracking server that is away at a run's end: wait this long, then leave the run's
    # writes in <runs_dir>/outbox for `bench sync`
    outbox_wait: float = Field(default=120.0, ge=0, allow_inf_nan=False)


class RunConfig(Section):
    """The shared part of every run's config; `config_model()` adds the methods' sections."""

    method: str = ""  # registered method name (bench methods)
    dataset: str = ""  # registered dataset name, folder:PATH or points:PATH (bench datasets)
    seed: NonNegInt = 0  # training seed
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    teacher: str = "auto"  # run id, checkpoint path, "analytic" or "auto"
    # a named variant of the method's preset for the dataset: [variant.<method>.<dataset>.<name>]
    variant: str = ""
    # "euler" or "heun" for diffusion models; "" = the method's default
    sampler: Literal["", "euler", "heun"] = ""
    data: DataConfig = Field(default_factory=DataConfig)
    net: NetConfig = Field(default_factory=NetConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def section(self, name: str, kind: type[S]) -> S:
        """A method's section by name, as its own type."""
        value = getattr(self, name, None)
        if not isinstance(value, kind):
            raise KeyError(f"config has no [{name}] section of type {kind.__name__}")
        return value


S = TypeVar("S", bound=Section)

# ---------------------------------------------------------------------------------------------
# the methods' sections

_SECTIONS: dict[str, type[Section]] = {}


def register_section(name: str, section: type[Section]) -> None:
    """Add a method's config section [name] to every run's config."""
    if name in RunConfig.model_fields or (name in _SECTIONS and _SECTIONS[name] is not section):
        raise ValueError(f"config section [{name}] is already defined")
    _SECTIONS[name] = section
    config_model.cache_clear()


_PRESET_FILES: dict[str, Path] = {}  # method name -> its presets (register_presets)


def register_presets(name: str, path: Path) -> None:
    """Add a method's own presets: a TOML file of [preset.<name>.<dataset>] tables (bench.toml's
    format) that applies below every bench.toml, so a user's file still overrides it."""
    _PRESET_FILES[name] = path


@cache
def config_model() -> type[RunConfig]:
    """RunConfig with one field per registered method section, in registration order."""
    fields: dict[str, Any] = {name: (section, Field(default_factory=section))
                              for name, section in _SECTIONS.items()}
    return create_model("RunConfig", __base__=RunConfig, **fields)


# ---------------------------------------------------------------------------------------------
# dict <-> model, with one-line errors naming the key


def defaults_dict() -> dict[str, Any]:
    """The built-in defaults as a nested dict."""
    return config_model()().model_dump()


def default_config() -> RunConfig:
    """Every default, with every registered method's section."""
    return config_model()()


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as a nested dict of TOML-serialisable values."""
    return cfg.model_dump()


def public_dict(cfg: RunConfig) -> dict[str, Any]:
    """to_dict with every URL's password masked: what is written anywhere (checkpoints,
    config.toml, params)."""
    from bench.core.secrets import masked

    return masked(to_dict(cfg))


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


def _field_at(model: type[BaseModel], loc: tuple[int | str, ...],
              ) -> tuple[type[BaseModel], FieldInfo | None]:
    """The model that holds the last named key of loc, and that key's field."""
    info: FieldInfo | None = None
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part)
        if info is None:
            return model, None
        inner = info.annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            model = inner
    return model, info


def _bounds(info: FieldInfo | None, element: bool) -> str:
    """'>= 1', '> 0' or 'in [0, 1)' from the field's (or its list elements') constraints."""
    metadata = list(info.metadata) if info is not None else []
    if element and info is not None:
        for arg in typing.get_args(info.annotation):
            metadata += [m for a in typing.get_args(arg) for m in getattr(a, "metadata", [])]
            metadata += typing.get_args(arg)[1:] if typing.get_origin(arg) is Annotated else []
    low = high = None
    for m in metadata:
        for lower in (annotated_types.Ge, annotated_types.Gt):
            if isinstance(m, lower):
                low = ("[" if lower is annotated_types.Ge else "(", m.ge if hasattr(m, "ge")
                       else m.gt)
        for upper in (annotated_types.Le, annotated_types.Lt):
            if isinstance(m, upper):
                high = ("]" if upper is annotated_types.Le else ")", m.le if hasattr(m, "le")
                        else m.lt)
    if low and high:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f"{'<=' if high[0] == ']' else '<'} {high[1]}"
    return "in range"


def _choices(info: FieldInfo | None) -> list[str]:
    """The allowed values of a Literal field (or of a list of Literals)."""
    tp = info.annotation if info is not None else None
    if typing.get_origin(tp) is list:
        (tp,) = typing.get_args(tp)
    return [str(c) for c in typing.get_args(tp)] if typing.get_origin(tp) is Literal else []


def _type_name(error_type: str) -> str:
    return {"int_type": "int", "int_from_float": "int", "float_type": "float",
            "string_type": "str", "bool_type": "bool"}.get(error_type, error_type)


def _message(model: type[BaseModel], error: Any) -> str:
    """One line for pydantic's first error, naming the dotted key."""
    loc: tuple[int | str, ...] = tuple(error["loc"])
    names = [str(p) for p in loc if not isinstance(p, int)]
    key = ".".join(names)
    kind, value = error["type"], error.get("input")
    holder, info = _field_at(model, loc)
    if kind == "extra_forbidden":
        prefix = ".".join(names[:-1])
        where = f"[{prefix}]" if prefix else "the top level"
        valid = ", ".join(sorted(holder.model_fields))
        return f"unknown config key '{key}' (valid in {where}: {valid})"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"config key '{key}' is a table, got {value!r}"
    if kind == "list_type":
        inner = typing.get_args(info.annotation) if info is not None else ()
        name = getattr(inner[0], "__name__", "value") if inner else "value"
        if inner and typing.get_origin(inner[0]) is Annotated:
            name = typing.get_args(inner[0])[0].__name__
        return f"config key '{key}' expects a list of {name}, got {value!r}"
    if kind in ("int_type", "int_from_float", "float_type", "string_type", "bool_type"):
        if loc and isinstance(loc[-1], int):
            return f"config key '{key}' expects a list of {_type_name(kind)}, got {value!r}"
        return f"config key '{key}' expects {_type_name(kind)}, got {value!r}"
    if kind in ("enum", "literal_error"):
        choices = _choices(info)
        listed = (" or ".join(choices) if len(choices) == 2
                  else f"one of {', '.join(choices)}")
        if info is not None and typing.get_origin(info.annotation) is list:
            return f"{key} must be a subset of {', '.join(choices)}"
        return f"{key} must be {listed}, got {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        element = bool(loc) and isinstance(loc[-1], int)
        what = f"{key} values" if element else key
        return f"{what} must be {_bounds(info, element)}, got {value!r}"
    if kind == "too_short":
        return f"{key} must not be empty"
    if kind == "finite_number":
        if loc and isinstance(loc[-1], int):
            return f"{key} values must be finite numbers, got {value!r}"
        return f"{key} must be a finite number, got {value!r}"
    if kind == "int64_range":
        what = f"{key} values" if isinstance(value, list) else key
        return f"{what} must fit in 64 bits (-2**63 to 2**63 - 1), got {value!r}"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    return f"config key '{key}': {error['msg']}"


def validate(model: type[RunConfig], data: Mapping[str, Any]) -> RunConfig:
    """Build a config from a nested dict; the first error is a UsageError naming the key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UsageError(_message(model, exc.errors()[0])) from None


def from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Build and validate a full RunConfig from a nested dict (unknown keys and wrong types
    fail)."""
    return validate(config_model(), data)


def merge(base: dict[str, Any], layer: Mapping[str, Any], source: str, prefix: str = "") -> None:
    """Deep-merge layer into base in place; keys must already exist in base."""
    for key, value in layer.items():
        name = f"{prefix}{key}"
        if key not in base:
            valid = sorted(base)
            where = f"[{prefix[:-1]}]" if prefix else "the top level"
            raise UsageError(f"{source}: unknown config key '{name}' "
                             f"(valid in {where}: {', '.join(valid)})")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise UsageError(f"{source}: config key '{name}' is a table, got {value!r}")
            merge(base[key], value, source, f"{name}.")
        else:
            base[key] = copy.deepcopy(value)


_TOO_LONG = (f"an integer of more than {sys.get_int_max_str_digits()} digits "
             "(integer keys fit in 64 bits)")
_TOO_DEEP = "arrays or tables nested too deeply"


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
    except ValueError:
        raise UsageError(f"--set {key}: {_TOO_LONG}") from None
    except RecursionError:
        raise UsageError(f"--set {key}: {_TOO_DEEP}") from None
    return key.split("."), value


def nest(path: list[str], value: Any) -> dict[str, Any]:
    """["train", "steps"], 5 -> {"train": {"steps": 5}}."""
    out: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        out = {part: out}
    return out


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """Read a TOML file; a missing, unreadable, oversized, non-UTF-8 or malformed file is a
    one-line error naming it."""
    try:
        with path.open("rb") as fh:
            data = fh.read(CONFIG_MAX_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > CONFIG_MAX_BYTES:
        raise UsageError(f"{what} {path} is larger than {CONFIG_MAX_BYTES // 2**20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UsageError(f"{what} {path} is not UTF-8 text (TOML files are): byte "
                         f"0x{data[exc.start]:02x} on line {line}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{what} {path} is not valid TOML: {exc}") from None
    except ValueError:
        raise UsageError(f"{what} {path} is not valid TOML: {_TOO_LONG}") from None
    except RecursionError:
        raise UsageError(f"{what} {path} is not valid TOML: {_TOO_DEEP}") from None


# ---------------------------------------------------------------------------------------------
# bench.toml: sections that mirror RunConfig, per-dataset data tables and presets


@dataclass
class BenchFile:
    """One bench.toml, split into its plain settings, dataset paths and presets."""

    source: str
    settings: dict[str, Any]
    data_tables: dict[str, dict[str, Any]]  # [data.<dataset>] tables
    presets: dict[str, dict[str, dict[str, Any]]]  # [preset.<method>.<dataset>] tables
    # [variant.<method>.<dataset>.<name>] tables: named alternatives to a preset
    variants: dict[str, dict[str, dict[str, dict[str, Any]]]] = field(default_factory=dict)


def load_bench_file(path: Path) -> BenchFile:
    """Parse a bench.toml into settings, per-dataset data tables and presets."""
    raw = read_toml(path, "bench.toml")
    settings = {k: v for k, v in raw.items() if k not in ("preset", "variant")}
    if not isinstance(settings.get("data", {}), dict):
        raise UsageError(f"{path}: [data] must be a table ([data.<dataset>] path = ...)")
    data = dict(settings.get("data", {}))
    known = set(DataConfig.model_fields)
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
    variants = raw.get("variant", {})
    shape_error = UsageError(f"{path}: [variant] must hold [variant.<method>.<dataset>.<name>] "
                             f"tables")
    if not isinstance(variants, dict):
        raise shape_error
    for method, per_dataset in variants.items():
        if not isinstance(per_dataset, dict):
            raise shape_error
        for dataset, named in per_dataset.items():
            if not isinstance(named, dict) or not all(isinstance(t, dict)
                                                      for t in named.values()):
                raise shape_error
            for name, table in named.items():
                body = {k: v for k, v in table.items() if k != "description"}
                _check_layer(body, f"{path} [variant.{method}.{dataset}.{name}]")
    return BenchFile(str(path), settings, data_tables, presets, variants)


_SCHEMA_ERRORS = ("extra_forbidden", "model_type", "dict_type", "model_attributes_type",
                  "list_type", "int_type", "int_from_float", "float_type", "string_type",
                  "bool_type")


def _check_layer(layer: Mapping[str, Any], source: str) -> None:
    """Unknown keys and wrong types of one layer are errors naming the source and the key
    (ranges and choices are checked on the resolved config, where later layers are in)."""
    data = defaults_dict()
    merge(data, layer, source)
    model = config_model()
    try:
        model.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            if error["type"] in _SCHEMA_ERRORS:
                raise UsageError(f"{source}: {_message(model, error)}") from None


def method_preset_files() -> list[BenchFile]:
    """The presets methods registered (register_presets); each file may only hold its own
    method's [preset.<name>.<dataset>] tables."""
    loaded = []
    for name, path in _PRESET_FILES.items():
        f = load_bench_file(path)
        if f.settings != {"data": {}} or f.data_tables or set(f.presets) - {name}:
            raise UsageError(f"{path}: a method's presets file holds only "
                             f"[preset.{name}.<dataset>] tables")
        loaded.append(f)
    return loaded


def default_bench_files(cwd: Path) -> list[BenchFile]:
    """The methods' own presets, the shipped bench.toml, then ./bench.toml if it is a
    different file."""
    files: list[Path] = []
    for candidate in (PACKAGE_DEFAULTS, SOURCE_DEFAULTS):
        if candidate.is_file():
            files.append(candidate)
            break
    local = cwd / "bench.toml"
    if local.is_file() and not any(local.resolve() == f.resolve() for f in files):
        files.append(local)
    return [*method_preset_files(), *(load_bench_file(f) for f in files)]


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
    variant = pick("variant")
    if variant:
        found = False
        for f in files:
            table = f.variants.get(method, {}).get(dataset_key, {}).get(variant)
            if table is None:
                continue
            body = {k: v for k, v in table.items() if k != "description"}
            merge(data, body, f"{f.source} [variant.{method}.{dataset_key}.{variant}]")
            description = table.get("description", description)
            found = True
        if not found:
            known = sorted({name for f in files
                            for name in f.variants.get(method, {}).get(dataset_key, {})})
            where = f"{method or '(no method)'} on {dataset_key or '(no dataset)'}"
            raise UsageError(f"unknown variant {variant!r} of {where}; "
                             + (f"valid: {', '.join(known)}" if known else "it has none"))
        applied.append(f"{method}.{dataset_key}.{variant}")
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
    """The config as TOML text that `--config` accepts back (passwords masked)."""
    return tomli_w.dumps(public_dict(cfg))
