"""One small engine interface and its adapters.

An engine is a context manager: entering activates it (sessions, execution contexts), ``infer``
runs it on preallocated input tensors and writes into preallocated output tensors (no
allocation of its own), leaving releases it.

* :class:`TorchEngine` runs a stage's wrapper module eagerly: the reference, behind the same
  interface.
* :class:`AotiEngine` runs a stage compiled ahead of time by AOTInductor (:mod:`flowar.engines.aoti`).
* :class:`OrtEngine` binds tensors to ONNX Runtime by pointer (I/O binding), on CPU or CUDA; on a
  CPU it splits calls with several rows into blocks run at once, one per core.
* :class:`TrtEngine` sets tensor addresses on a TensorRT execution context (one per profile,
  i.e. per scale) and enqueues on the current CUDA stream, so it can be captured in a graph.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor


class Engine(Protocol):
    name: str

    def __enter__(self) -> "Engine": ...

    def __exit__(self, *exc) -> None: ...

    def infer(self, inputs: dict[str, Tensor], outputs: dict[str, Tensor], profile: int = 0) -> None: ...


class TorchEngine:
    warm = True           # each new shape's first call creates oneDNN primitives and reorders weights: done at open
    CALLS_AT_ONCE = 2     # a module's forward keeps no state: calls from several threads may overlap

    def __init__(self, name: str, module: torch.nn.Module, input_names: tuple[str, ...], output_names: tuple[str, ...]):
        self.name, self.module = name, module
        self.input_names, self.output_names = input_names, output_names

    def __enter__(self) -> "TorchEngine":
        self.module.eval()
        return self

    def __exit__(self, *exc) -> None:
        pass

    @torch.no_grad()
    def infer(self, inputs: dict[str, Tensor], outputs: dict[str, Tensor], profile: int = 0) -> None:
        res = self.module(*(inputs[n] for n in self.input_names))
        res = res if isinstance(res, tuple) else (res,)
        for n, r in zip(self.output_names, res):
            outputs[n].copy_(r)


class AotiEngine:
    """A stage compiled by AOTInductor (every scale and row count: its dimensions are dynamic).
    The compiled code allocates its outputs; they are copied into the runtime's static buffers.
    Up to ``CALLS_AT_ONCE`` calls may run at once, from different threads (a served replica's lanes,
    :meth:`flowar.runtime.runtime.Runtime.lane`); the GIL is released while one computes."""

    CALLS_AT_ONCE = 2

    def __init__(self, name: str, package: Path, input_names: tuple[str, ...], output_names: tuple[str, ...]):
        self.name, self.package = name, package
        self.input_names, self.output_names = input_names, output_names
        self.model = None

    def __enter__(self) -> "AotiEngine":
        from flowar.engines.aoti import load_package
        self.model = load_package(self.package, self.CALLS_AT_ONCE)
        return self

    def __exit__(self, *exc) -> None:
        self.model = None

    def infer(self, inputs: dict[str, Tensor], outputs: dict[str, Tensor], profile: int = 0) -> None:
        for n, r in zip(self.output_names, self.model([inputs[n] for n in self.input_names])):
            outputs[n].copy_(r)


_NP = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.bfloat16: "bfloat16"}

# A call of one sample (two rows with guidance) of a graph larger than this runs whole, on its
# session's threads: row blocks need a second session, a second copy of the weights, which cost
# FlowAR-S (AR 521 MB, velocity 166 MB) 0.6-0.75 s to open and 0.73 GB at a one-image command's
# peak (1.69 against 2.41 GB) and gained 0.02 s of a 7.8 s image (AR 0.88 against 0.93 s, the head
# 5.88 against 5.84; interleaved in one process; Intel Xeon, 2 cores), while the tiny default
# model's graphs (under 4 MB) open in milliseconds and sample 1.45x faster as blocks. Batches
# split as before (FlowAR-S at batch 4: 6 % faster).
ALONE_BYTES = 32 << 20


class OrtEngine:
    """ONNX Runtime behind the engine interface.

    On a CPU each call follows :func:`flowar.engines.ort.plan_call`: small calls run on one
    thread, calls with several rows are split into row blocks that run at the same time, one per
    core, on a session of the matching thread count (ONNX Runtime sessions may run concurrently;
    see below for how weights are shared). A tensor takes part in the split
    when its stage spec lists it in ``row_tensors`` (every stage's rows are independent
    samples); a stage with an output that has no rows dimension is never split. Blocks of one
    thread share one session; blocks of several threads (machines with more cores than rows)
    each hold a session of their own, i.e. a copy of the stage's weights per block.
    ``shard_min``/``single_max``: rows x tokens limits, see :func:`plan_call`.
    """

    # A new batch size's first calls set up little beyond its row blocks' sessions, which a warm-up
    # opens without computing (FlowAR-S: a first batch of 2 0.3 s slower than the next, of 14 s); unless
    # the export measured otherwise, a warm-up does not compute them: a FlowAR-S replica that ran every
    # shape of its eight sizes took 101 s to start
    warm = False

    def __init__(self, name: str, graph: Path, sha256: str, row_tensors: frozenset[str], provider: str | None = None,
                 cache_dir: Path | None = None, threads: int | None = None, shard_min: int = 0, single_max: int = 0,
                 source: Path | None = None, expect: tuple = ()):
        self.name, self.graph, self.sha256, self.row_tensors, self.source = name, graph, sha256, row_tensors, source
        self.provider, self.cache_dir, self.threads = provider, cache_dir, threads
        self.shard_min, self.single_max = shard_min, single_max
        self.expect = expect                  # first inputs' shapes whose sessions entering starts opening
        self._sessions: dict[tuple, object] = {}
        self._pool = None                     # threads for row blocks after the first (which runs on the caller),
                                              # and that open the sessions of row blocks

    def __enter__(self) -> "OrtEngine":
        from flowar.engines.ort import choose_provider, cpu_threads, create_session
        self.provider = self.provider or choose_provider()
        self.cpu = self.provider == "CPUExecutionProvider"
        self.n_threads = (self.threads or cpu_threads()) if self.cpu else 1
        key = (self.n_threads if self.cpu else None, 0)
        self.session = self._sessions[key] = create_session(self.graph, self.sha256, self.provider, key[0],
                                                            self.cache_dir, self.source)
        outs = [o.name for o in self.session.get_outputs()]
        # Row blocks of several rows need a second (one-thread) session, i.e. a second copy of the
        # weights: not for graphs whose weights live in external data (> 1 GB), where every call
        # is large enough for ONNX Runtime's own threads anyway.
        external = isinstance(self.graph, Path) and Path(str(self.graph) + ".data").exists()
        self.splittable = (self.cpu and self.n_threads > 1 and not external
                           and all(o in self.row_tensors for o in outs))
        src = self.source or (self.graph if isinstance(self.graph, Path) else None)
        size = src.stat().st_size if src is not None else len(self.graph) if isinstance(self.graph, bytes) else 0
        self.whole_rows = 2 if size > ALONE_BYTES else 0     # calls of at most this many rows run whole
        if self.splittable:     # (at most one block per core: cores - 1 threads serve them all, and open sessions)
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(max(1, self.n_threads - 1), thread_name_prefix=f"flowar-{self.name}")
            for shape in self.expect:        # (while the caller opens the next engines: FlowAR-S opened 0.38 s sooner)
                self.open_sessions(shape)
        self._runs: dict[tuple, list] = {}
        self.settle()
        return self

    def settle(self) -> None:
        """Drop the graph's bytes once no session is opening (called where a wave of sessions has been
        opened: entering, a warm-up, a call that opened its own): where ONNX Runtime's optimized copy is
        not used (a read-only directory, or the first open) the graph is read to open a session and was
        then held beside it for the runtime's life (FlowAR-S's AR: 0.5 GB); a later session reads (and
        checks) it again."""
        from concurrent.futures import Future
        clear = getattr(self.graph, "cache_clear", None)
        if clear is not None and not any(isinstance(s, Future) and not s.done() for s in list(self._sessions.values())):
            clear()

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        self._pool = None
        self._sessions, self._runs = {}, {}
        self.session = None

    def _blocks(self, shape) -> list[tuple[int, int, tuple | None]]:
        """The row blocks (first row, end row, the key of their session: (threads, block), or None: the
        whole call on the main session) of a call whose first input has ``shape``
        (:func:`flowar.engines.ort.plan_call`; one sample of a large graph: whole, see
        :data:`ALONE_BYTES`). One-thread blocks share a session (each run computes on its
        caller's thread); blocks with several threads each get their own, since concurrent runs of
        one session share its thread pool."""
        from flowar.engines.ort import plan_call
        rows = shape[0] if len(shape) else 1
        if not self.splittable or rows <= self.whole_rows:
            return [(0, rows, None)]
        return [(b, e, (threads, i if threads > 1 else 0)) for i, (b, e, threads) in enumerate(
            plan_call(rows, shape[1] if len(shape) >= 2 else 1, self.n_threads, self.shard_min, self.single_max))]

    def open_sessions(self, shape) -> list:
        """Start opening, on the engine's threads, the sessions the row blocks of a call whose first input
        has ``shape`` run on (blocks of one thread share a second session of the graph: 0.7 s to open
        for FlowAR-S's AR, which the first image paid); returns the futures of every session still
        opening (the runtime waits for them at open: :meth:`flowar.runtime.stages.EngineStages.warm_up`)."""
        from concurrent.futures import Future

        from flowar.engines.ort import create_session
        for _, _, key in self._blocks(shape):
            if key is not None and key not in self._sessions:
                self._sessions[key] = self._pool.submit(create_session, self.graph, self.sha256, self.provider,
                                                        key[0], self.cache_dir, self.source)
        # (not those already open: a later warm-up waited for them again, and trimmed the allocator each time)
        return [f for f in self._sessions.values() if isinstance(f, Future) and (not f.done() or f.exception())]

    def infer(self, inputs: dict[str, Tensor], outputs: dict[str, Tensor], profile: int = 0) -> None:
        # The runtime's buffers are static, so the plan and bindings made once for these exact
        # addresses and shapes are replayed: no per-call binding work in the ODE loop.
        key = tuple((n, t.data_ptr(), tuple(t.shape)) for n, t in inputs.items()) + \
            tuple((n, t.data_ptr(), tuple(t.shape)) for n, t in outputs.items())
        runs = self._runs.get(key)
        if runs is None:
            if len(self._runs) > 4096:                # a caller with moving buffers: do not grow without bound
                self._runs.clear()
            runs = self._runs[key] = self._plan(inputs, outputs)
        if len(runs) == 1:
            runs[0]()
            return
        # Row blocks: runs[1:] on the pool, runs[0] on the caller; ONNX Runtime releases the GIL
        # while it computes, so they run on separate cores. Every block finishes before the first
        # error is raised.
        futures = [self._pool.submit(job) for job in runs[1:]]
        err = None
        try:
            runs[0]()
        except BaseException as e:            # noqa: BLE001 - re-raised after the other blocks finished
            err = e
        for f in futures:
            e = f.exception()                  # waits, also after an error
            err = err or e
        if err is not None:
            raise err

    def _plan(self, inputs: dict[str, Tensor], outputs: dict[str, Tensor]) -> list:
        """One job per row block (:meth:`_blocks`): its session's run on its tensors, bound by address once."""
        from concurrent.futures import Future

        import numpy as np
        from flowar.engines.ort import create_session
        known = {t.name for t in (*self.session.get_inputs(), *self.session.get_outputs())}
        stray = [n for n in (*inputs, *outputs) if n not in known]
        if stray:     # (another stage's graph in its place, its hash recorded too: ONNX Runtime's binding traceback)
            from flowar.errors import EngineDirError
            name = getattr(self.source, "name", self.name)
            raise EngineDirError(f"a graph of the {self.name} stage (its inputs and outputs)", f"{name} without "
                                 f"{', '.join(stray)} (it has {', '.join(sorted(known))})",
                                 "export the directory again with flowar-export")
        jobs = []
        for b, e, key in self._blocks(next(iter(inputs.values())).shape):
            if key is None:
                sess = self.session
            else:
                sess = self._sessions.get(key)
                if isinstance(sess, Future):      # (opening: see open_sessions; one that failed is tried again)
                    try:
                        sess = sess.result()
                    except Exception:   # noqa: BLE001
                        sess = None
                if sess is None:                  # (shapes not opened for)
                    sess = create_session(self.graph, self.sha256, self.provider, key[0], self.cache_dir, self.source)
                self._sessions[key] = sess
            binding = sess.io_binding()
            for group, bind in ((inputs, binding.bind_input), (outputs, binding.bind_output)):
                for n, t in group.items():
                    t = t[b:e] if key is not None and n in self.row_tensors else t
                    assert t.is_contiguous(), f"{self.name}: {n} must be contiguous"
                    bind(n, "cuda" if t.is_cuda else "cpu", t.device.index or 0, np.dtype(_NP[t.dtype]), list(t.shape),
                         t.data_ptr())
            jobs.append(functools.partial(sess.run_with_iobinding, binding))
        self.settle()
        return jobs


class TrtEngine:
    """A TensorRT plan with one execution context per optimization profile (i.e. per scale).

    Uses only the API that TensorRT 10 and TensorRT-RTX share: contexts with user-managed device
    memory (``create_execution_context(USER_MANAGED)`` + ``set_device_memory``), so the stages,
    which never run at once, share one scratch block. Every call that can fail is checked and a
    failure is one line naming the stage, the scale and what to do. Input shapes are set on every
    call (a context may serve B and 2B rows in one scale); addresses are the caller's static
    buffers, so a CUDA graph captured over ``infer`` stays valid.
    """

    def __init__(self, name: str, plan: Path, trt_module, shared_memory: "SharedDeviceMemory", stream=None):
        self.name, self.plan, self.trt, self.shared = name, plan, trt_module, shared_memory
        self.stream = stream or (lambda: torch.cuda.current_stream().cuda_stream)
        self.engine = None
        self.contexts = []

    def _fail(self, what: str, fix: str = "rebuild the plans here with flowar-export --backend trt"):
        from flowar.errors import FlowARError
        raise FlowARError(f"TensorRT to {what}", f"a failure for the {self.name} stage's plan", fix)

    def __enter__(self) -> "TrtEngine":
        trt = self.trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        self.engine = runtime.deserialize_cuda_engine(self.plan if isinstance(self.plan, bytes) else self.plan.read_bytes())
        if self.engine is None:
            self._fail("load the plan (deserialize_cuda_engine returned nothing)")
        self.shared.reserve(self.engine.device_memory_size_v2)
        for p in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if ctx is None:
                self._fail(f"create an execution context for profile {p}", "free GPU memory, or rebuild the plans")
            if not ctx.set_optimization_profile_async(p, self.stream()):
                self._fail(f"select optimization profile {p}")
            self.contexts.append(ctx)
        return self

    def __exit__(self, *exc) -> None:
        self.contexts.clear()
        self.engine = None

    def infer(self, inputs: dict[str, Tensor], outputs: dict[str, Tensor], profile: int = 0) -> None:
        if not 0 <= profile < len(self.contexts):
            self._fail(f"have a profile for scale {profile} (it has {len(self.contexts)})")
        ctx = self.contexts[profile]
        ctx.set_device_memory(self.shared.ptr(), self.shared.size)     # sequential stages share one block
        for n, t in inputs.items():
            if not ctx.set_input_shape(n, tuple(t.shape)):
                self._fail(f"accept {n} of shape {tuple(t.shape)} at scale {profile}",
                           "re-export with a larger --max-batch, or rebuild the plans")
            if not ctx.set_tensor_address(n, t.data_ptr()):
                self._fail(f"bind {n}")
        for n, t in outputs.items():
            if not ctx.set_tensor_address(n, t.data_ptr()):
                self._fail(f"bind {n}")
        if not ctx.execute_async_v3(self.stream()):
            self._fail(f"run at scale {profile}", "check the GPU (nvidia-smi) and rebuild the plans")


class SharedDeviceMemory:
    """One scratch block for all TensorRT engines, sized to the largest (they never run at once)."""

    def __init__(self, device: torch.device):
        self.device, self.size, self.block = device, 0, None

    def reserve(self, nbytes: int) -> None:
        if nbytes > self.size:
            self.size = int(nbytes)
            self.block = torch.empty(self.size, dtype=torch.uint8, device=self.device)

    def ptr(self) -> int:
        return self.block.data_ptr() if self.block is not None else 0


def enter_engines(stack, engines: dict, workers: int = 1) -> dict:
    """Every engine of ``engines`` entered, up to ``workers`` at once, each one's exit pushed on the
    ExitStack ``stack`` (also where another failed; the first error is raised once all finished).
    ONNX Runtime parses and prepacks a graph with the GIL released: FlowAR-S's four sessions opened
    in 1.0 s on two threads against 1.5-1.6 s one after another, its AR's alone taking 1.0 s (the
    open's own peak 0.27 GB higher, below the first image's)."""
    if workers <= 1 or len(engines) <= 1:
        return {n: stack.enter_context(e) for n, e in engines.items()}
    from concurrent.futures import ThreadPoolExecutor, wait
    pool = ThreadPoolExecutor(min(workers, len(engines)), thread_name_prefix="flowar-open")
    futures = {}
    try:
        for n, e in engines.items():     # (the stages come AR first, the largest of each model)
            futures[n] = pool.submit(e.__enter__)
        wait(futures.values())
    finally:                             # (an interrupt, or a thread that could not start: every engine that
        try:                             # opened is closed too)
            pool.shutdown(wait=True, cancel_futures=True)
        finally:
            for n, f in futures.items():
                if f.done() and not f.cancelled() and f.exception() is None:
                    stack.push(engines[n])
    for f in futures.values():
        if f.exception() is not None:
            raise f.exception()
    # (what the threads' parsing freed stays in their allocator arenas: FlowAR-S held 1.36 GB after
    # opening instead of 1.10, 1.07 once trimmed, the first image's peak above it)
    from flowar.io.memory import release_free_memory
    release_free_memory()
    return {n: f.result() for n, f in futures.items()}
