"""The engines an export measures (:mod:`flowar.commands.precision`): every candidate of every
stage built on demand (:class:`Workbench`), and whole images through the pipeline on a choice of
them (:class:`Probe`)."""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

import torch

from flowar.errors import FlowARError
from flowar.io.memory import release_free_memory
from flowar.runtime.candidates import COMPILED, stage_module, stage_tensors

PROBE_LABELS = 4             # samples of the end-to-end check
TIME_REPEAT = 2              # timed whole images per combination (after one warm-up)


class Workbench:
    """The engines of every candidate for the stages of one export, built on demand: compiled
    packages once each (into ``folder``, their build time kept apart), so that measuring, timing
    in the pipeline and the call plan all run the very engines the directory will hold.
    ``graphs``: stage -> (path, sha256) of the exported float32 ONNX graphs."""

    def __init__(self, model, vae, specs: dict, graphs: dict, folder, max_batch: int, threads: int | None = None,
                 max_memory: float | None = None):
        self.model, self.vae, self.specs, self.graphs, self.folder = model, vae, specs, graphs, folder
        self.max_batch, self.threads, self.max_memory = max_batch, threads, max_memory
        self.packages: dict[tuple[str, str], object] = {}
        self.build_s: dict[tuple[str, str], float] = {}
        self.untuned: dict[tuple[str, str], str] = {}     # why a compile's GEMM templates failed (ATen's calls then)

    def engine(self, stage: str, candidate: str, threads: int | None = None):
        """The (not yet entered) engine of ``candidate`` for ``stage``; compiles it the first time."""
        from flowar.engines.ort import split_limits
        from flowar.runtime.engines import AotiEngine, OrtEngine, TorchEngine
        spec, config = self.specs[stage], self.model.config
        if candidate == "ort-fp32":           # its optimized graph cached in the directory, as opening it would
            graph, sha = self.graphs[stage]
            return OrtEngine(stage, graph, sha, spec.row_tensors, "CPUExecutionProvider", Path(graph).parent / ".ort-cache",
                             threads or self.threads, *split_limits(stage, config), source=Path(graph))
        if candidate in COMPILED:
            key = (stage, candidate)
            if key not in self.packages:
                from flowar.engines.aoti import compile_stage
                release_free_memory()       # the compile's peak comes on top of what the process holds
                self._check_room(stage)
                path = self.folder / f"{stage}.{candidate}.so"
                self.build_s[key], self.untuned[key] = compile_stage(spec, stage_module(candidate, spec, self.model, self.vae), config,
                                                  spec.max_rows(self.max_batch), path)
                self.packages[key] = path
            return AotiEngine(stage, self.packages[key], spec.inputs, spec.outputs)
        return TorchEngine(stage, stage_module(candidate, spec, self.model, self.vae), spec.inputs, spec.outputs)

    def _check_room(self, stage: str) -> None:
        """Refuse (as a candidate this machine cannot have) a compile whose estimated peak exceeds
        what is left: under ``max_memory`` bytes (--max-memory) with what the process holds, else
        what the machine has available."""
        from flowar.engines.aoti import compile_memory
        from flowar.io.memory import GB, anon_bytes, available_bytes
        weights = sum(t.nbytes for t in stage_tensors(stage, self.specs[stage].module(self.model, self.vae)).values())
        need = compile_memory(weights)
        room = (self.max_memory - (anon_bytes() or 0)) if self.max_memory else available_bytes()
        if room is not None and need > room:
            limit = f"under --max-memory {self.max_memory / GB:g} GB" if self.max_memory else "available on this machine"
            raise FlowARError(f"memory to compile: about {need / GB:.1f} GB (its {weights / GB:.2f} GB of weights "
                              f"held about 3x)", f"{max(room, 0) / GB:.1f} GB left {limit}",
                              "its other candidates are measured instead; give more --max-memory to compile it")

    @contextlib.contextmanager
    def runtime(self, choice: dict[str, str], batch: int, plan: dict | None = None):
        """A runtime on the engines of ``choice`` (what opening the finished directory will give)."""
        from flowar.runtime.runtime import Runtime
        from flowar.runtime.threads import Threads
        from flowar.runtime.stages import EngineStages
        c = self.model.config
        threads = Threads.resolve(self.threads, any(e != "ort-fp32" for e in choice.values()))
        with contextlib.ExitStack() as stack:
            engines = {n: stack.enter_context(self.engine(n, choice.get(n, "ort-fp32"), threads.cores))
                       for n in self.specs}
            yield Runtime(kind="checkpoint", config=c, class_names=None,
                          stages=EngineStages(engines, c, batch, torch.device("cpu"), self.specs, plan),
                          device=torch.device("cpu"), backend="measured", detail=str(choice), threads=threads,
                          decodes=self.vae is not None, vae=self.vae, max_batch=batch,
                          image_size=c.latent_size * self.vae.downsample if self.vae is not None else None)
        release_free_memory()


class Probe:
    """Samples of the whole pipeline for a choice of engines: the time of one image at batch 1,
    and the probe samples against a float32 reference (ONNX Runtime fp32, within float32 noise
    of eager)."""

    def __init__(self, bench: Workbench):
        self.bench = bench
        c = bench.model.config
        self.labels = [(i * 37) % c.num_classes for i in range(PROBE_LABELS)]
        from flowar.sampling.schedule import Settings
        self.schedule = Settings().resolve(c.n_scales)
        self._ref = None

    def _run(self, rt, labels):
        return rt.sample(labels, self.schedule, seed=0, decode=self.bench.vae is not None)

    def seconds(self, choice: dict[str, str], repeat: int | None = None) -> float:
        repeat = repeat or TIME_REPEAT
        with self.bench.runtime(choice, 1) as rt:
            self._run(rt, self.labels[:1])                              # warm-up: sessions, caches, first calls
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                self._run(rt, self.labels[:1])
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def sample(self, choice: dict[str, str]):
        with self.bench.runtime(choice, len(self.labels)) as rt:
            return self._run(rt, self.labels)

    def reference(self):
        if self._ref is None:
            self._ref = self.sample({s: "ort-fp32" for s in self.bench.specs})
        return self._ref

    def official_fp16(self):
        from flowar.eval.mixed import OfficialFp16
        from flowar.sampling.batches import run_sampling
        from flowar.sampling.eager import EagerStages
        b = self.bench
        with torch.inference_mode():
            return run_sampling(OfficialFp16(EagerStages(b.model, b.vae.decode if b.vae else None)),
                                b.model.config, self.labels, self.schedule, 0, decode=b.vae is not None)
