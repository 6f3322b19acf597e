"""What one training step holds per image, so that a ``--batch`` that cannot fit is one line before
any work: ``flowar-train-vae --batch 100000`` grew until the system killed it (exit 137, no word).

Measured peak resident memory of a 2-step run (Intel Xeon, 2026-12-06, PyTorch 2.13 on the CPU):
flowar-train-vae 1.19 GB at --batch 128 and 2.80 GB at 512 (--size 32: 4.2 MB an image), 3.20 GB
at 128 with --size 64 (about 20 MB an image: the image's area, a little more); flowar-train of the
tiny default model on 8x8 latents 1.40 GB at 128 and 6.79 GB at 1024 (6.0 MB an image). Other
models are scaled by their tokens times their blocks' widths (the activations a step keeps for its
backward pass). A batch is refused only where a quarter less than its estimate would not fit (one
near the limit is left to run); the batch suggested instead fills 80 % of what is available.
"""

from __future__ import annotations

from flowar.config import FlowARConfig
from flowar.errors import FlowARError
from flowar.sampling.batches import FILLS, KEPT_LOW, block_units

VAE_IMAGE_BYTES = 4.2e6              # flowar-train-vae, an image of side 32
FLOWAR_UNIT_BYTES = 6.0e6 / 159290   # flowar-train, per unit of :func:`block_units` (the tiny default's: 159290)


def require_batch_memory(batch: int, per_image: float, command: str, resume: bool = False) -> None:
    """Refuse a ``--batch`` whose step would not fit in the memory available now, naming the batch that
    would (the global batch: torchrun's ranks on one machine share its memory; a resumed run keeps its
    batch, so it is told to start afresh)."""
    from flowar.io.memory import available_bytes
    free, need = available_bytes(), batch * per_image
    if free is not None and need * KEPT_LOW > free:
        raise FlowARError(f"a --batch whose {command} step fits in memory (about {per_image / 2**20:.1f} MB an image)",
                          f"--batch {batch}: about {need / 2**30:.1f} GB, with {free / 2**30:.1f} GB available",
                          ("start afresh in another --out (a resumed run keeps its --batch) with " if resume else "pass ")
                          + f"--batch {max(1, int(FILLS * free // per_image))} or less")


def vae_image_bytes(size: int) -> float:
    return VAE_IMAGE_BYTES * (size / 32) ** 2


def flowar_image_bytes(config: FlowARConfig) -> float:
    return FLOWAR_UNIT_BYTES * block_units(config)
