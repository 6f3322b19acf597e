"""The lean runtime: static buffers, the engine interface, and parity with the eager stages."""

from pathlib import Path

import numpy as np
import pytest
import torch

from flowar.export.specs import stage_specs
from flowar.runtime.stages import torch_engine_stages
from flowar.sampling.sampler import injected_noise, sample
from flowar.sampling.schedule import build_schedule
from flowar.sampling.eager import EagerStages


class Recording:
    """Wraps an engine and records the output addresses it was handed."""

    def __init__(self, inner):
        self.inner, self.name, self.seen = inner, inner.name, []

    def infer(self, inputs, outputs, profile=0):
        self.seen.append((profile, tuple(inputs.get("x", next(iter(inputs.values()))).shape),
                          tuple(t.data_ptr() for t in outputs.values())))
        self.inner.infer(inputs, outputs, profile)


def test_static_storage_holds_each_tensor_once_at_its_largest(tiny_v1):
    model, _ = tiny_v1
    c = model.config
    st = torch_engine_stages(model, 2, "cpu")
    assert st.storage["ar.semantics"].numel() == 4 * c.seq_len * c.ar_width
    assert st.storage["head_prep.c"].numel() == 4 * 256 * c.head_width
    assert st.storage["velocity.x"].numel() == 4 * 256 * c.latent_channels
    assert st.storage["velocity.t"].numel() == 4
    assert "velocity.c" not in st.storage            # the velocity reads head_prep's outputs in place
    out = st._call("ar", 1, 2, labels=torch.tensor([3, 7]), tokens=torch.zeros(2, 5, c.latent_channels))
    v = out["semantics"]
    assert v.shape == (2, 5, c.ar_width) and v.data_ptr() == st.storage["ar.semantics"].data_ptr() and v.is_contiguous()


def test_engine_stages_match_the_eager_stages_and_never_reallocate(tiny_v1, assert_tokens):
    model, io = tiny_v1
    st = torch_engine_stages(model, 2, "cpu")
    rec = Recording(st.engines["velocity"])
    st.engines["velocity"] = rec
    before = st.addresses()
    noise = injected_noise([io[f"sample25.noise{k}"] for k in range(5)])
    sched = build_schedule(25, 4.3, 0.9, 5)
    with torch.no_grad():
        ours, _ = sample(st, model.config, sched, torch.tensor([3, 7]), noise)
        ref, _ = sample(EagerStages(model), model.config, sched, torch.tensor([3, 7]),
                        injected_noise([io[f"sample25.noise{k}"] for k in range(5)]))
    assert_tokens(ours)
    assert_tokens(ref)
    assert st.addresses() == before
    # every velocity call of a (scale, rows) wrote to the same address
    by_shape = {}
    for profile, shape, ptrs in rec.seen:
        by_shape.setdefault((profile, shape), set()).add(ptrs)
    assert len(rec.seen) == 120 and all(len(p) == 1 for p in by_shape.values())


def test_batch_above_the_engines_max_is_refused(tiny_v1):
    from flowar.errors import FlowARError
    model, _ = tiny_v1
    st = torch_engine_stages(model, 2, "cpu")
    with pytest.raises(FlowARError, match=r"at most 4 AR rows per batch \(2 samples.*got 6 rows"):
        st.start(torch.tensor([1, 2, 3, 1000, 1000, 1000]))
    with pytest.raises(FlowARError, match="got 5 rows"):          # without guidance: 5 rows, not "2" (5 // 2)
        st.start(torch.tensor([1, 2, 3, 4, 5]))


def test_labels_outside_the_model_are_refused_before_sampling(default_auto_engines):
    """Runtime.sample (and every path through run_sampling) takes class ids of the model: -1 and
    num_classes were sampled silently as the null class (a graph's gather wraps -1 and reads row
    num_classes), 42 ended in the engine's traceback and [] in torch.cat's. Each is one line now;
    NumPy integers are ids."""
    from flowar.errors import FlowARError
    from flowar.runtime.runtime import Runtime
    rt = Runtime.open(default_auto_engines)
    try:
        for bad in ([-1], [rt.config.num_classes], [42], [], [True], ["cat"]):
            with pytest.raises(FlowARError, match=f"each in 0..{rt.config.num_classes - 1}"):
                rt.sample(bad, rt.schedule(), decode=False)
        assert rt.sample([np.int64(3)], rt.schedule(), decode=False).tokens.shape[0] == 1
        # a NumPy seed is one seed (it was 'not iterable'); a str is none (it was one seed per character)
        five = rt.sample([3, 4], rt.schedule(), seed=5, decode=False).tokens
        assert torch.equal(rt.sample([3, 4], rt.schedule(), seed=np.int64(5), decode=False).tokens, five)
        for bad in ("12", b"12", 1.5):
            with pytest.raises(FlowARError, match="seed an int, or one int per image"):
                rt.sample([3, 4], rt.schedule(), seed=bad, decode=False)
    finally:
        rt.close()


def test_a_batch_above_the_limit_is_told_the_fix_of_its_source(default_auto_engines):
    """Over an engine directory's max batch: re-export with a larger one; over a checkpoint's CUDA-graph
    limit (GRAPH_BATCH, set here by hand: no GPU) the fix is --no-cuda-graphs (it said re-export)."""
    from conftest import DEFAULT_CKPT
    from flowar.errors import FlowARError
    from flowar.runtime.runtime import Runtime
    for path, fix in ((default_auto_engines, "re-export with --max-batch 17"), (DEFAULT_CKPT, "--no-cuda-graphs")):
        with Runtime.open(path) as rt:
            rt.max_batch = 16 if rt.manifest is None else rt.max_batch
            with pytest.raises(FlowARError, match=fix):
                rt.sample([1] * 17, rt.schedule(), batch_size=17, decode=False)



