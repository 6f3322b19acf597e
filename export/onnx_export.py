"""Export each stage to ONNX (``torch.onnx.export(dynamo=True)``, opset 18) and verify it.

Verification runs every graph in ONNX Runtime at every scale's shape, for the smallest and
largest row counts, compares with eager PyTorch, and records the worst absolute difference
beside the spec's tolerance. Failures are collected over all stages before raising.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flowar.config import FlowARConfig
from flowar.errors import FlowARError
from flowar.export.specs import StageSpec, sample_inputs
from flowar.io.memory import release_free_memory

OPSET = 18
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Graphs whose weights pass this keep them in external data beside the graph (``<stage>.onnx.data``):
# protobuf cannot hold more than 2 GB, and one file per graph is simpler below it.
EXTERNAL_DATA_BYTES = 1 << 30


class ExportError(FlowARError):
    """A stage that cannot be exported or does not match eager PyTorch."""


# Graph inputs a reduced graph takes in float32 and hands on as they are: the flow time, which the head
# truncates to its integer timestep (t * 1000) in float32, as the official flownet does. Rounded
# first, the official grid's times moved: to bf16, 6 of 24 (--steps 25) by up to 2 timesteps; to fp16,
# 24 of 50 (--steps 50) by one (FlowAR-S's fp16 velocity was 0.9 off float32 eager at random times,
# and its export refused; 1e-2 without).
FLOAT32_INPUTS = ("t",)


class Reduced(nn.Module):
    """Runs a stage's weights in fp16/bf16 with float32 graph inputs and outputs.

    The buffers that carry positions and timesteps (RoPE frequencies, the timestep table,
    the mask) stay float32 where the module computes in float32 anyway, and so do the inputs
    of :data:`FLOAT32_INPUTS` (``inputs``: the stage's input names, in order); Linear/Conv weights
    and activations take the reduced type. TensorRT 11 reads precision from these dtypes.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype, inputs: tuple[str, ...]):
        super().__init__()
        self.inner = copy.deepcopy(module).to(dtype)      # the caller's module stays float32
        self.dtype = dtype
        self.keep = tuple(n in FLOAT32_INPUTS for n in inputs)

    def forward(self, *args):
        cast = [a.to(self.dtype) if a.is_floating_point() and not k else a for a, k in zip(args, self.keep, strict=True)]
        out = self.inner(*cast)
        if isinstance(out, tuple):
            return tuple(o.float() for o in out)
        return out.float()


def _dims(spec: StageSpec, max_rows: int, config: FlowARConfig) -> tuple:
    """Dynamic dims per input, in input order (a tuple works for wrapped modules too)."""
    limits = {"rows": max(4, max_rows), "seq": config.seq_len, "tokens": max(config.tokens_per_scale)}
    dims = {n: torch.export.Dim(n, min=1, max=limits[n]) for n in limits}
    return tuple({ax: dims[d] for ax, d in spec.dynamic.get(inp, {}).items()} or None for inp in spec.inputs)


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200] if msg else ''}"


@contextlib.contextmanager
def _quiet():
    # The exporter narrates every pass on stdout/stderr; the CLI shows its own progress instead.
    log = logging.getLogger("torch")
    level = log.level                     # (put back: it stayed at ERROR for the rest of the process)
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        log.setLevel(level)


def export_stage(spec: StageSpec, module: nn.Module, config: FlowARConfig, path: Path, max_rows: int,
                 precision: str = "fp32", weights: bool = True) -> list[Path]:
    """Write ``path`` (an .onnx file, and its external data file for large weights) for one stage,
    dynamic over rows and token-map size; returns the files written.

    The weights are never copied whole: the exporter traces with fake tensors, its graph refers
    to the module's own tensors, constant folding runs on that in-memory graph (only the folded
    transposes of weight matrices are new), and the graph is written once, with the weights
    streamed into external data when they pass :data:`EXTERNAL_DATA_BYTES`. ``weights=False``
    writes the graph alone, for modules built on the meta device (checking the real sizes
    without their memory).
    """
    k = min(2, config.n_scales - 1) if spec.per_scale else 0
    rows = 3                              # distinct from every static size, so nothing specializes
    ex = sample_inputs(spec, config, k, rows, torch.Generator().manual_seed(0))
    if not weights:
        ex = {n: v.to("meta") for n, v in ex.items()}
    mod = module if precision == "fp32" else Reduced(module, PRECISIONS[precision], tuple(spec.inputs))
    try:
        with torch.no_grad(), _quiet():
            prog = torch.onnx.export(mod, tuple(ex[n] for n in spec.inputs), dynamo=True, opset_version=OPSET,
                                     input_names=list(spec.inputs), output_names=list(spec.outputs),
                                     dynamic_shapes=_dims(spec, max_rows, config) if precision == "fp32"
                                     else (_dims(spec, max_rows, config),), optimize=weights)
            if weights:
                import onnxscript
                onnxscript.optimizer.optimize(prog.model)            # a second pass, in place, on the same graph
            _drop_traces(prog.model)
            external = weights and _initializer_bytes(prog.model) > EXTERNAL_DATA_BYTES
            if external:
                _write_in_row_blocks(prog.model)
            prog.save(str(path), include_initializers=weights, external_data=external)
    except Exception as e:   # noqa: BLE001 - reported as one line; --debug shows the chain
        raise ExportError(f"stage '{spec.name}' to export to ONNX", _root_cause(e),
                          "rerun with --debug for the exporter's traceback") from e
    finally:
        prog = None
        release_free_memory()
    data = path.with_name(path.name + ".data")
    return [path] + ([data] if data.is_file() else [])


