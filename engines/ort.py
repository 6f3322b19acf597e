"""ONNX Runtime sessions, the embedded default backend.

Options chosen for this workload: all graph optimizations, intra-op threads = the cores this
process may use, sequential execution (the graphs are chains of small GEMMs), memory-pattern
planning on (each scale has fixed shapes), and the optimized graph cached in the engine
directory under a name keyed by the graph's hash and the ONNX Runtime version, so a cache is
only used for the graph and library it was made from. On a CPU, :func:`plan_call` decides per
call how many threads run it and whether its rows are split into blocks run at once.

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


def velocity_work_limits(config, shard_flops: float = 2e7, single_flops: float = 2e8) -> tuple[int, int]:
    """(shard_min, single_max) in rows x tokens for the head's velocity call; see :func:`plan_call`.

    Measured on 2 cores with the shipped tiny model: below ~20 MFLOP a call is per-op overhead
    and runs best on one thread (2x2 map, 2 rows: 0.26 ms on 1 thread, 0.34 ms on 2, 0.26 ms as
    two 1-row blocks); above it, rows split across cores win (4x4 map, 2 rows: 0.72 ms on 1
    thread, 0.77 on 2, 0.49 as two blocks; 8x8 map, 16 rows: 22.0 / 14.0-20.2 / 11.1 ms). A
    single row takes all threads only above ~0.2 GFLOP.
    """
    W, Hm = config.head_width, config.head_mlp_hidden
    per_token = 2 * config.head_depth * (10 * W * W + 3 * W * Hm)
    return int(shard_flops // per_token), int(single_flops // per_token)


def split_limits(stage: str, config) -> tuple[int, int]:
    """(shard_min, single_max) for a stage's calls: the velocity's measured limits; the other
    stages (once per scale) split whenever they have two rows or more."""
    return velocity_work_limits(config) if stage == "velocity" else (0, 0)


def plan_call(rows: int, tokens: int, threads: int, shard_min: int = 0, single_max: int = 0
              ) -> tuple[tuple[int, int, int], ...]:
    """How one CPU call of ``rows`` x ``tokens`` runs on ``threads`` cores: (first row, end row,
    threads) per block, blocks run at once.

    * work (rows x tokens) <= ``shard_min``: one block on one thread (waking threads costs
      more than it saves);
    * two rows or more: contiguous row blocks, one per core (at most one per row), cores shared
      out among them. The graphs treat rows as independent samples, and a core running a whole
      block keeps every small GEMM and elementwise op on one thread: on small models that beats
      splitting each op across cores (ONNX Runtime's intra-op threads) by 1.3-1.9x;
    * one row: one thread up to ``single_max``, else all threads.
    """
    work = rows * tokens
    if threads <= 1 or work <= shard_min:
        return ((0, rows, 1),)
    if rows == 1:
        return ((0, 1, 1 if work <= single_max else threads),)
    n = min(threads, rows)
    out, begin = [], 0
    for i in range(n):
        end = begin + rows // n + (1 if i < rows % n else 0)
        out.append((begin, end, threads // n + (1 if i < threads % n else 0)))
        begin = end
    return tuple(out)


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
    # same cores, and row blocks of other calls run on one-thread sessions; spinning starves both.
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
    # no optimized copy of graphs with external data: a second file of their size, and ONNX Runtime
    # would have to write its weights out again
    external = Path(str(graph) + ".data").exists()
    if cache_dir is not None and provider == "CPUExecutionProvider" and not external:
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