def test_eager_sampling_takes_a_batch_that_fits_in_memory_and_a_given_one_that_does_not_is_one_line(monkeypatch):
    """A checkpoint samples all at once by default: flowar-run --ckpt --n-per-class 10000 (FlowAR-S) grew
    to 23 GB and was killed (another process with it), since only the finished images were counted.
    With little memory available the default batch is cut to one that fits (the images of all at
    once, to float rounding: 40 dB, the suite's bound across batch sizes), and a --batch given that
    does not fit is one line naming one that does, which then runs."""
    import re

    from conftest import DEFAULT_CKPT, DEFAULT_VAE
    from flowar.errors import FlowARError
    from flowar.io import memory
    from flowar.io.images import psnr
    from flowar.runtime.runtime import Runtime
    labels = [1, 2, 3, 4, 5, 6]
    with Runtime.open(DEFAULT_CKPT, vae=DEFAULT_VAE) as rt:
        scales = rt.config.n_scales
        whole = rt.sample(labels, rt.schedule(), seed=3)
        assert len(whole.traces) == scales                      # (one batch: a trace per scale)
        monkeypatch.setattr(memory, "available_bytes", lambda: 8 << 20)     # 8 MiB: a few of the tiny model's samples
        cut = rt.sample(labels, rt.schedule(), seed=3)
        assert len(cut.traces) > scales and len(cut.traces) % scales == 0, len(cut.traces)
        assert min(psnr(cut.images[i:i + 1], whole.images[i:i + 1]) for i in range(6)) >= 40.0
        with pytest.raises(FlowARError, match=r"--batch 6: about .* GB with the results, and 0.0 GB available") as e:
            rt.sample(labels, rt.schedule(), seed=3, batch_size=6)
        fits = int(re.search(r"Fix: pass --batch (\d+) or less", str(e.value)).group(1))
        assert 1 <= fits < 6
        assert rt.sample(labels, rt.schedule(), seed=3, batch_size=fits).images.shape[0] == 6
        # a --batch above the request is the request (--labels 0,1 --batch 64 was refused for 64 samples' memory)
        monkeypatch.setattr(memory, "available_bytes", lambda: 64 << 20)
        assert len(rt.sample(labels, rt.schedule(), seed=3, batch_size=64).traces) == scales
        assert rt.sample(iter(labels), rt.schedule(), seed=3, decode=False).tokens.shape[0] == 6   # (an iterator)
        # not even one at a time: what would help, not "--batch 1" again
        monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
        with pytest.raises(FlowARError, match=r"one sample at a time at least; got 6 samples: .* Fix: sample fewer labels"):
            rt.sample(labels, rt.schedule(), seed=3, batch_size=1)


def test_images_need_a_decoder_whose_fix_follows_the_source_and_give_the_side_it_makes(default_auto_engines,
                                                                                       tmp_path, monkeypatch):
    """What a runtime was opened from is said by its opener: images from a tokens-only engine directory
    are refused with "re-export with --vae", from a checkpoint opened without a VAE with "pass --vae"
    and the VAE it records it was trained with, where that is found (its tokens still come); with a
    decoder, the side of its images is the side they have."""
    from conftest import DEFAULT_CKPT, DEFAULT_VAE
    from flowar.commands.build import build_engine_dir
    from flowar.errors import FlowARError
    from flowar.runtime.runtime import Runtime
    from flowar.sampling.schedule import Settings
    build_engine_dir(DEFAULT_CKPT, tmp_path / "tokens", max_batch=4, verify=False)
    short = Settings(steps=4)
    import re
    import shutil
    (tmp_path / "moved").mkdir()
    shutil.copy(DEFAULT_CKPT, tmp_path / "moved" / "flowar.safetensors")       # (its VAE not beside it)
    monkeypatch.chdir(tmp_path)                 # (the recorded models/default/vae is not found from here)
    for path, fix in ((tmp_path / "tokens", "re-export with --vae"),
                      (DEFAULT_CKPT, f"pass --vae {Path(DEFAULT_VAE).resolve()} (the VAE it was trained with), or "
                                     "ask for tokens only (--save-tokens without --out or --save-images)"),   # (it said
                                     # "(--save-tokens)" to one who had passed it, beside --save-images)
                      (tmp_path / "moved" / "flowar.safetensors",
                       "pass --vae (it was trained with models/default/vae, not found from here), or")):
        with Runtime.open(path) as rt:
            assert rt.image_size is None and not rt.decodes
            with pytest.raises(FlowARError, match=re.escape(fix)):
                rt.sample([1], rt.schedule(short))
            assert rt.sample([1], rt.schedule(short), decode=False).tokens.shape[0] == 1
    for path, vae in ((default_auto_engines, None), (DEFAULT_CKPT, DEFAULT_VAE)):
        with Runtime.open(path, vae=vae) as rt:
            images = rt.sample([1], rt.schedule(short)).images
            assert rt.image_size == images.shape[-1] == images.shape[-2] == 32, (path, rt.image_size)

# ---- ONNX Runtime on the CPU: row blocks and thread plans ---------------------------------------

def test_plan_call_splits_rows_into_contiguous_blocks_one_per_core():
    from flowar.engines.ort import plan_call
    assert plan_call(16, 64, 2) == ((0, 8, 1), (8, 16, 1))
    assert plan_call(3, 64, 2) == ((0, 2, 1), (2, 3, 1))
    assert plan_call(2, 256, 16) == ((0, 1, 8), (1, 2, 8))          # cores shared out among blocks
    assert plan_call(5, 4, 4) == ((0, 2, 1), (2, 3, 1), (3, 4, 1), (4, 5, 1))
    assert plan_call(2, 4, 2, shard_min=8) == ((0, 2, 1),)           # overhead-bound: one thread
    assert plan_call(1, 64, 2, single_max=64) == ((0, 1, 1),)
    assert plan_call(1, 65, 2, single_max=64) == ((0, 1, 2),)
    assert plan_call(7, 64, 1) == ((0, 7, 1),)
    for rows in range(1, 20):
        for threads in range(1, 9):
            blocks = plan_call(rows, 16, threads)
            assert [b for b, _, _ in blocks] == [0] + [e for _, e, _ in blocks[:-1]]
            assert blocks[-1][1] == rows and all(e > b for b, e, _ in blocks)
            assert 1 <= sum(t for _, _, t in blocks) <= max(threads, 1)


def test_the_velocity_split_limits_are_the_flops_they_claim():
    """shard_min / single_max are rows x tokens of a velocity call of ~20 MFLOP / ~200 MFLOP:
    checked against torch's FLOP counter on the real head, for a narrow and a wide model."""
    from torch.utils.flop_counter import FlopCounterMode
    from flowar.config import get_preset
    from flowar.engines.ort import split_limits
    from flowar.export.specs import sample_inputs, stage_specs
    from flowar.model.ar import FlowAR
    for preset in ("tiny", "flowar-s"):
        c = get_preset(preset)
        spec = stage_specs(c)["velocity"]
        with torch.device("meta"):
            module = spec.module(FlowAR(c))
        k = c.n_scales - 1
        tokens = c.tokens_per_scale[k]
        ins = {n: t.to("meta") for n, t in sample_inputs(spec, c, k, 2, torch.Generator()).items()}
        with FlopCounterMode(display=False) as fc:
            module(*(ins[n] for n in spec.inputs))
        per_row_token = fc.get_total_flops() / (2 * tokens)
        shard_min, single_max = split_limits("velocity", c)
        # the largest rows x tokens at or under the claim; the limits count GEMMs only (attention's
        # token x token products add ~25 % at 16x16), so within 1.5x
        for limit, claimed in ((shard_min, 2e7), (single_max, 2e8)):
            assert limit * per_row_token <= claimed * 1.5 and (limit + 1) * per_row_token >= claimed / 1.5, \
                (preset, limit, per_row_token, claimed)


