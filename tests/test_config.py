"""The layered config: precedence, presets, validation and the saved round trip."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.core.config import (
    RunConfig,
    TrainConfig,
    default_bench_files,
    dumps,
    from_dict,
    load_bench_file,
    parse_set,
    resolve,
    to_dict,
)
from bench.core.errors import UsageError
from methods import method_names

assert method_names(), "the methods (and so their config sections) are registered on import"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_precedence_defaults_file_preset_config_flags_set(tmp_path: Path) -> None:
    bench_toml = write(tmp_path / "bench.toml", """
[train]
lr = 0.01
steps = 10
batch_size = 7
[preset."*".gmm8.train]
steps = 20
[preset.edm.gmm8]
description = "demo"
[preset.edm.gmm8.train]
batch_size = 9
""")
    files = [load_bench_file(bench_toml)]
    r = resolve(bench_files=files, flags={"method": "edm", "dataset": "gmm8"})
    assert (r.config.train.lr, r.config.train.steps, r.config.train.batch_size) == (0.01, 20, 9)
    assert r.preset == "*.gmm8, edm.gmm8" and r.preset_description == "demo"
    assert r.config.train.beta1 == RunConfig().train.beta1  # untouched default
    cfg_file = write(tmp_path / "c.toml", "[train]\nsteps = 30\nlr = 0.5\n")
    r = resolve(bench_files=files, config_file=cfg_file,
                flags={"method": "edm", "dataset": "gmm8", "train.steps": 40},
                sets=["train.lr=0.25"])
    assert (r.config.train.steps, r.config.train.lr) == (40, 0.25)
    # the preset of another method does not apply
    r = resolve(bench_files=files, flags={"method": "ddim", "dataset": "gmm8"})
    assert r.config.train.batch_size == 7 and r.preset == "*.gmm8"


def test_set_values_are_toml_literals_or_bare_strings() -> None:
    assert parse_set("eval.nfe=[1, 2]") == (["eval", "nfe"], [1, 2])
    assert parse_set("sampler=heun") == (["sampler"], "heun")
    assert parse_set("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_set("sample.sigmas=[80.0,0.585]") == (["sample", "sigmas"], [80.0, 0.585])
    with pytest.raises(UsageError, match="key=value"):
        parse_set("train.lr")


@pytest.mark.parametrize(("sets", "message"), [
    (["train.stpes=3"], "unknown config key 'train.stpes'"),
    (["train.steps=abc"], "config key 'train.steps' expects int"),
    (["train.steps=1.5"], "config key 'train.steps' expects int"),
    (["eval.nfe=3"], "expects a list of int"),
    (["net.dropout=true"], "expects float"),
    (["train=3"], "is a table"),
    (["bogus=1"], "unknown config key 'bogus'"),
    (["train.optimizer=sgd"], "train.optimizer must be adam or radam"),
    (["sample.sigmas=[0.5, 80.0]"], "strictly decreasing"),
])
def test_bad_keys_and_types_name_the_key(sets: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace(".", r"\.")):
        resolve(bench_files=[], flags={"method": "edm", "dataset": "gmm8"}, sets=sets)


def test_ints_are_accepted_for_floats() -> None:
    r = resolve(bench_files=[], sets=["train.lr=1"])
    assert r.config.train.lr == 1.0 and isinstance(r.config.train.lr, float)


def test_malformed_bench_toml_is_one_line(tmp_path: Path) -> None:
    bad = write(tmp_path / "bench.toml", "[train\nsteps = 3\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_bench_file(bad)
    typo = write(tmp_path / "bench2.toml", "[preset.edm.gmm8.train]\nstepz = 3\n")
    with pytest.raises(UsageError, match="stepz"):
        load_bench_file(typo)


def test_saved_config_feeds_back_identically(tmp_path: Path) -> None:
    r = resolve(bench_files=[], flags={"method": "edm", "dataset": "gmm8"},
                sets=["train.steps=12", "eval.nfe=[1,3]", "net.channel_mult=[1,2]"])
    saved = write(tmp_path / "config.toml", dumps(r.config))
    again = resolve(bench_files=[], config_file=saved)
    assert to_dict(again.config) == to_dict(r.config)
    assert from_dict(to_dict(r.config)) == r.config


def test_shipped_bench_toml_is_valid_and_has_presets() -> None:
    files = default_bench_files(Path("/nonexistent"))
    assert files, "the shipped bench.toml must be found"
    r = resolve(bench_files=files, flags={"method": "edm", "dataset": "gmm8"})
    assert r.preset == "*.gmm8, edm.*" and r.config.eval.nfe == [1, 3, 5, 9, 17, 35]
    r = resolve(bench_files=files, flags={"method": "cd", "dataset": "cifar10"})
    assert r.preset == "*.cifar10, cd.cifar10" and r.config.cd.distance == "lpips"
    per_dataset = [f.data_tables for f in files]
    assert any("cifar10" in t for t in per_dataset)


def test_dataset_paths_from_bench_toml(tmp_path: Path) -> None:
    f = write(tmp_path / "bench.toml", '[data.cifar10]\npath = "/data/cifar"\n')
    r = resolve(bench_files=[load_bench_file(f)], flags={"dataset": "cifar10"})
    assert r.config.data.path == "/data/cifar"
    r = resolve(bench_files=[load_bench_file(f)], flags={"dataset": "gmm8"})
    assert r.config.data.path == ""


def test_lr_schedules() -> None:
    from bench.engine.training import lr_at

    def train(schedule: str) -> TrainConfig:
        return resolve(bench_files=[], flags={"method": "edm", "dataset": "gmm8"},
                       sets=[f'train.lr_schedule="{schedule}"', "train.lr=1e-3",
                             "train.warmup_steps=10"]).config.train

    for schedule in ("constant", "cosine", "linear"):
        cfg = train(schedule)
        assert lr_at(0, cfg, 110) == pytest.approx(1e-4)
        assert lr_at(9, cfg, 110) == pytest.approx(1e-3)
        assert lr_at(10, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(109, train("constant"), 110) == pytest.approx(1e-3)
    assert lr_at(60, train("cosine"), 110) == pytest.approx(0.5e-3)
    assert lr_at(60, train("linear"), 110) == pytest.approx(0.5e-3)
    expected = 1e-3 * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_at(35, train("cosine"), 110) == pytest.approx(expected)
    assert lr_at(110, train("linear"), 110) == 0.0
    with pytest.raises(UsageError, match="train.lr_schedule"):
        train("step")


def test_ct_needs_at_least_two_levels_at_the_start() -> None:
    with pytest.raises(UsageError, match="ct.s0"):
        resolve(bench_files=[], flags={"method": "ct", "dataset": "gmm8"}, sets=["ct.s0=1"])
    cfg = resolve(bench_files=[], flags={"method": "ct", "dataset": "gmm8"}, sets=["ct.s0=2"])
    assert cfg.config.ct.s0 == 2
