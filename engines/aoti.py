"""Compiled CPU engines: a stage's reference module through ``torch.export`` and AOTInductor,
built once at export and loaded at run time without compiling.

A package holds one stage for every shape the runtime will request: rows, tokens per scale and
the AR's prefix length are dynamic dimensions (one package serves every scale and batch, as the
ONNX graphs do). It is compiled with Inductor's freezing (weights folded into the graph as
constants, prepacked for the GEMM kernels) and ``force_mmap_weights`` (the weights appended to
the shared library and memory-mapped when it is loaded, not copied). The ``bf16`` flavour is the
module with every GEMM and convolution in bfloat16 and float32 around them
(:func:`flowar.runtime.bf16.bf16_engine`: the decoder in bf16 throughout; the ``torch-bf16``
engine's numerics), compiled.

Loading goes through PyTorch's C++ package loader directly, so a process that runs packages never
imports ``torch._inductor`` (about 2 s). The generated code is built for the CPU of the export:
the runtime refuses (or replaces) a package on a CPU that lacks a flag the export CPU had
(:func:`flowar.engines.cpu.missing_for`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from flowar.errors import FlowARError


def compile_stage(spec, module: torch.nn.Module, config, max_rows: int, path: Path) -> float:
    """Compile ``module`` (one stage, float32 in and out) into the package ``path``; its dynamic
    dimensions are those of the stage's spec, rows up to ``max_rows``. Returns the seconds taken."""
    from torch.export import Dim

    from flowar.export.specs import sample_inputs
    limits = {"rows": max_rows, "tokens": max(config.tokens_per_scale), "seq": config.seq_len}
    dims = {sym: Dim(sym, min=1, max=hi) for sym, hi in limits.items() if hi > 1}
    dynamic = tuple({a: dims[s] for a, s in spec.dynamic.get(n, {}).items() if s in dims} or None for n in spec.inputs)
    # an example away from 1 on every dynamic dimension (a dimension seen at 1 is specialised to it)
    k = max(0, config.n_scales - 2) if spec.per_scale else 0
    ins = sample_inputs(spec, config, k, min(max_rows, 2), torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    try:
        from torch import _inductor
        with torch.no_grad():
            program = torch.export.export(module.eval(), tuple(ins[n] for n in spec.inputs), dynamic_shapes=dynamic)
            _inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs={
                "freezing": True, "aot_inductor.force_mmap_weights": True})
    except Exception as e:   # noqa: BLE001 - a stage Inductor cannot compile here is not a candidate
        raise FlowARError(f"AOTInductor to compile the {spec.name} stage", f"{type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or ['?'])[0][:200]}",
                          "export without the compiled candidates (--auto-candidates ort-fp32,torch-fp32,torch-bf16)"
                          ) from e
    return time.perf_counter() - t0


def load_package(path: Path):
    """The compiled model of a package (``boxed_run(list of tensors) -> list of tensors``)."""
    return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
