"""User-facing errors: each ends the command with one line and a non-zero exit code."""

from __future__ import annotations

from collections.abc import Iterator


class BenchError(Exception):
    """An error the user can fix (missing path, unknown run id, ...): exit code 1, one line."""

    exit_code = 1


class RunInterrupted(BenchError):
    """Ctrl-C or SIGTERM ended a run (marked KILLED, its checkpoint kept): one line, exit
    code 130 for SIGINT and 143 for SIGTERM (128 + the signal's number, as shells report)."""

    def __init__(self, message: str, signal: str = "SIGINT") -> None:
        super().__init__(message)
        self.signal = signal
        self.exit_code = 143 if signal == "SIGTERM" else 130


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


_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory",
                  "cannot allocate memory", "storage size calculation overflowed")


def resource_exhausted(exc: BaseException) -> str | None:
    """What ran out, when exc (or an error it was raised from or during) says a disk or the
    memory is full: 'no space left on device (...)', 'out of memory (...)'; else None."""
    import errno

    for error in causes(exc):
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {error.filename}" if error.filename else ""
            kind = "disk quota exceeded" if error.errno == errno.EDQUOT else \
                "no space left on device"
            return f"{kind}{where}"
        text = str(error).strip().splitlines()[0].lower() if str(error).strip() else ""
        if "database or disk is full" in text:
            return "no space left on device for the tracking store (database or disk is full)"
        if isinstance(error, MemoryError):
            return "out of memory (the host's RAM)"
        if type(error).__name__ == "OutOfMemoryError" or (
                isinstance(error, RuntimeError) and any(m in text for m in _OUT_OF_MEMORY)):
            device = "GPU memory" if "cuda" in text or "gpu" in text else "memory"
            first = str(error).strip().splitlines()[0]
            detail = first.split("] err == 0. ", 1)[-1][:200]  # not torch's enforce prefix
            return f"out of {device}: {detail}"
    return None


def unreadable_reason(exc: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in a few words. A file that needs
    code to be unpickled is refused outright: torch's advice to load it with
    weights_only=False is left out, since that runs whatever code the file holds."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if first.startswith("Weights only load failed"):
        return ("holds Python objects other than tensors and plain values, which could run "
                "code when loaded; it is refused (only weights-only files are loaded)")
    detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"is unreadable (corrupt, truncated or not a torch file): {detail[:300]}"
