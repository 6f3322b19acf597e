"""ONNX Runtime sessions, the embedded default backend.

Sessions are made by :func:`create_session` (its options are chosen for this workload; the
optimized graph is cached in the engine directory). On a CPU, :func:`plan_call` decides per call
how many threads run it and whether its rows are split into blocks run at once.

The CUDA provider is taken when onnxruntime-gpu and a GPU are both present; the caller is told
which provider ran.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

from flowar.io.files import file_state


def choose_provider(prefer_gpu: bool = True, device=None) -> str:
    """ONNX Runtime's CUDA provider where onnxruntime-gpu and a GPU are both there (and ``prefer_gpu``),
    else its CPU provider. The CUDA provider runs on the first visible GPU: another ``device`` asked
    for (``--device cuda:1``) is refused, with how to choose it."""
    import onnxruntime as ort
    if prefer_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        try:
            import torch
            if torch.cuda.is_available():
                from flowar.device import first_visible_gpu
                first_visible_gpu(device, "ONNX Runtime's CUDA sessions")
                return "CUDAExecutionProvider"
        except ImportError:
            pass
    return "CPUExecutionProvider"


def cpu_threads(asked: int | None = None) -> int:
    """The cores this process may use; with ``asked``, that many, at most the machine's cores (more
    only made threads: ``--threads 100000`` started as many per ONNX Runtime session and filled the
    machine's process ids; a count above the cores this process is pinned to is taken as asked)."""
    if asked is not None:
        return max(1, min(int(asked), os.cpu_count() or int(asked)))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def split_limits(stage: str, config, shard_flops: float = 2e7, single_flops: float = 2e8) -> tuple[int, int]:
    """(shard_min, single_max) in rows x tokens for a stage's calls; see :func:`plan_call`. The
    stages other than the velocity (once per scale) split whenever they have two rows or more.

    The velocity's, measured on 2 cores with the shipped tiny model: below ~20 MFLOP a call is
    per-op overhead and runs best on one thread (2x2 map, 2 rows: 0.26 ms on 1 thread, 0.34 ms on
    2, 0.26 ms as two 1-row blocks); above it, rows split across cores win (4x4 map, 2 rows: 0.72 ms
    on 1 thread, 0.77 on 2, 0.49 as two blocks; 8x8 map, 16 rows: 22.0 / 14.0-20.2 / 11.1 ms). A
    single row takes all threads only above ~0.2 GFLOP.
    """
    if stage != "velocity":
        return 0, 0
    W, Hm = config.head_width, config.head_mlp_hidden
    per_token = 2 * config.head_depth * (10 * W * W + 3 * W * Hm)
    return int(shard_flops // per_token), int(single_flops // per_token)


def plan_call(rows: int, tokens: int, threads: int, shard_min: int = 0, single_max: int = 0
              ) -> tuple[tuple[int, int, int], ...]:
    """How one CPU call of ``rows`` x ``tokens`` runs on ``threads`` cores: (first row, end row,
    threads) per block, blocks run at once (ONNX Runtime's sessions; the measured engines follow the
    call plan instead: :func:`flowar.runtime.stages.blocks`).

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


# ONNX Runtime's optimized copy of a graph: a folder of the graph (its initializers of 1 KB and more in
# a second file, which ONNX Runtime maps instead of copying them out of the parsed graph: FlowAR-S's AR
# opened in 0.53 s instead of 1.0, the four stages holding 0.70 GB after opening instead of 1.14)
# and the record of both files' sha256 and states
GRAPH, DATA, RECORD = "graph.onnx", "graph.onnx.data", "record.json"


def create_session(graph: Path | bytes | Callable[[], bytes], sha256: str, provider: str | None = None,
                   threads: int | None = None, cache_dir: Path | None = None, source: Path | None = None):
    """An InferenceSession for ``graph``: a path, the file's bytes already read and checked, or a
    function that reads and checks them (refusing a changed file). That function is not called
    when a whole cached copy of the optimized graph is there and the graph's file (``source``) has
    the size and modification time it had when the copy was made or last checked: opening a
    directory again reads one copy of each graph, not two, and a graph changed since is still
    read, and refused, where it would have been.

    Options chosen for this workload: all graph optimizations, intra-op threads = the cores this
    process may use, sequential execution, memory-pattern planning; idle worker threads do not
    spin (between calls PyTorch runs the sampler's own ops on the same cores, and row blocks of
    other calls run on one-thread sessions: spinning starves both). The optimized graph is cached
    in ``cache_dir`` per (graph hash, ORT version, CPU flags), on the CPU provider, as a folder
    (:data:`GRAPH`): a cache is used only for the graph, library and CPU kind it was made for, and
    only while its files hash to what was recorded when it was made (:func:`_cache_whole`); a
    damaged one is rebuilt.
    """
    import shutil

    import onnxruntime as ort

    from flowar.export.manifest import sha256_file
    provider = provider or choose_provider()
    cache = None
    # no optimized copy of graphs with external data: a second file of their size, and ONNX Runtime
    # would have to write its weights out again
    external = isinstance(graph, Path) and Path(str(graph) + ".data").exists()
    # (a cache folder that is a symbolic link is not used: it would be read, and written, outside the
    # engine directory)
    writable = False
    if cache_dir is not None and provider == "CPUExecutionProvider" and not external and not cache_dir.is_symlink():
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError:                            # (a read-only directory without one)
            pass
        if cache_dir.is_dir():
            # (a read-only directory's cache is read, not written: every open optimized every graph again)
            writable = os.access(cache_dir, os.W_OK)
            # named by the graph's hash, the library and the CPU's flags as ONNX Runtime sees them (its
            # ENABLE_ALL layouts are per CPU; it ignores what ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA hide)
            from flowar.engines.cpu import cpu_kind
            flags = cpu_kind(honour_env=False)["flags"]
            cache = cache_dir / f"{sha256[:16]}.ort{ort.__version__}.{'-'.join(flags) or 'x'}.opt"
            try:
                cache = None if cache.is_symlink() or not (writable or cache.is_dir()) else cache
            except OSError:                # (a cache folder another user made owner-only: the graphs are read instead;
                cache = None               # it was "Permission denied" and no image)
    for attempt in (0, 1):
        record = _cache_whole(cache) if cache is not None else None
        cached = record is not None
        # The graph's file is read again (and refused if it changed) only where its size or modification
        # time differ from the record's (_graph_state): the copy stands for the graph's recorded hash
        # whatever the file's device, inode or change time, which a copy of the directory (cp -a, rsync,
        # an image layer) or a chmod changes, and which a user who may not write there could not record.
        if callable(graph) and not (cached and source is not None and record.get("source") == _graph_state(source)):
            graph = graph()                        # the graph read and checked (a changed one is refused here)
            if cached and source is not None and writable:      # the same graph: its file's state recorded again
                _record(cache, record["files"], source, record["state"])
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = threads or cpu_threads()
        so.inter_op_num_threads = 1
        so.enable_mem_pattern = True
        so.enable_cpu_mem_arena = True
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if cached        # already optimized
                                       else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        # ONNX Runtime writes the optimized graph while the session is made: into a folder of this
        # process and thread, renamed into place after, so another process opening the same directory
        # meanwhile finds the cache whole or absent, never half written
        part = None
        # (not where a copy is there that could not be used nor removed, another user's: it is not replaced)
        if cache is not None and not cached and writable and not os.path.lexists(cache):
            from flowar.io.files import remove_stale
            remove_stale(cache.parent, f"{cache.name}.", r"-\d+\.part")    # those of writers that died
            part = cache.with_name(f"{cache.name}.{os.getpid()}-{threading.get_ident()}.part")
            shutil.rmtree(part, ignore_errors=True)
            try:
                part.mkdir()
                so.optimized_model_filepath = str(part / GRAPH)
                so.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
                so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            except OSError:
                part = None
        try:
            session = ort.InferenceSession(str(cache / GRAPH) if cached else graph if isinstance(graph, bytes)
                                           else str(graph), so, providers=[provider])
        except Exception as e:
            if part is not None:
                shutil.rmtree(part, ignore_errors=True)
                if not attempt:                    # (writing the copy failed, a full disk, or the graph did:
                    writable = False               # tried once more without writing it)
                    continue
            if not cached or attempt:
                if type(e).__module__.startswith("onnxruntime") and type(e).__name__ in _GRAPH_REFUSED:
                    raise _not_runnable(e, source or graph, provider) from e
                raise
            if not _drop(cache):                   # a stale or damaged cache: rebuilt from the graph
                cache = None                       # (read-only: opened from the graph)
            continue
        if isinstance(graph, bytes):   # (ONNX Runtime's Python session keeps the bytes it was made from, to make itself
            session.disable_fallback()  # again on another provider: FlowAR-S's graphs, 0.84 GB for the session's life)
            session._model_bytes = None
        if part is not None:
            try:
                made = sorted(part.iterdir())
                states = {f.name: file_state(f) for f in made}           # (before hashing: what was hashed)
                if not _record(part, {f.name: sha256_file(f) for f in made}, source, states):
                    raise OSError("no record")
                for old in (cache.with_name(cache.name + ".onnx"), cache.with_name(cache.name + ".onnx.json")):
                    old.unlink(missing_ok=True)    # (the single-file copy of earlier versions)
                os.rename(part, cache)             # (refused where another process's copy came first: ours goes)
            except OSError:                        # (a cache is an optimisation: the session stands without it)
                shutil.rmtree(part, ignore_errors=True)
        return session


# ONNX Runtime's errors that are about the graph (its exception classes' names), not the machine (out
# of memory, a provider that fails to start: those keep their own message)
_GRAPH_REFUSED = {"NotImplemented", "InvalidGraph", "InvalidProtobuf", "InvalidArgument", "NoModel"}


def _not_runnable(e: Exception, graph, provider: str):
    """What a graph ONNX Runtime refused to make a session of becomes (it was its own traceback:
    NOT_IMPLEMENTED for a bf16 graph under a manifest edited to say fp32, INVALID_GRAPH for a
    damaged one): one line with ONNX Runtime's reason."""
    import re

    import onnxruntime as ort

    from flowar.errors import EngineDirError
    name = graph.name if isinstance(graph, Path) else "a stage's graph"
    why = re.sub(r"^(\[ONNXRuntimeError\] : )?\d+ : ", "", (str(e).strip().splitlines() or [type(e).__name__])[0])[:240]
    return EngineDirError(f"graphs ONNX Runtime {ort.__version__} can run on {provider}", f"{name}: {why}",
                          "export the directory again with flowar-export (a graph or manifest.json changed after "
                          "the export, or 16-bit graphs made for TensorRT: --backend trt on a GPU)")


_WHOLE: dict[str, str] = {}          # cache folder -> its files' states and sha256s, found whole in this process


def _graph_state(source: Path) -> list[int]:
    """What a copy's record holds of its graph's file: its size and modification time."""
    return file_state(source)[2:4]


def _record(folder: Path, files: dict[str, str], source: Path | list | None, states: dict) -> bool:
    """Write :data:`RECORD` into a copy's ``folder``: the sha256 of each of its ``files`` (they were
    just hashed, or found whole) with their files' ``states`` (device, inode, size, modification and
    change times, as they were when hashed: a change time cannot be set back), and the state of the
    graph's file the copy was made from (a path, or the state already recorded). A copy whose files do not hash to it is
    never used; one whose files' states are those recorded is not hashed again (the engine
    directory's own files are trusted by the same record: :meth:`Manifest.hashes_to`); one whose
    graph's file changed makes the graph be read and checked again. (A folder that cannot be
    written: nothing recorded, False.)"""
    import json
    side = folder / RECORD
    tmp = folder / f"{RECORD}.{os.getpid()}-{threading.get_ident()}.tmp"
    try:
        record = {"files": files, "source": _graph_state(source) if isinstance(source, Path) else source,
                  "state": states}
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, side)
        return True
    except OSError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _drop(cache: Path) -> bool:
    """Remove a copy found damaged (rebuilt from the graph); False where it stays (a read-only directory).
    Renamed away first, as a writer's part (removed by the next writer if this process dies), so that no
    reader takes one file of it and the other of the copy made next."""
    import shutil
    gone = cache.with_name(f"{cache.name}.{os.getpid()}-{threading.get_ident()}.part")
    try:
        os.rename(cache, gone)
    except FileNotFoundError:        # (another process removed it)
        return True
    except OSError:
        return False
    shutil.rmtree(gone, ignore_errors=True)
    return True


