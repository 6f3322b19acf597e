"""TensorRT plans, built with ``tensorrt`` or, where only it is installed, TensorRT-RTX, through
Polygraphy's TensorRT loaders (ONNX -> strongly typed network -> config with profiles -> plan).

* One optimization profile per scale: each dynamic input gets min/opt/max shapes that differ
  only in rows (1 .. max rows), so every scale has its own tuned kernels.
* Strongly typed networks: precision comes from the graph's dtypes (TensorRT 11 semantics),
  never from builder flags.
* A timing cache file shared by all stages of a directory (full TensorRT; TensorRT-RTX tunes
  at run time, so it has none).
* Plans are named by a key over (graph hash, precision, profiles, builder flavour and version,
  compute capability); the manifest records the same fields and the runtime refuses a plan
  whose key does not match its environment.

TensorRT-RTX builds without a GPU when it is given a target compute capability; full
TensorRT needs the GPU it builds for. A plan can only be deserialized (``inspect_plan``) on a
GPU; without one, ``inspect_profiles`` reads the profiles back from TensorRT's builder objects.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from flowar.config import FlowARConfig
from flowar.errors import FlowARError
from flowar.export.specs import StageSpec

# per profile: input -> (min, opt, max) shapes
ProfileShapes = list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]


@dataclass(frozen=True, slots=True)
class Builder:
    trt: object          # the imported module
    flavour: str         # "tensorrt" | "tensorrt-rtx"
    version: str


def load_builder(flavour: str | None = None) -> Builder:
    """TensorRT, else TensorRT-RTX; ``flavour`` (what built a directory's plans) first: with both
    installed, plans of TensorRT-RTX were judged by TensorRT's version and never used."""
    # tensorrt_rtx: NVIDIA's SDK wheel; tensorrt_rtx_bindings: the same bindings as pip's tensorrt-rtx-cu13-bindings
    modules = (("tensorrt", "tensorrt"), ("tensorrt_rtx", "tensorrt-rtx"), ("tensorrt_rtx_bindings", "tensorrt-rtx"))
    for name, kind in sorted(modules, key=lambda m: m[1] != flavour):
        try:
            trt = __import__(name)
            return Builder(trt, kind, trt.__version__)
        except (ImportError, OSError):        # (OSError: a wheel whose libraries do not load)
            pass
    raise FlowARError("TensorRT or TensorRT-RTX for --backend trt", "neither is installed",
                      "pip install '.[trt]' (TensorRT-RTX) or NVIDIA's tensorrt, or use --backend ort")


def polygraphy_trt(b: Builder):
    """``polygraphy.backend.trt``, set to the builder's flavour (what POLYGRAPHY_USE_TENSORRT_RTX=1 does)."""
    try:
        from polygraphy import config as pg_config
    except ImportError as e:
        raise FlowARError("Polygraphy to build TensorRT plans", "it is not installed", "pip install '.[trt]'") from e
    rtx = b.flavour == "tensorrt-rtx"
    if "polygraphy.backend.trt" in sys.modules and pg_config.USE_TENSORRT_RTX != rtx:
        # its modules bound TensorRT or TensorRT-RTX when first imported
        raise FlowARError(f"Polygraphy set up for {b.flavour}",
                          f"POLYGRAPHY_USE_TENSORRT_RTX={int(pg_config.USE_TENSORRT_RTX)} in this process",
                          f"set POLYGRAPHY_USE_TENSORRT_RTX={int(rtx)} or unset it")
    pg_config.USE_TENSORRT_RTX = rtx
    if rtx:
        # Polygraphy imports TensorRT-RTX as `tensorrt_rtx`, the SDK wheel's name; pip's wheel is
        # `tensorrt_rtx_bindings`, the same API.
        sys.modules.setdefault("tensorrt_rtx", b.trt)
    from polygraphy.backend import trt as pg
    return pg


def _loader_error(pg_exc, what: str, graph: Path) -> FlowARError:
    first = str(pg_exc).strip().splitlines()[0] if str(pg_exc).strip() else type(pg_exc).__name__
    return FlowARError(f"TensorRT to {what} {graph.name}", first[:300],
                       "rerun with --debug; the TensorRT log above names the failing layer or input")


def gpu_compute_capability() -> str | None:
    try:
        import torch
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"sm{major}{minor}"
    except ImportError:
        pass
    return None


def plan_target(b: Builder, compute_capability: str | None) -> str:
    """The compute capability the plans are built for: TensorRT builds for the GPU it runs on (another
    --compute-capability would be recorded while the plans ran only there); TensorRT-RTX builds for this
    GPU, or ahead of time for ``compute_capability`` (default sm80) among the targets it knows."""
    gpu = gpu_compute_capability()
    cc = compute_capability or gpu or "sm80"
    if b.flavour == "tensorrt":
        if compute_capability not in (None, gpu):
            raise FlowARError(f"--compute-capability {gpu} (TensorRT builds for the GPU it runs on) or none",
                              compute_capability, "build on the target GPU, or drop --compute-capability")
    elif compute_capability is not None or gpu is None:
        known = sorted((m.lower() for m in dir(b.trt.ComputeCapability) if re.fullmatch(r"SM\d+", m)),
                       key=lambda s: int(s[2:]))
        if cc not in known:
            raise FlowARError(f"--compute-capability among {', '.join(known)} (TensorRT-RTX {b.version})",
                              repr(cc), "pick the target GPU's among those (e.g. sm80); a GPU TensorRT-RTX does not "
                              "target (H100/H200: sm90) takes full TensorRT's plans, built on that GPU "
                              "(flowar-export --backend trt there)")
    return cc


def profiles(spec: StageSpec, config: FlowARConfig, max_rows: int) -> list[dict[str, list[list[int]]]]:
    """Per scale: input -> [min, opt, max] shapes over rows 1..max_rows."""
    out = []
    for k in spec.scales:
        lo, hi = spec.input_shapes(k, 1), spec.input_shapes(k, max_rows)
        opt = spec.input_shapes(k, max(1, max_rows // 2))
        out.append({n: [list(lo[n]), list(opt[n]), list(hi[n])] for n in spec.inputs})
    return out


def plan_key(graph_sha: str, precision: str, profs: list, b: Builder, cc: str) -> str:
    blob = json.dumps([graph_sha, precision, profs, b.flavour, b.version, cc], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _network(pg, graph: Path, profs: list):
    """(builder, network, parser) of a strongly typed network, after checking that ``profs``
    covers exactly its inputs (Polygraphy would fill a missing one with a default shape)."""
    builder, network, parser = pg.network_from_onnx_path(str(graph), strongly_typed=True)
    have = {network.get_input(i).name for i in range(network.num_inputs)}
    for p in profs:
        if set(p) != have:
            raise FlowARError(f"profiles for the inputs of {graph.name}: {sorted(have)}", f"{sorted(p)}",
                              "re-export the graph with this version of flowar-export")
    return builder, network, parser


def build_plan(b: Builder, graph: Path, graph_sha: str, spec: StageSpec, config: FlowARConfig, max_rows: int,
               precision: str, out_dir: Path, timing_cache: Path, compute_capability: str | None = None) -> dict:
    """Build one stage's plan into ``out_dir``; returns its manifest record."""
    pg = polygraphy_trt(b)
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER
    gpu = gpu_compute_capability()
    cc = plan_target(b, compute_capability)
    profs = profiles(spec, config, max_rows)
    pg_profiles = [_pg_profile(pg, p) for p in profs]
    timed = b.flavour == "tensorrt"          # TensorRT-RTX tunes at run time: its timing cache is a no-op
    kw = dict(profiles=pg_profiles, progress_monitor=_stop_monitor(b.trt))
    if timed:
        # TensorRT's own default keeps TF32 on; Polygraphy's turns it off.
        create = pg.CreateConfig(**kw, tf32=True, load_timing_cache=str(timing_cache))
    else:
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX
        if compute_capability is None and gpu is not None:
            create = CreateConfigRTX(**kw, use_gpu=True)         # for this GPU
        else:                                                     # ahead of time, no GPU needed
            create = CreateConfigRTX(**kw, compute_capabilities=[(int(cc[2:-1]), int(cc[-1]))])
    from flowar.errors import raise_if_stopped, stops_held
    try:
        # A stop (Ctrl-C, SIGTERM) is recorded, not raised, while TensorRT builds: raised inside its callbacks (its
        # logger's), it printed TensorRT's "Exception caught in log()" and a stack; the monitor cancels the build
        # at its next step instead, and the stop is raised here
        with stops_held(""), G_LOGGER.verbosity(G_LOGGER.ERROR), warnings.catch_warnings():
            # Polygraphy always sets a timing cache; TensorRT-RTX warns that it is a no-op there
            warnings.filterwarnings("ignore", "Use Deprecated in TensorRT-RTX", DeprecationWarning)
            net = _network(pg, graph, profs)
            serialized = pg.engine_bytes_from_network(net, create, save_timing_cache=str(timing_cache) if timed else None)
    except PolygraphyException as e:
        raise_if_stopped()                    # (a cancelled build: "interrupted", not a failed one)
        raise _loader_error(e, "build a plan for", graph) from e
    finally:
        Path(f"{timing_cache}.lock").unlink(missing_ok=True)      # Polygraphy's lock beside the cache
    raise_if_stopped()
    key = plan_key(graph_sha, precision, profs, b, cc)
    plan = out_dir / f"{spec.name}.{key[:16]}.plan"
    plan.write_bytes(bytes(serialized))
    from flowar.export.manifest import sha256_file
    return {"file": plan.name, "sha256": sha256_file(plan), "key": key, "profiles": profs,
            "compute_capability": cc}


def _stop_monitor(trt):
    """A TensorRT progress monitor that cancels the build once a stop was asked for."""
    from flowar.errors import stopped

    class StopMonitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            pass

        def phase_finish(self, phase_name):
            pass

        def step_complete(self, phase_name, step):
            if stopped() is None:
                return True
            from polygraphy.logger import G_LOGGER      # (cancelled: not Polygraphy's "[!] Invalid Engine" line; the
            G_LOGGER.module_severity = G_LOGGER.CRITICAL + 1       # build's verbosity context restores it)
            return False
    return StopMonitor()


def _pg_profile(pg, p: dict[str, list[list[int]]]):
    prof = pg.Profile()
    for name, (lo, opt, hi) in p.items():
        prof.add(name, min=tuple(lo), opt=tuple(opt), max=tuple(hi))
    return prof


def inspect_profiles(b: Builder, graph: Path, profs: list) -> ProfileShapes:
    """What TensorRT holds for the profiles ``profs`` (a manifest record's ``profiles``): each is
    handed to TensorRT as the build does and read back, for every input of the parsed network.
    Works without a GPU."""
    pg = polygraphy_trt(b)
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER
    try:
        with G_LOGGER.verbosity(G_LOGGER.ERROR):
            builder, network, _ = _network(pg, graph, profs)
            trt_profiles = [_pg_profile(pg, p).fill_defaults(network).to_trt(builder, network) for p in profs]
    except PolygraphyException as e:
        raise _loader_error(e, "take the profiles of", graph) from e
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    return [{n: tuple(tuple(s) for s in tp.get_shape(n)) for n in names} for tp in trt_profiles]


def inspect_plan(b: Builder, plan: Path) -> ProfileShapes:
    """Per profile of a built plan: input -> (min, opt, max). Deserializing needs a GPU the plan
    was built for (TensorRT-RTX too)."""
    trt = b.trt
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise FlowARError(f"a plan TensorRT {b.version} can deserialize here", f"{plan.name} was refused",
                          "inspect plans on a GPU they were built for, or use inspect_profiles")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    return [{n: tuple(tuple(s) for s in engine.get_tensor_profile_shape(n, p)) for n in inputs}
            for p in range(engine.num_optimization_profiles)]


def compare_with_ort(b: Builder, graph: Path, plan: Path, spec: StageSpec, config: FlowARConfig, rows: int,
                     atol: float | None = None, seed: int = 0) -> bool:
    """Run one stage's ONNX graph (ONNX Runtime, CPU) and plan (TensorRT, GPU) on the same
    sample inputs at ``rows`` rows for every scale, with Polygraphy's Comparator; True when all
    outputs agree within ``atol`` (default: the stage's tolerance). Needs a GPU."""
    pg = polygraphy_trt(b)
    import torch
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import CompareFunc, Comparator
    from flowar.export.specs import sample_inputs
    engine = pg.EngineFromBytes(plan.read_bytes())
    compare = CompareFunc.simple(atol=spec.tolerance if atol is None else atol, rtol=0.0)
    gen = torch.Generator().manual_seed(seed)
    ok = True
    for k in spec.scales:
        feed = {n: t.numpy() for n, t in sample_inputs(spec, config, k, rows, gen).items()}
        runners = [OnnxrtRunner(SessionFromOnnx(str(graph), providers=["CPUExecutionProvider"]), name=f"ort-{k}"),
                   pg.TrtRunner(engine, name=f"trt-{k}", optimization_profile=k)]
        ok &= bool(Comparator.compare_accuracy(Comparator.run(runners, data_loader=[feed]), compare_func=compare))
    return ok
