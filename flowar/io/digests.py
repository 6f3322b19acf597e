"""Content digests: of a file, of a VAE (its weights and config), and ones that do not depend on where
files lie (a dataset's parts, a VAE folder's files)."""

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


def vae_digest(vae: str | Path) -> str:
    """sha256 over the VAE's files (names relative to it, and bytes), not where it lies."""
    path = Path(vae)
    if not path.exists():
        from flowar.errors import FlowARError
        raise FlowARError("a VAE: MAR's kl16.ckpt or a diffusers folder with config.json", f"nothing at {path}",
                          "check the --vae path")
    h, add = hasher()
    for f in sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]:
        add(f.relative_to(path).as_posix().encode() if path.is_dir() else b"", f.read_bytes())
    return h.hexdigest()


VAE_FILES = ("config.json", "*.safetensors", "*.bin")   # what a VAE folder's sha256 covers (not a README)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def vae_sha256(path: str | Path) -> str:
    """The sha256 of a VAE: of its file (MAR's kl16.ckpt), or for a diffusers folder one hash over
    the names and hashes of its config and weights files (:data:`VAE_FILES`)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    names = sorted({f.name for pattern in VAE_FILES for f in p.glob(pattern) if f.is_file()})
    return hashlib.sha256("".join(f"{n} {sha256_file(p / n)}\n" for n in names).encode()).hexdigest()