def test_worker_errors_reach_the_caller_after_every_block_finished():
    """An ONNX Runtime call run as row blocks: the first block on the caller, the others on the
    pool; an error in one is raised only after every block has finished."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor
    from flowar.runtime.engines import OrtEngine
    done = []
    eng = OrtEngine("velocity", None, "", frozenset())
    with ThreadPoolExecutor(2) as pool:
        eng._pool = pool

        def fail():
            raise ValueError("block 2 failed")

        def slow():
            time.sleep(0.05)
            done.append(2)
        eng._runs = {(): [lambda: done.append(0), fail, slow]}          # the bound blocks of a call without tensors
        with pytest.raises(ValueError, match="block 2 failed"):
            eng.infer({}, {})
        assert sorted(done) == [0, 2]                                  # the slow block finished first
        where = []
        eng._runs = {(): [lambda: where.append(threading.current_thread()), lambda: done.append(4)]}
        eng.infer({}, {})
        assert sorted(done) == [0, 2, 4] and where == [threading.main_thread()]   # the first on the caller


def test_the_optimized_graph_cache_is_written_whole_reused_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    """ONNX Runtime's optimized copy of a graph (cached per engine directory, a folder: the graph and
    its weights in a file ONNX Runtime maps): written under another name and renamed into place, so
    a process opening the directory meanwhile never reads it half written; opened without optimizing
    again the next time, and then without reading the graph itself while the graph's file keeps the
    size and time recorded beside the copy (once they change, the graph is read and checked again,
    and the copy kept); hashed again only where its files changed; rebuilt when damaged, truncated,
    missing a file or with one weight changed (its files no longer hash to what was recorded). The
    outputs every time against numpy's X @ W + b."""
    import hashlib
    import json
    import os
    import shutil
    import subprocess

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    import flowar.engines.ort as ort_mod
    import flowar.export.manifest as manifest_mod
    from flowar.engines.ort import create_session
    rng = np.random.default_rng(0)
    # (W 8 KB: past the 1 KB from which the copy's initializers go to its second file; b stays inside)
    W, b = rng.standard_normal((64, 32)).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
                          "affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
                          [numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")])
    graph = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    sha = hashlib.sha256(graph).hexdigest()
    x = rng.standard_normal((3, 64)).astype(np.float32)
    cache_dir = tmp_path / ".ort-cache"
    made = []                               # (model opened, optimization level, optimized copy's path, copies there)
    real = ort.InferenceSession

    def spy(model, so, providers):
        session = real(model, so, providers=providers)
        made.append((model if isinstance(model, str) else "bytes", so.graph_optimization_level,
                     so.optimized_model_filepath, [p.name for p in cache_dir.glob("*.opt")]))
        return session
    monkeypatch.setattr(ort, "InferenceSession", spy)

    reads = []                              # the graph is read (by the caller's function) only to build the cache

    def read():
        reads.append(1)
        return graph

    src = tmp_path / "affine.onnx"          # the graph's file, whose state is recorded beside the copy
    src.write_bytes(graph)

    def check():
        y = create_session(read, sha, "CPUExecutionProvider", 1, cache_dir, src).run(None, {"x": x})[0]
        np.testing.assert_allclose(y, x @ W + b, rtol=1e-5, atol=1e-5)
        copies = [f for f in cache_dir.iterdir() if f.name not in planted]
        assert len(copies) == 1 and copies[0].name.endswith(".opt") and copies[0].is_dir(), copies   # no part left
        copy = copies[0]
        assert sorted(f.name for f in copy.iterdir()) == ["graph.onnx", "graph.onnx.data", "record.json"]
        onnx.checker.check_model(onnx.load(str(copy / "graph.onnx")))                  # whole, its weights outside:
        assert data_of(copy) == W.tobytes()
        recorded = json.loads((copy / "record.json").read_text())
        st = {n: (copy / n).stat() for n in ("graph.onnx", "graph.onnx.data")}
        assert recorded == {"files": {n: hashlib.sha256((copy / n).read_bytes()).hexdigest() for n in st},
                            "source": [src.stat().st_size, src.stat().st_mtime_ns],
                            "state": {n: [s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns]
                                      for n, s in st.items()}}
        return copy

    def data_of(copy):                      # W's bytes as the copy's second file holds them
        (init,) = [t for t in onnx.load(str(copy / "graph.onnx"), load_external_data=False).graph.initializer
                   if t.name == "W"]
        where = {e.key: e.value for e in init.external_data}
        assert where["location"] == "graph.onnx.data"
        at = int(where.get("offset", 0))
        return (copy / "graph.onnx.data").read_bytes()[at: at + int(where["length"])]

    def damage(path, data: bytes) -> None:  # as another program would: a new file in its place
        tmp = path.with_name("new")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    planted = set()                         # the part of a live writer, planted below: not the cache's
    from flowar.engines.cpu import cpu_kind
    cache_dir.mkdir()
    name = f"{sha[:16]}.ort{ort.__version__}.{'-'.join(cpu_kind(honour_env=False)['flags']) or 'x'}.opt"
    legacy = cache_dir / (name + ".onnx")   # (earlier versions' single-file copy of this graph, as they named it)
    legacy.write_bytes(b"old copy")
    legacy.with_name(legacy.name + ".json").write_text("{}")
    cache = check()
    assert cache.name == name and not legacy.exists()
    assert len(made) == 1 and made[0][0] == "bytes" and made[0][1] == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert Path(made[0][2]).parent != cache and made[0][3] == [], made   # written elsewhere: not at the cache's name
    assert len(reads) == 1
    made.clear()
    copy_graph = str(cache / "graph.onnx")
    assert check() == cache and made == [(copy_graph, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "", [cache.name])]
    assert len(reads) == 1                  # opened from the cache alone
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))      # the graph's file touched:
    made.clear()
    assert check() == cache and made == [(copy_graph, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "", [cache.name])]
    assert len(reads) == 2                  # read and checked again, the copy kept (and the new state recorded:)
    assert check() == cache and len(reads) == 2
    # a later process (this one's memo of copies found whole forgotten) reads the copy again only where
    # its files changed since they were last found whole: FlowAR-S's fresh open hashed 840 MB in 1.4 s of 3.0
    hashed, real_sha = [], manifest_mod.sha256_file
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda path: hashed.append(Path(path).name) or real_sha(path))
    ort_mod._WHOLE.clear()
    assert check() == cache and hashed == []
    os.chmod(cache / "graph.onnx.data", 0o600)      # (its change time moves: whatever else might have, it is hashed again)
    ort_mod._WHOLE.clear()
    assert check() == cache and hashed == ["graph.onnx", "graph.onnx.data"] and len(reads) == 2
    ort_mod._WHOLE.clear()
    assert check() == cache and len(hashed) == 2    # (and its new state recorded)
    monkeypatch.setattr(manifest_mod, "sha256_file", real_sha)
    # the graph's file copied with its times (cp -a, rsync -a, an image layer: another inode) or its
    # modes changed (another change time): not read again, the copy stands for the graph's hash (every
    # graph was read on every open of a copied directory by a user who could not record it again)
    os.chmod(src, 0o600)
    shutil.copy2(src, tmp_path / "moved.onnx")
    os.replace(tmp_path / "moved.onnx", src)
    assert check() == cache and len(reads) == 2
    data = (cache / "graph.onnx.data").read_bytes()
    at = data.index(W.tobytes()) + 3        # one weight of the copy changed (W[0, 0]'s sign): it would still load
    damage(cache / "graph.onnx.data", data[:at] + bytes([data[at] ^ 0x80]) + data[at + 1:])
    made.clear()
    assert check() == cache and [m[0] for m in made] == ["bytes"] and len(reads) == 3    # rebuilt from the graph
    damage(cache / "graph.onnx", (cache / "graph.onnx").read_bytes()[:200])             # truncated: rebuilt too
    assert check() == cache and len(reads) == 4
    (cache / "graph.onnx.data").unlink()                                               # a file gone: rebuilt
    assert check() == cache and len(reads) == 5
    (cache / "record.json").write_text("{")                                            # its record damaged: rebuilt
    assert check() == cache and len(reads) == 6
    # beside it, the parts of a writer that died (removed when the cache is written again) and of one
    # that is writing now (this process, another thread: left alone)
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead, live = (cache.with_name(f"{cache.name}.{pid}-7.part") for pid in (gone.pid, os.getpid()))
    for part in (dead, live):
        part.mkdir()
        (part / "graph.onnx").write_bytes(b"half a graph")
    planted.add(live.name)
    shutil.rmtree(cache)
    made.clear()
    assert check() == cache and [m[0] for m in made] == ["bytes"] and len(reads) == 7
    assert not dead.exists() and (live / "graph.onnx").read_bytes() == b"half a graph"
    # a cache folder that is a symbolic link is not used: nothing read or written where it points
    outside = tmp_path / "outside"
    outside.mkdir()
    linked = tmp_path / "linked"
    linked.symlink_to(outside)
    y = create_session(read, sha, "CPUExecutionProvider", 1, linked, src).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ W + b, rtol=1e-5, atol=1e-5)
    assert list(outside.iterdir()) == [] and len(reads) == 8
    # a read-only directory (a volume mounted ro, another user's): its whole cache is read, nothing
    # written (every open optimized every graph again: FlowAR-S opened in 10.6 s instead of 2.0)
    before = sorted(str(f.relative_to(cache_dir)) for f in cache_dir.rglob("*"))
    with monkeypatch.context() as mp:
        real_access = os.access
        mp.setattr(ort_mod.os, "access", lambda path, mode: not mode & os.W_OK and real_access(path, mode))
        made.clear()
        assert check() == cache and [m[:3] for m in made] == [(copy_graph, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "")]
        assert len(reads) == 8 and sorted(str(f.relative_to(cache_dir)) for f in cache_dir.rglob("*")) == before
        # ... and a cache it cannot read (another user's, mode 600; root reads every file, so its read
        # is made to fail as that user's does) is passed over: the graph is read, the cache kept
        def denied(path):
            if Path(path).parent == cache:
                raise PermissionError(13, "Permission denied", str(path))
            return real_sha(path)
        mp.setattr(manifest_mod, "sha256_file", denied)
        mp.setattr(ort_mod.os, "access", lambda path, mode: not mode & os.W_OK and Path(path).parent != cache)
        ort_mod._WHOLE.clear()               # (this process found it whole before: it would not be read again)
        y = create_session(read, sha, "CPUExecutionProvider", 1, cache_dir, src).run(None, {"x": x})[0]
        np.testing.assert_allclose(y, x @ W + b, rtol=1e-5, atol=1e-5)
        assert len(reads) == 9 and sorted(str(f.relative_to(cache_dir)) for f in cache_dir.rglob("*")) == before
        # ... and a cache folder this user may not even look into (another user's first open under umask 077
        # made it drwx------): the graph is read (it was "Permission denied" and no image for every other user)
        real_is_dir = Path.is_dir

        def untraversable(path):
            if path == cache:
                raise PermissionError(13, "Permission denied", str(path))
            return real_is_dir(path)
        mp.setattr(Path, "is_dir", untraversable)
        y = create_session(read, sha, "CPUExecutionProvider", 1, cache_dir, src).run(None, {"x": x})[0]
        np.testing.assert_allclose(y, x @ W + b, rtol=1e-5, atol=1e-5)
        assert len(reads) == 10
    assert sorted(str(f.relative_to(cache_dir)) for f in cache_dir.rglob("*")) == before
    # in a directory this user may write, a copy it may not read (another user's owner-only folder) is
    # neither used nor made again beside it on every open: the graph is read, nothing written
    real_read_text = Path.read_text
    with monkeypatch.context() as mp:
        def owner_only(path, *a, **k):
            if path.parent == cache:
                raise PermissionError(13, "Permission denied", str(path))
            return real_read_text(path, *a, **k)
        mp.setattr(Path, "read_text", owner_only)
        ort_mod._WHOLE.clear()
        made.clear()
        y = create_session(read, sha, "CPUExecutionProvider", 1, cache_dir, src).run(None, {"x": x})[0]
        np.testing.assert_allclose(y, x @ W + b, rtol=1e-5, atol=1e-5)
        assert [m[:3] for m in made] == [("bytes", ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "")] and len(reads) == 11
    assert sorted(str(f.relative_to(cache_dir)) for f in cache_dir.rglob("*")) == before
    # a copy that cannot be written (a full disk: ONNX Runtime's write fails) leaves a session all the same
    shutil.rmtree(cache)
    with monkeypatch.context() as mp:
        def full_disk(model, so, providers):
            if so.optimized_model_filepath:
                raise ort.capi.onnxruntime_pybind11_state.Fail("write failed: No space left on device")
            return spy(model, so, providers)
        mp.setattr(ort, "InferenceSession", full_disk)
        made.clear()
        y = create_session(read, sha, "CPUExecutionProvider", 1, cache_dir, src).run(None, {"x": x})[0]
        np.testing.assert_allclose(y, x @ W + b, rtol=1e-5, atol=1e-5)
        assert [m[:3] for m in made] == [("bytes", ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "")]
    assert [f for f in cache_dir.iterdir() if f.name not in planted] == []         # (no part left)
    # the cache is named by the flags ONNX Runtime dispatches on: the variables that make PyTorch and
    # oneDNN behave as an AVX2-only CPU do not reach it (an AVX-512 layout was stored as "avx2")
    names = []
    for emulate in (False, True):
        with monkeypatch.context() as mp:
            if emulate:
                mp.setenv("ATEN_CPU_CAPABILITY", "avx2")
                mp.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
            cpu_kind.cache_clear()
            other = tmp_path / f"cache{emulate}"
            create_session(graph, sha, "CPUExecutionProvider", 1, other, src)
            names.append([f.name for f in other.glob("*.opt")])
            assert emulate is False or "avx512f" not in cpu_kind()["flags"]      # (PyTorch's choices do see them)
    cpu_kind.cache_clear()
    assert names[0] == names[1] and len(names[0]) == 1, names


