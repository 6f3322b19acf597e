"""Measurement for bench/latency.py: end-to-end times, the per-stage split, FLOPs, GEMM peak.

End-to-end runs call the sampler directly: one synchronisation before reading the clock and one
after the whole sample, none inside it, so a GPU pipeline runs as it would in production. The
per-stage split comes from a separate instrumented pass: every stage call is bracketed by CUDA
events on a GPU (read once, after the pass) or by the host clock on a CPU (where every stage
call returns when its work is done).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

STAGE_KEYS = ("ar", "head", "decode")


@dataclass(slots=True)
class Work:
    """What every backend is measured on: the same labels, noise, schedule and outputs."""
    config: object                 # FlowARConfig
    schedule: object               # flowar.sampling.schedule.Schedule
    labels: Tensor                 # (B,) class ids on the device
    seed: int
    decode: bool
    device: torch.device

    @property
    def batch(self) -> int:
        return self.labels.shape[0]


@dataclass(slots=True)
class Timing:
    times: list[float]                                         # seconds per measured sample call
    tokens: Tensor                                             # (B, C, S, S) of the last call, on the CPU

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(stages, work: Work, official_rows: bool, runner=None) -> Tensor:
    from flowar.sampling.sampler import per_sample_noise, sample
    with torch.inference_mode():
        tokens, _ = sample(stages, work.config, work.schedule, work.labels, per_sample_noise(work.seed, range(work.batch)),
                           decode=work.decode, device=work.device, official_rows=official_rows, check="none",
                           runner=runner)
    return tokens


def time_end_to_end(stages, work: Work, official_rows: bool, warmup: int, repeat: int, runner=None,
                    synchronize: Callable[[torch.device], None] = sync) -> Timing:
    """``warmup`` discarded calls, then ``repeat`` timed ones; no synchronisation inside a call."""
    times, tokens = [], None
    for r in range(warmup + repeat):
        synchronize(work.device)
        t0 = time.perf_counter()
        tokens = run_once(stages, work, official_rows, runner)
        synchronize(work.device)
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    return Timing(times, tokens.cpu())


KIND = {"ar": "ar", "prepare": "head", "velocity": "head", "decode": "decode"}     # the sampler's calls -> STAGE_KEYS


class StageClock:
    """Times each stage call (an ``around`` for :class:`flowar.sampling.sampler.Hooked`): CUDA
    events on a GPU (no synchronisation until :meth:`totals`), the host clock on a CPU. The AR step
    opens a scale, so head time is also kept per scale."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list[tuple[str, int, object, object]] = []     # (key, scale, start, end)
        self._k = 0

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def __call__(self, kind, fn, *a):
        if kind == "start":
            return fn(*a)
        if kind == "ar":
            self._k = a[0]
        t0 = self._now()
        out = fn(*a)
        self.marks.append((KIND[kind], self._k, t0, self._now()))
        return out

    def totals(self, n_scales: int) -> tuple[dict[str, float], list[float]]:
        sync(self.device)
        stages, by_scale = dict.fromkeys(STAGE_KEYS, 0.0), [0.0] * n_scales
        for key, k, t0, t1 in self.marks:
            dt = t0.elapsed_time(t1) / 1e3 if self.cuda else t1 - t0
            stages[key] += dt
            if key == "head":
                by_scale[k] += dt
        return stages, by_scale


def stage_split(stages, work: Work, official_rows: bool) -> tuple[dict[str, float], list[float]]:
    """One instrumented pass (after the timed ones): seconds per stage and head seconds per scale."""
    from flowar.sampling.sampler import Hooked
    clock = StageClock(work.device)
    run_once(Hooked(stages, clock), work, official_rows)
    return clock.totals(work.config.n_scales)


def gemm_peak_gflops(device: torch.device, n: int = 2048, repeat: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of an n x n x n GEMM in ``dtype`` on this device, now (median of ``repeat``).

    The size grows from 256 towards ``n`` only while one product takes under 50 ms: a dtype this
    CPU has no fast kernel for (bf16 on an AVX2-only CPU runs a scalar loop at ~1 GFLOP/s) is
    measured in a second instead of a minute and a half."""
    size = 256
    while True:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        torch.mm(a, b)
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if size >= n or time.perf_counter() - t0 > 0.05:
            break
        size = min(n, size * 2)
    # on a GPU one product of this size takes about what a launch and a sync do: a loop of them between
    # two syncs (one product per sync put the measured peak low, and the rows' share of it high)
    loop = 50 if device.type == "cuda" else 1
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(loop):
            torch.mm(a, b)
        sync(device)
        times.append((time.perf_counter() - t0) / loop)
    return 2 * size ** 3 / statistics.median(times) / 1e9


def schedule_flops(model, vae, schedule, B: int) -> dict[str, int]:
    """FLOPs of one sample of batch B with ``schedule``, done the official way (the null half
    integrated too), per stage, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode
    from flowar.sampling.eager import OfficialStyleStages
    from flowar.sampling.sampler import Hooked

    counted = dict.fromkeys(STAGE_KEYS, 0)

    def count(kind, fn, *a):
        with FlopCounterMode(display=False) as fc:
            out = fn(*a)
        if kind in KIND:
            counted[KIND[kind]] += fc.get_total_flops()
        return out

    dev = next(model.parameters()).device
    work = Work(model.config, schedule, torch.zeros(B, dtype=torch.int64, device=dev), 0, vae is not None, dev)
    run_once(Hooked(OfficialStyleStages(model, vae.decode if vae is not None else None), count), work, True)
    return counted
