"""User-facing errors: each ends the command with one line and a non-zero exit code."""

from __future__ import annotations

from collections.abc import Iterator


class BenchError(Exception):
    """An error the user can fix (missing path, unknown run id, ...): exit code 1, one line."""

    exit_code = 1


class RunInterrupted(BenchError):
    """Ctrl-C or SIGTERM ended a run (its checkpoint is kept): exit code 1, one line."""


class UsageError(BenchError):
    """A bad flag, option value or config key: exit code 2, one line."""

    exit_code = 2


def unknown_name(kind: str, name: str, valid: list[str]) -> UsageError:
    """Build the error for an unknown registry name, listing the valid ones."""
    return UsageError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}")


def causes(exc: BaseException) -> Iterator[BaseException]:
    """exc, then each error it was raised from or during (__cause__, else __context__), once."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__