def test_opening_opens_the_sessions_the_first_image_splits_its_calls_onto(default_auto_engines, monkeypatch):
    """ONNX Runtime's calls of several rows run as row blocks on a second, one-thread session of the
    graph. Opening opens it for batch 1's shapes (FlowAR-S's first image paid 0.7 s for its AR's, 1 s
    in all), so the image opens none; its images are those of a runtime that opened it in the image."""
    import os

    import flowar.engines.ort as ort_mod
    from flowar.runtime.engines import OrtEngine
    from flowar.runtime.runtime import Runtime
    monkeypatch.setattr(os, "cpu_count", lambda: 4)              # (two threads, whatever the machine)
    made, real = [], ort_mod.create_session
    monkeypatch.setattr(ort_mod, "create_session", lambda *a, **k: made.append(a[3]) or real(*a, **k))
    with monkeypatch.context() as m:                            # (as before: opened by the first call that splits)
        m.setattr(OrtEngine, "open_sessions", lambda self, shape: [])
        with Runtime.open_engine_dir(default_auto_engines, backend="ort", threads=2) as rt:
            at_open = len(made)
            lazy = rt.sample([3], rt.schedule(), seed=5)
            in_image = made[at_open:]
    assert 1 in in_image, made                                 # (what opening takes out of the image)
    made.clear()
    with Runtime.open_engine_dir(default_auto_engines, backend="ort", threads=2) as rt:
        opened = list(made)
        res = rt.sample([3], rt.schedule(), seed=5)
    assert made == opened and opened.count(1) == in_image.count(1), (opened, made, in_image)
    assert torch.equal(res.tokens, lazy.tokens) and torch.equal(res.images, lazy.images)


