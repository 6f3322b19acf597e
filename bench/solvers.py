"""Solvers x steps on the default model, through ONNX Runtime engines: head evaluations,
batch-1 latency, and quality against the official schedule (PSNR of the same samples, token
error), class accuracy by the independent judge and the judge-feature Frechet distance.

    python bench/solvers.py --out bench/out/solvers.md      # ~6 minutes on 2 cores

Needs the Animal-MNIST data for the judge: pip install --no-deps animal-mnist==0.4.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# (label, solver, grid points, stride, order)
CONFIGS = [
    ("official (euler 25)", "euler", 25, 1, 1),
    ("euler 13", "euler", 13, 1, 1),
    ("euler 9", "euler", 9, 1, 1),
    ("ab2 13", "ab2", 13, 1, 1),
    ("ab2 9", "ab2", 9, 1, 1),
    ("heun 7", "heun", 7, 1, 1),
    ("heun 5", "heun", 5, 1, 1),
    ("skip 1/2, order 3", "skip", 25, 2, 3),
    ("skip 1/3, order 1", "skip", 25, 3, 1),
    ("skip 1/3, order 2", "skip", 25, 3, 2),
    ("fast = skip 1/3, order 3", "skip", 25, 3, 3),
    ("skip 1/4, order 3", "skip", 25, 4, 3),
]


def main(argv=None) -> int:
    from entry import Parser
    from flowar.errors import FlowARError
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=str(ROOT / "models" / "default" / "flowar.safetensors"))
    ap.add_argument("--vae", default=str(ROOT / "models" / "default" / "vae"))
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=21, help="batch-1 latency: median over this many runs")
    ap.add_argument("--out", default="bench/out/solvers.md")
    a = ap.parse_args(argv)
    for name, v in (("--per-class", a.per_class), ("--repeat", a.repeat)):     # (found after the export, a traceback)
        if v < 1:
            raise FlowARError(f"{name} >= 1", str(v), f"use e.g. {name} 1")
    import subprocess
    from flowar.config import SAMPLING_DEFAULTS
    from flowar.eval.judge import train_judge
    from flowar.io.files import atomic_write_bytes, check_writable
    from flowar.eval.quality import measure, stages_sampler
    from flowar.sampling.batches import run_sampling
    from flowar.runtime.runtime import Runtime
    from flowar.sampling.schedule import build_schedule
    check_writable(a.out, False, "--out")
    from flowar.io.files import user_cache
    judge = train_judge(cache=user_cache("judge.safetensors"))
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        export = subprocess.Popen([str(Path(sys.executable).parent / "flowar-export"), "--ckpt", a.ckpt, "--vae", a.vae,
                                   "--out", str(Path(tmp) / "e"), "--max-batch", "8", "--no-verify"],
                                  stderr=subprocess.PIPE, text=True)
        said = ""
        try:
            for said in export.stderr:    # its progress as it comes; its error line as ours (it was a traceback)
                if not said.startswith("error: "):
                    print(said, end="", file=sys.stderr, flush=True)
        except BaseException:             # (a stop of this script: not the export left running alone)
            export.kill()
            export.wait()
            raise
        if export.wait():
            from entry import relayed
            raise relayed(said, "flowar-export of --ckpt and --vae", "pass a checkpoint and VAE flowar-export takes")
        with Runtime.open_engine_dir(Path(tmp) / "e", backend="ort") as rt:
            c = rt.config
            labels = [k for k in range(c.num_classes) for _ in range(a.per_class)]
            rows = []
            for name, solver, points, stride, order in CONFIGS:
                s = build_schedule(points, SAMPLING_DEFAULTS["cfg"], SAMPLING_DEFAULTS["guidance"], c.n_scales, solver,
                                   "official", stride, order)
                times = []
                for _ in range(a.repeat + 2):
                    t0 = time.perf_counter()
                    with rt.threads.applied():          # (the thread policy flowar-run samples under)
                        run_sampling(rt.stages, c, [3], s, 0, decode=True)
                    times.append(time.perf_counter() - t0)
                lat = statistics.median(times[2:])
                q = measure(stages_sampler(rt.stages, c, labels, 0, rt.manifest.max_batch), c, labels, s, True, judge,
                            judge.real_stats)
                if not q.vs_official:               # the official schedule is the reference itself
                    q.vs_official = {"psnr_median": float("inf"), "psnr_worst": float("inf"), "token_mean": 0.0}
                rows.append((name, s.head_evals, lat, q))
                print(f"{name:<26} evals {s.head_evals:3d}  batch-1 {lat * 1e3:6.1f} ms  PSNR median "
                      f"{q.vs_official['psnr_median']:6.1f} worst {q.vs_official['psnr_worst']:5.1f}  tokens mean "
                      f"{q.vs_official['token_mean']:.4f}  accuracy {q.class_accuracy:.1%}  Frechet {q.frechet_judge:.1f}",
                      flush=True)
    base_evals, base_lat = rows[0][1], rows[0][2]
    lines = ["| solver, grid points | head evals / sample | fewer evals | batch-1 latency ms | faster | PSNR vs official "
             "median / worst dB | token error mean | class accuracy | judge Frechet |", "|" + "---|" * 9]
    for name, ev, lat, q in rows:
        o = q.vs_official
        lines.append(f"| {name} | {ev} | {base_evals / ev:.2f}x | {lat * 1e3:.1f} | {base_lat / lat:.2f}x | "
                     f"{o['psnr_median']:.1f} / {o['psnr_worst']:.1f} | {o['token_mean']:.4f} | {q.class_accuracy:.1%} | "
                     f"{q.frechet_judge:.1f} |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    atomic_write_bytes(a.out, lambda t: Path(t).write_text(table))
    return 0


if __name__ == "__main__":
    from entry import run_script
    sys.exit(run_script(main))
