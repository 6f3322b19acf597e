"""The engines a stage can run on, by candidate name (what ``flowar-export --precision auto|bf16``
chooses among and records, and what the runtime opens):

* ``ort-fp32``: the exported ONNX graph on ONNX Runtime;
* ``torch-fp32``: the reference module in eager PyTorch;
* ``torch-bf16`` (:mod:`flowar.runtime.bf16`): the reference module with every GEMM and
  convolution in bfloat16 and everything else in float32 (norms, softmax, residual adds,
  modulation), which is what makes bf16 accurate enough; the VAE's decoder in bf16 throughout.
  Fast only where the CPU computes bf16 (AVX512-BF16, AMX), emulated elsewhere;
* ``aoti-fp32`` / ``aoti-bf16`` (:mod:`flowar.engines.aoti`): the same two modules compiled ahead
  of time by AOTInductor (fused, weights prepacked), loaded without compiling.

An engine directory stores each chosen engine in the form it runs: the compiled packages, and for
the eager PyTorch engines their weights in the precision they run (``<group>.<candidate>.safetensors``,
memory-mapped when opened: ``ar`` for the AR stage, ``head`` shared by the head's two stages,
``vae`` for the decoder), so that opening converts nothing. The export-time search that measures
and chooses among them is in :mod:`flowar.commands.precision`.
"""

from __future__ import annotations

import torch
from torch import nn

from flowar.errors import EngineDirError
from flowar.export.manifest import CANDIDATE_OPENS
from flowar.runtime.bf16 import bf16_engine

CANDIDATES = tuple(CANDIDATE_OPENS)                 # (named with the manifest's format: reading one imports no PyTorch)
REDUCED = ("torch-bf16", "aoti-bf16")
COMPILED = tuple(c for c, opens in CANDIDATE_OPENS.items() if opens == "file")
GROUPS = {"ar": "ar", "head_prep": "head", "velocity": "head", "decode": "vae"}   # whose weights a stage reads
# Wrappers that hold more than their stage reads: the AR's holds the whole model (not its head), the
# decoder's the whole VAE (not its encoder).
_EXCLUDES = {"ar": ("model.flownet.",), "decode": ("vae.autoencoder.encoder.", "vae.autoencoder.quant_conv.")}


def default_candidates(mode: str, fast_bf16: bool) -> tuple[str, ...]:
    """What ``auto`` (or ``bf16``) measures on this CPU: bf16 engines only where the CPU computes
    bf16 in hardware (emulated bf16 is slower than float32 there), one compiled flavour."""
    if mode == "bf16":
        return ("torch-bf16", "aoti-bf16")
    return ("ort-fp32", "torch-fp32") + (("torch-bf16", "aoti-bf16") if fast_bf16 else ("aoti-fp32",))


def stage_module(candidate: str, spec, model, vae) -> nn.Module:
    """The module a PyTorch or compiled candidate runs for a stage: the stage's wrapper of the
    reference modules, in bf16 for the bf16 flavours (:func:`flowar.runtime.bf16.bf16_engine`)."""
    module = spec.module(model, vae)
    return bf16_engine(module, spec.name) if candidate.endswith("bf16") else module


def stage_tensors(stage: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a stage's module reads (parameters and buffers, the non-persistent ones too),
    by name: what its weights file holds."""
    named = dict(module.named_parameters()) | dict(module.named_buffers())
    return {n: t for n, t in named.items() if not n.startswith(_EXCLUDES.get(stage, ()))}


def assign_tensors(stage: str, module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """``module`` (built without its weights) given ``tensors`` themselves, no copy; every tensor
    the stage reads must be there."""
    want = set(stage_tensors(stage, module))
    if set(tensors) != want:
        missing, extra = sorted(want - set(tensors))[:3], sorted(set(tensors) - want)[:3]
        raise EngineDirError(f"the tensors the {stage} stage reads", f"missing {missing}, unexpected {extra}",
                             "re-export the directory with flowar-export")
    for name, t in tensors.items():
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner)
        if leaf in sub._parameters:
            sub._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        else:
            sub._buffers[leaf] = t
    return module.eval()
