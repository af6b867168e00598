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


_ALLOCATION_FAILURES = ("can't allocate memory", "not enough memory",
                        "Storage size calculation overflowed", "out of memory")


def out_of_memory(exc: BaseException) -> str | None:
    """The one line for a failed memory allocation (a MemoryError, or torch's allocators' own
    errors, which a network width, batch size, NFE or sample count far too large for this
    machine causes), or None for any other error."""
    first = (str(exc).strip().splitlines() or [""])[0]
    if not (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or (isinstance(exc, RuntimeError)
                and any(text in first for text in _ALLOCATION_FAILURES))):
        return None
    detail = first.split("] err == 0. ", 1)[-1] or type(exc).__name__
    return (f"out of memory: {detail} (lower the sizes in the config: batch sizes, network "
            f"widths, NFE or sample counts)")
