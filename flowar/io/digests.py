"""Content digests that do not depend on where files lie: of a dataset's parts and of a VAE."""

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
