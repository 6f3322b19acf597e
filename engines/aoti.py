"""Compiled CPU engines: a stage's reference module through ``torch.export`` and AOTInductor,
built once at export and loaded at run time without compiling.

A package holds one stage for every shape the runtime will request: rows, tokens per scale and
the AR's prefix length are dynamic dimensions (one package serves every scale and batch, as the
ONNX graphs do). It is compiled with Inductor's freezing (weights folded into the graph as
constants, prepacked for the GEMM kernels), on a CPU with AMX each GEMM as the faster of Inductor's C++
template and ATen's call (:func:`gemm_templates`; ATen's calls alone elsewhere and where the templates fail
to build), ``force_mmap_weights`` (the weights appended to
the shared library and memory-mapped when it is loaded, not copied) and ``cpp.dynamic_threads``
(the generated loops take the thread count of the process that runs them; by default Inductor
builds in the compiling process's: a reduction split over threads kept one slot per thread of the
compile, so that a mean of 2^20 values compiled on 2 threads and run on 8 died of SIGSEGV; and
where PyTorch's threads were fewer than the CPUs, as with SMT, every loop was fixed at that count:
FlowAR-S's stages compiled on 1 thread ran up to 7 % slower on 2. Both ways FlowAR-S's stages
give the same outputs bit for bit in the same time on 2 threads; bench/RESULTS.md). The directory stores that
shared library itself (``STAGE.aoti-bf16.so``), taken out of the ``.pt2`` package at export:
PyTorch's package loader unpacks a package into a temporary folder at every opening (FlowAR-H's
4 GB of libraries written again, 18 s of a cold opening), where the library is loaded in place and
processes that open the same directory share its pages. The ``bf16`` flavour is the
module with every GEMM and convolution in bfloat16 and float32 around them
(:func:`flowar.runtime.bf16.bf16_engine`: the decoder in bf16 throughout; the ``torch-bf16``
engine's numerics), compiled.

Loading goes through PyTorch's C++ loaders directly, so a process that runs compiled stages never
imports ``torch._inductor`` (about 2 s). The generated code is built for the CPU of the export
(``-march=native``): the runtime replaces a package on a CPU that lacks a flag or an instruction
set the export CPU had, as recorded (:func:`flowar.engines.cpu.compiled_for`, ``missing_for``).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import time
from pathlib import Path

import torch

from flowar.errors import FlowARError


# What compiling a stage holds at its peak, in anonymous memory, against the float32 bytes of its
# weights: measured alone (one process per compile, its resident anonymous memory polled every 0.1 s
# from outside, compiler processes included), bf16 and fp32 alike: FlowAR-H's AR 16.3 GB for 5.13 GB
# (3.1x), FlowAR-S's AR 2.0 GB for 0.52 GB (3.4x bf16, 3.3x fp32), FlowAR-S's velocity 0.95 GB for
# 0.17 GB (the compiler's own ~0.5 GB). The weights are held as the module's, as frozen constants,
# prepacked for the GEMMs and serialized into the library. Timing the GEMMs' C++ templates (TUNED)
# added 0.3 GB to FlowAR-S's AR (peak resident 2.63 -> 2.93 GB, cold caches): counted as overhead.
COMPILE_PER_WEIGHT_BYTE = 3.3
COMPILE_OVERHEAD = 0.8e9

# Each GEMM compiled as Inductor's C++ template (micro-kernels for this CPU's AMX or AVX-512, built
# into the library) where that times faster at compile than the ATen call (oneDNN, which creates
# and JIT-compiles its kernels for each new shape in the process: the first image paid 10-50 ms per
# shape and stage). FlowAR-S bf16 on an Intel Xeon with AMX, per call (interleaved): velocity at 1 row
# 5.35 -> 3.34 ms at the 1x1 scale, 8.87 -> 7.80 at 8x8, 22.4 -> 24.6 at 16x16 (at 2 rows 46.1 -> 44.9:
# the largest calls gain nothing); its first call per shape 10-50 ms -> 1-6 ms above the next; the AR
# at 2 rows 225 -> 202 ms over the five scales; the same error against float32. The
# first image 2.22 s against 2.43, the next ones 5-7 % faster. Paid at export: FlowAR-S's AR compiled
# in 76 s instead of 41 (each GEMM's template built and timed), its whole --precision auto 379 s.
TUNED = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",   # (and nothing printed: each GEMM's
         "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}   # timings filled the terminal)


def gemm_templates() -> dict:
    """Inductor's settings for the GEMM templates (:data:`TUNED`) on a CPU where they pay, else none
    (ATen's calls). They pay with AMX (above). Without it they did not: FlowAR-S bf16 on an AMD EPYC
    Zen 4 (AVX512-BF16, no AMX), each stage compiled with and without them, calls interleaved in one
    process: the same time at every scale (velocity at 2 rows 4.46 / 4.43 ms at 1x1, 112.7 / 112.1 at
    16x16; the AR 371.8 / 373.0 ms at 16x16) and the same error against float32, for a compile twice
    as long (the AR 91 s against 37, the velocity 61 against 15; the whole ``--precision auto`` export
    796 s against 669) (bench/RESULTS.md)."""
    from flowar.engines.cpu import cpu_kind
    return dict(TUNED) if "amx_tile" in cpu_kind()["flags"] else {}


def compile_memory(weight_bytes: int) -> float:
    """Bytes of anonymous memory compiling a stage with these float32 weight bytes takes (estimate)."""
    return COMPILE_PER_WEIGHT_BYTE * weight_bytes + COMPILE_OVERHEAD


def compile_stage(spec, module: torch.nn.Module, config, max_rows: int, path: Path) -> tuple[float, str]:
    """Compile ``module`` (one stage, float32 in and out) into the shared library ``path``; its
    dynamic dimensions are those of the stage's spec, rows up to ``max_rows``. Returns the seconds
    taken and, where the GEMM templates (:func:`gemm_templates`) failed to build and ATen's calls were
    compiled instead, Inductor's reason (else "")."""
    from torch.export import Dim

    from flowar.export.specs import sample_inputs
    limits = {"rows": max_rows, "tokens": max(config.tokens_per_scale), "seq": config.seq_len}
    dims = {sym: Dim(sym, min=1, max=hi) for sym, hi in limits.items() if hi > 1}
    dynamic = tuple({a: dims[s] for a, s in spec.dynamic.get(n, {}).items() if s in dims} or None for n in spec.inputs)
    # an example away from 1 on every dynamic dimension (a dimension seen at 1 is specialised to it)
    k = max(0, config.n_scales - 2) if spec.per_scale else 0
    ins = sample_inputs(spec, config, k, min(max_rows, 2), torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    package = path.with_name(path.name + ".pt2")
    # Inductor's cache beside the library, removed with the compile: it kept a copy of every library compiled, its
    # weights appended (2.4 GB of /tmp after a day of FlowAR-S exports here; FlowAR-H's AR 5 GB a candidate)
    cache, before = path.with_name(f".{path.name}.inductor"), os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    try:
        import warnings

        from torch import _inductor
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)   # (Inductor's timing, not ours)
            program = torch.export.export(module.eval(), tuple(ins[n] for n in spec.inputs), dynamic_shapes=dynamic)
            base = {"freezing": True, "aot_inductor.force_mmap_weights": True, "cpp.dynamic_threads": True}
            # (a key this PyTorch's Inductor does not know would fail every compile: only those it has)
            tuned = {k: v for k, v in gemm_templates().items() if hasattr(_inductor.config, k)}
            untuned = ""
            try:
                _inductor.aoti_compile_and_package(program, package_path=str(package), inductor_configs=base | tuned)
            except Exception as e:   # noqa: BLE001 - (templates this CPU or PyTorch cannot build: ATen's calls alone)
                if not tuned:
                    raise
                untuned = _reason(e)
                _inductor.aoti_compile_and_package(program, package_path=str(package), inductor_configs=base)
        take_library(package, path)
    except FlowARError:
        raise
    except Exception as e:   # noqa: BLE001 - a stage Inductor cannot compile here is not a candidate
        raise FlowARError(f"AOTInductor to compile the {spec.name} stage", _reason(e),
                          "export without the compiled candidates (--auto-candidates ort-fp32,torch-fp32,torch-bf16)"
                          ) from e
    finally:
        package.unlink(missing_ok=True)      # (also what a failed compile left)
        shutil.rmtree(cache, ignore_errors=True)
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR") if before is None else os.environ.update(TORCHINDUCTOR_CACHE_DIR=before)
    return time.perf_counter() - t0, untuned


def _reason(e: Exception) -> str:
    """An exception of Inductor's as one line: its type and its message's first line."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or ['?'])[0][:200]}"


def take_library(package: Path, path: Path) -> None:
    """The package's one shared library (its weights appended to it) written to ``path``, atomically.
    A package that needs more (a second library, weights in files of their own) is refused."""
    import shutil
    import zipfile

    from flowar.io.files import atomic_write_bytes
    with zipfile.ZipFile(package) as z:
        libs = [i for i in z.infolist() if i.filename.endswith(".so")]
        data = [i.filename for i in z.infolist() if i.filename.endswith((".bin", ".pt", ".safetensors"))]
        if len(libs) != 1 or data:
            raise FlowARError("one shared library holding its weights in the compiled package",
                              f"{len(libs)} libraries and {len(data)} weight files", "report it: this PyTorch packages "
                              "AOTInductor output differently (export with --auto-candidates ort-fp32,torch-bf16 meanwhile)")

        def write(tmp: str) -> None:
            with z.open(libs[0]) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
        atomic_write_bytes(path, write)


def load_package(path: Path, models: int = 1):
    """The compiled model of a stage, as a function (list of tensors) -> list of tensors: the shared
    library loaded in place (its appended weights memory-mapped) as a :class:`Library` that runs up
    to ``models`` calls at once, or a ``.pt2`` package (directories exported before the library was
    stored alone) through PyTorch's package loader, which unpacks it."""
    # AMX tiles (the C++ GEMM templates') need the kernel's permission, which oneDNN asks for itself and
    # the library does not: a process whose first computation was a compiled stage died of SIGILL
    init_amx = getattr(torch._C._cpu, "_init_amx", None)
    if init_amx is not None:
        init_amx()
    if Path(path).suffix == ".pt2":
        return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1).boxed_run
    return Library(path, models)


