"""Memory and disk as the export reports and checks them: the process's peak resident set per
phase, and the free space a write needs before any work.

The peak is Linux's high-water mark of resident memory (``VmHWM``), reset between phases through
``/proc/self/clear_refs`` so that each phase reports its own; elsewhere, or where the reset is
refused, the process's peak so far (``ru_maxrss``) is reported instead. Both count the pages of
memory-mapped files (a FlowAR-H checkpoint's 7.65 GB, the engines' libraries), which the kernel can
drop and read again; :class:`AnonPeak` samples what it cannot: anonymous memory (``RssAnon``).
:func:`release_free_memory` hands memory that was freed but kept by the C allocator back to the
system between the export's phases.
"""

from __future__ import annotations

import os
import resource
import shutil
from pathlib import Path

from flowar.errors import FlowARError

GB = 1e9


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def reset_peak() -> bool:
    """Start a new peak-memory window; False where the system does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Bytes: the resident high-water mark since the last :func:`reset_peak` (or since start)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024


# The poller AnonPeak runs: RssAnon summed over a process and its descendants (itself excluded), every
# EVERY seconds until a line arrives on its stdin (or it closes: the command has ended); then it prints the peak
# in bytes.
_POLLER = r"""
import os, select, sys
from flowar.io.memory import descendants
root, every, me = int(sys.argv[1]), float(sys.argv[2]), os.getpid()
def anon(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0
peak = 0
while True:
    peak = max(peak, sum(anon(p) for p in [root, *descendants(root)] if p != me))
    if select.select([sys.stdin], [], [], every)[0]:
        break
try:
    print(peak, flush=True)
except OSError:          # the command has gone (killed): its end of the pipe is closed; nothing to say
    pass
os._exit(0)
"""


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (children, their children, ...), from ``/proc`` (none without it)."""
    children: dict[int, list[int]] = {}
    try:
        names = [n for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []
    for name in names:
        try:
            with open(f"/proc/{name}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(name))
        except (OSError, ValueError, IndexError):
            pass
    out, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


class AnonPeak:
    """The highest anonymous resident memory (``RssAnon``: what the machine must hold, the pages of
    mapped files not counted) of this process and the processes it starts (a compiler's), while
    the ``with`` block runs, sampled every ``every`` seconds. ``peak`` in bytes; None where
    ``/proc`` has no such field (not Linux). A peak shorter than the interval can be missed.

    The sampling runs in a small process of its own, not on a thread here: a thread needs the GIL,
    and a long call that holds it (AOTInductor writing a stage's weights into one buffer) stops it
    sampling exactly at the peak. Measured on the FlowAR-H export: a thread reported 14.3 GB where
    a poller outside the process saw 16.75 GB.
    """

    def __init__(self, every: float = 0.2):
        self.every, self.peak = every, None
        self._proc = None

    def _sample(self) -> None:
        now = anon_bytes()
        if now is not None:
            self.peak = max(self.peak or 0, now)

    def __enter__(self) -> "AnonPeak":
        import subprocess
        import sys
        self._sample()
        if self.peak is not None:
            # a session of its own: a terminal's Ctrl-C (SIGINT to the process group) is the command's; one
            # that came while the poller started printed its KeyboardInterrupt traceback (it ends when the
            # command's pipe closes, however the command ends)
            self._proc = subprocess.Popen([sys.executable, "-c", _POLLER, str(os.getpid()), str(self.every)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                          start_new_session=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            out, _ = self._proc.communicate("stop\n", timeout=60)
            if out.strip().isdigit():
                self.peak = max(self.peak or 0, int(out))
            self._proc = None
        self._sample()


def anon_bytes() -> int | None:
    """This process's anonymous resident memory now (None where ``/proc`` does not say)."""
    kb = _status_kb("RssAnon")
    return None if kb is None else kb * 1024


def available_bytes() -> int | None:
    """What the machine can still give without swapping (``MemAvailable``; None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def libc():
    """The C library (ctypes), for glibc's allocator controls; None where it cannot be loaded."""
    import ctypes
    import ctypes.util
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_free_memory() -> bool:
    """Collect garbage, then give the C allocator's free pages back to the system (glibc's
    ``malloc_trim``). Returns whether the allocator was asked (False where it is not glibc).

    glibc keeps what a program frees in its arenas for reuse; the arenas of other threads (ONNX
    Runtime's and PyTorch's workers allocate there) are trimmed only from their top, so memory freed
    below a block still in use stays resident. Measured on FlowAR-S: verifying the AR stage in ONNX
    Runtime left the export 1.40 GB anonymous, 0.36 GB after this call; on FlowAR-H such leftovers
    of each phase added up under the next phase's own peak (the compile of a stage).
    """
    import gc
    gc.collect()
    c = libc()
    if c is None or not hasattr(c, "malloc_trim"):
        return False
    c.malloc_trim(0)
    return True


def require_memory(needed: float, what: str, fix: str) -> None:
    """A one-line error before any work when ``needed`` bytes for ``what`` exceed the memory
    available (``--n-per-class 10^8`` ran until killed; flowar-judge's ``--per-class 10^11`` too)."""
    free = available_bytes()
    if free is not None and needed > free:
        raise FlowARError(f"memory for {what} (about {_size(needed)})", f"{_size(free)} available", fix)


def require_free_space(folder: str | Path, needed: int, what: str, option: str = "--out") -> None:
    """A one-line error before any work when ``folder``'s file system has less than ``needed`` bytes free."""
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    free = shutil.disk_usage(p).free
    if free < needed:
        raise FlowARError(f"{_size(needed)} free for {what}", f"{_size(free)} free at {p.resolve()}",   # (not ".")
                          f"free disk space there or choose another {option}")


def _size(n: int) -> str:
    """Bytes as people read them (a small disk said "0.0 GB free for ...; got 0.0 GB free")."""
    for unit, scale in (("GB", GB), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def process_running(pid: int) -> bool:
    """Whether the process ``pid`` has not ended (unlike :func:`process_alive`, a zombie, ended but
    not yet reaped, is not running), from ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reuse_large_allocations() -> bool:
    """Large tensors from the heap, kept for reuse, instead of fresh mappings (glibc, Linux).

    glibc serves allocations above its mmap threshold (128 KB at start, raised as such blocks are
    freed) with new page mappings, zero-filled page by page on first touch and unmapped when freed.
    A compiled engine allocates its intermediates (megabytes at the last scale) on every call, so
    a fresh process pays those page faults on every call until the threshold has grown: measured on
    FlowAR-S, the first image's velocity calls at the last scale took 2.7x their steady time. Fixing
    the thresholds (allocations up to 256 MB from the heap, up to 1 GB of it kept) makes the first
    image cost what the next ones do. Only where PyTorch computes: ONNX Runtime's sessions keep
    their memory in arenas of their own. Returns whether it applied.
    """
    c = libc()
    if c is None or not hasattr(c, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(c.mallopt(m_mmap_threshold, 256 << 20)) and bool(c.mallopt(m_trim_threshold, 1 << 30))
