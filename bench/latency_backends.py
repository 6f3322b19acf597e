"""The backends bench/latency.py measures, each prepared once per batch size into a
:class:`Prepared`: the stages the sampler calls, how it calls them, and what they compute in.

:class:`Backends` owns what the preparations create (exported engine directories in temporary
folders, opened runtimes) and releases all of it when the bench leaves its ``with`` block.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from flowar.errors import FlowARError, one_line
from latency_measure import Work, run_once

ALL = ("eager", "eager-bf16", "cached", "compile", "ort", "auto", "bf16", "trt", "cudagraph")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Skip(Exception):
    """A backend this machine or source cannot run; the reason goes into the table."""


@dataclass(slots=True)
class Prepared:
    stages: object                  # the sampler's Stages, reused by every run
    official_rows: bool             # the official method's 2B rows at every step (the eager baseline)
    precision: str                  # what it computes in, for the table
    runner: object = None           # a ScaleRunner (CUDA graphs), else the sampler's eager loop
    build_s: float | None = None    # export / compile time, reported apart
    note: str = ""
    threads: Callable = field(default=contextlib.nullcontext)   # the opened runtime's thread policy, applied while timing

    @property
    def graphed(self) -> bool:
        return self.runner is not None


def autocast(inner, device: torch.device, dtype: torch.dtype):
    """Stages whose every call runs under torch.autocast in ``dtype``."""
    from flowar.sampling.sampler import Hooked

    def around(kind, fn, *a):
        with torch.autocast(device.type, dtype=dtype):
            return fn(*a)
    return Hooked(inner, around)


@dataclass(slots=True)
class BenchSource:
    """The eager model the bench measures, and where its engines come from."""
    model: object
    vae: object
    engine_dir: Path | None          # given by the user; else exported into a temporary folder
    engine_precision: str | None     # what that directory was exported in (fp32, fp16, bf16, auto)
    dtype: str                       # fp32, bf16, fp16: the PyTorch backends' autocast
    max_batch: int                   # the largest batch of the run (what exported engines serve)
    device: torch.device
    threads: int | None = None       # --threads: the engines' cores (PyTorch's are set for the whole run)
    vae_path: str | None = None      # the VAE file or folder ``vae`` was read from (what an export is given)


class Backends(contextlib.AbstractContextManager):
    def __init__(self, src: BenchSource):
        self.src = src
        self._stack = contextlib.ExitStack()
        self._dirs: dict[tuple[str, str], Path] = {}
        self._runtimes: dict[tuple[Path, str], object] = {}
        self._compiled = None                # the head's velocity under torch.compile, shared by every batch

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def prepare(self, name: str, work: Work) -> Prepared:
        if name not in ALL:
            raise Skip(f"unknown backend {name}")
        return getattr(self, "_" + name.replace("-", "_"))(work)

    # ---- PyTorch -----------------------------------------------------------------------------

    def _torch_stages(self, stages, dtype: str):
        return stages if dtype == "fp32" else autocast(stages, self.src.device, AUTOCAST[dtype])

    def _decode(self):
        return self.src.vae.decode if self.src.vae is not None else None

    def _eager(self, work: Work) -> Prepared:
        from flowar.sampling.eager import OfficialStyleStages
        return Prepared(self._torch_stages(OfficialStyleStages(self.src.model, self._decode()), self.src.dtype), True,
                        self.src.dtype)

    def fp32_tokens(self, work: Work):
        """Eager's tokens in float32, untimed: a 16-bit run's yardstick."""
        from flowar.sampling.eager import OfficialStyleStages
        return run_once(OfficialStyleStages(self.src.model, self._decode()), work, True).cpu()   # as the timed rows'

    def _eager_bf16(self, work: Work) -> Prepared:
        from flowar.sampling.eager import OfficialStyleStages
        return Prepared(self._torch_stages(OfficialStyleStages(self.src.model, self._decode()), "bf16"), True,
                        "bf16 autocast")

    def _cached(self, work: Work) -> Prepared:
        from flowar.sampling.eager import EagerStages
        return Prepared(self._torch_stages(EagerStages(self.src.model, self._decode()), self.src.dtype), False,
                        self.src.dtype)

    def _compile(self, work: Work) -> Prepared:
        import torch._dynamo
        from flowar.sampling.eager import EagerStages
        if self._compiled is None:
            # one specialisation per (scale, rows): 2 x scales x batches, above the default limit of 8
            torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
            self._compiled = torch.compile(self.src.model.flownet.velocity, dynamic=False)
        velocity = self._compiled

        class Compiled(EagerStages):
            def velocity(self, ctx, x, t):
                return velocity(x, t, ctx)

        stages = self._torch_stages(Compiled(self.src.model, self._decode()), self.src.dtype)
        t0 = time.perf_counter()
        run_once(stages, work, False)                # compiles every (scale, rows) shape now, timed apart
        build_s = time.perf_counter() - t0
        return Prepared(stages, False, self.src.dtype, build_s=build_s, note=f"compile {build_s:.0f} s")

    def _cudagraph(self, work: Work) -> Prepared:
        if self.src.device.type != "cuda":
            raise Skip("CUDA graphs need a CUDA GPU")
        from flowar.runtime.cudagraph import GraphRunner
        from flowar.runtime.stages import torch_engine_stages
        stages = self._torch_stages(torch_engine_stages(self.src.model, work.batch, self.src.device, self.src.vae),
                                    self.src.dtype)
        return Prepared(stages, False, self.src.dtype, runner=GraphRunner(self.src.device),
                        note="CUDA graphs, captured in the warm-up run")

    # ---- engine directories ------------------------------------------------------------------

    def _runtime(self, backend: str, export: str, precision: str, work: Work):
        """(the runtime opened with ``backend``, export seconds or None): the user's directory, else
        one exported for this run with ``flowar-export --backend export --precision precision``.
        Opened as every command opens it (flowar.runtime.runtime.Runtime)."""
        from flowar.runtime.runtime import Runtime
        d, build_s = self.src.engine_dir, None
        if d is None or (precision != "fp32" and self.src.engine_precision != precision):
            d, build_s = self._export(export, precision)
        key = (d, backend)
        if key not in self._runtimes:
            try:
                self._runtimes[key] = self._stack.enter_context(Runtime.open_engine_dir(d, backend=backend,
                                                                                        threads=self.src.threads))
            except FlowARError as e:
                if backend != "trt":
                    raise
                raise Skip(f"no TensorRT engines to open here: {one_line(e)}") from None   # (a row, not the run)
        rt = self._runtimes[key]
        if work.batch > rt.max_batch:
            raise Skip(f"batch {work.batch} above the directory's max batch {rt.max_batch}")
        return rt, build_s

    def _export(self, backend: str, precision: str) -> tuple[Path, float | None]:
        """An engine directory of the bench's model, made by the flowar-export command (in its own
        process, as a user makes one)."""
        key = (backend, precision)
        if key in self._dirs:
            return self._dirs[key], None
        from flowar.model.checkpoint import save_checkpoint
        tmp = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="flowar-bench-")))
        t0 = time.perf_counter()
        save_checkpoint(tmp / "model.safetensors", self.src.model.state_dict(), self.src.model.config)
        cmd = [str(Path(sys.executable).parent / "flowar-export"), "--ckpt", str(tmp / "model.safetensors"),
               "--out", str(tmp / "engines"), "--backend", backend, "--max-batch", str(self.src.max_batch),
               "--no-verify", "--precision", precision]
        if self.src.vae is not None:        # (the file the user gave: the decoder read from it cannot be saved as a VAE)
            cmd += ["--vae", str(self.src.vae_path)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise Skip(f"flowar-export failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        self._dirs[key] = tmp / "engines"
        return tmp / "engines", time.perf_counter() - t0

    def _ort(self, work: Work) -> Prepared:
        rt, build_s = self._runtime("ort", "ort", "fp32", work)
        p = rt.manifest.precision
        return Prepared(rt.stages, False, "fp32" if p == "auto" else p, build_s=build_s,
                        note=rt.detail + (f", export {build_s:.0f} s" if build_s else ""), threads=rt.threads.applied)

    def _measured(self, work: Work, precision: str) -> Prepared:
        """The runtime on what `flowar-export --precision auto|bf16` measured and chose on this machine."""
        rt, build_s = self._runtime("auto", "ort", precision, work)
        choice = rt.manifest.choice or {}
        return Prepared(rt.stages, False, f"{precision}: " + ", ".join(f"{s} {c}" for s, c in choice.items()),
                        build_s=build_s, threads=rt.threads.applied,
                        note=rt.detail + (f", export and measure {build_s:.0f} s" if build_s else ""))

    def _auto(self, work: Work) -> Prepared:
        return self._measured(work, "auto")

    def _bf16(self, work: Work) -> Prepared:
        return self._measured(work, "bf16")

    def _trt(self, work: Work) -> Prepared:
        if not torch.cuda.is_available():
            raise Skip("TensorRT needs a CUDA GPU")
        rt, build_s = self._runtime("trt", "trt", "fp32", work)
        return Prepared(rt.stages, False, rt.manifest.precision, build_s=build_s, note=rt.detail,
                        threads=rt.threads.applied)

