"""``flowar-check --engine-dir DIR``: an engine directory checked whole before it ships.

Opening a directory hashes only the files the chosen engines read (a plan for a GPU is never read
on a CPU, so a damaged one went unnoticed until the GPU machine opened it). This reads and hashes
every file the manifest lists (graphs, their external data, compiled engines, weights, TensorRT
plans) against the sha256 the export recorded, and the manifest against the seal the export wrote
into it (an edited ``latent_scale`` or class name changed the images while every file hashed to its
record); names every file that differs (exit 2; a missing one is named when the manifest is read),
says what the directory holds,
and opens it as ``flowar-run`` would on this machine (its backend line, or why it cannot).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import click

from flowar.commands.options import command
from flowar.errors import EngineDirError, FlowARError


def holds(m) -> list[str]:
    """What the directory holds, one line per stage: its graph, the engine chosen for it on a CPU
    and its TensorRT plan."""
    plans = (m.tensorrt or {}).get("plans", {})
    graphs = m.precision if m.precision in ("fp16", "bf16") and not m.auto else "fp32"   # (measured: fp32 graphs)
    out = []
    for stage, info in m.stages.items():
        worst, rel = info.get("verified_max_abs_diff"), info.get("verified_max_rel_diff")   # (--no-verify: said)
        cells = [f"{info['file']} ({graphs} graph, " + (f"within {worst:.1e} of eager)" if worst is not None else
                                                        f"within {rel:.1%} of eager's largest value)" if rel is not None
                                                        else "not verified against eager)")]
        if stage in m.choice:                   # (what runs on a CPU: the choice, with the file its record names)
            rec = (m.engines or {}).get(stage) or {}
            held = rec.get("file") or ((m.weights or {}).get(rec.get("weights")) or {}).get("file", "no file recorded")
            cells.append(f"CPU engine {m.choice[stage]} ({held})")
        if stage in plans:
            cells.append(f"TensorRT plan {plans[stage]['file']} ({m.tensorrt['flavour']} {m.tensorrt['version']}, "
                         f"{plans[stage].get('compute_capability') or 'the GPU kind it was built on'})")
        out.append(f"  {stage:<10} " + "; ".join(cells))
    return out


def runs_here(engine_dir) -> tuple[bool, str]:
    """What ``flowar-run --engine-dir`` does with the directory on this machine: opened as it opens
    it (its engines made, nothing warmed or sampled), its backend line, or why it does not open here
    (a directory for a GPU checked on a CPU is intact all the same)."""
    from flowar.runtime.runtime import Runtime
    try:
        with Runtime.open_engine_dir(engine_dir, warm=()) as rt:
            return True, f"opens here as flowar-run opens it: {rt.detail}"
    except Exception as e:     # noqa: BLE001 - said, whatever it is (a compiled engine another PyTorch cannot load)
        return False, f"does not open on this machine: {e if isinstance(e, FlowARError) else f'{type(e).__name__}: {e}'}"


@command("flowar-check")
@click.option("--engine-dir", required=True, type=click.Path(), help="Engine directory from flowar-export.")
@click.option("--must-open", is_flag=True, help="Also fail (exit 3) where the directory does not open on this machine: "
              "for a check on the machine that will run it [default: said, not a failure, since a directory for a GPU "
              "is checked on the CPU that made it].")
@click.option("--quiet", is_flag=True, help="No progress bar and no description: the verdict line only.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def check_cmd(engine_dir, must_open, quiet, debug):
    """Check an engine directory whole before shipping it: every file it lists read and hashed
    against its record (a damaged TensorRT plan is found on a CPU; exit 2), what it holds, and
    whether it opens here (said; exit 3 only with --must-open, since a directory for a GPU is
    checked on a CPU)."""
    from flowar.export.manifest import MANIFEST, read_manifest
    from flowar.io.digests import SEAL, edited_parts, seal_broken, seal_of
    m = read_manifest(engine_dir)                # (its format, fields and paths; a missing file is named here)
    t0 = time.perf_counter()
    changed = m.changed(progress=not quiet)
    # the manifest itself, where the export sealed it: an edit (latent_scale, a class name, a default) changed the
    # images while every file it lists still hashed to its record
    raw = json.loads((m.root / MANIFEST).read_text())
    now = seal_of(raw)
    edited = seal_broken(raw)
    members = set(m.members())
    n, size = len(members), sum(m.member(rel).stat().st_size for rel, _ in members)
    if changed or edited:
        got = [f"{len(changed)} of {n} not: " + "; ".join(f"{rel} changed (sha256 {found[:12]}..., recorded {want[:12]}...)"
                                                            for rel, found, want in changed)] if changed else []
        parts = edited_parts(raw) if edited else []     # (which fields: "config.latent_scale"; it named none)
        got += [f"{MANIFEST} itself edited since" + (": " + ", ".join(parts[:6]) + (", ..." if len(parts) > 6 else "")
                if parts else f" (its fields hash to {now[:12]}..., sealed as {str(raw.get(SEAL))[:12]}...)")] if edited else []
        fix = m.rebuild                   # (built from the manifest as edited: it repeated an edited --cfg 99)
        opts = {"max_batch": "max-batch", "precision": "precision"} | {
            f"schedule_defaults.{k}": k for k in ("schedule", "steps", "cfg", "guidance")}
        for p in parts:
            fix = re.sub(rf" --{opts[p]} \S+", "", fix) if p in opts else fix
        raise EngineDirError(f"every file {Path(engine_dir) / MANIFEST} lists as the export wrote it"
                             + (", and the manifest itself" if edited else ""), "; ".join(got),
                             fix + " (its edited values left to their defaults)" * (fix != m.rebuild))
    seconds = time.perf_counter() - t0
    trained = (m.checkpoint or {}).get("vae_sha256")
    if m.vae and trained and m.vae.get("sha256") != trained:    # (the export's note was its only word; the images are noise)
        click.echo(f"note: its decoder is not the VAE {m.checkpoint.get('file')} was trained with (sha256 "
                   f"{str(m.vae.get('sha256'))[:12]}..., trained with {trained[:12]}...): its images are not the "
                   "model's; re-export with --vae of that VAE", err=True)
    opens, here = runs_here(engine_dir) if must_open or not quiet else (True, "")
    refused = must_open and not opens           # (then its error line says why, once: it was said twice)
    if not quiet:
        click.echo("\n".join([f"{engine_dir}: {len(m.stages)} stages, {m.precision}, max batch {m.max_batch}, "
                              + (f"{m.vae['image_size']} px images" if m.vae else "tokens only (no decoder)"),
                              *holds(m)] + [here] * (not refused)))
    if not (quiet and refused):                 # (--quiet: the verdict line only, here the refusal)
        click.echo(f"intact: {n} files, {size / 1e6:.1f} MB, each hashes to the sha256 its export recorded "
                   f"({seconds:.2f} s)" + ("" if raw.get(SEAL) else f"; {MANIFEST} unsealed (an export before the seal): "
                                                                  "an edit of it is not found"))
    if refused:
        click.echo(f"error: {here} (--must-open)", err=True)
        raise SystemExit(3)
