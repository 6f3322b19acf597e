"""One small engine interface and its adapters.

An engine is a context manager: entering activates it (sessions, execution contexts), ``infer``
runs it on preallocated input tensors and writes into preallocated output tensors (no
allocation of its own), leaving releases it.

* :class:`TorchEngine` runs a stage's wrapper module eagerly: the reference, behind the same
  interface.
* :class:`OrtEngine` binds tensors to ONNX Runtime by pointer (I/O binding), on CPU or CUDA.
* :class:`TrtEngine` sets tensor addresses on a TensorRT execution context (one per profile,
  i.e. per scale) and enqueues on the current CUDA stream, so it can be captured in a graph.
"""

from __future__ import annotations

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


_NP = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.bfloat16: "bfloat16"}


class OrtEngine:
    """ONNX Runtime behind the engine interface.

    ``small_work``: calls whose first input has at most this many rows x tokens run on a second,
    single-threaded session; on a CPU, waking threads costs more than it saves for tiny calls
    (measured: the shipped model's velocity at batch 1 runs 2x faster on 1 thread than on 2).
    """

    def __init__(self, name: str, graph: Path, sha256: str, provider: str | None = None, cache_dir: Path | None = None,
                 threads: int | None = None, small_work: int = 0):
        self.name, self.graph, self.sha256 = name, graph, sha256
        self.provider, self.cache_dir, self.threads, self.small_work = provider, cache_dir, threads, small_work
        self.session = self.small = None

    def __enter__(self) -> "OrtEngine":
        from flowar.engines.ort import choose_provider, create_session
        self.provider = self.provider or choose_provider()
        self.session = create_session(self.graph, self.sha256, self.provider, self.threads, self.cache_dir)
        if self.small_work and self.provider == "CPUExecutionProvider" and (self.threads or 2) > 1:
            self.small = create_session(self.graph, self.sha256, self.provider, 1, self.cache_dir)
        self._bindings: dict[tuple, object] = {}
        return self

    def __exit__(self, *exc) -> None:
        self.session = self.small = None
        self._bindings = {}

    def infer(self, inputs: dict[str, Tensor], outputs: dict[str, Tensor], profile: int = 0) -> None:
        first = next(iter(inputs.values()))
        sess = self.small if (self.small is not None and first.ndim >= 2 and
                              first.shape[0] * first.shape[1] <= self.small_work) else self.session
        # The runtime's buffers are static, so a binding made once for these exact addresses and
        # shapes is replayed: no per-call binding work in the ODE loop.
        key = (id(sess),) + tuple((n, t.data_ptr(), tuple(t.shape)) for n, t in inputs.items()) + \
            tuple((n, t.data_ptr(), tuple(t.shape)) for n, t in outputs.items())
        b = self._bindings.get(key)
        if b is None:
            b = self._bind(sess, inputs, outputs)
            if len(self._bindings) > 4096:           # a caller with moving buffers: do not grow without bound
                self._bindings.clear()
            self._bindings[key] = b
        sess.run_with_iobinding(b)

    def _bind(self, sess, inputs: dict[str, Tensor], outputs: dict[str, Tensor]):
        import numpy as np
        b = sess.io_binding()
        for group, bind in ((inputs, b.bind_input), (outputs, b.bind_output)):
            for n, t in group.items():
                assert t.is_contiguous(), f"{self.name}: {n} must be contiguous"
                dev = "cuda" if t.is_cuda else "cpu"
                bind(n, dev, t.device.index or 0, np.dtype(_NP[t.dtype]), list(t.shape), t.data_ptr())
        return b


class TrtEngine:
    """A TensorRT plan with one execution context per optimization profile (scale)."""

    def __init__(self, name: str, plan: Path, trt_module, shared_memory: "SharedDeviceMemory"):
        self.name, self.plan, self.trt, self.shared = name, plan, trt_module, shared_memory
        self.engine = None
        self.contexts = []

    def __enter__(self) -> "TrtEngine":
        trt = self.trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        self.engine = runtime.deserialize_cuda_engine(self.plan.read_bytes())
        self.shared.reserve(self.engine.device_memory_size)
        for p in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context_without_device_memory()
            ctx.set_optimization_profile_async(p, torch.cuda.current_stream().cuda_stream)
            self.contexts.append(ctx)
        return self

    def __exit__(self, *exc) -> None:
        self.contexts.clear()
        self.engine = None

    def infer(self, inputs: dict[str, Tensor], outputs: dict[str, Tensor], profile: int = 0) -> None:
        ctx = self.contexts[profile]
        ctx.device_memory = self.shared.ptr()         # sequential stages share one scratch block
        for n, t in inputs.items():
            ctx.set_input_shape(n, tuple(t.shape))
            ctx.set_tensor_address(n, t.data_ptr())
        for n, t in outputs.items():
            ctx.set_tensor_address(n, t.data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.name} failed")


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