def test_an_engine_holds_no_graph_bytes_once_its_sessions_are_open(default_auto_engines, tmp_path, monkeypatch):
    """Where ONNX Runtime's optimized copy is not used (a directory opened the first time, or read-only)
    each graph is read to open its sessions; the bytes were then held for the runtime's life, by the
    engine's reader and by ONNX Runtime's Python session itself (FlowAR-S read-only: 1.97 GB resident
    after opening, 1.15 without them). Python's own memory (tracemalloc) after opening, and after a
    call that opened sessions of its own (a batch not warmed, which reads a graph again), is that of
    the cached directory, whose graphs are never read, within a quarter of the graphs' bytes; the
    images are the cached directory's."""
    import gc
    import os
    import shutil
    import tracemalloc

    from flowar.runtime.engines import OrtEngine
    from flowar.runtime.runtime import Runtime
    monkeypatch.setattr(os, "cpu_count", lambda: 4)              # (two threads: row blocks, whatever the machine)
    fresh = tmp_path / "fresh"
    shutil.copytree(default_auto_engines, fresh, ignore=shutil.ignore_patterns(".ort-cache"))
    graphs = sum(f.stat().st_size for f in fresh.glob("*.onnx"))

    def opened_and_sampled(path):
        gc.collect()
        tracemalloc.start()
        try:
            with Runtime.open_engine_dir(path, backend="ort", threads=2) as rt:     # (its warm-up: batch 1's)
                gc.collect()
                at_open = tracemalloc.get_traced_memory()[0]
                res = rt.sample([3, 7], rt.schedule(), seed=5)
                gc.collect()
                return at_open, tracemalloc.get_traced_memory()[0], res
        finally:
            tracemalloc.stop()
    base_open, base_after, want = opened_and_sampled(default_auto_engines)
    for lazy in (False, True):                   # (True: the row blocks' sessions opened by the image's calls)
        shutil.rmtree(fresh / ".ort-cache", ignore_errors=True)      # (the first open wrote the copies)
        with monkeypatch.context() as m:
            if lazy:                             # (and read-only: each session reads the graph, as no copy is made)
                m.setattr(OrtEngine, "open_sessions", lambda self, shape: [])
                real = os.access
                m.setattr(os, "access", lambda p, mode, **k: not str(p).startswith(str(fresh)) and real(p, mode, **k))
            at_open, after, got = opened_and_sampled(fresh)
        assert at_open - base_open < graphs / 4 and after - base_after < graphs / 4, (at_open - base_open, after -
                                                                                      base_after, graphs)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.images, want.images)
    shutil.rmtree(fresh / ".ort-cache", ignore_errors=True)
    with Runtime.open_engine_dir(fresh, backend="ort", threads=2, warm=()) as rt:  # (no warm-up: entering drops them
        held = {n: e.graph.cache_info().currsize for n, e in rt.stages.engines.items()}   # where no session opens on)
        assert held["head_prep"] == held["decode"] == 0, held


def test_a_directory_whose_stages_fall_back_to_onnx_runtime_gets_onnx_runtimes_thread_policy(default_auto_engines,
                                                                                              monkeypatch):
    """A directory whose record chose bf16 PyTorch engines, opened on a CPU without bf16 in hardware,
    runs every stage on ONNX Runtime; the thread policy followed the record (PyTorch on every core
    beside ONNX Runtime's threads, as where PyTorch computes stages): it follows what runs, as for a
    plain ONNX Runtime directory."""
    import flowar.engines.cpu as cpu
    from flowar.export.manifest import Manifest
    from flowar.runtime.engines import OrtEngine
    from flowar.runtime.runtime import Runtime
    with Runtime.open_engine_dir(default_auto_engines, backend="ort", threads=2) as rt:
        plain = rt.threads
    monkeypatch.setattr(Manifest, "choice", property(lambda self: dict.fromkeys(self.stages, "torch-bf16")))
    monkeypatch.setattr(cpu, "fast_bf16", lambda *a, **k: False)
    with Runtime.open_engine_dir(default_auto_engines, threads=2) as rt:
        assert rt.backend == "measured" and all(isinstance(e, OrtEngine) for e in rt.stages.engines.values())
        assert "torch-bf16 needs" in rt.detail, rt.detail                     # (the fallback, said)
        assert (rt.threads.host, rt.threads.torch_computes) == (plain.host, plain.torch_computes) == (1, False), rt.threads


