"""Content digests: of a file, of a VAE (its weights and config), and a dataset's parts; none depends on
where the files lie."""

from __future__ import annotations

import hashlib
from pathlib import Path


def hasher():
    """A sha256 fed length-prefixed parts, so no two part sequences hash alike."""
    h = hashlib.sha256()
    def add(*parts: bytes) -> None:
        for part in parts:
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h, add


VAE_FILES = ("config.json", "*.safetensors", "*.bin")   # what a VAE folder's sha256 covers (not a README)


def sha256_file(path: str | Path, found: dict | None = None) -> str:
    """The file's sha256; with ``found``, noted there as ``{name: [sha256, *the state of the file read, taken
    before reading it]}`` (what :meth:`flowar.export.manifest.Manifest.remember` records: the export's own files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if found is not None:
            from flowar.io.files import file_state
            state = file_state(f.fileno())
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if found is not None:
        found[Path(path).name] = [h.hexdigest(), *state]
    return h.hexdigest()


SEAL = "sealed_sha256"      # where a sealed JSON record (an engine directory's manifest) keeps its own digest
SEAL_PARTS = "sealed_parts"  # and a short digest of each field, two levels deep, to name what an edit changed
# a manifest's fields its graphs were made for (the model's config but its latent_scale, applied outside them; the
# decoder's shape): an edit of one ended in ONNX Runtime's traceback. Others (class names, sampling defaults) run as edited
MADE_FOR = ("config.", "scales", "vae.latent_channels", "vae.downsample", "vae.image_size", "vae.config")


def sealed(record: dict) -> dict:
    """``record`` with a digest of each field (:func:`seal_parts`, under :data:`SEAL_PARTS`) and the
    sha256 of all of that (as JSON with sorted keys) under :data:`SEAL`."""
    record = record | {SEAL_PARTS: seal_parts(record)}
    return record | {SEAL: seal_of(record)}


def seal_of(record: dict) -> str:
    import json
    return hashlib.sha256(json.dumps({k: v for k, v in record.items() if k != SEAL}, sort_keys=True).encode()).hexdigest()


def seal_parts(record: dict) -> dict[str, str]:
    """The first 16 hex digits of the sha256 of each field (``config.latent_scale``, ``class_names``),
    the seal's own fields left out."""
    import json
    flat = {f"{k}.{k2}" if isinstance(v, dict) else k: v2
            for k, v in record.items() if k not in (SEAL, SEAL_PARTS)
            for k2, v2 in (v.items() if isinstance(v, dict) else [(k, v)])}
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:16] for k, v in flat.items()}


def strict_json(v):
    """``v`` with every non-finite float as a string ("inf"): what ``json.dumps(..., allow_nan=False)`` takes
    (json wrote Infinity, which strict parsers, jq and JavaScript's among them, refuse)."""
    import math
    return ({k: strict_json(x) for k, x in v.items()} if isinstance(v, dict) else [strict_json(x) for x in v]
            if isinstance(v, (list, tuple)) else str(v) if isinstance(v, float) and not math.isfinite(v) else v)


def seal_broken(record: dict) -> bool:
    """Whether a sealed ``record`` was edited since: its seal is not its fields' digest, or the seal
    is gone while the digests sealed with it stay (removing the one key passed any edit as a record
    from before the seal). A record with neither is from before the seal: nothing to tell."""
    if record.get(SEAL) is None:
        return SEAL_PARTS in record
    return record[SEAL] != seal_of(record)


def edited_parts(record: dict) -> list[str]:
    """The fields of a sealed ``record`` whose digests are not those it was sealed with (added and
    removed ones too), and the seal itself where it was removed; empty where it holds no digests to
    compare (then only :data:`SEAL` tells)."""
    was = record.get(SEAL_PARTS)
    if not isinstance(was, dict):
        return []
    now = seal_parts(record)
    return sorted(k for k in now.keys() | was.keys() if now.get(k) != was.get(k)) + [SEAL] * (record.get(SEAL) is None)


def vae_sha256(path: str | Path) -> str:
    """The sha256 of a VAE: of its file (MAR's kl16.ckpt), or for a diffusers folder one hash over
    the names and hashes of its config and weights files (:data:`VAE_FILES`)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    names = sorted({f.name for pattern in VAE_FILES for f in p.glob(pattern) if f.is_file()})
    return hashlib.sha256("".join(f"{n} {sha256_file(p / n)}\n" for n in names).encode()).hexdigest()
