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


def first_visible_gpu(asked: torch.device | None, engines: str) -> None:
    """Refuse a GPU other than the first visible one for ``engines`` that run there whatever was
    asked (TensorRT's plans, ONNX Runtime's CUDA provider: ``--device cuda:1`` ran them on GPU 0 in
    silence), with the ``CUDA_VISIBLE_DEVICES`` that chooses it (cuda:N counts the visible ones)."""
    if asked is not None and asked.type == "cuda" and asked.index not in (None, 0):
        import os
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        gpu = visible[asked.index] if asked.index < len(visible) else asked.index     # (the GPU cuda:N names now)
        raise FlowARError(f"--device cuda (the first visible GPU, where {engines} run)", str(asked),
                          f"choose that GPU with CUDA_VISIBLE_DEVICES={gpu} and pass --device cuda")
