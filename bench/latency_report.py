"""Reporting for bench/latency.py: the record of one backend at one batch and schedule, the
machine it ran on, the markdown tables and the per-stage chart."""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(kw_only=True)
class Result:
    backend: str
    batch: int
    median_s: float
    min_s: float
    max_s: float
    speedup_vs_eager: float | None
    max_abs_diff_vs_eager: float | None
    stage_median_s: dict = field(default_factory=dict)     # instrumented pass: ar, head, decode; other = the rest
    tokens_per_s: float = 0.0
    images_per_s: float = 0.0
    effective_gflops: dict = field(default_factory=dict)
    build_s: float | None = None
    note: str = ""
    head_by_scale_s: list = field(default_factory=list)   # instrumented pass: head seconds per scale
    parity_ok: bool | None = None                          # max_abs_diff_vs_eager within --parity-tol
    schedule: str = "official"                             # the sampling schedule (official, fast)
    head_evals: int = 0                                    # head evaluations per sample
    max_abs_diff_vs_official: float | None = None          # tokens vs eager with the official schedule
    precision: str = "fp32"                                # what the backend computes in
    max_abs_diff_vs_fp32: float | None = None              # a 16-bit run (--dtype): tokens vs fp32 eager's

    @property
    def ran(self) -> bool:
        return not math.isnan(self.median_s)

    @classmethod
    def skipped(cls, backend: str, batch: int, why: str, schedule: str, head_evals: int) -> "Result":
        nan = float("nan")
        return cls(backend=backend, batch=batch, median_s=nan, min_s=nan, max_s=nan, speedup_vs_eager=None,
                   max_abs_diff_vs_eager=None, note=why, schedule=schedule, head_evals=head_evals)


def within_16_bit_rounding(row_vs_fp32: float, eager_vs_fp32: float) -> bool:
    """A 16-bit path's tokens against float32 eager's, judged by 16-bit eager's own distance there:
    two 16-bit paths differ by rounding as much as either differs from float32 (H200, FlowAR-S at
    batch 1: bf16 graphs - bf16 eager 0.26, bf16 eager - fp32 0.42, bf16 graphs - fp32 0.36), while a
    wrong input or buffer errs by the tokens' own size (~6)."""
    return row_vs_fp32 <= 1.5 * eager_vs_fp32 + 1e-3


def machine_info() -> dict:
    from flowar.engines.cpu import cpu_record
    from flowar.engines.ort import cpu_threads
    from flowar.export.manifest import library_versions
    return library_versions() | cpu_record() | {
        "cpu_cores_usable": cpu_threads(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def line(r: Result, peak: float, tolerance: float) -> str:
    """The progress line printed as each measurement finishes."""
    total = r.effective_gflops.get("total", 0.0)
    return (f"  {r.backend:<9} {r.schedule:<8} batch {r.batch:<3} median {r.median_s:8.3f} s  "
            f"x{r.speedup_vs_eager or 0:5.2f} vs eager  max|dtokens| {_num(r.max_abs_diff_vs_eager)}"
            f"{'' if r.max_abs_diff_vs_fp32 is None else f' (vs fp32 eager {_num(r.max_abs_diff_vs_fp32)})'}"
            f"{'' if r.parity_ok is not False else f' WRONG (above {tolerance:g})'}  "
            f"{total:.1f} GFLOP/s ({total / peak:.0%} of the GEMM peak){'  ' + r.note if r.note else ''}")


def _num(x: float | None) -> str:
    return f"{x:.1e}" if x is not None else "n/a"


def markdown(results: list[Result], peak: float, decode: bool) -> str:
    head = ("| backend | precision | schedule | head evals | batch | median s | min s | max s | vs eager official | "
            "AR s | head s | " + ("decode s | " if decode else "")
            + "other s | tokens/s | images/s | GFLOP/s (% of the GEMM peak) | max abs diff vs eager (same schedule) |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        first = f"| {r.backend} | {r.precision} | {r.schedule} | {r.head_evals} | {r.batch} |"
        if not r.ran:
            rows.append(f"{first} skipped: {r.note} |")
            continue
        s = r.stage_median_s
        split = (" | ".join(f"{s[k]:.3f}" if k in s else "-" for k in ("ar", "head") + (("decode",) if decode else ())
                            + ("other",)))
        tot = r.effective_gflops.get("total", 0.0)
        rows.append(f"{first} {r.median_s:.3f} | {r.min_s:.3f} | {r.max_s:.3f} | {r.speedup_vs_eager:.2f}x | {split} | "
                    f"{r.tokens_per_s:.0f} | {r.images_per_s:.2f} | {tot:.1f} ({tot / peak:.0%}) | "
                    f"{_num(r.max_abs_diff_vs_eager)}{' WRONG' if r.parity_ok is False else ''} |")
    return "\n".join(rows)


def scale_table(results: list[Result], scales) -> str:
    """Head time (per-scale constants + the ODE loop) of each scale: where the time goes."""
    head = "| backend | schedule | batch | " + " | ".join(f"head {s}x{s} s" for s in scales) + " |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if r.head_by_scale_s:
            rows.append(f"| {r.backend} | {r.schedule} | {r.batch} | " + " | ".join(f"{t:.4f}" for t in r.head_by_scale_s)
                        + " |")
    return "\n".join(rows)


def plot(results: list[Result], path: Path, label: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from flowar.io.files import atomic_write_bytes
    ok = [r for r in results if r.ran]
    if not ok:
        return
    names = [f"{r.backend}\n{r.schedule}\nB={r.batch}" for r in ok]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(ok)), 4), dpi=110)
    # Each bar is the median end-to-end time, divided among the stages in the proportions of the
    # separate instrumented run (its own total differs from the median by the run-to-run noise).
    keys = ("ar", "head", "decode", "other")
    shares = []
    for r in ok:
        split = sum(r.stage_median_s.get(k, 0.0) for k in keys)
        shares.append({k: r.median_s * r.stage_median_s.get(k, 0.0) / split for k in keys} if split > 0 else {})
    bottom = [0.0] * len(ok)
    for stage, color in zip(keys, ("#4c72b0", "#dd8452", "#55a868", "#8c8c8c")):
        vals = [sh.get(stage, 0.0) for sh in shares]
        if any(vals):
            ax.bar(names, vals, bottom=bottom, label=stage, color=color)
            bottom = [b + v for b, v in zip(bottom, vals)]
    unsplit = [i for i, sh in enumerate(shares) if not sh]      # replayed CUDA graphs: no split
    for i in unsplit:
        ax.bar(names[i], ok[i].median_s, color="#cccccc", label=None if i != unsplit[0] else "not split (CUDA graphs)")
    for i, r in enumerate(ok):
        ax.text(i, r.median_s, f"{r.speedup_vs_eager:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.12 * max(r.median_s for r in ok))
    ax.set_ylabel("seconds per sample call (median), by stage")
    ax.set_title(f"FlowAR latency per stage: {label}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
