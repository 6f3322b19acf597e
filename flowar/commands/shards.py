"""What a bulk run (``flowar-sample``) writes into its folder: the shards of consecutive sample
indices (``shards/NNNNN.npz``, written last, marks a shard done) and ``run.json`` (the settings that
define the images, and what ran). See :mod:`flowar.commands.bulk`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flowar.errors import FlowARError

if TYPE_CHECKING:
    from flowar.commands.bulk import BulkSpec


def shard_ranges(n: int, size: int) -> list[tuple[int, int, int]]:
    """(shard id, first index, end index) of consecutive shards."""
    return [(j, s, min(s + size, n)) for j, s in enumerate(range(0, n, size))]


def shard_batches(start: int, end: int, batch: int) -> list[list[int]]:
    """The batches of a shard's indices, cut at multiples of ``batch``: the same batches for any shard
    size that is a multiple of it (so the same bytes), fewer images where a shard is smaller."""
    cuts = sorted({start, end} | set(range((start // batch + 1) * batch, end, batch)))
    return [list(range(a, b)) for a, b in zip(cuts, cuts[1:])]


def shard_path(out: Path, j: int) -> Path:
    return out / "shards" / f"{j:05d}.npz"


def shard_is_done(out: Path, j: int, start: int, end: int) -> bool:
    p = shard_path(out, j)
    if not p.is_file():
        return False
    try:
        with np.load(p, allow_pickle=False) as z:
            return z["indices"].tolist() == list(range(start, end)) and z["images"].shape[0] == end - start
    except Exception:   # noqa: BLE001 - an unreadable shard is redone
        return False


def images_sha256(manifest: Path) -> str:
    """The sha256 of what an engine directory's manifest says that defines its images: its engines'
    files and choices, the model, the defaults, the call plan's batch sizes and row blocks (they
    change pixels by float rounding); not when it was made, with which library versions, what the
    export measured (memory peaks, differences found by verify, the call plan's seconds, the
    precision search's timings) or where its inputs lay. A run binds to this: re-exporting the same
    checkpoint with the same settings (byte-identical graphs, another timestamp and memory peak in
    the manifest) made the run impossible to resume ("other manifest_sha256"), with no way to follow
    the fix the line gave."""
    import hashlib
    import json
    m = json.loads(manifest.read_text())
    from flowar.io.digests import SEAL, SEAL_PARTS
    for measured in ("created", "versions", "auto", SEAL, SEAL_PARTS):      # (the seal: of the timestamp too)
        m.pop(measured, None)
    plan = m.get("call_plan")
    if isinstance(plan, dict):
        plan.pop("per_image", None)
        for stage in (plan.get("stages") or {}).values():
            if isinstance(stage, dict):
                stage.pop("seconds", None)
    for stage in (m.get("stages") or {}).values():
        if isinstance(stage, dict):
            for measured in ("peak_rss_gb", "verified_max_abs_diff", "verified_max_rel_diff"):
                stage.pop(measured, None)
    for source in ("checkpoint", "vae"):
        if isinstance(m.get(source), dict):
            m[source].pop("source", None)
    if isinstance(m.get("checkpoint"), dict):
        m["checkpoint"].pop("config", None)        # (how its config was given: a --config file's path)
        m["checkpoint"].pop("vae_sha256", None)    # (a record, recorded since 2026-12-06)
    return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()


def images_done(out: Path, spec: BulkSpec) -> int:
    """Images already in finished shards of ``out`` (read from the shard files there, not from a list
    of every shard of the run, which a huge count could not hold)."""
    done = 0
    for p in (out / "shards").glob("*.npz") if (out / "shards").is_dir() else ():
        if p.stem.isdigit():
            j = int(p.stem)
            start, end = j * spec.shard_size, min((j + 1) * spec.shard_size, spec.num_images)
            if start < end and shard_is_done(out, j, start, end):
                done += end - start
    return done


def check_run(out: Path, spec: BulkSpec, meaning=None) -> bool:
    """Whether ``out`` holds this run to resume (True) or is new to it (False: :func:`begin_run`
    makes it this run's); writes nothing. A folder holds one run: refuse to mix shards of other
    settings into it, and to write into a folder this command did not write (new or empty, else one
    with its run.json): a folder of the user's had its run.json and samples.npz replaced, and shards
    without a run.json, whose settings nobody knows, were kept as part of a run of other settings.
    ``meaning`` maps a record to what it means on this engine directory (the schedule its settings
    resolve to, the engines its backend picks), so that a default spelled out resumes the run."""
    mine = asdict(spec)
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    recorded = _recorded(out)
    if held and not (isinstance(recorded, dict) and {"num_images", "shard_size", "seed"} <= recorded.keys()):
        raise FlowARError("--out: a new or empty folder, or one flowar-sample wrote (with its run.json)",
                          f"{out} holds {', '.join(held[:3])}{', ...' if len(held) > 3 else ''}"
                          + (", its run.json not flowar-sample's (unreadable, or other fields)" if "run.json" in held
                             else ", without a run.json"), "choose a new --out")
    # (a run.json without a shard done binds nothing: a first run that failed before its first shard,
    # say on an engine that would not open, left the folder refusing every other setting)
    if not ((out / "run.json").is_file() and any((out / "shards").glob("*.npz"))):
        return False
    theirs = recorded
    if isinstance(theirs, dict):
        for ran in ("engines", "throughput"):       # what ran, not what defines the images
            theirs.pop(ran, None)
        if theirs.get("manifest_sha256") and theirs["manifest_sha256"] == mine["manifest_sha256"]:
            theirs["engine_dir"] = mine["engine_dir"]     # the same engines, moved (a volume mounted elsewhere)
        theirs.setdefault("manifest_sha256", mine["manifest_sha256"])   # (a run.json from before the field)
        if meaning is not None:
            theirs, mine = meaning(theirs), meaning(mine)
    if theirs != mine:
        diff = sorted(k for k in mine if not isinstance(theirs, dict) or theirs.get(k) != mine[k])

        def short(v) -> str:                        # (None: "batch: here 4, there None")
            return "not given" if v is None else repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."

        def differs(k: str, a, b) -> str:           # (a schedule by the fields that differ: its first 37 characters
            if dataclasses.is_dataclass(a) and type(a) is type(b):     # were the same on both sides), not by the
                fields = [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]  # tables
                plain = [f for f in fields if not isinstance(getattr(a, f), tuple)] or fields    # derived from them
                return "; ".join(differs(f"{k}.{f}", getattr(a, f), getattr(b, f)) for f in plain)   # (its plan's)
            return f"{k}: here {short(a)}, there {short(b)}"
        # (each with both values: "other seed than run.json records" left the user to find which seed it holds)
        both = "; ".join(differs(k, mine[k], theirs.get(k) if isinstance(theirs, dict) else None) for k in diff[:4])
        got = f"other {', '.join(diff) or 'settings'} than {out / 'run.json'} records" + (f" ({both})" if both else "")
        raise FlowARError("the settings of the run already in --out (to resume it)", got,
                          "run with the same settings, or choose a new --out")
    return True


def begin_run(out: Path, spec: BulkSpec) -> None:
    """Make ``out`` (new, or holding no finished shard: :func:`check_run`) this run's: its run.json,
    and no PNGs of an earlier start's unfinished shards (they are not this run's)."""
    import shutil
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "png", ignore_errors=True)
    (out / "run.json").unlink(missing_ok=True)
    write_run_json(out, spec, None)


def write_run_json(out: Path, spec: BulkSpec, engines: list[str] | None, throughput: dict | None = None) -> None:
    """run.json: the settings that define the images, and (once known) which engines ran and the
    throughput of each run that sampled (a resumed folder keeps every run's)."""
    from flowar.io.files import atomic_write_bytes
    before = _recorded(out)
    before = before if isinstance(before, dict) else {}
    body = asdict(spec) | {"engines": sorted(set(before.get("engines") or []) | set(engines or [])),
                           "throughput": list(before.get("throughput") or []) + ([throughput] if throughput else [])}
    atomic_write_bytes(out / "run.json", lambda t: Path(t).write_text(json.dumps(body, indent=1)))


def _recorded(out: Path):
    """What ``run.json`` in ``out`` holds (None where it is missing or not JSON)."""
    try:
        return json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return None
