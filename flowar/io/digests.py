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


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


SEAL = "sealed_sha256"      # where a sealed JSON record (an engine directory's manifest) keeps its own digest


def sealed(record: dict) -> dict:
    """``record`` with the sha256 of its other fields (as JSON with sorted keys) under :data:`SEAL`."""
    return record | {SEAL: seal_of(record)}


def seal_of(record: dict) -> str:
    import json
    return hashlib.sha256(json.dumps({k: v for k, v in record.items() if k != SEAL}, sort_keys=True).encode()).hexdigest()


def vae_sha256(path: str | Path) -> str:
    """The sha256 of a VAE: of its file (MAR's kl16.ckpt), or for a diffusers folder one hash over
    the names and hashes of its config and weights files (:data:`VAE_FILES`)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    names = sorted({f.name for pattern in VAE_FILES for f in p.glob(pattern) if f.is_file()})
    return hashlib.sha256("".join(f"{n} {sha256_file(p / n)}\n" for n in names).encode()).hexdigest()
