"""What kind of CPU this is: the facts a precision choice depends on (and is recorded with)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")


@functools.lru_cache(maxsize=1)
def cpu_kind() -> dict:
    """{"model": ..., "flags": [the FLAGS this CPU reports]} from /proc/cpuinfo (Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.processor(), platform.machine()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"model": model, "flags": [f for f in FLAGS if f in flags]}


def describe(kind: dict) -> str:
    return f"{kind['model']} ({', '.join(kind['flags']) or 'no vector flags read'})"
