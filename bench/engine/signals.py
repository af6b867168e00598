"""SIGINT and SIGTERM end a run at a safe point.

A signal that arrives inside a `deferred()` block (one training iteration and its periodic
checkpoint) is raised as `Interrupted` when the block ends, so no iteration is ever cut in half:
the final checkpoint then holds the weights, optimizer, EMA, RNG states and iteration counter
of one and the same completed iteration, and `--resume` continues bit for bit. Outside such a
block (evaluation, say) the signal is raised at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; the message is the signal's name."""


class SignalGuard:
    """Delivers SIGINT and SIGTERM as Interrupted, deferred while a block must not be cut."""

    def __init__(self) -> None:
        self.pending: str | None = None  # name of a signal held back by deferred()
        self._depth = 0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._depth:
            self.pending = self.pending or name
            return
        raise Interrupted(name)

    @contextmanager
    def installed(self) -> Iterator[SignalGuard]:
        """Handle SIGINT and SIGTERM inside the block (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous: dict[int, Any] = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def deferred(self) -> _Deferred:
        """Hold signals back until the block ends, then raise Interrupted (if none is raised).
        A plain context manager (entered once per training iteration: no generator)."""
        return _Deferred(self)

    @contextmanager
    def shielded(self) -> Iterator[None]:
        """Ignore further signals while a stopping run writes its last checkpoint and status."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            self.pending = None


class _Deferred:
    """The block of SignalGuard.deferred()."""

    __slots__ = ("guard",)

    def __init__(self, guard: SignalGuard) -> None:
        self.guard = guard

    def __enter__(self) -> None:
        self.guard._depth += 1

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        guard = self.guard
        guard._depth -= 1
        if kind is None and not guard._depth and guard.pending is not None:
            raise Interrupted(guard.pending)
