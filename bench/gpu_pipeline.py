"""The pipeline on a GPU, as users call it: CUDA graphs against eager for every schedule, in fp32
and bf16, with the time per image (what a CPU cannot check).

    python bench/gpu_pipeline.py --preset flowar-s [--batch 1,8] [--out bench/out/gpu/pipeline.json]

For each precision (fp32; bf16 = bf16 GEMMs, fp32 around them) and schedule (official, fast):
``FlowARPipeline`` over a stand-in checkpoint (random weights of trained scale, bench/standins.py)
with CUDA graphs (captured on the first call, replayed after) and without, the same labels and
seeds. In fp32 the replay's tokens (and the capturing call's) must equal eager's within 1e-3. In
bf16 two paths differ by their rounding as much as either differs from fp32, so a bf16 replay is
judged against fp32 eager as bench/latency.py judges a 16-bit row (``within_16_bit_rounding``: its
error at most 1.5 times bf16 eager's, + 1e-3), and the replay must equal the capturing call within 1e-3.
On a CPU (a dry run) there is no capture: graphs and eager are the same loop, and it says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="flowar-s")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="bench/out/gpu/pipeline.json")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from standins import flowar_state_dict

    from latency_report import within_16_bit_rounding

    from flowar import FlowARPipeline
    from flowar.sampling.schedule import SCHEDULES
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, ok = [], True
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:            # after every row: a run stopped at its time limit keeps the rows it finished
        Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                           "preset": a.preset, "rows": rows}, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.pth"
        torch.save(flowar_state_dict(a.preset), ckpt)
        fp32_eager = {}                                   # (schedule, batch) -> fp32 eager tokens: bf16's reference
        diff = lambda a, b: float((a - b).abs().max())    # noqa: E731
        for precision in ("fp32", "bf16"):
            pipes = {g: FlowARPipeline.from_pretrained(ckpt, preset=a.preset, device=device, cuda_graphs=g,
                                                       precision=precision) for g in (True, False)}
            for schedule in SCHEDULES:
                for B in (int(b) for b in a.batch.split(",")):
                    labels = [(7 * i) % pipes[True].runtime.config.num_classes for i in range(B)]
                    out = {}
                    for graphs, pipe in pipes.items():
                        first = pipe(labels, seed=1, schedule=schedule, output_type="latent").images   # captures
                        times = []
                        for _ in range(a.repeat):
                            if device == "cuda":
                                torch.cuda.synchronize()
                            t0 = time.perf_counter()
                            tokens = pipe(labels, seed=1, schedule=schedule, output_type="latent").images
                            times.append(time.perf_counter() - t0)
                        out[graphs] = (tokens.cpu(), first.cpu(), statistics.median(times),
                                       "on" if pipe.runtime.runner else "off")
                    d, d_first = diff(out[True][0], out[False][0]), diff(out[True][1], out[False][0])
                    if precision == "fp32":
                        fp32_eager[schedule, B] = out[False][0]
                        good, judged = d <= 1e-3 and d_first <= 1e-3, {}
                    else:
                        ref = fp32_eager[schedule, B]
                        judged = {"max_abs_diff_replay_vs_fp32_eager": diff(out[True][0], ref),
                                  "max_abs_diff_eager_vs_fp32_eager": diff(out[False][0], ref)}
                        good = (within_16_bit_rounding(judged["max_abs_diff_replay_vs_fp32_eager"],
                                                       judged["max_abs_diff_eager_vs_fp32_eager"])
                                and diff(out[True][0], out[True][1]) <= 1e-3)
                    ok &= good
                    row = {"precision": precision, "schedule": schedule, "batch": B, "graphs": out[True][3],
                           "ms_per_image_graphs": 1e3 * out[True][2] / B, "ms_per_image_eager": 1e3 * out[False][2] / B,
                           "max_abs_diff_replay_vs_eager": d, "max_abs_diff_first_vs_eager": d_first, "ok": good} | judged
                    rows.append(row)
                    save()
                    print(f"{precision} {schedule:<8} batch {B:<3} graphs {row['ms_per_image_graphs']:9.2f} ms/image, "
                          f"eager {row['ms_per_image_eager']:9.2f} ms/image (x{out[False][2] / out[True][2]:.2f}); "
                          f"|replay - eager| {d:.1e}, |capture call - eager| {d_first:.1e}"
                          + (f", vs fp32 eager: replay {judged['max_abs_diff_replay_vs_fp32_eager']:.1e}, eager "
                             f"{judged['max_abs_diff_eager_vs_fp32_eager']:.1e} " if judged else " ")
                          + f"{'ok' if good else 'WRONG'}  [CUDA graphs {out[True][3]}]", flush=True)
            for p in pipes.values():
                p.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flowar.errors import run_script
    run_script(main)
