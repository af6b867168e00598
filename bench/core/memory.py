"""The C allocator's settings for a bench process.

glibc gives each thread that allocates its own malloc arena; torch's intra-op threads make
several, and freed tensor memory fragments across them: a 50,000-sample evaluation (digits, NFE
1, batches of 500) held 2.6 times the memory above its start of a 1,000-sample one, with nothing
kept by bench (with every allocation mmap-ed, MALLOC_MMAP_THRESHOLD_=65536, the two peaks are
equal). One arena (one_malloc_arena; MALLOC_ARENA_MAX set by the user wins) and the free pages
handed back between evaluation batches every few seconds (release_free_memory: glibc's
malloc_trim) keep it flat.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time

M_ARENA_MAX = -8  # glibc's mallopt parameter number
TRIM_SECONDS = 5.0  # release_free_memory's least interval
_LIBC: ctypes.CDLL | None = None
_LAST_TRIM = 0.0


def one_malloc_arena() -> bool:
    """Limit glibc's malloc to one arena (before threads start); True when it took effect."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(M_ARENA_MAX, 1))


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
