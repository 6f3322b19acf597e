"""What a person who types the commands gets: each command in a fresh process, timed from outside.

For an engine directory, ``flowar-run --engine-dir DIR`` against ``flowar-run --ckpt`` on the
checkpoint (and VAE) it was exported from, the eager sampler a user runs, with the same labels,
seed, sampling settings (the directory's recorded defaults, given to both) and ``--threads``, one
image written as a PNG. Each pair runs ``repeat`` times, alternating
(the host's speed drifts; the best of each side is compared, and every run is kept):

* ``sampled``: the first image's sampling, as the command reports it ("sampled ... in X s");
* ``opened``: opening the source, as the command reports it ("opened ... in X s");
* ``command``: the whole process, start to exit (imports, open, sample, write the PNG).
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLED = re.compile(r"sampled .* in ([0-9.]+) s")
OPENED = re.compile(r"opened .* in ([0-9.]+) s")


def flowar_run(args: list[str], threads: int | None) -> dict:
    exe = str(Path(sys.executable).parent / "flowar-run")
    cmd = [exe, *args] + (["--threads", str(threads)] if threads else [])
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:              # (its own line, whole: the runs' command line went before it, cut at 400)
        from entry import relayed
        raise relayed((done.stderr.strip().splitlines() or [""])[-1], f"flowar-run {args[0]} {args[1]}, fresh",
                      f"run it alone: {' '.join(cmd)}")
    text = done.stdout + done.stderr
    sampled, opened = SAMPLED.search(text), OPENED.search(text)
    return {"command_s": wall, "sampled_s": float(sampled.group(1)) if sampled else None,
            "opened_s": float(opened.group(1)) if opened else None}


def fresh_runs(engine_dir: str, repeat: int = 2, threads: int | None = None, label: int = 0, seed: int = 0) -> dict:
    """Fresh-process runs of both commands; ratios of the best of each side."""
    from flowar.export.manifest import read_manifest
    m = read_manifest(engine_dir)
    ckpt, _, ema = m.exported_checkpoint
    with tempfile.TemporaryDirectory(prefix="flowar-fresh-") as tmp:
        cfg = Path(tmp) / "config.json"
        cfg.write_text(m.config.to_json())
        # the directory's recorded sampling defaults (e.g. FlowAR-H's 50 steps, cfg 2.4) given to both
        # sides: flowar-run --engine-dir samples with them, flowar-run --ckpt would not
        recorded = {k: v for k, v in (m.schedule_defaults or {}).items() if v is not None}
        common = ["--labels", str(label), "--seed", str(seed)] + [a for k, v in sorted(recorded.items())
                                                                   for a in (f"--{k}", str(v))]
        eager = ["--ckpt", str(ckpt), "--config", str(cfg)] + (["--vae", m.vae["source"]] if m.vae else []) + \
            ([] if ema else ["--raw-weights"])
        sides = {"eager": eager, "engines": ["--engine-dir", str(engine_dir)]}
        runs: dict[str, list[dict]] = {k: [] for k in sides}
        for i in range(repeat):
            for name, args in sides.items():
                out = ["--out", str(Path(tmp) / f"{name}{i}.png")] if m.vae else ["--save-tokens", str(Path(tmp) / f"{name}{i}.safetensors")]
                runs[name].append(flowar_run(args + common + out, threads))
    best = {k: {f: min(r[f] for r in v if r[f] is not None) if any(r[f] is not None for r in v) else None
                for f in ("command_s", "sampled_s", "opened_s")} for k, v in runs.items()}
    ratio = {f: best["eager"][f] / best["engines"][f] for f in ("command_s", "sampled_s")
             if best["eager"][f] and best["engines"][f]}
    from flowar.engines.cpu import cpu_record
    return {**cpu_record(), "runs": runs, "best": best, "ratio": ratio, "threads": threads, "repeat": repeat,
            "median": {k: statistics.median(r["command_s"] for r in v) for k, v in runs.items()}}


def lines(res: dict) -> list[str]:
    b, r = res["best"], res["ratio"]
    out = [f"## What a user gets: each command in a fresh process (best of {res['repeat']}, threads "
           f"{res['threads'] or 'all'}; {res['cpu']}, {', '.join(res['cpu_flags'])})", "",
           "| | `flowar-run --ckpt` (eager) | `flowar-run --engine-dir` | ratio |", "|---|---|---|---|"]
    for f, what in (("opened_s", "opening the source"), ("sampled_s", "sampling of the first image"),
                    ("command_s", "whole command (open, sample, write the PNG)")):
        e, g = b["eager"][f], b["engines"][f]
        out.append(f"| {what} | {e:.2f} s | {g:.2f} s | {f'{r[f]:.2f}x' if f in r else ''} |" if e and g else
                   f"| {what} | {e or '-'} | {g or '-'} | |")
    return out


def main(argv: list[str]) -> int:
    from entry import Parser
    from flowar.errors import FlowARError
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine-dir", required=True)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args(argv)
    if a.repeat < 1:
        raise FlowARError("--repeat >= 1", str(a.repeat), "use e.g. --repeat 2")
    if a.threads is not None and a.threads < 1:
        raise FlowARError("--threads >= 1", str(a.threads), "use e.g. --threads 2, or leave it out for every core")
    from flowar.export.manifest import read_manifest
    read_manifest(a.engine_dir)                      # (a bad --engine-dir: one line, not the runs' traceback)
    r = fresh_runs(a.engine_dir, a.repeat, a.threads)
    print("\n".join(lines(r)))
    print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    from entry import run_script
    sys.exit(run_script(main))
