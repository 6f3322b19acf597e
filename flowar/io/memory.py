"""Memory and disk as the export reports and checks them: the process's peak resident set per
phase, and the free space a write needs before any work.

The peak is Linux's high-water mark of resident memory (``VmHWM``), reset between phases through
``/proc/self/clear_refs`` so that each phase reports its own; elsewhere, or where the reset is
refused, the process's peak so far (``ru_maxrss``) is reported instead.
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


def require_free_space(folder: str | Path, needed: int, what: str, option: str = "--out") -> None:
    """A one-line error before any work when ``folder``'s file system has less than ``needed`` bytes free."""
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    free = shutil.disk_usage(p).free
    if free < needed:
        raise FlowARError(f"{needed / GB:.1f} GB free for {what}", f"{free / GB:.1f} GB free at {p}",
                          f"free disk space there or choose another {option}")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
