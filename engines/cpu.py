"""What kind of CPU this is: the facts a precision choice depends on (and is recorded with), and
what a compiled engine needs of the CPU it runs on (and, with ``honour_env=False``, the CPU's own
flags, which ONNX Runtime dispatches on whatever the variables below say).

The flags are those /proc/cpuinfo reports, less what this process is told not to use: PyTorch's
``ATEN_CPU_CAPABILITY`` (``avx2`` hides the AVX-512 and AMX flags from PyTorch's kernels and from
code compiled here) and oneDNN's ``ONEDNN_MAX_CPU_ISA`` (``AVX2`` and below: no bf16 dot products
or AMX in its GEMMs). So a machine told to behave as an AVX2-only CPU is one, for every choice
made here (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` emulates the AVX2-only kind).
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
WIDE = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")       # beyond AVX2
FAST_BF16 = ("avx512_bf16", "amx_bf16")                                       # bf16 dot products in hardware
# The instruction sets a compiler told -march=native (AOTInductor's default) may use, by their /proc/cpuinfo names:
# a compiled engine needs every one its export's CPU had (an AVX-512 VBMI or VNNI instruction where there is none:
# SIGILL), whatever the variables below told PyTorch there (the compiler reads the CPU itself).
ISA = ("avx", "sse", "ssse3", "fma", "f16c", "bmi", "adx", "sha", "aes", "vaes", "gfni", "vpclmulqdq", "pclmulqdq",
       "popcnt", "abm", "movbe", "amx", "rdrand", "rdseed", "cx16", "clwb", "clflushopt", "movdir", "prefetchw", "rdpid")


# Intel generations by (family 6) model number, as /proc/cpuinfo gives it; AMD's by family below.
# Only the kinds these machines were seen to be or are likely to be; others show their numbers.
INTEL = {143: "Sapphire Rapids", 207: "Emerald Rapids", 173: "Granite Rapids", 106: "Ice Lake",
         85: "Skylake/Cascade/Cooper Lake"}


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@functools.lru_cache(maxsize=2)
def cpu_kind(honour_env: bool = True) -> dict:
    """{"model": ..., "cpuid": "vendor family model", "flags": [the FLAGS this process may use]}
    (Linux: /proc/cpuinfo); with ``honour_env`` False, the CPU's own flags, as ONNX Runtime sees
    them (it ignores those variables)."""
    model, flags, ident = platform.processor() or platform.machine(), set(), {}
    for line in _cpuinfo().splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and model in ("", platform.processor(), platform.machine()):
            model = value
        elif key in ("vendor_id", "cpu family", "model") and key not in ident:
            ident[key] = value
        elif key == "flags":
            flags = set(value.split())
            break
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").lower() if honour_env else ""
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() if honour_env else ""
    if aten in ("avx2", "default") or onednn.startswith(("AVX2", "SSE", "AVX_")) or onednn == "AVX":
        flags -= set(WIDE)
    if aten == "default":
        flags.discard("avx2")
    kind = {"model": model, "flags": [f for f in FLAGS if f in flags]}
    if len(ident) == 3:
        kind["cpuid"] = f"{ident['vendor_id']} {ident['cpu family']} {ident['model']}"
    return kind


def same_cpu(recorded: dict, kind: dict | None = None) -> bool:
    """Whether a recorded CPU (a manifest's ``auto.machine``) is this kind: model name, flags, and
    family and model numbers where the record has them (records before 2026-12-06 have none)."""
    kind = kind or cpu_kind()
    return all(recorded.get(k) == kind.get(k) for k in ("model", "flags", *(("cpuid",) if "cpuid" in recorded else ())))


def fast_bf16(kind: dict | None = None) -> bool:
    """Whether this CPU computes bf16 products in hardware (AVX512-BF16 or AMX)."""
    return any(f in (kind or cpu_kind())["flags"] for f in FAST_BF16)


def own_isa() -> list[str]:
    """This CPU's instruction sets (:data:`ISA`), as /proc/cpuinfo reports them (no variable hides any)."""
    flags = next((line.partition(":")[2].split() for line in _cpuinfo().splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(ISA))


def compiled_for() -> dict:
    """What a compiled engine records of the CPU it was compiled on: its kind and every instruction set it has."""
    return cpu_kind() | {"isa": own_isa()}


def missing_for(built_on: dict, kind: dict | None = None) -> list[str]:
    """The flags of the CPU an engine was compiled on that this CPU lacks (code compiled for them
    would stop with an illegal instruction here): of its kind's, and of its instruction sets where
    recorded (compiled since 2026-12-07: a CPU of the same kind's flags could lack one)."""
    have = set((kind or cpu_kind())["flags"])
    missing = [f for f in built_on.get("flags", []) if f not in have]
    if kind is not None and "isa" not in kind:
        return missing
    own = set(kind["isa"] if kind else own_isa())
    return missing + [f for f in built_on.get("isa", []) if f not in own and f not in missing]


def generation(kind: dict) -> str | None:
    """"Zen 4", "Sapphire Rapids", ... from ``kind["cpuid"]`` ("family F model M" where not known;
    None without a cpuid). The model name alone does not tell them apart: "AMD EPYC" is Zen 4 and
    Zen 5 alike, which compute bf16 at different speeds (Zen 4 runs 512-bit instructions in two
    halves)."""
    try:
        vendor, family, model = kind["cpuid"].split()
        family, model = int(family), int(model)
    except (KeyError, ValueError):
        return None
    if vendor == "AuthenticAMD" and family == 26:
        return "Zen 5"
    if vendor == "AuthenticAMD" and family == 25:                 # Zen 4: models 10-1f, 60-7f, a0-af (hex)
        return "Zen 4" if model // 16 in (0x1, 0x6, 0x7, 0xa) else "Zen 3"
    if vendor == "GenuineIntel" and family == 6 and model in INTEL:
        return INTEL[model]
    return f"family {family} model {model}"


def cpu_name(kind: dict) -> str:
    """"AMD EPYC Zen 4": the model name and, where known, the generation."""
    return " ".join(filter(None, (kind["model"], generation(kind))))


def cpu_record(kind: dict | None = None) -> dict:
    """What a benchmark records of the CPU beside its figures: name (with the generation), family and
    model numbers, flags."""
    kind = kind or cpu_kind()
    return {"cpu": cpu_name(kind), "cpu_id": kind.get("cpuid"), "cpu_flags": kind["flags"]}


def describe(kind: dict) -> str:
    return f"{cpu_name(kind)} ({', '.join(kind['flags']) or 'no vector flags read'})"


class OthersShare:
    """The share of this process's CPUs' time that other processes (and the hypervisor: steal) took
    while this one timed something: summed over the ``with`` blocks of one meter, from /proc/stat
    (the busy time of the CPUs this process may run on, its affinity) less this process's own
    (``os.times``). A timing taken while others computed measures them too: a FlowAR-S export on 2
    cores shared with a test run timed every candidate 2-6x slow and kept all fp32. ``share`` is
    None where /proc/stat cannot be read. (Under a CPU quota without an affinity mask, a container's
    share of a larger host, the CPUs are the host's: others on them count, diluted by their number.)"""

    BUSY = 0.15          # the share above which timings are said to measure others too (quiet: <1 %; one busy
                         # process on 2 cores: ~40 %): the export's and the bench's warning

    def __init__(self):
        self.others = self.wall = 0.0
        self.readable = True
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None

    def _busy(self) -> float | None:
        """Seconds the CPUs of this process's affinity have been busy (all but idle and iowait)."""
        try:
            lines = Path("/proc/stat").read_text().splitlines()
            busy = 0
            for line in lines:
                name, *fields = line.split()
                if name.startswith("cpu") and name != "cpu" and (self.cpus is None or int(name[3:]) in self.cpus):
                    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
                    busy += user + nice + system + irq + softirq + steal
        except (OSError, ValueError):
            return None
        return busy / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> "OthersShare":
        t = os.times()
        self._start = (self._busy(), t.user + t.system, t.elapsed)
        return self

    def __exit__(self, *exc) -> None:
        busy, t = self._busy(), os.times()
        if busy is None or self._start[0] is None:
            self.readable = False
            return
        self.others += max(0.0, (busy - self._start[0]) - (t.user + t.system - self._start[1]))
        self.wall += t.elapsed - self._start[2]

    @property
    def share(self) -> float | None:
        cpus = len(self.cpus) if self.cpus else (os.cpu_count() or 1)
        return self.others / (self.wall * cpus) if self.readable and self.wall > 0 else None