def test_one_sample_of_a_large_graph_runs_whole_and_batches_still_split(default_auto_engines, monkeypatch):
    """A second session of a large graph (a copy of its weights) costs more to open than its row
    blocks save on one sample: FlowAR-S's one-image command paid 0.75 s and 0.73 GB for 0-0.3 s.
    With every graph counted large, batch 1 opens no session beyond each stage's own and gives the
    images of the split calls (within float32 noise); a batch of two still splits."""
    import os

    import flowar.engines.ort as ort_mod
    import flowar.runtime.engines as engines_mod
    from flowar.runtime.runtime import Runtime
    monkeypatch.setattr(os, "cpu_count", lambda: 4)              # (two threads, whatever the machine)
    made, real = [], ort_mod.create_session
    monkeypatch.setattr(ort_mod, "create_session", lambda *a, **k: made.append(a[3]) or real(*a, **k))
    with Runtime.open_engine_dir(default_auto_engines, backend="ort", threads=2) as rt:
        split = rt.sample([3], rt.schedule(), seed=5)
    assert 1 in made                                            # (small graphs: one-thread blocks)
    made.clear()
    monkeypatch.setattr(engines_mod, "ALONE_BYTES", 0)
    with Runtime.open_engine_dir(default_auto_engines, backend="ort", threads=2) as rt:
        whole = rt.sample([3], rt.schedule(), seed=5)
        assert made == [2] * len(rt.stages.engines), made       # each stage's own session, nothing more
        rt.warm_up([2])
        pair = rt.sample([3, 7], rt.schedule(), seed=5)
    assert made.count(1) >= 1, made                             # the batch of two: row blocks again
    assert (whole.tokens - split.tokens).abs().max() <= 1e-5 and (whole.images - split.images).abs().max() <= 1e-5
    assert (pair.tokens[:1] - split.tokens).abs().max() <= 1e-5


def test_engines_open_at_once_and_a_failure_closes_those_that_opened():
    """Opening enters the engines on the cores at once (FlowAR-S's ONNX Runtime sessions 1.0 s instead
    of 1.5); where one fails, every other that opened is closed and the failure raised."""
    import contextlib
    import threading

    from flowar.runtime.engines import enter_engines
    both = threading.Barrier(2, timeout=10)         # (two engines entered one after another would time out here)
    log = []

    class Fake:
        def __init__(self, name, fails=False):
            self.name, self.fails = name, fails

        def __enter__(self):
            both.wait()
            if self.fails:
                raise RuntimeError(f"{self.name} refused")
            log.append(("in", self.name))
            return self

        def __exit__(self, *exc):
            log.append(("out", self.name))

    with contextlib.ExitStack() as stack:
        got = enter_engines(stack, {"ar": Fake("ar"), "velocity": Fake("velocity")}, workers=2)
        assert list(got) == ["ar", "velocity"] and sorted(log) == [("in", "ar"), ("in", "velocity")]
    assert sorted(log[2:]) == [("out", "ar"), ("out", "velocity")]
    log.clear()
    stack = contextlib.ExitStack()
    with pytest.raises(RuntimeError, match="velocity refused"):
        enter_engines(stack, {"ar": Fake("ar"), "velocity": Fake("velocity", fails=True)}, workers=2)
    stack.close()
    assert log == [("in", "ar"), ("out", "ar")]
    # a thread that cannot start (or an interrupt) after the first engine was submitted: it is closed too
    import concurrent.futures
    log.clear()
    both = threading.Barrier(1)
    real_submit = concurrent.futures.ThreadPoolExecutor.submit
    submitted = []

    def submit(pool, fn, *a, **k):
        submitted.append(fn)
        if len(submitted) > 1:
            raise RuntimeError("can't start new thread")
        return real_submit(pool, fn, *a, **k)
    stack = contextlib.ExitStack()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(concurrent.futures.ThreadPoolExecutor, "submit", submit)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            enter_engines(stack, {"ar": Fake("ar"), "velocity": Fake("velocity")}, workers=2)
    stack.close()
    assert log == [("in", "ar"), ("out", "ar")]


def test_a_directory_whose_runtime_cannot_be_made_closes_the_engines_it_entered(default_auto_engines, monkeypatch):
    """Opening an engine directory closes what it entered when the Runtime itself then fails (its
    recorded defaults or class names refused, a runner that cannot be made): the sessions and
    compiled libraries stayed open in a server or a notebook that went on."""
    import flowar.runtime.engines as engines_
    import flowar.runtime.runtime as runtime
    from flowar.errors import FlowARError
    real, closed = engines_.enter_engines, []

    def entered(stack, engines, workers):
        stack.callback(closed.append, sorted(engines))
        return real(stack, engines, workers)

    monkeypatch.setattr(engines_, "enter_engines", entered)
    monkeypatch.setattr(runtime, "class_names_for", lambda *a: (_ for _ in ()).throw(FlowARError("names", "none", "x")))
    with pytest.raises(FlowARError, match="expected names"):
        runtime.Runtime.open(default_auto_engines)
    assert closed == [["ar", "decode", "head_prep", "velocity"]]


def test_the_thread_policy_is_resolved_at_open_and_applied_while_sampling(fixtures_dir, monkeypatch):
    """threads= is honoured for a checkpoint (PyTorch computes every stage there, so every stage
    call sees it), restored after sampling; engines that compute on ONNX Runtime's own threads
    leave PyTorch one thread; a bad count is refused when the source is opened."""
    from flowar.engines.ort import cpu_threads
    from flowar.errors import FlowARError
    from flowar.runtime.runtime import Runtime
    from flowar.runtime.threads import Threads
    seen = []
    with Runtime.open_checkpoint(fixtures_dir / "tiny_v1.safetensors", config=fixtures_dir / "tiny_v1.config.json",
                                 threads=1) as rt:
        inner = rt.stages.velocity
        monkeypatch.setattr(rt.stages, "velocity", lambda *a: seen.append(torch.get_num_threads()) or inner(*a))
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            rt.sample([3, 7], build_schedule(5, 4.3, 0.9, 5), decode=False)
            assert set(seen) == {1} and torch.get_num_threads() == 2        # applied while sampling, restored after
        finally:
            torch.set_num_threads(before)
    assert Threads.resolve(None, False) == Threads(cpu_threads(), 1, torch_computes=False)
    import os
    monkeypatch.setattr(os, "cpu_count", lambda: 4)                             # (a machine with 4 cores)
    assert Threads.resolve(3, True) == Threads(3, 3)
    assert Threads.resolve(64, True) == Threads(4, 4)                           # (never more than the cores)
    with pytest.raises(FlowARError, match="--threads an integer >= 1"):
        Runtime.open_checkpoint(fixtures_dir / "tiny_v1.safetensors", threads=0)


