"""Hostile inputs beyond the interrupts: passwords in URLs of every shape, files that hold code,
lock files of odd store URLs, flags that contradict a resumed run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.core.errors import BenchError, UsageError
from tests.test_cli import assert_one_line_error


@pytest.mark.parametrize(("url", "masked"), [
    ('postgresql://bench:pw"s3cr@t:/x@127.0.0.1:5432/db', "postgresql://bench:***@127.0.0.1:5432/db"),
    ("postgresql://bench:pw%22s3cr%40t%3A%2Fx@h:5432/db", "postgresql://bench:***@h:5432/db"),
    ("http://u:pa'ss@host:5000", "http://u:***@host:5000"),
    ("mysql://u:p/q@h/db", "mysql://u:***@h/db"),
    ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
    ("https://h/api?token=abc\"d&x=1", "https://h/api?token=***&x=1"),
    ("postgresql://bench@h/db", "postgresql://bench@h/db"),
    ("sqlite:////tmp/runs/mlflow.db", "sqlite:////tmp/runs/mlflow.db"),
])
def test_a_url_password_is_masked_whatever_it_holds(url: str, masked: str) -> None:
    from bench.core.secrets import mask_credentials

    assert mask_credentials(f"cannot reach '{url}': refused") == f"cannot reach '{masked}': refused"


def test_a_store_url_with_a_query_names_no_file_after_it(tmp_path: Path) -> None:
    from bench.app.tracking import Tracker

    runs = tmp_path / "runs"
    Tracker(f"sqlite:///{runs / 'mlflow.db'}?secret=abc", runs)
    names = [p.name for p in runs.iterdir()]
    assert "mlflow.db" in names
    assert not [n for n in names if "?" in n or "secret" in n or "abc" in n], names


class Payload:
    """Anything a pickle can carry beyond tensors and plain values (code, when loaded)."""


def test_a_checkpoint_that_holds_code_is_refused_without_advice_to_load_it(
        tmp_path: Path) -> None:
    from bench.engine.checkpoint import load_checkpoint

    path = tmp_path / "evil.pt"
    torch.save({"format": "cmbench-checkpoint/1", "x": Payload()}, path)
    with pytest.raises(BenchError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "refused" in message and "\n" not in message
    assert "weights_only=False" not in message and "weights_only" not in message.replace(
        "weights-only", "")
    folder = tmp_path / "last.pt"
    folder.mkdir()
    with pytest.raises(BenchError, match="is a folder, not a checkpoint file"):
        load_checkpoint(folder)


def test_flags_given_with_resume_must_agree_with_the_run() -> None:
    from bench.app.runner import check_resume_flags
    from bench.core.config import default_config

    cfg = default_config().model_copy(update={"method": "ct", "dataset": "gmm8"})
    check_resume_flags(cfg, "r" * 32, {"method": "ct", "train.steps": cfg.train.steps}, [])
    check_resume_flags(cfg, "r" * 32, {}, [f"train.lr={cfg.train.lr}",
                                          "tracking.uri=sqlite:///elsewhere.db"])
    with pytest.raises(UsageError, match="method = cd conflicts with run r+, which has ct"):
        check_resume_flags(cfg, "r" * 32, {"method": "cd"}, [])
    with pytest.raises(UsageError, match="train.lr = 0.5 conflicts"):
        check_resume_flags(cfg, "r" * 32, {}, ["train.lr=0.5"])


def test_resume_with_a_config_file_is_a_usage_error(bench, tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("seed = 3\n")
    assert_one_line_error(bench("run", "--resume", "a" * 32, "--config", "c.toml"), 2,
                          "--config cannot be given with --resume")
