"""What a GPU user sees from a fresh process, and bf16's image accuracy on the GPU.

    python bench/gpu_fresh.py [--standins DIR] [--repeat 2] [--per-class 10] [--json FILE]

1. FlowAR-S at 256 px (full-size stand-in weights, written by ``bench/standins.py`` unless
   ``--standins`` holds them), decode included: ``flowar-run --ckpt ... --device cuda`` in a fresh
   process per mode (float32 / ``--precision bf16``, CUDA graphs on / off), the modes alternating,
   best of ``repeat``: opening, the first image's sampling (graph capture included), the whole
   command; each mode's image and tokens against float32 eager's.
2. The shipped default model (trained), ``per-class`` samples of each class in one process on the
   GPU: images of bf16 (graphs) and float32 graphs against float32 eager: PSNR median and worst,
   token error. (The stand-ins' random weights make part 1's PSNR a measure of rounding only.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency_fresh import flowar_run  # noqa: E402

DEVICE = ["cuda"]          # --device cpu: a dry run of the script here
MODES = {"fp32 eager": ["--no-cuda-graphs"], "fp32 graphs": [], "bf16 eager": ["--precision", "bf16", "--no-cuda-graphs"],
         "bf16 graphs": ["--precision", "bf16"]}


def fresh(standins: Path, repeat: int, tmp: Path) -> dict:
    base = ["--ckpt", str(standins / "FlowAR-S.pth"), "--preset", "flowar-s", "--vae", str(standins / "kl16.ckpt"),
            "--device", DEVICE[0], "--labels", "0", "--seed", "0"]
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for i in range(repeat):
        for mode, extra in MODES.items():
            p = tmp / f"{mode.replace(' ', '_')}{i}"
            runs[mode].append(flowar_run(base + extra + ["--save-images", str(p), "--save-tokens", f"{p}.safetensors"],
                                         None))
            print(mode, i, runs[mode][-1], flush=True)
    from flowar.io.images import psnr
    ref_t = _tokens(tmp / "fp32_eager0")
    ref_i = _image(tmp / "fp32_eager0")
    out = {}
    for mode in MODES:
        p = tmp / f"{mode.replace(' ', '_')}0"
        out[mode] = {f: min(r[f] for r in runs[mode]) for f in ("opened_s", "sampled_s", "command_s")} | {
            "tokens_max_abs_vs_fp32_eager": float((_tokens(p) - ref_t).abs().max()),
            "psnr_vs_fp32_eager": psnr(_image(p), ref_i), "runs": runs[mode]}
    return out


def _sync() -> None:
    if DEVICE[0].startswith("cuda"):
        torch.cuda.synchronize()


def _tokens(p: Path) -> torch.Tensor:
    from safetensors.torch import load_file
    return load_file(f"{p}.safetensors")["tokens"].float()


def _image(p: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image
    a = np.asarray(Image.open(p / "000000.png").convert("RGB"), dtype=np.float32)    # the image alone (a grid: captions)
    return torch.from_numpy(a).permute(2, 0, 1)[None] / 127.5 - 1


def default_model(per_class: int) -> dict:
    from flowar.io.images import psnr_each
    from flowar.runtime.runtime import Runtime
    root = Path(__file__).resolve().parents[1] / "models" / "default"
    res = {}
    for mode, (precision, graphs) in {"fp32 eager": ("fp32", False), "fp32 graphs": ("fp32", True),
                                      "bf16 eager": ("bf16", False), "bf16 graphs": ("bf16", True)}.items():
        with Runtime.open_checkpoint(root / "flowar.safetensors", vae=root / "vae", device=DEVICE[0],
                                     precision=precision, cuda_graphs=graphs) as rt:
            labels = [c for c in range(rt.config.num_classes) for _ in range(per_class)]
            sched = rt.schedule()
            # set-up and capture outside the timing: the very call timed (a batch of one captured only the
            # batch-1 bucket; the 16 and 4 buckets were captured inside the timed call)
            rt.sample(labels, sched, seed=0, batch_size=16)
            _sync()
            t0 = time.perf_counter()
            r = rt.sample(labels, sched, seed=0, batch_size=16)
            _sync()
            res[mode] = {"s_per_image": (time.perf_counter() - t0) / len(labels), "tokens": r.tokens, "images": r.images}
    ref = res["fp32 eager"]
    out = {}
    for mode, r in res.items():
        each = psnr_each(r["images"], ref["images"])
        finite = [x for x in each if x != float("inf")]
        out[mode] = {"ms_per_image": 1e3 * r["s_per_image"], "images": len(each),
                     "psnr_median": statistics.median(each), "psnr_worst": min(finite) if finite else float("inf"),
                     "tokens_max_abs": float((r["tokens"] - ref["tokens"]).abs().max()),
                     "tokens_mean_abs": float((r["tokens"] - ref["tokens"]).abs().mean())}
        print(mode, out[mode], flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--standins", help="a folder with FlowAR-S.pth and kl16.ckpt (default: written to a temporary one)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script (slow at full size)")
    a = ap.parse_args()
    from flowar.io.files import check_writable
    check_writable(a.json, False, "--json")
    DEVICE[0] = a.device
    report = {"gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu", "torch": torch.__version__}
    report["default_model"] = default_model(a.per_class)
    with tempfile.TemporaryDirectory(prefix="flowar-gpu-fresh-") as tmp:
        standins = Path(a.standins) if a.standins else Path(tmp) / "standins"
        if not a.standins:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(Path(__file__).parent / "standins.py"), "--out", str(standins),
                            "--presets", "flowar-s", "--vae"], check=True)
            print(f"stand-ins written in {time.perf_counter() - t0:.1f} s", flush=True)
        report["flowar_s_fresh"] = fresh(standins, a.repeat, Path(tmp))
    print("\n## FlowAR-S 256 px, decode included, each command a fresh process (best of "
          f"{a.repeat}; {report['gpu']})\n")
    print("| mode | open s | first image s | whole command s | image PSNR vs fp32 eager | max abs dtokens |")
    print("|---|---|---|---|---|---|")
    for m, r in report["flowar_s_fresh"].items():
        print(f"| {m} | {r['opened_s']:.2f} | {r['sampled_s']:.3f} | {r['command_s']:.2f} | "
              f"{r['psnr_vs_fp32_eager']:.1f} | {r['tokens_max_abs_vs_fp32_eager']:.1e} |")
    print(f"\n## The default model (trained), {a.per_class} per class, batch 16, warm\n")
    print("| mode | ms per image | PSNR vs fp32 eager median / worst | tokens max / mean abs |")
    print("|---|---|---|---|")
    for m, r in report["default_model"].items():
        print(f"| {m} | {r['ms_per_image']:.2f} | {r['psnr_median']:.1f} / {r['psnr_worst']:.1f} | "
              f"{r['tokens_max_abs']:.1e} / {r['tokens_mean_abs']:.1e} |")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    from flowar.errors import run_script
    run_script(main)
