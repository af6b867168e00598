"""Property-based tests of the config loader: whatever the bench.toml text, the --config file
and the --set overrides, loading ends in a config or in the project's one-line errors, never
in another exception."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.core.config import defaults_dict, flatten, load_bench_file, resolve
from bench.core.errors import BenchError, UsageError

KEYS = sorted(flatten(defaults_dict()))  # train.steps, eval.nfe, ...
SECTIONS = sorted({k.split(".")[0] for k in KEYS})

scalars = st.one_of(
    st.integers(), st.integers(min_value=-2**63, max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.text(max_size=12),
    st.sampled_from(["stop", "skip", "gmm8", "ct", "cosine", "heun", "", "auto", "cpu"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(SECTIONS), st.text(min_size=1,
                                                                         max_size=12))


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"train.steps": 5} -> {"train": {"steps": 5}}; a clash keeps the first writer."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            node.setdefault(last, value)
    return out


tables = st.dictionaries(keys, values, max_size=6).map(nest)
presets = st.dictionaries(st.sampled_from(["*", "ct", "cd", "x"]), st.dictionaries(
    st.sampled_from(["*", "gmm8", "digits", "y"]), tables, max_size=2), max_size=2)


def toml_text(table: dict[str, Any], preset: dict[str, Any]) -> str:
    body = dict(table)
    if preset:
        body["preset"] = preset
    try:
        return tomli_w.dumps(body)
    except (TypeError, ValueError):  # a value TOML cannot hold (None, mixed nesting)
        return ""


set_items = st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, v: f"{k}={v}", keys, st.one_of(
        st.text(max_size=12), st.integers().map(str), st.floats().map(repr),
        st.sampled_from(["[1,2]", "[]", "{a=1}", "true", "[1,", "'x'", "nan", "-inf", "1e999"]))),
)
flags = st.fixed_dictionaries({}, optional={
    "method": st.text(max_size=6), "dataset": st.sampled_from(["gmm8", "digits", "x", ""]),
    "train.steps": st.integers(), "seed": st.integers(), "eval.nfe": st.lists(st.integers()),
})


def load(bench_toml: str | bytes, config_toml: str | bytes, sets: list[str],
         flag_values: dict[str, Any]) -> None:
    """Run the loader; only the project's errors may escape."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, text in (("bench.toml", bench_toml), ("config.toml", config_toml)):
            (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        try:
            files = [load_bench_file(folder / "bench.toml")]
            resolve(bench_files=files, config_file=folder / "config.toml", flags=flag_values,
                    sets=sets)
        except BenchError as exc:  # UsageError is a BenchError
            assert str(exc).strip(), "an error must say something"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=tables, preset=presets, config=tables, sets=st.lists(set_items, max_size=4),
       flag_values=flags)
def test_structured_toml_and_overrides_never_escape(table: dict[str, Any],
                                                    preset: dict[str, Any],
                                                    config: dict[str, Any], sets: list[str],
                                                    flag_values: dict[str, Any]) -> None:
    load(toml_text(table, preset), toml_text(config, {}), sets, flag_values)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=200), sets=st.lists(st.text(max_size=20), max_size=3))
def test_arbitrary_text_never_escapes(text: str, sets: list[str]) -> None:
    load(text, "", sets, {})


@settings(max_examples=100, deadline=None)
@given(bench_bytes=st.binary(max_size=200), config_bytes=st.binary(max_size=200))
def test_arbitrary_bytes_never_escape(bench_bytes: bytes, config_bytes: bytes) -> None:
    load(bench_bytes, config_bytes, [], {})
    load(b"[train]\nsteps = 1\n# " + bench_bytes, "", [], {})


FLAT = flatten(defaults_dict())
FLOAT_KEYS = sorted(k for k, v in FLAT.items() if isinstance(v, float)
                    or (isinstance(v, list) and k == "sample.sigmas"))
INT_KEYS = sorted(k for k, v in FLAT.items() if isinstance(v, int) and not isinstance(v, bool))
INT_LIST_KEYS = sorted(k for k, v in FLAT.items()
                       if isinstance(v, list) and v and isinstance(v[0], int))


def refused(item: str) -> str:
    """The one-line UsageError of resolving the defaults with one --set item."""
    with pytest.raises(UsageError) as err:
        resolve(bench_files=[], sets=[item])
    message = str(err.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "+nan", "1e400", "-1e400"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_non_finite_values(key: str, value: str) -> None:
    literal = f"[{value}]" if isinstance(FLAT[key], list) else value
    message = refused(f"{key}={literal}")
    assert key in message and "finite" in message


@pytest.mark.parametrize("value", [2**63, 10**23, -2**63 - 1])
@pytest.mark.parametrize("key", INT_KEYS)
def test_every_int_key_refuses_values_beyond_int64(key: str, value: int) -> None:
    message = refused(f"{key}={value}")
    assert key in message and str(value) in message


@pytest.mark.parametrize("key", INT_LIST_KEYS)
def test_every_int_list_key_refuses_values_beyond_int64(key: str) -> None:
    message = refused(f"{key}=[1, {2**63}]")
    assert f"{key} values must fit in 64 bits" in message
