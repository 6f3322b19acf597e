"""TensorRT plans, built with ``tensorrt`` or, where only it is installed, TensorRT-RTX
(``tensorrt_rtx_bindings``, whose builder API matches TensorRT's).

* One optimization profile per scale: each dynamic input gets min/opt/max shapes that differ
  only in rows (1 .. max rows), so every scale has its own tuned kernels.
* Strongly typed networks: precision comes from the graph's dtypes (TensorRT 11 semantics),
  never from builder flags.
* A timing cache file shared by all stages of a directory.
* Plans are named by a key over (graph hash, precision, profiles, builder flavour and version,
  compute capability); the manifest records the same fields and the runtime refuses a plan
  whose key does not match its environment.

TensorRT-RTX builds without a GPU when it is given a target compute capability; full
TensorRT needs the GPU it builds for.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from flowar.config import FlowARConfig
from flowar.errors import FlowARError
from flowar.export.specs import StageSpec


@dataclass(frozen=True, slots=True)
class Builder:
    trt: object          # the imported module
    flavour: str         # "tensorrt" | "tensorrt-rtx"
    version: str


def load_builder() -> Builder:
    try:
        import tensorrt as trt           # noqa: F401
        return Builder(trt, "tensorrt", trt.__version__)
    except ImportError:
        pass
    try:
        import tensorrt_rtx_bindings as trt
        return Builder(trt, "tensorrt-rtx", trt.__version__)
    except ImportError as e:
        raise FlowARError("TensorRT or TensorRT-RTX for --backend trt", "neither is installed",
                          "pip install '.[trt]' (TensorRT-RTX) or NVIDIA's tensorrt, or use --backend ort") from e


def _logger(trt):
    """Errors to stderr, except the CUDA-driver complaint TensorRT-RTX makes on a machine without a GPU."""
    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if "cudaError 35" in msg or "CUDA driver version is insufficient" in msg:
                return                      # expected when building ahead of time without a GPU
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                print(f"TensorRT: {msg}", file=sys.stderr)
    return Logger()


def gpu_compute_capability() -> str | None:
    try:
        import torch
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"sm{major}{minor}"
    except ImportError:
        pass
    return None


def profiles(spec: StageSpec, config: FlowARConfig, max_rows: int) -> list[dict[str, list[list[int]]]]:
    """Per scale: input -> [min, opt, max] shapes over rows 1..max_rows."""
    out = []
    for k in (range(config.n_scales) if spec.per_scale else [0]):
        lo, hi = spec.input_shapes(k, 1), spec.input_shapes(k, max_rows)
        opt = spec.input_shapes(k, max(1, max_rows // 2))
        out.append({n: [list(lo[n]), list(opt[n]), list(hi[n])] for n in spec.inputs})
    return out


def plan_key(graph_sha: str, precision: str, profs: list, b: Builder, cc: str) -> str:
    blob = json.dumps([graph_sha, precision, profs, b.flavour, b.version, cc], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_plan(b: Builder, graph: Path, graph_sha: str, spec: StageSpec, config: FlowARConfig, max_rows: int,
               precision: str, out_dir: Path, timing_cache: Path, compute_capability: str | None = None) -> dict:
    """Build one stage's plan into ``out_dir``; returns its manifest record."""
    trt = b.trt
    cc = compute_capability or gpu_compute_capability() or "sm80"
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flag)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errs = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise FlowARError(f"the TensorRT parser to accept {graph.name}", errs[:300], "report this graph with --debug")
    cfg = builder.create_builder_config()
    profs = profiles(spec, config, max_rows)
    for p in profs:
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.items():
            prof.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        cfg.add_optimization_profile(prof)
    timed = b.flavour == "tensorrt"          # TensorRT-RTX tunes at run time: its timing cache is a no-op
    if timed:
        cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cfg.set_timing_cache(cfg.create_timing_cache(cache_bytes), ignore_mismatch=False)
    if b.flavour == "tensorrt-rtx" and gpu_compute_capability() is None:
        # No GPU here: build ahead of time for the named target.
        cfg.num_compute_capabilities = 1
        cfg.set_compute_capability(getattr(trt.ComputeCapability, cc.upper()), 0)
    serialized = builder.build_serialized_network(network, cfg)
    if serialized is None:
        raise FlowARError(f"TensorRT to build a plan for {graph.name}", "the builder returned nothing",
                          "rerun with --debug; check the log above for the failing layer")
    key = plan_key(graph_sha, precision, profs, b, cc)
    plan = out_dir / f"{spec.name}.{key[:16]}.plan"
    plan.write_bytes(bytes(serialized))
    if timed:
        timing_cache.write_bytes(bytes(cfg.get_timing_cache().serialize()))
    from flowar.export.manifest import sha256_file
    return {"file": plan.name, "sha256": sha256_file(plan), "key": key, "profiles": profs,
            "compute_capability": cc}
