"""ONNX Runtime sessions, the embedded default backend.

Options chosen for this workload: all graph optimizations, intra-op threads = the cores this
process may use, sequential execution (the graphs are chains of small GEMMs), memory-pattern
planning on (each scale has fixed shapes), and the optimized graph cached in the engine
directory under a name keyed by the graph's hash and the ONNX Runtime version, so a cache is
only used for the graph and library it was made from.

The CUDA provider is taken when onnxruntime-gpu and a GPU are both present; the caller is told
which provider ran.
"""

from __future__ import annotations

import os
from pathlib import Path


def available_providers() -> list[str]:
    import onnxruntime as ort
    return list(ort.get_available_providers())


def choose_provider(prefer_gpu: bool = True) -> str:
    provs = available_providers()
    if prefer_gpu and "CUDAExecutionProvider" in provs:
        try:
            import torch
            if torch.cuda.is_available():
                return "CUDAExecutionProvider"
        except ImportError:
            pass
    return "CPUExecutionProvider"


def cpu_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def single_thread_work(config, flops_limit: float = 2e8) -> int:
    """Largest rows x tokens of a velocity call that runs faster on one thread than on all.

    Below ~0.2 GFLOP a call is dominated by per-op overhead, and waking threads only adds to it
    (the shipped tiny model's velocity at batch 1: 2x faster on 1 thread than on 2).
    """
    W, Hm = config.head_width, config.head_mlp_hidden
    per_token = 2 * config.head_depth * (10 * W * W + 3 * W * Hm)
    return int(flops_limit // per_token)


def session_options(threads: int | None = None, optimized_cache: Path | None = None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or cpu_threads()
    so.inter_op_num_threads = 1
    so.enable_mem_pattern = True
    so.enable_cpu_mem_arena = True
    # Idle worker threads must not spin: between calls PyTorch runs the sampler's own ops on the
    # same cores (and a second, single-threaded session may run); spinning workers starve both.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_cache is not None and optimized_cache.is_file():
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # already optimized
    else:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized_cache is not None:
            so.optimized_model_filepath = str(optimized_cache)
    return so


def create_session(graph: Path, sha256: str, provider: str | None = None, threads: int | None = None,
                   cache_dir: Path | None = None):
    """An InferenceSession for ``graph``; the optimized graph is cached per (hash, ORT version, provider)."""
    import onnxruntime as ort
    provider = provider or choose_provider()
    cache = None
    if cache_dir is not None and provider == "CPUExecutionProvider":
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            if os.access(cache_dir, os.W_OK):
                cache = cache_dir / f"{graph.stem}.{sha256[:16]}.ort{ort.__version__}.opt.onnx"
        except OSError:
            cache = None
    try:
        sess = ort.InferenceSession(str(cache if cache and cache.is_file() else graph),
                                    session_options(threads, cache), providers=[provider])
    except Exception:
        if cache is not None and cache.is_file():
            cache.unlink(missing_ok=True)          # a stale or damaged cache: rebuild it from the graph
            sess = ort.InferenceSession(str(graph), session_options(threads, cache), providers=[provider])
        else:
            raise
    return sess
