"""Search spaces: TOML files of config keys and the ranges a sweep draws them from.

A space file (each method declares its built-in ones, `Method.search_spaces`; those of the
built-in methods live in methods/spaces/NAME.toml):

    description = "CT curriculum: s0, s1, mu0"   # optional, shown by `bench sweep --help`
    methods = ["ct"]                             # optional: the methods it applies to

    [params."ct.s0"]                             # any config key, as for --set
    type = "int"                                 # "int", "float" or "categorical"
    low = 1                                      # int/float: inclusive bounds, low < high
    high = 16
    log = true                                   # optional: draw on a log scale (low > 0)
    step = 1                                     # optional: grid step (not with log)

    [params."cd.solver"]
    type = "categorical"
    choices = ["heun", "euler"]                  # strings, numbers or booleans
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.core.config import read_toml
from bench.core.errors import UsageError
from methods import all_methods

TYPES = ("int", "float", "categorical")
TOP_KEYS = {"description", "methods", "params"}
FIELDS = {"int": {"type", "low", "high", "log", "step"},
          "float": {"type", "low", "high", "log", "step"},
          "categorical": {"type", "choices"}}

Scalar = str | int | float | bool


@dataclass(frozen=True)
class Param:
    """One swept config key and its distribution."""

    name: str  # dotted config key, e.g. "ct.s0"
    type: str  # "int", "float" or "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Scalar, ...] = ()

    def extremes(self) -> list[Scalar]:
        """The values that bound the range: low and high, or every choice."""
        if self.type == "categorical":
            return list(self.choices)
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]

    def to_dict(self) -> dict[str, Any]:
        """The TOML fields that define the parameter (for comparing studies)."""
        if self.type == "categorical":
            return {"type": self.type, "choices": list(self.choices)}
        out: dict[str, Any] = {"type": self.type, "low": self.low, "high": self.high,
                               "log": self.log}
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class Space:
    """The union of one or more space files."""

    names: tuple[str, ...]  # as given: built-in names or paths
    params: tuple[Param, ...]
    methods: tuple[str, ...] = field(default=())  # () = any method
    description: str = ""

    @property
    def label(self) -> str:
        """A short name for study names: the file stems joined by '+'."""
        return "+".join(Path(n).stem if n.endswith(".toml") else n for n in self.names)


def builtin_spaces() -> dict[str, Path]:
    """Built-in space names and their files: every registered method's, sorted by name."""
    found = {p.stem: p for cls in all_methods() for p in cls.search_spaces}
    return dict(sorted(found.items()))


def describe_builtins() -> list[tuple[str, str]]:
    """(name, description) of every built-in space."""
    return [(name, load_space_file(path, name).description)
            for name, path in builtin_spaces().items()]


def locate(name_or_path: str) -> Path:
    """A built-in space's file, or a path to a space file."""
    builtins = builtin_spaces()
    if name_or_path in builtins:
        return builtins[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml" or "/" in name_or_path or path.is_file():
        if not path.is_file():
            raise UsageError(f"space file not found: {path}")
        return path
    raise UsageError(f"unknown space {name_or_path!r}; valid: {', '.join(builtins)} "
                     f"or a path to a .toml space file")


def load_space(names: Sequence[str]) -> Space:
    """Load and merge space files; a key swept by two of them is an error."""
    if not names:
        raise UsageError("--space is required: a built-in name or a .toml file")
    params: dict[str, Param] = {}
    methods: set[str] | None = None
    descriptions = []
    for name in names:
        one = load_space_file(locate(name), name)
        for p in one.params:
            if p.name in params:
                raise UsageError(f"space {name}: {p.name} is already swept by another space")
            params[p.name] = p
        if one.methods:
            methods = set(one.methods) if methods is None else methods & set(one.methods)
        if one.description:
            descriptions.append(one.description)
    return Space(tuple(names), tuple(params.values()), tuple(sorted(methods or ())),
                 "; ".join(descriptions))


def load_space_file(path: Path, name: str) -> Space:
    """Parse and validate one space file; every problem is a one-line UsageError."""
    raw = read_toml(path, "space file")
    where = f"space {name}"
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise UsageError(f"{where}: unknown top-level key(s) {', '.join(sorted(unknown))} "
                         f"(valid: {', '.join(sorted(TOP_KEYS))})")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise UsageError(f"{where}: description must be a string")
    methods = raw.get("methods", [])
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise UsageError(f"{where}: methods must be a list of method names")
    table = raw.get("params")
    if not isinstance(table, Mapping) or not table:
        raise UsageError(f'{where}: no parameters; add tables like [params."train.lr"]')
    params = tuple(parse_param(f"{where}: {key}", key, spec) for key, spec in table.items())
    return Space((name,), params, tuple(methods), description)


def parse_param(where: str, key: str, spec: Any) -> Param:
    """One [params."key"] table -> Param."""
    if not isinstance(spec, Mapping):
        raise UsageError(f'{where}: must be a table ([params."{key}"] with type = ...); '
                         f"for a dotted key quote it")
    if any(not part for part in key.split(".")):
        raise UsageError(f"{where}: not a config key")
    kind = spec.get("type")
    if kind not in TYPES:
        raise UsageError(f"{where}: type must be one of {', '.join(TYPES)}, got {kind!r}")
    extra = set(spec) - FIELDS[kind]
    if extra:
        raise UsageError(f"{where}: field(s) {', '.join(sorted(extra))} not allowed for type "
                         f"{kind} (allowed: {', '.join(sorted(FIELDS[kind]))})")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UsageError(f"{where}: choices must be a non-empty list")
        if not all(isinstance(c, Scalar) for c in choices):
            raise UsageError(f"{where}: choices must be strings, numbers or booleans")
        if len({(type(c), c) for c in choices}) != len(choices):
            raise UsageError(f"{where}: choices must be distinct")
        return Param(key, kind, choices=tuple(choices))
    number = int if kind == "int" else (int, float)
    bounds = {}
    for bound in ("low", "high"):
        value = spec.get(bound)
        if value is None:
            raise UsageError(f"{where}: {bound} is required for type {kind}")
        if isinstance(value, bool) or not isinstance(value, number):
            what = "an integer" if kind == "int" else "a number"
            raise UsageError(f"{where}: {bound} must be {what}, got {value!r}")
        if not math.isfinite(value):
            raise UsageError(f"{where}: {bound} must be finite")
        bounds[bound] = value
    low, high = bounds["low"], bounds["high"]
    if not low < high:
        raise UsageError(f"{where}: low must be < high, got low = {low}, high = {high}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UsageError(f"{where}: log must be true or false")
    if log and low <= 0:
        raise UsageError(f"{where}: log = true needs low > 0, got low = {low}")
    step = spec.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, number) or step <= 0:
            raise UsageError(f"{where}: step must be a positive "
                             f"{'integer' if kind == 'int' else 'number'}")
        if log:
            raise UsageError(f"{where}: step cannot be combined with log = true")
    return Param(key, kind, low, high, log, step)


def literal(value: Scalar | list[Any]) -> str:
    """A value as the TOML literal --set reads back (bare word for plain strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if not isinstance(value, float) or math.isfinite(value) else (
            "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, list):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    try:
        if tomllib.loads(f"v = {value}")["v"] == value:
            return value
    except tomllib.TOMLDecodeError:
        if value and all(c.isalnum() or c in "-_.:/" for c in value):
            return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def set_item(key: str, value: Scalar) -> str:
    """key=value in the --set syntax."""
    return f"{key}={literal(value)}"
