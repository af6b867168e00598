"""The C allocator's settings for a bench process.

glibc gives each thread that allocates its own malloc arena; torch's intra-op threads make
several, and freed tensor memory fragments across them: a 50,000-sample evaluation (digits, NFE
1, batches of 500) held 2.6 times the memory above its start of a 1,000-sample one, with nothing
kept by bench (with every allocation mmap-ed, MALLOC_MMAP_THRESHOLD_=65536, the two peaks are
equal). One arena (one_malloc_arena; MALLOC_ARENA_MAX set by the user wins) and the free pages
handed back between evaluation batches every few seconds (release_free_memory: glibc's
malloc_trim) keep it flat.

Under glibc's sliding thresholds a network call without autograd (sampling, evaluation) hands
its freed activations back to the system at the end of the call and faults them in again on
the next: one-step sampling of a 16x16 UNet at batch 32 took ~3,800 page faults per call and
10-14 % more time on the CPU. Fixed thresholds (fixed_malloc_thresholds: blocks under 32 MiB
from the heap, up to 64 MiB of free memory kept at its top; the user's MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_ or their GLIBC_TUNABLES win) keep those pages mapped between calls;
release_free_memory still hands them back between evaluation batches.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time
from collections.abc import Callable

M_ARENA_MAX = -8  # glibc's mallopt parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # the largest glibc takes on 64 bits (its sliding maximum)
TRIM_THRESHOLD_BYTES = 64 << 20  # twice the mmap threshold, as glibc's sliding rule sets it
_THRESHOLD_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
TRIM_SECONDS = 5.0  # release_free_memory's least interval
_LIBC: ctypes.CDLL | None = None
_LAST_TRIM = 0.0


def one_malloc_arena() -> bool:
    """Limit glibc's malloc to one arena (before threads start); True when it took effect."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_ARENA_MAX, 1))


def fixed_malloc_thresholds() -> bool:
    """Fix glibc's mmap and trim thresholds at MMAP_THRESHOLD_BYTES and TRIM_THRESHOLD_BYTES
    (see the module's docstring), unless the user set either; True when both took effect."""
    if not sys.platform.startswith("linux") or any(
            name in os.environ for name in _THRESHOLD_VARIABLES) or any(
            name in os.environ.get("GLIBC_TUNABLES", "")
            for name in ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")):
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def configure_malloc() -> None:
    """The allocator settings of every bench process (the command, sweep workers), before
    torch starts its threads: one arena and fixed thresholds."""
    one_malloc_arena()
    fixed_malloc_thresholds()


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's mallopt (None elsewhere: musl has none)."""
    libc = _libc()
    return getattr(libc, "mallopt", None) if libc is not None else None


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is None and sys.platform.startswith("linux"):
        name = ctypes.util.find_library("c")
        if name is not None:
            try:
                _LIBC = ctypes.CDLL(name)
            except OSError:
                return None
    return _LIBC


def release_free_memory(every: float = TRIM_SECONDS) -> None:
    """Hand the allocator's free pages back to the system (glibc's malloc_trim; elsewhere
    nothing), at most once per `every` seconds: a trim walks the heap (about a millisecond),
    which a loop of 2-ms batches must not pay each time."""
    global _LAST_TRIM
    now = time.monotonic()
    if now - _LAST_TRIM < every:
        return
    _LAST_TRIM = now
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)


def status_kib(field: str) -> int:
    """A kB field of Linux /proc/self/status (VmRSS, VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> bool:
    """Restart the process's peak resident set (VmHWM := VmRSS, Linux /proc/self/clear_refs);
    False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True
