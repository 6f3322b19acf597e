"""Shared test fixtures.

The official-code fixtures live in ``../shared/fixtures/official`` beside the repository, or
wherever ``FLOWAR_FIXTURES`` points. Where they are absent (a clone outside this team) the
tests that need them skip with the reason; with ``FLOWAR_REQUIRE_FIXTURES=1`` (set by
``.ci/run``) their absence is a failure instead.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

# Under pytest -n 2 (the README's test command) each worker has a core of its own: most of the
# suite's time is single-threaded Python (the ONNX exporter, imports, Ray), and two workers with
# two threads each on two cores ran 1.6x slower than one (spinning thread pools). Tests that are
# about several cores ask for their threads explicitly. Pinned before torch is imported: GNU
# OpenMP counts the cores it may use once, when it loads, and spins at barriers for long only
# where a team has no more threads than that count; pinned after, a team of two threads on the
# one core spun away each other's time slices (a two-lane test: 53 s instead of 3 s).
if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):
    _cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {_cores[int(os.environ["PYTEST_XDIST_WORKER"][2:]) % len(_cores)]})

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("FLOWAR_FIXTURES", ROOT.parent / "shared" / "fixtures" / "official"))
torch.set_num_threads(min(2, len(os.sched_getaffinity(0))))


# Seconds of test time per file (setup included) on a 2-core AVX2-only AMD EPYC, 2026-12-03
# (`--durations=0`), for the files that take more than ~20 s. Under `-n 2 --dist loadfile` a worker
# takes the next file when it runs dry; xdist orders files by their number of tests, which left one
# worker 783 s and the other 610 s. Heaviest first (longest-processing-time order) evens them; the
# figures need only be roughly right, and a file not named here runs after these, in its order.
HEAVY_FILES = {"test_distributed.py": 288, "test_export.py": 165, "test_precision.py": 158, "test_parity.py": 138,
               "test_large_weights.py": 115, "test_quality.py": 90, "test_default_model.py": 87,
               "test_faults.py": 73, "test_bench.py": 72, "test_trt_build.py": 72, "test_serving.py": 69,
               "test_cli.py": 54, "test_sampler.py": 26, "test_train.py": 26, "test_compiled.py": 21}


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False          # keep the order below (xdist would sort by test count)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -HEAVY_FILES.get(item.path.name, 0))    # stable: a file's tests keep their order


def invoke(cmd, args: list[str]):
    """A command run in this process (click's runner) as a subprocess.CompletedProcess: its exit code,
    stdout and stderr (for tests about what a command says; its installed program's exits: tests/test_cli.py)."""
    import subprocess
    from click.testing import CliRunner
    r = CliRunner().invoke(cmd, args)
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not (FIXTURES / "tiny_v1.safetensors").is_file():
        msg = f"official FlowAR fixtures not found at {FIXTURES} (set FLOWAR_FIXTURES to their folder)"
        if os.environ.get("FLOWAR_REQUIRE_FIXTURES") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return FIXTURES


@functools.lru_cache(maxsize=None)
def _official(fixtures_dir: Path, name: str):
    from parity import load_official
    return load_official(fixtures_dir, name)


@pytest.fixture(scope="session", params=["tiny_v1", "tiny_v2"])
def official(request, fixtures_dir):
    """Both official recordings of a tiny fixture with our float32 and float64 modules (tests/parity.py)."""
    return _official(fixtures_dir, request.param)


@pytest.fixture(scope="session")
def tiny(official):
    """(name, model, io) for each official tiny fixture (io: the AVX2 recording, inputs included)."""
    return official.name, official.model, official.a


@pytest.fixture(scope="session")
def official_v1(fixtures_dir):
    return _official(fixtures_dir, "tiny_v1")


@pytest.fixture(scope="session")
def tiny_v1(fixtures_dir):
    o = _official(fixtures_dir, "tiny_v1")
    return o.model, o.a


@pytest.fixture(scope="session")
def official_tokens(fixtures_dir):
    """(name, run) -> the end-to-end token check of eager sampling (computed once per session).

    Other paths (CLI, engines, CUDA-graph runner) are held to the same bound: ``assert_tokens``.
    """
    from parity import token_check
    cache = {}

    def get(name: str, run: str = "sample25"):
        if (name, run) not in cache:
            cache[name, run] = token_check(_official(fixtures_dir, name), run)
        return cache[name, run]
    return get


@pytest.fixture(scope="session")
def assert_tokens(fixtures_dir, official_tokens):
    """Asserts that tokens from any path are within the float32-noise bound of both official recordings."""
    from parity import max_abs

    def check(tokens, name: str = "tiny_v1", run: str = "sample25") -> None:
        o = _official(fixtures_dir, name)
        bound, _ = official_tokens(name, run)
        key = f"{run}.tokens"
        err = max(max_abs(tokens, o.a[key]), max_abs(tokens, o.b[key]))
        assert err <= bound.tol, f"{name} {run}: |tokens - official| {err:.2e} above the float32-noise bound ({bound})"
    return check


@pytest.fixture(scope="session")
def bench():
    """bench/latency.py as a module (the bench is a folder of scripts, not a package: its folder
    goes on sys.path, as it does when the script runs)."""
    import sys
    folder = str(Path(__file__).resolve().parents[1] / "bench")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import latency
    return latency


DEFAULT_CKPT = ROOT / "models" / "default" / "flowar.safetensors"
DEFAULT_VAE = ROOT / "models" / "default" / "vae"


@pytest.fixture(scope="session")
def default_auto_engines(tmp_path_factory) -> Path:
    """The shipped default model exported with ``--precision auto`` (max batch 4): the directory
    the pipeline, serve and bulk tests open, so they run what auto chose. Exported once per test run:
    the first xdist worker to need it builds it under a lock, the other opens the same directory
    (the tests only read it; the export writes it whole or not at all)."""
    import fcntl
    from flowar.commands.build import build_engine_dir
    base = _run_folder(tmp_path_factory)
    d = base / "default-auto" / "engines"
    with open(base / "default-auto.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (d / "manifest.json").is_file():
            d.parent.mkdir(exist_ok=True)
            build_engine_dir(DEFAULT_CKPT, d, vae_path=DEFAULT_VAE, max_batch=4, verify=False, precision="auto",
                             auto_candidates=("ort-fp32", "torch-fp32"))
    return d


def _run_folder(tmp_path_factory) -> Path:
    """A folder for this whole test run: shared by the xdist workers (their base folders' parent)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _code_digest(h) -> None:
    """Feed ``h`` the code that builds graphs as it is bound now: every function and method of the
    flowar.model and flowar.export modules (a file edited, or a function monkeypatched by a
    test, changes it). The same bytes in every process (nested code objects by their contents, not
    their addresses), so the suite's workers share one memo. Every module of the two packages is
    imported first: hashing only those a test happened to have loaded gave the same graph several
    keys (the default model was exported twice per run, tiny_v1 three times). Module globals named
    ``__*`` are not the modules' code: torch.compile leaves its compiled functions there, named by a
    uuid (after the bench's compile test, a worker's keys all changed: 7 stages exported again)."""
    import importlib
    import inspect
    import pkgutil
    import sys

    import flowar.export
    import flowar.model
    for pkg in (flowar.model, flowar.export):
        for info in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
            importlib.import_module(info.name)

    def code_bytes(code) -> bytes:
        consts = [code_bytes(c) if inspect.iscode(c) else repr(sorted(map(repr, c)) if isinstance(c, frozenset) else c)
                  .encode() for c in code.co_consts]         # (a set's order changes with the hash seed)
        return code.co_code + b"\0".join(consts) + repr(code.co_names).encode()

    for name in sorted(n for n in sys.modules if n.startswith(("flowar.model", "flowar.export"))):
        for attr, obj in sorted(vars(sys.modules[name]).items()):
            if attr.startswith("__"):     # not the modules' own: torch.compile's __compiled_fn_<n>_<uuid>, __resume_at_
                continue
            members = [obj] + ([v for _, v in sorted(vars(obj).items())] if inspect.isclass(obj) else [])
            for f in members:
                f = getattr(f, "__func__", f)
                code = getattr(f, "__code__", None)
                if code is not None:
                    h.update(f"{name}.{attr}.{getattr(f, '__qualname__', '')}".encode() + code_bytes(code))


@pytest.fixture(scope="session", autouse=True)
def export_memo(tmp_path_factory):
    """Within this test run (every xdist worker: the files are shared on disk, published by an
    atomic rename, one export per key at a time under a lock), a stage exported again with the same
    inputs reuses the first export's files: the ONNX exporter takes ~9 s per tiny stage and the
    suite exports the same fixtures (tiny_v1, tiny_v2, the default model) many times. The key is everything the graph
    is made from: the module's class, its parameters and every buffer (persistent or not, hashed),
    the stage spec (names, dynamic axes, shapes), the config (not the row limit: no graph holds it), the
    precision, the code that builds graphs (every function and method of flowar.model and
    flowar.export as bound at the time, so an edit or a test's monkeypatch is a new key), and the
    side of the external-data threshold it falls on (both sides kept: a stage that moves across it
    is exported again once); the exporter is deterministic for those (tests/test_export.py checks it, uncached).
    Exports in subprocesses (the CLI's kill -9, the 2 GB test, bulk) and without weights are real
    every time. FLOWAR_EXPORT_MEMO=0 turns it off; FLOWAR_EXPORT_MEMO_LOG=FILE logs each hit and miss."""
    import fcntl
    import hashlib
    import shutil
    import time
    import types

    import flowar.export.onnx_export as onnx_export
    if os.environ.get("FLOWAR_EXPORT_MEMO") == "0":
        yield None
        return
    real = onnx_export.export_stage
    store = _run_folder(tmp_path_factory) / "export-memo"
    store.mkdir(exist_ok=True)

    parts: dict[str, str] = {}            # key -> its three parts' digests (the log's, to see what differed)

    def key(spec, module, config, path, max_rows, precision) -> str:
        # (not the row limit: no graph holds it, tests/test_export.py checks; the others come from the config)
        def meta(h):
            h.update(repr((type(module).__module__, type(module).__qualname__, spec.name, spec.inputs, spec.outputs,
                           sorted(spec.dynamic.items()), sorted(spec.templates.items()), path.name, config.to_json(),
                           precision, onnx_export.OPSET)).encode())

        def tensors(h):
            for n, t in [*module.named_parameters(), *module.named_buffers()]:
                t = t.detach().contiguous().cpu()
                h.update(f"{n}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

        digests = []
        for feed in (meta, _code_digest, tensors):
            h = hashlib.blake2b(digest_size=16)
            feed(h)
            digests.append(h.hexdigest())
        k = hashlib.blake2b("".join(digests).encode(), digest_size=16).hexdigest()
        parts[k] = " ".join(d[:8] for d in digests)
        return k

    def stored(k: str):
        """The stored export of key ``k`` that falls on this side of the external-data threshold:
        one file (graph with weights) or two (graph and external data); both may be stored (a test
        that lowers the threshold exports the same stage again, and overwrote the other before)."""
        external = onnx_export.EXTERNAL_DATA_BYTES
        for n in (1, 2):
            files = sorted((store / f"{k}-{n}").iterdir()) if (store / f"{k}-{n}").is_dir() else []
            size = sum(f.stat().st_size for f in files)
            # one file holds every weight, so its size bounds them: at most the threshold, one file
            # again; two files: their weights are about their bytes (near the line: export again)
            if files and (n == 1 and size <= external or n == 2 and size > external + (1 << 20)):
                return files
        return None

    def log(k: str, what: str, t0: float, spec, precision: str, max_rows: int) -> None:
        if os.environ.get("FLOWAR_EXPORT_MEMO_LOG"):          # one line per stage export: which test, hit or miss
            with open(os.environ["FLOWAR_EXPORT_MEMO_LOG"], "a") as f:
                f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?')}\t{k[:8]}\t{what}\t{time.time() - t0:.1f} s"
                        f"\t{spec.name}\t{precision}\t{max_rows} rows\tpid {os.getpid()}\t"
                        f"meta code tensors {parts.get(k, '?')}\n")

    def export_stage(spec, module, config, path, max_rows, precision="fp32", weights=True):
        if not weights or any(t.is_meta for t in module.state_dict().values()):
            return real(spec, module, config, path, max_rows, precision, weights)
        k = key(spec, module, config, path, max_rows, precision)
        t0 = time.time()
        with open(store / f"{k}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)            # another worker exporting the same stage: wait for it
            hit = stored(k)
            if hit is not None:
                for f in hit:
                    shutil.copy2(f, path.with_name(f.name))
                log(k, "hit", t0, spec, precision, max_rows)
                return [path.with_name(f.name) for f in hit]
            files = real(spec, module, config, path, max_rows, precision, weights)
            part = store / f"{k}.part{os.getpid()}"
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir()
            for f in files:
                shutil.copy2(f, part / f.name)
            shutil.rmtree(store / f"{k}-{len(files)}", ignore_errors=True)
            os.rename(part, store / f"{k}-{len(files)}")        # whole or absent for any reader
            log(k, "miss", t0, spec, precision, max_rows)
            return files

    onnx_export.export_stage = export_stage
    yield types.SimpleNamespace(real=real, key=key)
    onnx_export.export_stage = real