def test_more_threads_than_the_cores_are_taken_as_the_cores(default_auto_engines):
    """--threads above the cores this process may use was taken as asked: ONNX Runtime's sessions
    made that many threads each (--threads 100000 on 2 cores held 32 000 threads and filled the
    machine's process ids; 64 made 435 threads and sampled 4x slower than 2). Counted from the
    kernel's view of this process: the sessions of --threads cores+30 make at most what the
    machine's cores' own would (a count above the cores this process is pinned to, as each test
    worker is, is taken as asked: the lane tests ask for 2 on one)."""
    import os

    from flowar.runtime.runtime import Runtime

    def os_threads() -> int:
        return int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("Threads:")))
    cores, before = os.cpu_count(), os_threads()
    with Runtime.open(default_auto_engines, True, backend="ort", threads=cores + 30) as rt:
        rt.sample([3], rt.schedule(), seed=0, decode=False)
        made = os_threads() - before
        assert rt.threads.cores == cores, rt.threads
    # (per stage: a session of cores - 1 threads and, for calls split in row blocks, one per block: about 7 x cores
    # in all; asked as given, 7 x (cores + 30))
    assert made <= 8 * cores + 8, f"{made} threads for {cores} cores"


def test_lanes_sample_at_once_on_buffers_of_their_own_with_a_share_of_the_threads(default_auto_engines):
    """Two lanes over the same engines (PyTorch's, which take calls from several threads) sample at
    the same time on two threads, each on static buffers of its own: every result is what the
    runtime gives alone (float32 noise: the thread counts differ), and while both sample, each
    stage call runs on half the threads; a later lane never on more (its floor). Fails when a lane
    shares its runtime's buffers, or when the share ignores the samplings running or the floor
    (tried)."""
    import dataclasses
    import threading

    from flowar.runtime.runtime import Runtime
    from flowar.runtime.threads import Threads
    t = Threads(4, 4)
    seen: list[int] = []
    before = torch.get_num_threads()
    try:
        for running in (2, 1, 3):
            t.running[0] = running
            t.share("velocity", lambda: seen.append(torch.get_num_threads()))
        later = dataclasses.replace(t, floor=2)
        assert later.running is t.running               # one count for every lane
        for running in (1, 2):
            t.running[0] = running
            later.share("velocity", lambda: seen.append(torch.get_num_threads()))
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 4, 1, 2, 2]
    with Runtime.open_engine_dir(default_auto_engines, backend="torch", threads=2) as rt:
        assert rt.lanes == 2
        lane = rt.lane()
        sched = rt.schedule()
        alone = {lab: rt.sample([lab, lab + 1], sched, seed=lab, decode=False).tokens for lab in (1, 5)}
        got, threads_seen, barrier = {}, [], threading.Barrier(2)
        for r in (rt, lane):
            inner = r.stages.velocity
            r.stages.velocity = (lambda inner: lambda *a: threads_seen.append(torch.get_num_threads())
                                 or inner(*a))(inner)

        def work(r, lab):
            barrier.wait()
            got[lab] = [r.sample([lab, lab + 1], sched, seed=lab, decode=False).tokens for _ in range(3)]
        jobs = [threading.Thread(target=work, args=(r, lab)) for r, lab in ((rt, 1), (lane, 5))]
        for j in jobs:
            j.start()
        for j in jobs:
            j.join(120)
        lane.close()
        torch.set_num_threads(before)             # (lane() set this thread's count to the lane's share)
        assert rt.stages.engines["velocity"].module is not None       # closing a lane leaves the engines open
    for lab in (1, 5):
        for tokens in got[lab]:
            assert (tokens - alone[lab]).abs().max().item() <= 1e-4 * alone[lab].abs().max().item(), lab
    assert 1 in threads_seen and lane.threads.floor == 2 and rt.threads.floor == 1
    with Runtime.open_engine_dir(default_auto_engines, backend="torch", threads=1) as one:
        assert one.lanes == 1                   # one thread: nothing to share between lanes


def test_the_labels_are_copied_into_static_storage_at_start(tiny_v1):
    """A captured scale reads the address it was captured with: the AR's labels must be the
    stages' own buffer, filled at start, not the caller's tensor (which a later request replaces)."""
    model, _ = tiny_v1
    st = torch_engine_stages(model, 2, "cpu")
    labels = torch.tensor([3, 7, 1000, 1000])
    with torch.no_grad():
        st.start(labels)
        want = st.ar(0, None).clone()
        st.start(labels)
        labels.fill_(5)                          # the caller's tensor changes after start
        got = st.ar(0, None)
    assert torch.equal(got, want)


def test_the_warm_up_runs_the_shapes_sampling_runs(default_auto_engines):
    """The warm-up cuts rows into the call plan's blocks as _call does: a call below the block size
    runs whole (3 rows with blocks of 4: one call of 3; the warm-up ran 2 and 1, so the first image at
    that batch still paid the set-up of a shape it had not run). Every shape a batch of 3 gives the
    engines was warmed."""
    from flowar.runtime.runtime import Runtime
    with Runtime.open(default_auto_engines, warm=()) as rt:
        assert rt.call_plan.get("stages")
        seen: dict[str, set] = {"warm": set(), "sample": set()}
        phase = ["warm"]
        for name, eng in rt.stages.engines.items():
            def rec(ins, outs, profile=0, _real=eng.infer, _name=name):
                seen[phase[0]].add((_name, profile, tuple(next(iter(ins.values())).shape)))
                return _real(ins, outs, profile=profile)
            eng.infer = rec
        rt.stages.warm_up([3], every_engine=True)
        phase[0] = "sample"
        rt.sample([1, 2, 3], rt.schedule(), batch_size=3)
    assert seen["sample"] and seen["sample"] <= seen["warm"], sorted(seen["sample"] - seen["warm"])