def _cache_whole(cache: Path) -> dict | None:
    """The record of the copy ``cache`` if it is there and its files hash to the sha256s recorded
    when it was made, else None; a copy that does not (or whose record is unreadable) is removed,
    to be rebuilt from the graph. Its files are read (one streaming read each, which leaves them in
    the page cache for ONNX Runtime) only where their states are not the ones recorded when they
    were last found whole (by this process, or by any that could write the record: its writer, an
    open in a directory its user can write): FlowAR-S's four copies, 840 MB, took 1.4 s of a fresh
    process's 3.0 s open to hash. The record returned holds the states the files were found whole in."""
    import json

    from flowar.export.manifest import sha256_file
    try:
        if not cache.is_dir():
            return None
        record = json.loads((cache / RECORD).read_text())
        files = record["files"]
        state = {n: file_state(cache / n) for n in files}
        if GRAPH not in files or not all(isinstance(h, str) for h in files.values()):
            raise ValueError(files)
    except PermissionError:          # (another user's, owner-only: the graph is read instead)
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        _drop(cache)                 # (a copy without its record, or with a file missing: made again)
        return None
    seen = json.dumps([state, files], sort_keys=True)
    if _WHOLE.get(str(cache)) == seen:
        return record | {"state": state}
    if record.get("state") == state:         # (one this user cannot read, another user's, is passed over: the graph is read)
        return record if all(os.access(cache / n, os.R_OK) for n in files) else None
    try:
        whole = all(sha256_file(cache / n) == h for n, h in files.items())
    except OSError:                  # (unreadable: the graph is read instead)
        return None
    if not whole:
        _drop(cache)
        return None
    _WHOLE[str(cache)] = seen
    if os.access(cache, os.W_OK):
        _record(cache, files, record.get("source"), state)
    return record | {"state": state}
