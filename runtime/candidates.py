"""The engines a stage can run on, by candidate name (what ``flowar-export --precision auto|bf16``
chooses among and records, and what the runtime opens):

* ``ort-fp32``: the exported ONNX graph on ONNX Runtime;
* ``torch-fp32``: the reference module in eager PyTorch;
* ``torch-bf16`` (:mod:`flowar.runtime.bf16`): the reference module with every GEMM and
  convolution in bfloat16 (weights stored once in bf16, activations rounded to bf16 at each
  GEMM's input and output) and everything else in float32: norms, softmax, residual adds,
  modulation, which is what makes bf16 accurate enough. Fast only where the CPU computes bf16
  (AVX512-BF16, AMX), emulated elsewhere.

The export-time search that measures and chooses among them is in
:mod:`flowar.commands.precision`.
"""

from __future__ import annotations

from flowar.errors import FlowARError
from flowar.runtime.bf16 import bf16_gemms

CANDIDATES = ("ort-fp32", "torch-fp32", "torch-bf16")
REDUCED = ("torch-bf16",)


def stage_engine(stage: str, candidate: str, module, spec, graph=None, sha256: str = "", threads: int | None = None,
                 limits: tuple[int, int] = (0, 0), cache_dir=None, provider: str = "CPUExecutionProvider"):
    """The (not yet entered) engine a candidate names for one stage."""
    from flowar.runtime.engines import OrtEngine, TorchEngine
    if candidate == "ort-fp32":
        return OrtEngine(stage, graph, sha256, spec.row_tensors, provider, cache_dir, threads, *limits)
    if candidate == "torch-fp32":
        return TorchEngine(stage, module, spec.inputs, spec.outputs)
    if candidate == "torch-bf16":
        return TorchEngine(stage, bf16_gemms(module), spec.inputs, spec.outputs)
    raise FlowARError(f"engine candidates among {', '.join(CANDIDATES)}", repr(candidate), "e.g. ort-fp32,torch-bf16")


def stage_engines(choice: dict[str, str], config, model, vae, specs: dict, graphs: dict,
                  threads: int | None = None, cache_dir=None, provider: str = "CPUExecutionProvider") -> dict:
    """Engines for every stage (not entered): ``choice`` where it names one, ONNX Runtime fp32
    (on ``provider``) otherwise. ``graphs``: stage -> (ONNX path, sha256)."""
    from flowar.engines.ort import split_limits
    out = {}
    for stage, spec in specs.items():
        cand = choice.get(stage, "ort-fp32")
        module = spec.module(model, vae) if cand.startswith("torch") else None
        out[stage] = stage_engine(stage, cand, module, spec, *graphs[stage], threads,
                                  split_limits(stage, config), cache_dir, provider)
    return out


def needs_weights(choice: dict[str, str]) -> set[str]:
    """Which modules the PyTorch stages of a choice need: "model" and/or "vae"."""
    torch_stages = {s for s, c in choice.items() if c.startswith("torch")}
    return ({"model"} if torch_stages - {"decode"} else set()) | ({"vae"} if "decode" in torch_stages else set())
