"""SIGINT and SIGTERM end a command at a safe point.

The `bench` command installs one process-wide guard (`GUARD.install()`) before it does
anything: both signals then arrive as `Interrupted` (a KeyboardInterrupt whose message is the
signal's name), so a pre-empted job (SIGTERM) is handled exactly like Ctrl-C, with exit code
143 instead of 130.

A signal that arrives inside a `deferred()` block (one training iteration and its periodic
checkpoint, the creation of a run and the record of its id, one write to the tracking store) is
raised as `Interrupted` when the outermost such block ends, so neither an iteration nor a
store transaction is ever cut in half: the final checkpoint then holds the weights, optimizer,
EMA, RNG states and iteration counter of one and the same completed iteration, `--resume`
continues bit for bit, and the store is never left locked by a half-made write. Outside such a
block (evaluation, say) the signal is raised at once, unless the main thread is importing a
module: an exception raised in the middle of a module's first import leaves that module (numpy,
scipy, ...) half-initialised in `sys.modules`, where the next attribute lookup can recurse
without end and hide the interrupt behind a RecursionError. The signal then waits for the import
to finish (checked again every 50 ms on a timer). Signals are only ever delivered to the main
thread, so blocks entered on other threads defer nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any, NoReturn

SIGNALS = (signal.SIGINT, signal.SIGTERM)
RETRY_SECONDS = 0.05  # how often a signal that arrived during an import checks again
_IMPORT_MACHINERY = ("<frozen importlib._bootstrap", "importlib/_bootstrap")
_RETRY_ARMED = False  # whether the retry timer of a signal held during an import runs
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as shells report


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; the message is the signal's name."""

    @property
    def signal_name(self) -> str:
        return str(self.args[0]) if self.args else "SIGINT"


def signal_name(exc: BaseException) -> str:
    """SIGINT or SIGTERM: which signal a KeyboardInterrupt stands for (a plain one: SIGINT)."""
    return exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"


def exit_code(exc: BaseException) -> int:
    """The exit code of a command ended by this interrupt: 130 (SIGINT) or 143 (SIGTERM)."""
    return EXIT_CODES.get(signal_name(exc), 130)


class SignalGuard:
    """Delivers SIGINT and SIGTERM as Interrupted, deferred while a block must not be cut."""

    def __init__(self) -> None:
        self.pending: str | None = None  # name of a signal held back by deferred()
        self.delivered: str | None = None  # name of the last signal raised as Interrupted
        self._depth = 0

    def _raise(self, name: str) -> NoReturn:
        self.delivered = name
        _disarm_retry()  # a retry timer left running would end the process by SIGALRM
        raise Interrupted(name)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._depth:
            self.pending = self.pending or name
            return
        if _importing(frame) and _arm_retry(self._retry):
            self.pending = self.pending or name
            return
        self._raise(name)

    def _retry(self, signum: int, frame: FrameType | None) -> None:
        """The timer armed by a signal that arrived during an import: raise it once the import
        is over (a deferred block entered since raises it itself when it ends)."""
        if self.pending is None or self._depth:
            return
        if _importing(frame) and _arm_retry(self._retry):
            return
        name, self.pending = self.pending, None
        self._raise(name)

    def install(self) -> None:
        """Handle SIGINT and SIGTERM for the rest of the process (main thread only)."""
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                signal.signal(s, self._handle)

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

    def deferred(self) -> contextlib.AbstractContextManager[None]:
        """Hold signals back until the block ends, then raise Interrupted (if none is raised).
        A plain context manager (entered once per training iteration: no generator); a
        no-op on threads other than the main one."""
        if threading.current_thread() is not threading.main_thread():
            return _NOTHING
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
            _disarm_retry()

    def hold(self) -> None:
        """Hold signals back until release() (a deferred block spanning two functions: the
        creation of a run and the start of the code that ends it KILLED). Main thread only,
        like every block of the guard; elsewhere a no-op."""
        if threading.current_thread() is threading.main_thread():
            self._depth += 1

    def release(self) -> None:
        """End a hold(); a signal held back is raised by the next raise_pending()."""
        if threading.current_thread() is threading.main_thread():
            self._depth -= 1

    def raise_pending(self) -> None:
        """Raise a signal held back by an enclosing block now (outside every deferred block)."""
        if self.pending is not None and not self._depth:
            name, self.pending = self.pending, None
            self._raise(name)


def _importing(frame: FrameType | None) -> bool:
    """Whether this frame runs inside the import machinery (a module's first execution)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith(_IMPORT_MACHINERY):
            return True
        frame = frame.f_back
    return False


def _disarm_retry() -> None:
    """Stop the retry timer _arm_retry armed, if it still runs."""
    global _RETRY_ARMED
    if _RETRY_ARMED:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _RETRY_ARMED = False


def _arm_retry(handler: Any) -> bool:
    """Call `handler` once after RETRY_SECONDS on SIGALRM; False where timers are missing."""
    if not hasattr(signal, "setitimer"):
        return False
    global _RETRY_ARMED
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, RETRY_SECONDS)
    _RETRY_ARMED = True
    return True


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
            name, guard.pending = guard.pending, None
            guard._raise(name)


_NOTHING = contextlib.nullcontext()

GUARD = SignalGuard()  # the process's guard: `bench` installs it, the run and the tracker use it


def critical() -> contextlib.AbstractContextManager[None]:
    """A block no signal cuts short (raised when it ends instead): the process guard's
    deferred()."""
    return GUARD.deferred()