_OPENED: dict[str, tuple[int, int]] = {}      # a library's path -> the file (device, inode) dlopen gave that name


def _fresh_name(path: Path) -> Path | None:
    """A name to dlopen ``path`` by where this process opened another file at that path before (a
    re-export swaps the directory whole): glibc gives the library it loaded for a name it has seen,
    without looking at the file, so the old code ran with the new file's weights (another model's:
    SIGSEGV). A link in a folder of its own, removed once loaded; None where the path's name will do."""
    name, st = str(path.resolve()), os.stat(path)
    if _OPENED.setdefault(name, (st.st_dev, st.st_ino)) == (st.st_dev, st.st_ino):
        return None
    import tempfile
    link = Path(tempfile.mkdtemp(prefix="flowar-aoti-")) / f"{st.st_ino}-{path.name}"
    link.symlink_to(name)
    return link


class Library:
    """A compiled stage's shared library, called through the C interface every AOTInductor library
    exports (create a model container, run it, delete it) with ``ctypes``, which releases the GIL
    for the call. PyTorch's own runner keeps the GIL while the model computes, so that nothing else
    in the process runs meanwhile (a served replica's second lane, measured: a Python thread got
    6 % of its progress during such calls). ``models``: how many calls may run at once; the
    container holds that many models over one copy of the weights, a further call waits for one.
    Tensors cross as PyTorch's C handles: the model takes over the inputs' handles (new references,
    not the tensors), the outputs' handles are taken over here."""

    def __init__(self, path: Path, models: int = 1):
        c = ctypes
        link = _fresh_name(Path(path))
        ptr, size = c.c_void_p, c.c_size_t
        self._handle = ptr()
        try:          # (by its resolved name, which _fresh_name keeps: a link retargeted, or a chdir, is another file)
            try:
                self._lib = lib = c.CDLL(str(link or Path(path).resolve()))
            except OSError as e:                    # (named by the user's path, not the link's)
                raise OSError(str(e).replace(str(link), str(path)) if link else str(e)) from None
            for name, args in (("CreateWithDevice", [c.POINTER(ptr), size, c.c_char_p, c.c_char_p]),
                               ("Run", [ptr, c.POINTER(ptr), size, c.POINTER(ptr), size, ptr, ptr]),
                               ("GetNumInputs", [ptr, c.POINTER(size)]), ("GetNumOutputs", [ptr, c.POINTER(size)]),
                               ("Delete", [ptr])):
                fn = getattr(lib, "AOTInductorModelContainer" + name)
                fn.argtypes, fn.restype = args, c.c_int32
            # (the weights are mapped from the library's file as the container is made)
            self._check(lib.AOTInductorModelContainerCreateWithDevice(c.byref(self._handle), models, b"cpu", None),
                        "load")
        finally:
            if link is not None:
                shutil.rmtree(link.parent, ignore_errors=True)
        n, m = size(), size()
        self._check(lib.AOTInductorModelContainerGetNumInputs(self._handle, c.byref(n)), "load")
        self._check(lib.AOTInductorModelContainerGetNumOutputs(self._handle, c.byref(m)), "load")
        self.inputs, self.outputs = n.value, m.value
        api = c.pythonapi
        self._pointer, self._capsule = api.PyCapsule_GetPointer, api.PyCapsule_New
        self._pointer.restype, self._pointer.argtypes = ptr, [c.py_object, c.c_char_p]
        self._capsule.restype, self._capsule.argtypes = c.py_object, [ptr, c.c_char_p, ptr]
        self._ptrs = c.c_void_p

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            last = getattr(self._lib, "AOTInductorGetLastError", None)     # (libraries of recent PyTorch)
            if last is not None:
                last.restype = ctypes.c_char_p
            said = (last() if last is not None else None) or b"error code %d" % code
            raise FlowARError(f"the compiled library to {what}", said.decode(errors="replace")[:300],
                              "re-export the directory with this PyTorch (flowar-export)")

    def __call__(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(tensors) != self.inputs:           # (the library would abort the process)
            raise FlowARError(f"{self.inputs} input tensors", str(len(tensors)), "call it with the stage's inputs")
        handles = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(tensors)
        ins = (self._ptrs * len(handles))(*(self._pointer(h, None) for h in handles))
        outs = (self._ptrs * self.outputs)()
        self._check(self._lib.AOTInductorModelContainerRun(self._handle, ins, len(handles), outs, self.outputs,
                                                           None, None), "run")
        return torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(
            [self._capsule(outs[i], None, None) for i in range(self.outputs)])

    def close(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.AOTInductorModelContainerDelete(self._handle)
            self._handle = None

    __del__ = close
