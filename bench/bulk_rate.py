"""Bulk sampling's throughput against one image at a time, in one run.

    python bench/bulk_rate.py --engine-dir DIR [--num-images 32] [--batch B ...] [--json bench/out/bulk_rate.json]

Measures, in this order on the same machine: ``flowar-run --engine-dir DIR`` sampling eight
images one at a time in one process (the in-process rate, as bench/serve_load.py does), then
``flowar-sample --engine-dir DIR --num-images N`` (one worker with every core) at its default
batch (the best images/s of the call plan measured at export) and at each ``--batch`` given.
Reports each run's images/s while sampling (run.json's ``sampling_images_per_s``: the seconds in
the shards, Ray's start and the engines' opening excluded) and for the whole command, and the
ratio to the in-process rate, measured before and after the bulk runs (this host's speed drifts
by several per cent within minutes: the ratio is taken to the mean of the two, both reported).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve_load import in_process_rate

BIN = Path(sys.executable).parent


def bulk(engine_dir: str, n: int, threads: int, batch: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        t0 = time.perf_counter()
        subprocess.run([str(BIN / "flowar-sample"), "--engine-dir", engine_dir, "--num-images", str(n), "--out",
                        str(out), "--threads", str(threads), "--shard-size", str(n)]
                       + (["--batch", str(batch)] if batch else []),
                       check=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, stdout=subprocess.DEVNULL)
        command_s = time.perf_counter() - t0
        [tp] = json.loads((out / "run.json").read_text())["throughput"]
    return {"batch": tp["batch"], "sampling_images_per_s": tp["sampling_images_per_s"],
            "run_images_per_s": tp["images_per_s"], "command_s": command_s, "command_images_per_s": n / command_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine-dir", required=True)
    ap.add_argument("--num-images", type=int, default=32)
    ap.add_argument("--batch", type=int, action="append", default=[], help="also this batch (repeatable)")
    ap.add_argument("--threads", type=int, default=None, help="[default: the cores this process may use]")
    ap.add_argument("--json", default="bench/out/bulk_rate.json")
    a = ap.parse_args(argv)
    from flowar.engines.ort import cpu_threads
    from flowar.io.files import check_writable
    a.threads = cpu_threads() if a.threads is None else a.threads      # (taskset / cpuset, not the host's count)
    if a.threads < 1:
        sys.exit(f"error: expected --threads >= 1; got {a.threads}. Fix: use e.g. --threads 2")
    check_writable(a.json, False, "--json")
    before = in_process_rate(a.engine_dir, a.threads)
    print(f"in-process: {before:.3f} s per image ({1 / before:.3f} images/s; flowar-run, eight images one at a time)",
          flush=True)
    runs = [bulk(a.engine_dir, a.num_images, a.threads, b) | {"default": b is None} for b in [None, *a.batch]]
    after = in_process_rate(a.engine_dir, a.threads)
    print(f"in-process again: {after:.3f} s per image", flush=True)
    per = (before + after) / 2
    for r in runs:
        r["vs_in_process"] = r["sampling_images_per_s"] * per
        print(f"flowar-sample {a.num_images} images at batch {r['batch']}{' (default)' if r['default'] else ''}: "
              f"{r['sampling_images_per_s']:.3f} images/s while sampling ({r['vs_in_process']:.2f}x the mean "
              f"in-process rate), whole command {r['command_s']:.1f} s ({r['command_images_per_s']:.3f} images/s)",
              flush=True)
    from flowar.engines.cpu import cpu_record
    out = {"engine_dir": a.engine_dir, **cpu_record(), "threads": a.threads,
           "in_process_s_per_image": [before, after], "runs": runs}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"JSON -> {a.json}")
    return 0


if __name__ == "__main__":
    from flowar.errors import run_script
    run_script(main)
