"""bf16 where it pays and float32 where it matters: every GEMM and convolution of a module in
bfloat16 (weights stored once in bf16, the operands rounded to bf16 at each GEMM's input and its
result at the output), everything else in float32 (norms, softmax, residual adds, modulation).

This is the ``torch-bf16`` engine of ``--precision auto|bf16`` and ``flowar-run --ckpt
--precision bf16``. Keeping the elementwise work and reductions in float32 around the bf16 GEMMs
is what makes bf16 accurate enough: on FlowAR-S's head, 16x closer to float32 than weights and
activations in bf16 everywhere, at nearly the same speed (bench/RESULTS.md).

The VAE's decoder is the exception (:func:`bf16_throughout`): its float32 GroupNorm, SiLU and casts
between the convolutions work on full-resolution activations (128 channels at 256x256 for a 256 px
image) and cost as much as a third of its time, while its images move little in bf16: on the
KL-16 stand-in 0.35-0.41 s against 0.52 s per image, 48.4 dB from float32 against 49.8 dB.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from flowar.errors import FlowARError


class _Bf16Linear(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.register_buffer("weight", lin.weight.detach().to(torch.bfloat16))
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().to(torch.bfloat16))

    def forward(self, x):
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).float()


class _Bf16Conv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.register_buffer("weight", conv.weight.detach().to(torch.bfloat16))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().to(torch.bfloat16))
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise FlowARError("convolutions with zero padding for bf16", conv.padding_mode, "use --precision fp32")

    def forward(self, x):
        return F.conv2d(x.to(torch.bfloat16), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups).float()


def bf16_gemms(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose Linear and Conv2d layers compute in bf16 (float32 in and out);
    the caller's module is unchanged. Its other tensors (norms, embeddings, buffers) are shared,
    not copied: the copy costs the bf16 weights only."""
    shared = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    out = copy.deepcopy(module, memo=shared)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, _Bf16Linear(child))
            elif isinstance(child, nn.Conv2d):
                setattr(parent, name, _Bf16Conv2d(child))
    return out.eval()


def bf16_throughout(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every floating-point parameter and buffer in bfloat16 (the caller's
    module is unchanged; the others are shared). For the VAE, whose ``decode`` computes in its
    weights' dtype and answers in its input's."""
    def bf16(t):
        t16 = t.detach().to(torch.bfloat16)
        return nn.Parameter(t16, requires_grad=False) if isinstance(t, nn.Parameter) else t16
    memo = {id(t): (bf16(t) if t.is_floating_point() else t) for t in [*module.parameters(), *module.buffers()]}
    return copy.deepcopy(module, memo=memo).eval()


def bf16_engine(module: nn.Module, stage: str) -> nn.Module:
    """The bf16 flavour of a stage's module: the decoder in bf16 throughout, every other stage with
    its GEMMs in bf16 and float32 around them."""
    return bf16_throughout(module) if stage == "decode" else bf16_gemms(module)
