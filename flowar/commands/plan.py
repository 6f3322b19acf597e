"""The call plan of an engine directory, measured at export on the engines chosen for this machine.

For every stage and scale, each row count that is a power of two up to the engines' limit is timed
(one call, median of a few, after a warm-up call); the block size that costs least per row is the
plan: a call of more rows runs as consecutive blocks of that size (what is left over in the largest
measured sizes that fit). So the small scales, where a call is mostly overhead, run a whole batch
at once, and the last scale runs in the blocks that keep its activations in cache.

From the same times, the seconds per image of a batch of B (the official schedule's calls, decode
included) for every B up to the limit, and the batch sizes worth forming: those that cost less
per image than every smaller one. A served replica forms only those, and bulk sampling takes the
cheapest (:mod:`flowar.commands.serve`, :mod:`flowar.commands.bulk`).
"""

from __future__ import annotations

import statistics
import time

import torch

from flowar.runtime.stages import blocks

REPEAT = 3


def measure_plan(bench, choice: dict[str, str], max_batch: int, schedule, progress=lambda s: None) -> dict:
    """The manifest's ``call_plan``: per stage, the block rows per scale and the measured seconds
    per (scale, rows); the seconds per image of each batch size; the batch sizes worth forming."""
    from flowar.export.specs import sample_inputs
    config, specs = bench.model.config, bench.specs
    gen = torch.Generator().manual_seed(0)
    plan: dict = {"stages": {}}
    for stage, spec in specs.items():
        progress(f"call plan {stage}")
        top = spec.max_rows(max_batch)
        sizes = [1 << i for i in range(top.bit_length()) if 1 << i <= top]
        seconds: dict[int, dict[int, float]] = {}
        with bench.engine(stage, choice.get(stage, "ort-fp32")) as eng:
            for k in spec.scales:
                seconds[k] = {}
                for r in sizes:
                    ins = sample_inputs(spec, config, k, r, gen)
                    shapes = spec.shapes(k, r)
                    outs = {n: torch.empty(shapes[n], dtype=spec.dtypes[n]) for n in spec.outputs}
                    times = []
                    with torch.inference_mode():
                        for i in range(REPEAT + 1):
                            t0 = time.perf_counter()
                            eng.infer(ins, outs, profile=k)
                            times.append(time.perf_counter() - t0)
                    seconds[k][r] = statistics.median(times[1:])
        best = {k: min(sizes, key=lambda r: (seconds[k][r] / r, -r)) for k in seconds}
        plan["stages"][stage] = {"block": {str(k): b for k, b in best.items()}, "sizes": sizes,
                                 "seconds": {str(k): {str(r): t for r, t in ts.items()} for k, ts in seconds.items()}}
    plan["per_image"] = {str(B): image_seconds(plan, specs, config, schedule, B) / B for B in range(1, max_batch + 1)}
    per = [plan["per_image"][str(B)] for B in range(1, max_batch + 1)]
    plan["batches"] = [B for B in range(1, max_batch + 1) if B == 1 or per[B - 1] < min(per[:B - 1])]
    return plan


def call_seconds(plan: dict, stage: str, k: int, rows: int) -> float:
    """What one call of ``rows`` costs by the plan (its blocks' measured times)."""
    st = plan["stages"][stage]
    ts = st["seconds"][str(k)]
    return sum(ts[str(b)] for b in blocks(rows, st["block"][str(k)], st["sizes"]))


def image_seconds(plan: dict, specs: dict, config, schedule, B: int) -> float:
    """Seconds of a batch of B images by the plan: the AR and the head's preparation on 2B rows
    per scale, the velocity on 2B rows where the schedule guides and B elsewhere, the decode on B."""
    R = schedule.rows(B)
    total = 0.0
    for k in range(config.n_scales):
        total += call_seconds(plan, "ar", k, R) + call_seconds(plan, "head_prep", k, R)
        total += sum(call_seconds(plan, "velocity", k, R if e.guided else B) for e in schedule.plan[k])
    return total + (call_seconds(plan, "decode", 0, B) if "decode" in specs else 0.0)
