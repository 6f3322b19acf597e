"""Which torch device a command computes on: the one place ``--device auto|cpu|cuda[:N]`` is read."""

from __future__ import annotations

import torch

from flowar.errors import FlowARError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): the GPU when PyTorch sees one, else the CPU. A named CUDA device that is
    not there is refused instead of failing later inside a stage."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):    # (meta opened and failed in the first call; mps, xpu: not ours)
        raise FlowARError("--device auto, cpu or cuda[:N]", repr(str(name)), "use --device auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FlowARError("a CUDA device for --device cuda", "no CUDA device visible to PyTorch",
                          "use --device cpu (or auto)")
    return dev
