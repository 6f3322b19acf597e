"""The official sampler's own mixed precision, as a yardstick for reduced-precision engines.

The official evaluation samples under fp16 autocast (on its GPUs). How far that moves the
tokens and images of a checkpoint from float32 is the deviation its users already accept; the
deviation of a faster engine is reported beside it (``flowar-export --precision auto|bf16``).

On a CPU, fp16 GEMMs run in software (FlowAR-S's largest 4.5x slower than in float32, its
decoder's convolutions 8x), so this runs autocast's fp16 program with each fp16 GEMM and
convolution computed in float32 from the same fp16 operands and rounded back to fp16 once: the
numbers of an fp16 GEMM that accumulates in float32 (what tensor cores do), at float32 speed.
Every other op runs as autocast has it: in fp16 where its inputs are fp16, in float32 where
autocast keeps it there; attention too (PyTorch's fp16 kernel, a small share of the time, kept:
attention computed in float32 would skip the fp16 roundings an fp16 attention makes inside it).
FlowAR-S's yardstick, two samples: 29-34 s, against 117-131 s with the GEMMs in fp16 and 32-38 s
in float32 (AMD EPYC Zen 4; bench/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flowar.sampling.sampler import Hooked

aten = torch.ops.aten
# fp16 ops autocast sends to the GEMM kernels, as a dispatch mode sees them: PyTorch 2.13 hands it linear and
# conv2d whole (before they were listed, every GEMM ran as an fp16 kernel), other versions their decompositions
_GEMMS = {aten.linear.default, aten.conv2d.default,
          aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.convolution.default}


class _Fp16GemmsInFloat32(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GEMMS and any(isinstance(a, torch.Tensor) and a.dtype == torch.float16 for a in args):
            up = lambda a: a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float16 else a  # noqa: E731
            out = func(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
            return out.half()
        return func(*args, **kwargs)


class OfficialFp16(Hooked):
    """Sampler stages whose every call runs in the official mixed precision (fp16 autocast),
    with float32 in and out, wrapping any eager stages (``flowar.sampling.eager.EagerStages``)."""

    def __init__(self, stages):
        super().__init__(stages, _in_fp16)


def _in_fp16(kind: str, fn, *args) -> Any:
    if kind == "start":
        return fn(*args)
    with torch.autocast("cpu", dtype=torch.float16), _Fp16GemmsInFloat32():
        out = fn(*args)
    return _float(out)


def _float(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if hasattr(out, "__dataclass_fields__"):         # the head's per-scale context: keep fp16 inside, as autocast does
        return out
    if isinstance(out, (list, tuple)):
        return type(out)(_float(o) for o in out)
    return out