def _drop_traces(model) -> None:
    """Remove what the exporter notes on each node and value for debugging (the stack trace with this
    checkout's source paths, the module hierarchy): the same model exported from another folder gave
    other bytes, so other hashes and TensorRT plan keys (the tiny model's AR graph: 341 of 348 nodes
    named /work/..., 0.3 of its 1.7 MB)."""
    for g in [model.graph, *model.functions.values()]:
        for node in g.all_nodes():
            node.metadata_props.clear()
            for v in node.outputs:
                v.metadata_props.clear()
    for v in [*model.graph.inputs, *model.graph.initializers.values()]:
        v.metadata_props.clear()
    # and the dynamic dims' ranges (the row limit of --max-batch): a graph is the same for any limit
    model.graph.metadata_props.pop("pkg.torch.export.ExportedProgram.range_constraints", None)


_BLOCK_BYTES = 64 << 20


def _write_in_row_blocks(model) -> None:
    """Let the external data's writer take the folded weight transposes in contiguous row blocks.
    Constant folding leaves them as transposed views of the weights; numpy writes such a view one
    element at a time (a 2.2 GB AR stage: 12.8 s of its export's 40; copied to contiguous blocks and
    written, 4.5 s). A block of at most 64 MB (or one row) is copied at a time: the export's memory
    does not grow.
    The blocks are written as bytes: numpy gives no buffer of bf16 (ml_dtypes) arrays."""
    import numpy as np
    import onnx_ir as ir

    class RowBlocks(ir.Tensor):
        def tofile(self, file) -> None:
            a = self.raw
            step = max(1, _BLOCK_BYTES // max(1, a[:1].nbytes))
            for i in range(0, a.shape[0], step):
                file.write(np.ascontiguousarray(a[i:i + step]).reshape(-1).view(np.uint8).data)

    floats = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
    for v in model.graph.initializers.values():
        t = v.const_value
        raw = t.raw if type(t) is ir.Tensor else None
        if (isinstance(raw, np.ndarray) and raw.ndim and not raw.flags.c_contiguous and t.dtype in floats
                and sys.byteorder == "little"):         # (onnx_ir swaps the bytes of a big-endian host's arrays)
            v.const_value = RowBlocks(raw, dtype=t.dtype, shape=t.shape, name=t.name, doc_string=t.doc_string,
                                      metadata_props=dict(t.metadata_props))


def _initializer_bytes(model) -> int:
    return sum(int(v.const_value.nbytes) for v in model.graph.initializers.values() if v.const_value is not None)


@dataclass(slots=True)
class StageCheck:
    name: str
    worst: float
    tolerance: float
    where: str                            # the shape of the worst case
    relative: bool = False                # worst and tolerance as fractions of the output's largest magnitude

    @property
    def ok(self) -> bool:
        return self.worst <= self.tolerance

    def describe(self) -> str:
        if self.relative:
            return f"{self.worst:.2%} of its largest value (tolerance {self.tolerance:.0%})"
        return f"{self.worst:.2e} (tolerance {self.tolerance:.0e})"


def verify_stage(spec: StageSpec, module: nn.Module, config: FlowARConfig, path: Path, max_rows: int,
                 tolerance: float | None = None, relative: bool = False) -> StageCheck:
    """ONNX Runtime vs eager PyTorch at every scale, for 1 row and max_rows rows: the largest
    difference, or with ``relative`` (fp16 graphs against float32) the largest difference over the
    output's largest magnitude (or 1, where that is smaller). (An fp16 graph's rounding grows with
    its values, and the largest of more random rows is larger: an absolute bound refused the shipped
    model at --max-batch 32 and passed it at 8.)"""
    import numpy as np
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    worst, where = 0.0, ""
    scales = range(config.n_scales) if spec.per_scale else [0]
    for k in scales:
        for rows in sorted({1, max_rows}):
            ex = sample_inputs(spec, config, k, rows, gen)
            with torch.no_grad():
                ref = module(*(ex[n] for n in spec.inputs))
            ref = ref if isinstance(ref, tuple) else (ref,)
            if not all(bool(r.isfinite().all()) for r in ref):     # the weights, not the exporter
                raise FlowARError(f"finite outputs of the checkpoint's {spec.name} stage in eager PyTorch",
                                  f"NaN or Inf at scale {k} with {rows} rows (nothing was written)",
                                  "the checkpoint's weights hold NaN/Inf (a damaged file or a diverged run): "
                                  "check it, or export an earlier checkpoint")
            got = sess.run(list(spec.outputs), {n: ex[n].numpy() for n in spec.inputs})
            for name, r, g in zip(spec.outputs, ref, got):
                r = r.float().numpy()
                d = float(np.abs(r - g).max()) if r.size else 0.0
                if relative and d:              # (of at least 1: an output near zero is judged absolutely)
                    d /= max(float(np.abs(r).max()), 1.0)
                if not np.isfinite(d):
                    d = float("inf")
                if d > worst or not where:
                    at = f"scale {k} ({config.scales[k]}x{config.scales[k]})" if spec.per_scale else "the largest latent"
                    worst, where = d, f"{name} at {at}, {rows} rows"
    return StageCheck(spec.name, worst, spec.tolerance if tolerance is None else tolerance, where, relative)