def test_opening_warms_only_the_engines_whose_measured_set_up_is_large(default_auto_engines, tmp_path):
    """Warming runs each shape once on zeros, so it costs the calls themselves: an engine is
    warmed at open only where the export measured a set-up of at least WARM_SETUP_S (else the
    command would pay a whole call to save a little), batch 1 by default, nothing with warm=().
    A replica's warm-up adds the engines whose set-up nothing says; ONNX Runtime's, unmeasured, set up
    little (a FlowAR-S replica that computed every shape of theirs took 101 s to start)."""
    import json
    import shutil
    from flowar.runtime.directory import WARM_SETUP_S
    from flowar.runtime.runtime import Runtime
    d = tmp_path / "e"
    shutil.copytree(default_auto_engines, d)
    m = json.loads((d / "manifest.json").read_text())
    m["auto"]["measured"]["ar"]["ort-fp32"]["setup_s"] = 2 * WARM_SETUP_S
    m["auto"]["measured"]["velocity"]["ort-fp32"]["setup_s"] = WARM_SETUP_S / 10
    m["auto"]["measured"]["head_prep"]["ort-fp32"]["setup_s"] = WARM_SETUP_S / 10
    del m["auto"]["measured"]["decode"]["ort-fp32"]["setup_s"]           # no record: the engine's own default
    (d / "manifest.json").write_text(json.dumps(m))
    with Runtime.open_engine_dir(d, backend="ort") as rt:
        warm = {s: getattr(e, "warm", False) for s, e in rt.stages.engines.items()}
        n_scales = rt.config.n_scales
        warmed = rt.opened["shapes warmed"]
    assert warm == {"ar": True, "head_prep": False, "velocity": False, "decode": False}
    rows_ar = 2                                                          # batch 1: the AR sees 1 and 2 rows
    assert warmed == n_scales * rows_ar
    with Runtime.open_engine_dir(d, backend="ort", warm=()) as rt:
        assert rt.opened["shapes warmed"] == 0
        # A served replica's or bulk worker's warm-up (the default): the engines measured as large, not
        # one measured as small (velocity) nor ONNX Runtime's unmeasured one (decode), which sets up
        # little, but an engine whose set-up nothing says (stood in for by the head's); every_engine=True: all.
        called = []
        for name, eng in rt.stages.engines.items():
            eng.infer = (lambda infer, name: lambda *a, **k: (called.append(name), infer(*a, **k))[1])(eng.infer, name)
        rt.warm_up([1, 2])
        assert set(called) == {"ar"}, called
        called.clear()
        rt.stages.engines["head_prep"].warm = None
        rt.warm_up([1, 2])
        assert set(called) == {"ar", "head_prep"}, called
        called.clear()
        rt.warm_up([1], every_engine=True)
        assert set(called) == {"ar", "head_prep", "velocity", "decode"}, called


def test_a_gpu_other_than_the_first_is_refused_for_onnx_runtime_s_cuda_sessions(default_auto_engines, monkeypatch):
    """ONNX Runtime's CUDA sessions run on the first visible GPU (they name no device_id): --device
    cuda:1 ran them on GPU 0 in silence, as TensorRT's plans did. Opened as on a machine with
    onnxruntime-gpu and GPUs (the providers and the device check stood in for, since this test also
    runs without a GPU): cuda:1 is refused with the CUDA_VISIBLE_DEVICES that chooses it; cuda:0 and
    cuda get the CUDA provider; --device cpu the CPU provider."""
    import onnxruntime

    import flowar.device
    from flowar.engines.ort import choose_provider
    from flowar.errors import FlowARError
    from flowar.runtime.runtime import Runtime
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(flowar.device, "resolve_device", lambda name: torch.device(name))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")               # cuda:1 is GPU 3
    with pytest.raises(FlowARError, match=r"^expected --device cuda \(the first visible GPU, where ONNX Runtime's CUDA "
                                          r"sessions run\); got cuda:1. Fix: choose that GPU with CUDA_VISIBLE_DEVICES=3 "
                                          r"and pass --device cuda$"):
        Runtime.open(default_auto_engines, True, backend="ort", device="cuda:1")
    for ok in ("cuda:0", "cuda", None):
        assert choose_provider(True, None if ok is None else torch.device(ok)) == "CUDAExecutionProvider", ok
    assert choose_provider(False, torch.device("cpu")) == "CPUExecutionProvider"


def test_cpu_engines_stay_on_the_cpu_where_pytorch_sees_a_gpu(default_auto_engines, monkeypatch, tmp_path):
    """On a machine where PyTorch sees a GPU and the engines are CPU engines (ONNX Runtime without
    its CUDA provider; what --precision auto compiled for the CPU), flowar-run's default --device
    auto opens them on the CPU (it handed them CUDA buffers); --device cuda is one line, before
    anything is allocated."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from flowar.commands.cli import run
    from flowar.runtime.runtime import Runtime
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)     # (no GPU here: any CUDA allocation fails)
    for backend in ("auto", "ort"):
        with Runtime.open(default_auto_engines, True, backend=backend, device="auto") as rt:
            assert rt.device.type == "cpu", (backend, rt.device)
        out = tmp_path / f"{backend}.safetensors"
        res = CliRunner().invoke(run, ["--engine-dir", str(default_auto_engines), "--backend", backend, "--labels", "1",
                                       "--steps", "3", "--save-tokens", str(out)])
        assert res.exit_code == 0 and load_file(str(out))["tokens"].isfinite().all(), (backend, res.output)
        res = CliRunner().invoke(run, ["--engine-dir", str(default_auto_engines), "--backend", backend, "--labels", "1",
                                       "--device", "cuda"])
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: expected --device cpu for these "
                                                                              "engines"), res.output
    # --device cpu keeps the GPU engines out: ONNX Runtime's CPU provider, and auto not on TensorRT plans
    import json
    import shutil

    import flowar.engines.ort as ort
    import flowar.runtime.directory as directory
    asked, real = [], ort.choose_provider
    monkeypatch.setattr(ort, "choose_provider", lambda prefer_gpu=True, device=None: asked.append(prefer_gpu) or real(prefer_gpu))
    with Runtime.open(default_auto_engines, True, backend="ort", device="cpu") as rt:
        assert rt.device.type == "cpu" and asked == [False], asked
    d = tmp_path / "e"
    shutil.copytree(default_auto_engines, d)
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(m | {"tensorrt": {"flavour": "tensorrt", "version": "11.0", "plans": {}}}))
    monkeypatch.setattr(directory, "_trt_usable", lambda m: (True, ""))
    with Runtime.open(d, True, device="cpu") as rt:
        assert rt.backend == "measured" and rt.device.type == "cpu"
