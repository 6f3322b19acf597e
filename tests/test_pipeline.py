"""FlowARPipeline: the Python API, and the one way every command opens a source and samples."""

import json
import re
import shutil
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import DEFAULT_CKPT, DEFAULT_VAE
from flowar import FlowARPipeline
from flowar.errors import FlowARError
from flowar.sampling.schedule import Settings


def test_the_pipeline_gives_flowar_runs_images_pixel_for_pixel(default_auto_engines, tmp_path):
    from flowar.commands.cli import run
    with FlowARPipeline.from_pretrained(default_auto_engines) as pipe:
        assert pipe.runtime.backend == "measured" and pipe.runtime.detail.startswith("auto: ")
        out = pipe(["cat", "dog"], seed=3)
        assert out.labels == [2, 4] and out.seeds == [3, 3] and out.indices == [0, 1]
        assert set(out.timings) >= {"ar", "head", "decode", "total"} and out.timings["head"] > 0
        assert len(out.images) == 2 and out.images[0].size == (32, 32)
        arr = pipe([2, "dog"], seed=3, output_type="np").images
        latent = pipe(["cat"], seed=3, output_type="latent").images
    res = CliRunner().invoke(run, ["--engine-dir", str(default_auto_engines), "--classes", "cat,dog", "--seed", "3",
                                   "--save-images", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    for i in range(2):
        ref = np.asarray(Image.open(tmp_path / "run" / f"{i:06d}.png").convert("RGB"))
        assert np.array_equal(np.asarray(out.images[i]), ref), i
        assert np.abs(arr[i] * 255 - ref).max() <= 0.5 + 1e-3          # "np": the same image in [0, 1]
    # sample 0 does not depend on the batch (up to float32 rounding: PyTorch stages round by batch shape)
    assert (latent - out.tokens[:1]).abs().max().item() <= 1e-4
    assert not np.array_equal(np.asarray(out.images[0]), np.asarray(out.images[1]))


def test_the_checkpoint_path_gives_the_same_images_within_float32_noise(default_auto_engines):
    from flowar.io.images import psnr_each
    with FlowARPipeline.from_pretrained(default_auto_engines) as pipe:
        engines = pipe(["cat", "dog"], seed=3, output_type="pt").images
    with FlowARPipeline.from_pretrained(DEFAULT_CKPT, vae=DEFAULT_VAE) as pipe:
        assert pipe.runtime.backend == "torch"
        eager = pipe(["cat", "dog"], seed=3, output_type="pt").images
        other_seed = pipe(["cat", "dog"], seed=4, output_type="pt").images
    assert min(psnr_each(engines * 2 - 1, eager * 2 - 1)) >= 40.0
    assert max(psnr_each(other_seed * 2 - 1, eager * 2 - 1)) < 30.0      # the bound can fail: another seed is far


def test_an_official_file_without_names_takes_imagenet_names(fixtures_dir, tmp_path):
    """A flat .pth of a 1000-class model (the official format, no names): --classes and the API
    take ImageNet names and synonyms."""
    from safetensors.torch import load_file
    from flowar.commands.cli import run
    pth = tmp_path / "official.pth"
    torch.save(load_file(str(fixtures_dir / "tiny_v1.safetensors")), pth)
    with FlowARPipeline.from_pretrained(pth, preset="tiny") as pipe:
        assert pipe.get_label_ids(["Strix nebulosa"]) == [24]
        # every name with its id, as diffusers' DiT pipeline lists them (ImageNet's tsv: 24's three names)
        labels = pipe.labels
        assert labels["great grey owl"] == labels["great gray owl"] == labels["Strix nebulosa"] == 24
        assert labels["crane"] == 517 and labels["umbrella"] == 879            # (a shared name: the last, as DiT's)
        assert list(labels) == sorted(labels)
        assert pipe.get_label_ids("great gray owl") == [24] and pipe.runtime.class_names[24] == "great grey owl"
        tokens = pipe(["great grey owl", 7], seed=1, output_type="latent").images
    res = CliRunner().invoke(run, ["--ckpt", str(pth), "--preset", "tiny", "--classes", "great grey owl",
                                   "--classes", "great grey owl, great gray owl, Strix nebulosa", "--seed", "1",
                                   "--save-tokens", str(tmp_path / "t.safetensors")])
    assert res.exit_code == 0, res.output
    saved = load_file(str(tmp_path / "t.safetensors"))
    assert saved["labels"].tolist() == [24, 24]
    assert torch.equal(saved["tokens"][0], tokens[0])


def test_the_solvers_and_stride_of_the_commands_are_keywords_of_a_call(default_auto_engines, tmp_path):
    """solver= and stride= sample what flowar-run --solver/--stride samples (the pipeline took only the
    named schedules, while the README calls the settings one object for the API and the commands);
    their refusals name the keywords."""
    from safetensors.torch import load_file

    from flowar.commands.cli import run
    with FlowARPipeline.from_pretrained(default_auto_engines) as pipe:
        pipe.set_progress_bar_config(disable=True)
        heun, skip, euler = (pipe([3, 7], seed=2, output_type="latent", **kw).images for kw in
                             (dict(solver="heun"), dict(schedule="fast", stride=2), {}))
        with pytest.raises(FlowARError, match=r"expected stride with the skip solver .*Fix: drop stride"):
            pipe([3], stride=2)
    for kw, got in ((["--solver", "heun"], heun), (["--schedule", "fast", "--stride", "2"], skip)):
        res = CliRunner().invoke(run, ["--engine-dir", str(default_auto_engines), "--labels", "3,7", "--seed", "2",
                                       *kw, "--save-tokens", str(tmp_path / "t.safetensors")])
        assert res.exit_code == 0, res.output
        assert torch.equal(load_file(str(tmp_path / "t.safetensors"))["tokens"], got)
    assert (heun - euler).abs().max() > 1e-2 and (skip - euler).abs().max() > 1e-2       # (they took effect)


def test_bad_calls_are_one_line_errors(default_auto_engines):
    """A bad call is one FlowARError line in the call's own terms (it named the commands' options:
    "--cfg", "--batch"); indices that are not ints (1.7 sampled image 1), a callback that is not a
    function (found once sampling had begun), a 2-D label tensor and a closed pipeline included."""
    with FlowARPipeline.from_pretrained(default_auto_engines) as pipe:
        for kw, needle in ((dict(class_labels=["unicorn"]), "a class name of this model"),
                           (dict(class_labels=[3], output_type="jpeg"), "output_type among"),
                           (dict(class_labels=[], ), "at least one class label"),
                           (dict(class_labels=[1], num_inference_steps=1), "expected num_inference_steps an integer"),
                           (dict(class_labels=[1], guidance_scale=0.5), "guidance_scale in [1, 50]"),
                           (dict(class_labels=[1] * 5, batch_size=5), "batch_size at most 4 (the engines' max batch)"),
                           (dict(class_labels=[1], indices=[1.7]), "indices: one int >= 0 per image"),
                           (dict(class_labels=[1], callback_on_scale_end=3), "callback_on_scale_end a function"),
                           (dict(class_labels=torch.tensor([[1, 2]])), "class ids (int) or class names"),
                           # ("no" is a true value: it gave the dict)
                           (dict(class_labels=[1], return_dict="no"), "return_dict True or False; got 'no'")):
            try:
                pipe(**kw)
            except ValueError as e:                     # (as diffusers' refusals are: ValueError catches it)
                text = str(e)
                assert isinstance(e, FlowARError), (kw, e)
            else:
                raise AssertionError(f"{kw} was not refused")
            assert needle in text and "\n" not in text and "--" not in text.replace("--max-batch", ""), (kw, text)
    with pytest.raises(FlowARError, match="an open source; got one closed"):
        pipe([1])
    for call in (pipe.runtime.lane, lambda: pipe.runtime.warm_up([1])):    # (an AttributeError; "0 calls made")
        with pytest.raises(FlowARError, match="an open source; got one closed"):
            call()
    with pytest.raises(FlowARError, match="backend auto or torch"):
        FlowARPipeline.from_pretrained(DEFAULT_CKPT, backend="ort")


def test_decode_gives_the_images_of_the_tokens_a_call_returned(default_auto_engines):
    """pipe.decode(latents) of a call's output_type="latent" tokens is that call's images (diffusers:
    pipe.vae.decode); a part of them decodes to the same images within a batch's rounding; anything
    else, and a source without a decoder, is one line."""
    with FlowARPipeline.from_pretrained(default_auto_engines) as pipe:
        pipe.set_progress_bar_config(disable=True)
        labels = list(range(10))
        tokens = pipe(labels, seed=5, output_type="latent").images
        images = pipe(labels, seed=5, output_type="np").images
        assert np.array_equal(pipe.decode(tokens, output_type="np"), images)
        part = pipe.decode(tokens[3:5], output_type="pt")
        assert part.shape == (2, 3, 32, 32) and float(np.abs(part.permute(0, 2, 3, 1).numpy() - images[3:5]).max()) < 2e-2
        assert [im.size for im in pipe.decode(tokens[:2])] == [(32, 32)] * 2               # (PIL by default)
        for bad, said in ((tokens[0], "got a torch.float32 tensor of shape (4, 8, 8)"),
                          (tokens[:, :3], "got a torch.float32 tensor of shape (10, 3, 8, 8)"),
                          (tokens[:0], "shape (0, 4, 8, 8)"), (tokens.long(), "torch.int64"),
                          (tokens.numpy(), "got ndarray")):
            with pytest.raises(FlowARError, match=r"expected token maps of this model, a float tensor \(B, 4, 8, 8\)"):
                pipe.decode(bad)
            with pytest.raises(FlowARError, match=re.escape(said)):
                pipe.decode(bad)
        with pytest.raises(FlowARError, match="output_type among pil, np, pt; got 'latent'"):
            pipe.decode(tokens, output_type="latent")
        bad = tokens.clone()
        bad[1, 0, 2, 2] = float("nan")              # (NaN images came back, without a word; then the checkpoint was blamed)
        with pytest.raises(FlowARError, match="expected finite token maps; got NaN or Inf in the tokens passed"):
            pipe.decode(bad)
    with FlowARPipeline.from_pretrained(DEFAULT_CKPT) as pipe:
        with pytest.raises(FlowARError, match="expected a VAE to decode images; .* pass vae="):
            pipe.decode(tokens)


def test_a_pipeline_says_what_it_opened_and_leaves_its_bar(default_auto_engines):
    """repr(pipe) names its source and what computes (it was the default object repr), then closed;
    a call's bar stays at its end, as diffusers' do (it was erased: leave=False), unless asked."""
    import io
    pipe = FlowARPipeline.from_pretrained(default_auto_engines)
    rt = pipe.runtime
    for options, left in (({}, True), ({"leave": False}, False)):
        pipe.set_progress_bar_config(file=(bar := io.StringIO()), **options)
        pipe([1], output_type="latent")
        last = bar.getvalue().split("\r")[-1]
        assert last.startswith("scales: 100%") == left and last.endswith("\n") == left, (options, bar.getvalue())
    assert repr(pipe) == (f"FlowARPipeline({str(default_auto_engines)!r}: engine directory, {rt.detail}; 10 classes, "
                          f"32 px images, max batch {rt.max_batch})")
    pipe.close()
    assert repr(pipe) == f"FlowARPipeline({str(default_auto_engines)!r}: closed)"
    with FlowARPipeline.from_pretrained(DEFAULT_CKPT) as pipe:
        assert repr(pipe) == f"FlowARPipeline({str(DEFAULT_CKPT)!r}: checkpoint, eager PyTorch on cpu; 10 classes, " \
                             "tokens only (no decoder))"


def test_every_entry_point_takes_the_backend_flowar_run_takes(default_auto_engines, tmp_path, monkeypatch):
    """On a machine where TensorRT plans fit (pretended here: no GPU), flowar-run, the served
    replica and the bulk actor all choose TensorRT, because they all open through the runtime's
    one choice (runtime.runtime.choose_backend)."""
    import flowar.runtime.directory as directory
    import flowar.runtime.runtime as runtime
    from flowar.commands.bulk import BulkSpec, ShardSampler
    from flowar.commands.cli import run
    from flowar.commands.replica import Replica
    opened = []
    d = tmp_path / "e"                            # the directory, with (pretended) TensorRT plans recorded
    shutil.copytree(default_auto_engines, d)
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(m | {"tensorrt": {"flavour": "tensorrt", "version": "11.0", "plans": {}}}))

    def fake_trt(m, specs, asked=None):
        opened.append("trt")                      # ONNX Runtime does the computing
        engines, _ = directory.directory_engines(m, specs, {}, "ort", 1, "CPUExecutionProvider", torch.device("cpu"))
        return engines, torch.device("cpu"), "TensorRT (pretended)"

    monkeypatch.setattr(directory, "_trt_usable", lambda m: (True, ""))
    monkeypatch.setattr(runtime, "trt_engines", fake_trt)
    res = CliRunner().invoke(run, ["--engine-dir", str(d), "--labels", "1", "--save-tokens",
                                   str(tmp_path / "t.safetensors")])
    assert res.exit_code == 0 and "backend: TensorRT (pretended)" in res.output, res.output
    rep = Replica(str(d), threads=1)
    assert rep.pipe.runtime.backend == "trt"
    rep.pipe.close()
    spec = BulkSpec(str(d), 2, [0], 0, {}, 2, 1)
    sampler = ShardSampler({f: getattr(spec, f) for f in spec.__dataclass_fields__}, str(tmp_path / "bulk"))
    assert sampler.pipe.runtime.backend == "trt"
    sampler.pipe.close()
    assert opened == ["trt"] * 3
    monkeypatch.setattr(directory, "_trt_usable", lambda m: (False, "no CUDA GPU"))   # and without: what auto chose
    assert directory.choose_backend(directory.read_manifest(d), "auto") == "measured"


def test_a_bulk_worker_samples_two_batches_at_once_in_lanes_with_the_images_of_one(default_auto_engines, tmp_path):
    """Where the engines allow lanes (PyTorch's here), a bulk worker samples a shard's batches two at
    a time: the shard holds, in order, the images the runtime gives alone batch by batch (pixels
    within 1: float32 noise of other thread counts). Fails when a batch's images land in another
    batch's place, or when the lanes share static buffers."""
    from flowar.commands.bulk import BulkSpec, ShardSampler
    from flowar.commands.shards import shard_path
    from flowar.io.images import to_uint8
    spec = BulkSpec(str(default_auto_engines), 8, [0, 1, 2], 3, {}, 8, 2, backend="torch", batch=2)
    sampler = ShardSampler({f: getattr(spec, f) for f in spec.__dataclass_fields__}, str(tmp_path / "bulk"))
    try:
        assert len(sampler.lanes) == 2
        sampler.sample_shard(0, 0, 8)
        got = np.load(shard_path(tmp_path / "bulk", 0))["images"]
        rt = sampler.pipe.runtime
        want = np.concatenate([to_uint8(rt.sample([i % 3 for i in idx], sampler.schedule, seed=3, indices=idx,
                                                  batch_size=2).images) for idx in ([0, 1], [2, 3], [4, 5], [6, 7])])
    finally:
        sampler.pipe.close()
    assert got.shape == want.shape == (8, 32, 32, 3)
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_a_bulk_worker_stops_its_shard_at_the_first_batch_that_fails(default_auto_engines, tmp_path):
    """A shard's batches are queued on the compute threads at once; when one fails (or Ctrl-C /
    SIGTERM reaches the wait for it) the queued ones are dropped, not computed and thrown away
    (before: flowar-sample went on for the whole shard after its 'interrupted' line, 9 s of a
    128-image shard). Here the first of 6 batches fails while the next runs: 2 calls, not 6."""
    from flowar.commands.bulk import BulkSpec, ShardSampler
    spec = BulkSpec(str(default_auto_engines), 6, [0], 0, {}, 6, 1, batch=1)
    sampler = ShardSampler({f: getattr(spec, f) for f in spec.__dataclass_fields__}, str(tmp_path / "bulk"))
    calls = []

    def sample(rt, idx, stopping):
        calls.append(idx)
        if len(calls) == 1:
            raise RuntimeError("a failed batch")
        time.sleep(0.3)                       # the next batch is running when the failure is seen
        return torch.zeros(len(idx), 3, 32, 32)
    sampler._sample = sample
    try:
        with pytest.raises(RuntimeError, match="a failed batch"):
            sampler.sample_shard(0, 0, 6)
        time.sleep(0.5)                       # (what was still queued would run now)
    finally:
        sampler.pipe.close()
    assert len(calls) <= 2, calls


def test_a_disk_that_fills_during_a_bulk_run_is_named_and_the_run_resumes(default_auto_engines, tmp_path,
                                                                          monkeypatch):
    """A disk filled by someone else while flowar-sample wrote its shards: the line blamed the workers
    and the engines ("expected workers that sample their shards; ... shows whether the engines open").
    It names the disk and the file, the shards written are kept, and the same command resumes."""
    import errno

    import flowar.commands.bulk as files
    from flowar.commands.bulk import BulkSpec, run_bulk
    from flowar.errors import FlowARError
    real, written = files.write_npz, []

    def fills(path, arrays):
        if len(written) == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        real(path, arrays)
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        mp.setattr(files, "write_npz", fills)
        with pytest.raises(FlowARError, match=r"room on the disk .*00001.npz: no space left on device\. Fix: free some "
                                              "space .* run the same command again: it resumes"):
            run_bulk(BulkSpec(str(default_auto_engines), 4, [0, 1], 0, {}, 2, 1), out, progress=False)
    rep = run_bulk(BulkSpec(str(default_auto_engines), 4, [0, 1], 0, {}, 2, 1), out, progress=False)
    assert rep.shards_done_before == 1 and rep.shards_total == 2 and (out / "samples.npz").is_file()


@pytest.mark.parametrize("n, shard, batch, sizes", [(7, 3, 4, [1, 2, 3]), (4, 2, 8, [2])])
def test_a_bulk_worker_warms_and_reports_the_batches_its_shards_form(default_auto_engines, tmp_path, monkeypatch,
                                                                     n, shard, batch, sizes):
    """Batches are cut at multiples of --batch within each shard: 7 images in shards of 3 at batch 4
    form [0 1 2], [3] [4 5], [6]; shards of 2 at batch 8 form batches of 2. The worker warms those
    sizes (not the batch it was given, which no shard forms) and reports the largest it forms."""
    from flowar.commands.bulk import BulkSpec, ShardSampler
    from flowar.runtime.runtime import Runtime
    warmed = []
    real = Runtime.warm_up
    monkeypatch.setattr(Runtime, "warm_up", lambda self, b, *a, **k: (warmed.append(list(b)), real(self, b, *a, **k))[1])
    spec = BulkSpec(str(default_auto_engines), n, [0, 1], 0, {}, shard, 1, batch=batch)
    sampler = ShardSampler({f: getattr(spec, f) for f in spec.__dataclass_fields__}, str(tmp_path / "bulk"))
    try:
        out = sampler({"shard": [0], "start": [0], "end": [min(shard, n)]})
    finally:
        sampler.pipe.close()
    assert warmed == [sizes] and out["batch"].tolist() == [max(sizes)], (warmed, out["batch"])


def test_a_generator_draws_the_seeds_as_diffusers_does_and_a_callback_sees_every_scale(default_auto_engines):
    """generator=: its state decides the images (a generator used once gives new images the next
    time, a fresh one with the same seed the same ones), and the drawn seeds name them: seed=those
    seeds gives the same images. callback_on_scale_end sees each scale's tokens."""
    with FlowARPipeline.from_pretrained(default_auto_engines) as pipe:
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(11)
        first = pipe(["cat", "dog"], generator=g, output_type="latent")
        second = pipe(["cat", "dog"], generator=g, output_type="latent")
        again = pipe(["cat", "dog"], generator=torch.Generator().manual_seed(11), output_type="latent")
        by_seed = pipe(["cat", "dog"], seed=first.seeds, output_type="latent")
        seen, kept = [], []
        pipe(["cat"], seed=0, output_type="latent", callback_on_scale_end=lambda p, k, kw: (seen.append(
            (p is pipe, k, tuple(kw["tokens"].shape))), kept.append((kw["tokens"], kw["tokens"].clone()))))
        with pytest.raises(FlowARError, match="seed or generator"):
            pipe(["cat"], seed=1, generator=g)
    assert first.seeds != second.seeds and not torch.equal(first.images, second.images)
    assert again.seeds == first.seeds and torch.equal(again.images, first.images)
    assert torch.equal(by_seed.images, first.images) and len(set(first.seeds)) == 2
    C = pipe.runtime.config.latent_channels
    assert seen == [(True, k, (1, C, s, s)) for k, s in enumerate(pipe.runtime.config.scales)]
    # what a callback keeps is what it was given (it was a view of the sampler's buffer, which later scales overwrote)
    assert all(torch.equal(tokens, then) for tokens, then in kept)


def test_numpy_numbers_are_numbers_and_a_seed_that_is_no_int_is_one_line(default_auto_engines):
    """NumPy's numbers, as a sweep makes them, sample what Python's do (np.float64(4.3) was refused as
    'expected --cfg in [1, 50]', np.int64 steps and batch sizes too); a seed that is not an int is
    one line (seed="12" sampled seeds 1 and 2, 3.5 raised a TypeError)."""
    with FlowARPipeline.from_pretrained(default_auto_engines) as pipe:
        pipe.set_progress_bar_config(disable=True)
        kw = dict(seed=7, output_type="latent")
        plain = pipe([3, 4], num_inference_steps=9, guidance_scale=3.5, guidance=0.8, batch_size=1, **kw)
        numpy = pipe([3, 4], num_inference_steps=np.int64(9), guidance_scale=np.float64(3.5),
                     guidance=np.float32(0.8), batch_size=np.int64(1), **kw)
        seeds = pipe([3, 4], seed=np.array([7, 7]), indices=[0, 1], output_type="latent", num_inference_steps=9,
                     guidance_scale=3.5, guidance=0.8)
        for bad in ("12", 3.5, True, [7, 7.0]):
            with pytest.raises(FlowARError, match="seed an int, or one int per image"):
                pipe([3, 4], seed=bad)
        with pytest.raises(FlowARError, match=r"expected seed: one, or one per label \(2\); got a list of 0\. Fix"):
            pipe([3, 4], seed=[])             # (it said "one index and one seed per label (2); got 2 indices, 0 seeds")
        with pytest.raises(FlowARError, match=r"expected seed an int, or one int per image; got True\. Fix"):
            pipe([3, 4], seed=True)           # (it said "[True]")
    assert torch.equal(plain.images, numpy.images) and torch.allclose(plain.images, seeds.images, atol=1e-4)
    assert numpy.seeds == seeds.seeds == [7, 7]
    # one seed names samples 0, 1, ... of it, as flowar-run --seed (the runtime given the int), 0-d arrays too
    with FlowARPipeline.from_pretrained(default_auto_engines) as pipe:
        pipe.set_progress_bar_config(disable=True)
        one = pipe([3, 4], seed=np.array(7), output_type="latent", num_inference_steps=9)
        rt = pipe.runtime.sample([3, 4], pipe.runtime.schedule(Settings(steps=9)), seed=7, decode=False)
        rt0d = pipe.runtime.sample([3, 4], pipe.runtime.schedule(Settings(steps=9)), seed=torch.tensor(7), decode=False)
    assert one.indices == [0, 1] and torch.equal(one.images, rt.tokens) and torch.equal(rt0d.tokens, rt.tokens)


def test_an_image_is_named_by_its_seed_and_index_and_generators_come_one_per_image(default_auto_engines):
    """Image i of a call comes again from (seeds[i], indices[i]); a list of generators draws one
    seed per image as diffusers takes them (each from its own state), anything else is one line;
    the callback sees a batch's samples only, also where a runner pads the batch to a captured size
    (a CPU stand-in of the CUDA-graph runner that pads 3 samples to 4: it handed over 4 rows)."""
    from flowar.runtime.cudagraph import GraphRunner

    class Padding(GraphRunner):
        def bucket(self, B):
            return 4
    with FlowARPipeline.from_pretrained(default_auto_engines) as pipe:
        pipe.set_progress_bar_config(disable=True)
        out = pipe(["cat", "dog", "cow"], seed=5, output_type="latent")
        one = pipe(["cow"], seed=out.seeds[2], indices=[out.indices[2]], output_type="latent")
        gens = pipe(["cat", "dog"], generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)],
                    output_type="latent")
        alone = [pipe([c], generator=[torch.Generator().manual_seed(s)], output_type="latent").seeds[0]
                 for c, s in (("cat", 1), ("dog", 2))]
        alone_dog = pipe(["dog"], generator=torch.Generator().manual_seed(2), output_type="latent")
        by_seeds, seed_alone = (pipe(c, seed=s, output_type="latent") for c, s in ((["cat", "dog"], [8, 9]), ("dog", 9)))
        by_rt = pipe.runtime.sample(pipe.get_label_ids(["cat", "dog"]), pipe.runtime.schedule(), seed=[8, 9], decode=False)
        drawn = pipe(["cat", "dog"], generator=torch.Generator().manual_seed(4), output_type="latent")
        for bad, got in (([torch.Generator()], "got a list of 1"), ("seed", "got str")):
            with pytest.raises(FlowARError, match=rf"a torch.Generator, or a list of 2 \(one per image\); {got}"):
                pipe(["cat", "dog"], generator=bad)
        pipe.runtime.runner = Padding("cpu", capture=False)
        seen = []
        padded = pipe(["cat", "dog", "cow"], seed=5, output_type="latent",
                      callback_on_scale_end=lambda p, k, kw: seen.append(kw["tokens"].shape[0]))
        pipe.runtime.runner = None
        # where each batch's samples stand among the call's (a callback of a call in batches could not tell)
        last = pipe.runtime.config.n_scales - 1
        places = {}
        batched = pipe([1, 2, 3, 4, 5], seed=3, batch_size=2, output_type="latent", callback_on_scale_end=lambda p, k, kw:
                       places.update({(k, r): kw["tokens"][i] for i, r in enumerate(kw["images"])}))
    assert sorted({r for _, r in places}) == [0, 1, 2, 3, 4] and len(places) == 5 * (last + 1)
    assert all(torch.equal(places[(last, r)], batched.images[r]) for r in range(5))
    assert (one.images[0] - out.images[2]).abs().max() < 1e-3          # (another batch: float rounding only)
    assert gens.seeds == alone and gens.seeds[0] != gens.seeds[1]
    assert seen == [3] * pipe.runtime.config.n_scales and padded.images.shape[0] == 3
    # as in diffusers, image j of a list of generators is what generator[j] gives alone, wherever it
    # stands (its noise depended on its place in the list too)
    assert (gens.images[1] - alone_dog.images[0]).abs().max() < 1e-3 and gens.indices == [0, 0]
    # and so of a list of seeds: image j is what seed[j] gives alone (it was sample j of seed[j], another image),
    # as the runtime samples a seed per label too (the two differed), and of the seeds one generator draws
    assert (by_seeds.images[1] - seed_alone.images[0]).abs().max() < 1e-3 and by_seeds.indices == [0, 0]
    assert torch.equal(by_rt.tokens, by_seeds.images) and drawn.indices == [0, 0]


def test_a_bulk_run_resumes_only_on_the_engines_it_began_with_and_bad_settings_write_nothing(default_auto_engines,
                                                                                              tmp_path, monkeypatch):
    """run.json records what the engine directory's manifest says defines its images: after a re-export
    into the same folder with other engines or other choices the same command is refused instead of
    mixing the new engines' shards with the old ones; the same engines exported again resume. A --stride without the skip solver is refused before --out is
    written (it wrote run.json, failed in the worker, and then refused the corrected command)."""
    from flowar.commands.bulk import BulkSpec, run_bulk
    d = tmp_path / "e"
    shutil.copytree(default_auto_engines, d)
    bad = BulkSpec(str(d), 2, [0, 1], 0, {"stride": 2}, 1, 1)
    with pytest.raises(FlowARError, match="--stride with the skip solver"):
        run_bulk(bad, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
    rep = run_bulk(BulkSpec(str(d), 2, [0, 1], 0, {"stride": 2, "schedule": "fast"}, 1, 1), tmp_path / "bad",
                   progress=False)                                              # the corrected command runs there
    assert rep.shards_done_before == 0 and (tmp_path / "bad" / "samples.npz").is_file()
    spec = BulkSpec(str(d), 2, [0, 1], 0, {}, 1, 1)
    run_bulk(spec, tmp_path / "run", progress=False)
    assert run_bulk(BulkSpec(str(d), 2, [0, 1], 0, {}, 1, 1), tmp_path / "run", progress=False).shards_done_before == 2
    # the defaults spelled out are the same run (it was refused: "other schedule than run.json records");
    # another cfg is not
    from flowar.config import SAMPLING_DEFAULTS
    spelled = dict(SAMPLING_DEFAULTS) | {"steps": 25}
    assert run_bulk(BulkSpec(str(d), 2, [0, 1], 0, spelled, 1, 1), tmp_path / "run",
                    progress=False).shards_done_before == 2
    # (the schedule by the field that differs: both sides' first 37 characters were the same)
    with pytest.raises(FlowARError, match=r"other schedule than .*\(schedule\.cfg: here 3\.0, there 4\.3\)\. Fix"):
        run_bulk(BulkSpec(str(d), 2, [0, 1], 0, {"cfg": 3.0}, 1, 1), tmp_path / "run", progress=False)
    # (by the settings, not the tables derived from them: --schedule fast said "schedule.plan: here ((Eval(t=1.0, ...")
    with pytest.raises(FlowARError, match=r"\(schedule\.solver: here 'skip', there 'euler'; schedule\.stride: here 3, "
                                          r"there 1; schedule\.order: here 3, there 1; schedule\.slots: here \d, there 1; schedule\.name: here 'fast', there "
                                          r"'official'; schedule\.head_evals: here \d+, there \d+\)\. Fix"):
        run_bulk(BulkSpec(str(d), 2, [0, 1], 0, {"schedule": "fast"}, 1, 1), tmp_path / "run", progress=False)
    # the batch it sampled at by default, given, is the same run (it was refused: "batch: here 4, there not given"),
    # and so is any other where shards of 1 cut every batch to 1 (the batch 1 it said it ran at was refused)
    with FlowARPipeline.from_pretrained(d) as pipe:
        ran_at = pipe.runtime.batch
    for given in (ran_at, 1, 3 - ran_at % 2):
        assert run_bulk(BulkSpec(str(d), 2, [0, 1], 0, {}, 1, 1, batch=given), tmp_path / "run",
                        progress=False).shards_done_before == 2
    # another batch where the shards hold more is another run, and the line names the batch it ran at
    run_bulk(BulkSpec(str(d), 2, [0, 1], 0, {}, 2, 1, batch=2), tmp_path / "run2", progress=False)
    with pytest.raises(FlowARError, match=r"\(batch: here 1, there 2\)"):
        run_bulk(BulkSpec(str(d), 2, [0, 1], 0, {}, 2, 1, batch=1), tmp_path / "run2", progress=False)
    with pytest.raises(FlowARError, match=r"other seed than .*run.json records \(seed: here 5, there 0\)\. Fix"):
        run_bulk(BulkSpec(str(d), 2, [0, 1], 5, {}, 1, 1), tmp_path / "run", progress=False)   # (it named no value)
    # what the backend picked where the run began is compared, not what it picks here: a run begun with auto
    # on a GPU (TensorRT) is not resumed on a CPU (it was, and mixed the two engines' shards)
    began = json.loads((tmp_path / "run" / "run.json").read_text())
    (tmp_path / "run" / "run.json").write_text(json.dumps(began | {"chosen": "trt"}))
    (tmp_path / "run" / "shards" / "00001.npz").unlink()
    with pytest.raises(FlowARError, match=r"other backend than .*\(backend: here 'auto: .*, there 'trt'\)"):   # (named as
        # flowar-run names it: it said 'measured', which is no --backend)
        run_bulk(BulkSpec(str(d), 2, [0, 1], 0, {}, 1, 1), tmp_path / "run", progress=False)
    (tmp_path / "run" / "run.json").write_text(json.dumps(began))
    # a local Ray cluster that will not start (a TMPDIR too long for its sockets) is refused before a new
    # --out is written (it left a run.json there)
    import flowar.commands.bulk as bulk
    with monkeypatch.context() as mp:
        mp.setattr(bulk, "start_ray", lambda *a: (_ for _ in ()).throw(FlowARError("Ray to start", "no", "fix it")))
        with pytest.raises(FlowARError, match="Ray to start"):
            run_bulk(BulkSpec(str(d), 2, [0, 1], 0, {}, 1, 1), tmp_path / "ray", workers=2, progress=False)
    assert not (tmp_path / "ray").exists()
    # a re-export of the same engines (another time, memory peak, library record, checkpoint location) is the
    # same run: it was refused ("other manifest_sha256"), a fix no one could follow; a run.json of before,
    # which recorded the manifest file's own digest, resumes on that file
    m = json.loads((d / "manifest.json").read_text())
    assert m["call_plan"]["batches"] and m["call_plan"]["per_image"]           # (this directory has a call plan)
    again = m | {"created": "re-exported", "versions": {}, "sealed_sha256": "f" * 64, "checkpoint": m["checkpoint"] | {"source": "/moved"},
                 "sealed_parts": m["sealed_parts"] | {"created": "0" * 16},
                 "stages": {k: v | {"peak_rss_gb": 99.0} for k, v in m["stages"].items()},
                 "call_plan": m["call_plan"] | {"per_image": {b: 2 * t for b, t in m["call_plan"]["per_image"].items()}}}
    (d / "manifest.json").write_text(json.dumps(again))
    assert run_bulk(BulkSpec(str(d), 2, [0, 1], 0, {}, 1, 1), tmp_path / "run", progress=False).shards_done_before == 1
    from flowar.export.manifest import sha256_file
    began = json.loads((tmp_path / "run" / "run.json").read_text())
    (tmp_path / "run" / "run.json").write_text(json.dumps(began | {"manifest_sha256": sha256_file(d / "manifest.json"),
                                                                    "engine_dir": "/where/it/was"}))
    assert run_bulk(BulkSpec(str(d), 2, [0, 1], 0, {}, 1, 1), tmp_path / "run", progress=False).shards_done_before == 2
    # other engines (another graph, other recorded defaults) are another run
    (tmp_path / "run" / "run.json").write_text(json.dumps(began))
    for other in ({"stages": m["stages"] | {"ar": m["stages"]["ar"] | {"sha256": "0" * 64}}},
                  {"schedule_defaults": m["schedule_defaults"] | {"cfg": 2.0}},
                  {"call_plan": m["call_plan"] | {"batches": m["call_plan"]["batches"][:1]}}):   # (batches: rounding)
        (d / "manifest.json").write_text(json.dumps(m | other))
        with pytest.raises(FlowARError, match="other manifest_sha256 than .*run.json records"):
            run_bulk(BulkSpec(str(d), 2, [0, 1], 0, {}, 1, 1), tmp_path / "run", progress=False)
    (d / "manifest.json").write_text(json.dumps(m))
    # a first run that fails before its first shard (its engines would not open) binds the folder to nothing:
    # other settings run there (they were refused: "other backend than run.json records")
    with monkeypatch.context() as mp:
        mp.setattr(bulk.ShardSampler, "_open", lambda self, batch: (_ for _ in ()).throw(
            FlowARError("engines that open", "none", "fix them")))
        with pytest.raises(FlowARError, match="engines that open"):
            run_bulk(BulkSpec(str(d), 2, [0, 1], 0, {}, 1, 1, backend="torch"), tmp_path / "failed", progress=False)
    rep = run_bulk(BulkSpec(str(d), 2, [0, 1], 0, {}, 1, 1), tmp_path / "failed", progress=False)
    assert rep.shards_total == 2 and rep.shards_done_before == 0 and (tmp_path / "failed" / "samples.npz").is_file()
    # a folder this command did not write is refused, untouched (a user's run.json and samples.npz were
    # replaced), and so are shards without their run.json (kept as part of a run of other settings)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "run.json").write_text('{"mine": 1}')
    (mine / "samples.npz").write_bytes(b"the user's")
    orphan = tmp_path / "orphan"
    shutil.copytree(tmp_path / "run", orphan)
    (orphan / "run.json").unlink()
    torn = tmp_path / "torn"                    # (a run.json cut short was said as if there were none)
    shutil.copytree(tmp_path / "run", torn)
    (torn / "run.json").write_text((torn / "run.json").read_text()[:20])
    for folder, said in ((mine, "holds run.json, samples.npz.*its run.json not flowar-sample's"),
                         (orphan, "without a run.json"), (torn, "its run.json not flowar-sample's \\(unreadable")):
        before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        with pytest.raises(FlowARError, match=f"a new or empty folder, or one flowar-sample wrote.*{said}"):
            run_bulk(BulkSpec(str(d), 2, [0, 1], 7, {}, 1, 1), folder, progress=False)
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_from_pretrained_answers_a_path_it_cannot_use_with_one_flowar_error(tmp_path):
    """Not a path, a name too long for the file system, a loop of links: a FlowARError each (a TypeError,
    an OSError and a RuntimeError reached the caller)."""
    from flowar import FlowARPipeline
    from flowar.errors import FlowARError
    (tmp_path / "a.safetensors").symlink_to(tmp_path / "b.safetensors")
    (tmp_path / "b.safetensors").symlink_to(tmp_path / "a.safetensors")
    for path, said in ((None, "a str or os.PathLike"), (5, "a str or os.PathLike"),
                       (tmp_path / ("x" * 300 + ".safetensors"), "File name too long"),
                       (tmp_path / "a.safetensors", "a.safetensors"),
                       # (a mistyped engine directory was "expected a checkpoint file")
                       (tmp_path / "engines/", "expected an engine directory or a checkpoint file; got nothing at "),
                       ("", "got an empty path"), ("a\0b", "a checkpoint"),     # (a NUL byte: ValueError's traceback)
                       # a Hub id ("check the path" alone); a path in a folder that is here is not one
                       ("no-such-org/FlowAR-S", r"nothing at no-such-org/FlowAR-S\. Fix: check the path \(a Hugging Face "
                        r"Hub id is not downloaded here: download the checkpoint, e\.g\. huggingface-cli download "
                        r"no-such-org/FlowAR-S, and pass the file's path\)$"),
                       ("no-such-org/Model-1.5", r"huggingface-cli download no-such-org/Model-1\.5, and pass"),
                       ("no-such-org/model.pth", r"nothing at no-such-org/model\.pth\. Fix: check the path$"),
                       ("tests/no-such-file", r"nothing at tests/no-such-file\. Fix: check the path$")):
        with pytest.raises(FlowARError, match=said):
            FlowARPipeline.from_pretrained(path)


def test_one_pipeline_called_from_two_threads_gives_each_call_its_own_images(default_auto_engines):
    """The stages' buffers are the runtime's: two threads calling one pipeline at once got each other's
    images (every pixel wrong, no error); calls now take turns. A call from inside the pipeline's own
    callback is refused in one line (it would have written into the outer call's buffers)."""
    import threading
    with FlowARPipeline.from_pretrained(default_auto_engines) as pipe:
        pipe.set_progress_bar_config(disable=True)
        want = {s: pipe([s % 10, 3, 5], seed=s, output_type="latent").images for s in range(6)}
        got = {}

        def work(seeds):
            for s in seeds:
                got[s] = pipe([s % 10, 3, 5], seed=s, output_type="latent").images
        threads = [threading.Thread(target=work, args=(range(j, 6, 2),)) for j in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(torch.equal(got[s], want[s]) for s in range(6))
        with pytest.raises(FlowARError, match="one call at a time on a runtime; got a sample call from inside a "
                                              "sampling's callback. Fix: sample after that call returns"):
            pipe([1], callback_on_scale_end=lambda p, k, kw: p([2]))
        with pytest.raises(FlowARError, match="got a decode call from inside a sampling's callback. Fix: decode after"):
            pipe([1], callback_on_scale_end=lambda p, k, kw: p.decode(want[0]))


def test_labels_and_devices_a_notebook_passes(default_auto_engines, tmp_path):
    """A NumPy or 0-d torch integer is one label (a DataLoader's y[0] was a TypeError); float, bool and
    bytes labels are refused (3.7 was class 3, True class 1, b"\\x01" class 1); devices PyTorch names but
    nothing here runs on are refused when opened (meta opened, then failed in the first call); the
    opening errors name the keywords, not the commands' options."""
    import numpy as np
    with FlowARPipeline.from_pretrained(default_auto_engines) as pipe:
        pipe.set_progress_bar_config(disable=True)
        for label in (np.int64(3), torch.tensor(3), torch.tensor([3])):
            assert pipe(label, output_type="latent").labels == [3]
        for label, ids in ((np.array(3), [3]), (torch.tensor(3), [3]), (np.array("cat"), pipe.get_label_ids("cat"))):
            assert pipe.get_label_ids(label) == ids         # (get_label_ids said "iteration over a 0-d array")
        for bad in (torch.tensor([3.7]), torch.tensor([True]), b"\x01", None, 3.0):
            with pytest.raises(FlowARError, match="class_labels"):
                pipe(bad, output_type="latent")
        # a list of 0-d tensors (list(y) of a float tensor): 1.5 was class 1 and True class 1, silently
        for bad in ([torch.tensor(1.5)], [torch.tensor(True)], [3, torch.tensor(2.7)]):
            with pytest.raises(FlowARError, match="class ids"):
                pipe(bad, output_type="latent")
        with pytest.raises(FlowARError, match="class ids"):
            pipe.get_label_ids([torch.tensor(2.7)])
        assert pipe([3, 4], seed=torch.tensor(1), output_type="latent").seeds == [1, 1]
    for kw, said in ((dict(device="meta"), "device auto, cpu or cuda"), (dict(threads=0), "threads an integer >= 1"),
                     (dict(threads=True), "threads an integer >= 1"), (dict(cuda_graphs="no"), "cuda_graphs True or False"),
                     (dict(vae="x"), "expected no vae with an engine directory; got vae")):
        with pytest.raises(FlowARError, match=said) as e:
            FlowARPipeline.from_pretrained(default_auto_engines, **kw)
        assert "--" not in str(e.value), str(e.value)


def test_a_pipeline_closed_during_a_call_lets_it_finish_and_is_not_copied(default_auto_engines):
    """close() from another thread while a call runs waits for it (the call failed with ONNX Runtime's
    'cannot schedule new futures after shutdown'); a pickle or copy of an opened pipeline, and a bar
    option tqdm does not take (it failed later, in a call, on a terminal only), are one line each."""
    import copy
    import pickle
    import threading
    pipe = FlowARPipeline.from_pretrained(default_auto_engines)
    pipe.set_progress_bar_config(disable=True)
    for bad in (pickle.dumps, copy.deepcopy, copy.copy):
        with pytest.raises(FlowARError, match="from_pretrained"):
            bad(pipe)
    with pytest.raises(FlowARError, match="bogus"):
        pipe.set_progress_bar_config(bogus=1)
    want = pipe(list(range(10)) * 2, seed=4, output_type="latent", batch_size=4).images
    started, result = threading.Event(), {}

    def call():
        try:
            result["images"] = pipe(list(range(10)) * 2, seed=4, output_type="latent", batch_size=4,
                                    callback_on_scale_end=lambda p, k, kw: started.set()).images
        except Exception as e:  # noqa: BLE001
            result["error"] = e
    t = threading.Thread(target=call)
    t.start()
    assert started.wait(60)
    pipe.close()                                  # (waits for the call)
    t.join()
    assert "error" not in result and torch.equal(result["images"], want)
    with pytest.raises(FlowARError, match="closed"):
        pipe([1])


def test_indices_may_come_as_any_iterable(default_auto_engines):
    """indices=(i for i in ...) was used up by its check ("0 indices, 2 seeds"); the images it names are
    those of the same indices as a list."""
    with FlowARPipeline.from_pretrained(default_auto_engines) as pipe:
        pipe.set_progress_bar_config(disable=True)
        want = pipe([3, 4], seed=2, indices=[5, 6], output_type="latent")
        got = pipe([3, 4], seed=2, indices=(i for i in [5, 6]), output_type="latent")
        tensor = pipe([3, 4], seed=2, indices=torch.tensor([5, 6]), output_type="latent")   # (README: "or tensor")
    assert got.indices == [5, 6] and torch.equal(got.images, want.images)
    assert tensor.indices == [5, 6] and torch.equal(tensor.images, want.images)


def test_what_a_diffusers_user_reaches_for_next(default_auto_engines, monkeypatch):
    """return_dict=False, pipe.to / pipe.device, a callback of the wrong arity (a TypeError once a scale
    had run), unordered labels, seeds or indices (a set's order changes with the hash seed: which image
    had which label changed between processes; a dict gave its keys), NumPy's generator and a list
    holding None (a bare AttributeError), NumPy integer threads, a call too large for the memory (it
    grew toward terabytes), and messages that keep a suggested command line as it is ("flowar-export
    backend trt")."""
    import numpy as np

    from flowar.pipeline.messages import in_python_terms
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # (threads within the cores: no warning)
        FlowARPipeline.from_pretrained(default_auto_engines, threads=1).close()
    with pytest.warns(UserWarning, match=r"threads=999: this process may use (\d+) cores?; it computes on those") as w:
        with FlowARPipeline.from_pretrained(default_auto_engines, threads=999) as capped:   # (capped without a word)
            said = next(str(m.message) for m in w if "threads=999" in str(m.message))
            assert said.split()[5] == str(capped.runtime.threads.cores), said
    with FlowARPipeline.from_pretrained(default_auto_engines, threads=np.int64(1)) as pipe:
        pipe.set_progress_bar_config(disable=True)
        assert pipe.runtime.threads.cores == 1 and type(pipe.runtime.threads.cores) is int
        want = pipe([3, 4], seed=1, output_type="np").images
        got = pipe([3, 4], seed=1, output_type="np", return_dict=False)
        assert isinstance(got, tuple) and len(got) == 1 and np.array_equal(got[0], want)
        assert pipe.to("cpu") is pipe and pipe.device == torch.device("cpu")
        assert pipe.to("cpu:0") is pipe and pipe.to(torch.device("cpu", 0)) is pipe    # (the same CPU: it was refused)
        with pytest.raises(FlowARError, match="from_pretrained\\(path, device='cuda'\\)"):
            pipe.to("cuda")
        calls = []
        for bad in (lambda k: calls.append(k), lambda p, k: calls.append(k)):
            with pytest.raises(FlowARError, match="callback_on_scale_end a function of"):
                pipe([1], callback_on_scale_end=bad)
        assert calls == []                                  # refused before any scale ran
        # what a call returns and hands its callback are tensors to change in place, as diffusers' are (made
        # under inference mode, mul_ raised "Inplace update to inference tensor outside InferenceMode")
        out = pipe([3, 4], seed=1, output_type="latent", callback_on_scale_end=lambda p, k, d: calls.append(d["tokens"]))
        pt = pipe([3], seed=1, output_type="pt")
        for t in (out.images, out.tokens, *calls, pipe.runtime.decode(out.images), pt.images, pt.tokens):
            t.mul_(1.0)
        for kw, said in ((dict(class_labels={3, 4}), "class_labels: a list, tuple, array or tensor"),
                         (dict(class_labels={"cat": 1}), "class_labels: a list, tuple, array or tensor"),
                         (dict(class_labels=[3, 4], seed={1: 2, 3: 4}), "seed: a list, tuple, array or tensor"),
                         (dict(class_labels=[3, 4], indices={0, 1}), "indices: a list, tuple, array or tensor"),
                         (dict(class_labels=[3], generator=np.random.default_rng(0)), "got numpy.random.Generator"),
                         (dict(class_labels=[3, 4], generator=[torch.Generator(), None]), "holding a NoneType")):
            with pytest.raises(FlowARError, match=said.replace("(", "\\(")):
                pipe(**kw)
        for bad in (3, None, b"cat", {"cat"}):
            with pytest.raises(FlowARError, match="names: a list, tuple, array or tensor"):
                pipe.get_label_ids(bad)
        import flowar.io.memory as memory
        monkeypatch.setattr(memory, "available_bytes", lambda: 10 << 20)       # 10 MiB left
        with pytest.raises(FlowARError, match="fit in memory.*1000 images") as e:
            pipe([1] * 1000)
        # the parts it advises are the bound it keeps (it refused above all the memory, and advised half of it)
        part = int(re.search(r"call it in parts of at most (\d+) labels", str(e.value)).group(1))
        assert pipe([1] * part, output_type="np", num_inference_steps=2).images.shape[0] == part
        with pytest.raises(FlowARError, match=f"fit in memory.*{part + 1} images"):
            pipe([1] * (part + 1), output_type="np")
        assert pipe([1, 2], output_type="latent").labels == [1, 2]            # a call that fits
    said = in_python_terms(FlowARError("a", "b", "rebuild plans here with flowar-export --backend trt, or use --backend ort"))
    assert str(said).endswith('with flowar-export --backend trt, or use backend="ort"'), said
    said = in_python_terms(FlowARError("--precision fp32 or bf16", "x", "check the --config path; drop --raw-weights"))
    assert "--" not in str(said) and "raw_weights" in str(said) and "config path" in str(said), said
    # an option with its value is the keyword argument a call takes; a word that is no value of it stays
    said = in_python_terms(FlowARError("--cfg in [1, 50]", "x", "use e.g. --steps 25, pass --preset tiny or --backend ort"))
    assert str(said).endswith('got x. Fix: use e.g. num_inference_steps=25, pass preset="tiny" or backend="ort"'), said
    assert "guidance_scale in [1, 50]" in str(said), said
    said = in_python_terms(FlowARError("a", "b", "use --precision bf16 on --device cuda:1; pass --vae /m/vae (its VAE), "
                                                 "or --steps 25."))
    assert str(said).endswith('Fix: use precision="bf16" on device="cuda:1"; pass vae="/m/vae" (its VAE), or '
                              'num_inference_steps=25.'), said
    said = in_python_terms(FlowARError("a", "b", "pass --vae, or ask for tokens only (--save-tokens without --out or "
                                                 "--save-images)"))
    assert str(said).endswith('Fix: pass vae=, or ask for tokens only (output_type="latent")'), said


def test_from_pretrained_takes_the_config_itself_or_its_path_and_names_what_differs():
    """config= may be the FlowARConfig a Python user holds (it was a TypeError: "expected str, bytes
    or os.PathLike object, not FlowARConfig"), sampling as the file's own; another type is one line;
    a config other than the file's names the fields that differ."""
    from conftest import DEFAULT_CKPT
    from flowar import FlowARPipeline
    from flowar.errors import FlowARError
    from flowar.model.checkpoint import load_model
    own = load_model(DEFAULT_CKPT)[1].config
    tokens = []
    for config in (None, own):
        with FlowARPipeline.from_pretrained(str(DEFAULT_CKPT), config=config) as pipe:
            pipe.set_progress_bar_config(disable=True)
            tokens.append(pipe([3], seed=0, num_inference_steps=4, output_type="latent").images)
    assert torch.equal(tokens[0], tokens[1])
    with pytest.raises(FlowARError, match="expected config: a config JSON's path or a FlowARConfig; got 3") as e:
        FlowARPipeline.from_pretrained(str(DEFAULT_CKPT), config=3)
    assert "\n" not in str(e.value)
    with pytest.raises(FlowARError, match=r"a different preset=/config= \(latent_scale 0.5, the file's 1.07"):
        FlowARPipeline.from_pretrained(str(DEFAULT_CKPT), config=own.replace(latent_scale=0.5))


def test_a_bar_the_caller_points_at_a_stream_or_a_notebook_is_drawn_there(monkeypatch):
    """Where stderr is no terminal a bar became a plain line every 30 s (a log's), also where the caller
    named the stream (set_progress_bar_config(file=...)) or ran in a notebook (stderr is no terminal
    there): nothing at all for a short call. Those get tqdm's bar, on their stream."""
    import io
    import sys
    import types
    from flowar.io.progress import Lines, progress_bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert isinstance(progress_bar(total=3, desc="scales"), Lines)              # (a log: the plain lines)
    out = io.StringIO()
    bar = progress_bar(total=3, desc="scales", unit="scale", file=out)
    bar.update(3)
    bar.close()
    assert "scales" in out.getvalue() and "3/3" in out.getvalue(), out.getvalue()
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    bar = progress_bar(total=3, desc="scales")                                  # (a notebook: no file named)
    assert not isinstance(bar, Lines)
    bar.close()


def test_a_log_s_line_gives_byte_counts_in_si_units(monkeypatch, capsys):
    """Hashing a directory in a log (no terminal) printed "hashing: 4213741824/16000000000 Bs
    (1053435456.00 B/s, 4 s)": tqdm's unit_scale was dropped by the plain lines."""
    import sys
    from flowar.io import progress
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    bar = progress.progress_bar(16_000_000_000, "hashing", "B", unit_scale=True)
    bar.update(4_213_741_824)
    line = capsys.readouterr().err
    assert line.startswith("hashing: 4.21GB/16.0GB (") and "B/s, " in line and "Bs" not in line, line
    bar = progress.progress_bar(10, "scales", "scale")                 # (counts without unit_scale: as they were)
    bar.update(3)
    assert capsys.readouterr().err.startswith("scales: 3/10 scales ("), "unscaled counts changed"


def test_numpy_ids_and_0d_tensors_are_taken_as_their_python_values(default_auto_engines):
    """A NumPy array of ids and 0-d tensors for the numbers sample what the plain values sample
    (guidance_scale=torch.tensor(2.0) was refused as "not in [1, 50]")."""
    import numpy as np
    with FlowARPipeline.from_pretrained(default_auto_engines) as pipe:
        pipe.set_progress_bar_config(disable=True)
        a = pipe(np.array([3, 7]), seed=1, guidance_scale=torch.tensor(2.0), num_inference_steps=torch.tensor(4),
                 output_type="np").images
        b = pipe([3, 7], seed=1, guidance_scale=2.0, num_inference_steps=4, output_type="np").images
        assert np.array_equal(a, b)
        with pytest.raises(FlowARError, match="guidance_scale in"):
            pipe([3], guidance_scale=torch.tensor(0.5))
        # a 0-d array is its one label (iterating it was NumPy's TypeError)
        assert np.array_equal(pipe(np.array(3), seed=1, output_type="np").images,
                              pipe(3, seed=1, output_type="np").images)


def test_a_models_folder_passed_as_an_engine_directory_is_told_to_open_the_checkpoint_in_it():
    """A diffusers user's first try is the model's folder (the shipped model's holds flowar.safetensors and
    vae/): the refusal names the file and its VAE, for the command and for from_pretrained."""
    from flowar.export.manifest import EngineDirError
    with pytest.raises(EngineDirError) as e:
        FlowARPipeline.from_pretrained(DEFAULT_CKPT.parent)
    assert f"flowar-run --ckpt {DEFAULT_CKPT} --vae {DEFAULT_VAE} (Python: FlowARPipeline.from_pretrained(" \
           f"{str(DEFAULT_CKPT)!r}, vae={str(DEFAULT_VAE)!r}))" in str(e.value), str(e.value)



def test_a_vae_folder_or_a_file_of_an_engine_directory_is_not_told_to_open_it_as_a_model(default_auto_engines):
    """The VAE's own folder (diffusers' diffusion_pytorch_model.safetensors) was told "it holds a checkpoint:
    open the file itself", which then failed as a model with no config; a file of an engine directory
    (ar.onnx, manifest.json) was told to "rename or convert the file": now the folder it is in."""
    from flowar.export.manifest import EngineDirError
    with pytest.raises(EngineDirError) as e:
        FlowARPipeline.from_pretrained(DEFAULT_VAE)
    assert "manifest.json in the engine directory" in str(e.value) and "diffusion_pytorch_model" not in str(e.value)
    for name in ("ar.onnx", "manifest.json"):
        with pytest.raises(FlowARError, match=rf"got {re.escape(name)}\. Fix: pass the folder it is in, "
                                              rf"{re.escape(str(default_auto_engines))}, as an engine directory$"):
            FlowARPipeline.from_pretrained(default_auto_engines / name)


def test_what_diffusers_users_pass_is_refused_with_what_to_do_instead_and_the_output_indexes_like_theirs(
        default_auto_engines):
    """callback_on_step_end, num_images_per_prompt, torch_dtype and .to(dtype) were bare TypeErrors; out[0],
    out["images"] and out.to_tuple() work as on diffusers' outputs."""
    with pytest.raises(FlowARError, match=r"torch_dtype', which it does not take. Fix: precision=\"bf16\" when opening"):
        FlowARPipeline.from_pretrained(default_auto_engines, torch_dtype=torch.float16)
    with FlowARPipeline.from_pretrained(default_auto_engines) as pipe:
        pipe.set_progress_bar_config(disable=True)
        for kw, fix in ((dict(callback_on_step_end=print), "callback_on_scale_end="),
                        (dict(num_images_per_prompt=4), "repeat the labels"), (dict(bogus=1), "help(FlowARPipeline.__call__)"),
                        (dict(height=512), "leave it out: a FlowAR model makes images of one size")):
            with pytest.raises(FlowARError, match=re.escape(fix)):
                pipe([3], **kw)
        for args in ((torch.float16,), ("cpu", torch.float16)):
            with pytest.raises(FlowARError, match="keeps the precision it was opened with"):
                pipe.to(*args)
        with pytest.raises(FlowARError, match=r"torch_dtype', which it does not take. Fix: precision=\"bf16\""):
            pipe.to("cpu", torch_dtype=torch.float16)                    # (a TypeError)
        with pytest.raises(FlowARError, match=r"'prompt', which it does not take. Fix: class_labels: FlowAR makes "):
            pipe(prompt="cat")                                           # (a TypeError: a missing class_labels)
        with pytest.raises(FlowARError, match=r"of 3 arguments .*; got function of 4 arguments \(diffusers' step"):
            pipe([3], callback_on_scale_end=lambda pipe, step, timestep, kw: kw)
        with pytest.raises(FlowARError, match=r"expected batch_size an int >= 1; got 3.0"):     # (">= 1; got 3.0")
            pipe([3], batch_size=3.0)
        assert pipe.to("cpu") is pipe
        out = pipe([3, 7], seed=0, num_inference_steps=4, output_type="np")
        assert out[0] is out["images"] is out.images and out.to_tuple() == (out.images,)


def test_a_local_bulk_run_records_the_threads_that_compute(default_auto_engines, tmp_path):
    """--threads above the machine's cores computes on the cores (the runtime's cap): run.json records
    that count, so that a resume where it differs is refused as other settings, not mixed in."""
    import json
    import os

    from click.testing import CliRunner

    from flowar.commands.cli_ray import sample_cmd
    res = CliRunner().invoke(sample_cmd, ["--engine-dir", str(default_auto_engines), "--num-images", "2", "--out",
                                          str(tmp_path / "o"), "--threads", "999", "--schedule", "fast"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "run.json").read_text())["threads"] == os.cpu_count()


def test_a_bulk_runs_samples_npz_is_written_one_shard_at_a_time(tmp_path):
    """samples.npz was the shards' images concatenated in memory, then copied once more while written:
    three times its size (a 50,000-image FlowAR-S run: about 29 GB at its very end, on a 23 GB machine).
    Its images are written part by part, each released before the next is read, as numpy.load reads them
    (the same bytes twice over)."""
    import weakref

    from flowar.io.npz import Parts, write_npz
    alive = []

    def part(i):
        assert all(r() is None for r in alive), "an earlier part still held"
        a = np.full((2, 3), i, np.uint8)
        alive.append(weakref.ref(a))
        return a
    for name in ("a.npz", "b.npz"):
        write_npz(tmp_path / name, {"arr_0": Parts((6, 3), np.uint8, [lambda i=i: part(i) for i in range(3)]),
                                    "arr_1": np.arange(6)})
        alive.clear()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        assert np.array_equal(z["arr_0"], np.repeat(np.arange(3, dtype=np.uint8), 2)[:, None].repeat(3, 1))
        assert np.array_equal(z["arr_1"], np.arange(6))
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with pytest.raises(ValueError, match="parts of 4 rows, not 6"):
        write_npz(tmp_path / "c.npz", {"arr_0": Parts((6, 3), np.uint8, [lambda: np.zeros((2, 3), np.uint8)] * 2)})
    assert not (tmp_path / "c.npz").exists()


def test_a_stopped_bulk_run_records_its_throughput_beside_the_resumed_ones(default_auto_engines, tmp_path, monkeypatch):
    """run.json keeps each run's throughput (README): a run stopped after its first shard recorded none, so the
    folder's record held the resumed run alone. Stopped as a signal stops the command (its handler records the
    stop, which then refused the record's write: the line said "interrupted" alone, run.json no stopped run)."""
    import json
    import signal

    import flowar.commands.bulk as bulk
    from flowar.errors import stop_asked, stops_cleared
    real = bulk._sample_here

    def one_shard_then_stopped(spec, out, todo, progress, done_before):
        real(spec, out, todo[:1], progress, done_before)
        stop_asked(signal.SIGTERM, None)
    spec = bulk.BulkSpec(str(default_auto_engines), 4, [0, 1], 0, {}, 2, 1)
    monkeypatch.setattr(bulk, "_sample_here", one_shard_then_stopped)
    stops_cleared()
    try:
        with pytest.raises(KeyboardInterrupt, match="2 of 4 images written"):
            bulk.run_bulk(spec, tmp_path / "run", progress=False)
    finally:
        stops_cleared()
    monkeypatch.setattr(bulk, "_sample_here", real)
    bulk.run_bulk(spec, tmp_path / "run", progress=False)
    runs = json.loads((tmp_path / "run" / "run.json").read_text())["throughput"]
    assert [(r["images"], r.get("stopped", False)) for r in runs] == [(2, True), (2, False)], runs
    assert all(r["images_per_s"] > 0 for r in runs)


def test_a_stop_ends_a_single_workers_batch_at_its_next_scale(default_auto_engines, tmp_path):
    """flowar-sample with one worker (in its own process) said "interrupted" at once, then ran on until
    its batch ended (FlowAR-S: 20 s; SIGTERM 18.8 s, past a container's 10 s grace), and a second Ctrl-C
    meanwhile aborted it (exit 134): the thread computing was not told. An interrupt sets the sampler's
    `stopping`; the batch computing stops at its next scale, and the next shard clears it."""
    from dataclasses import asdict

    from flowar.commands.bulk import BulkSpec, ShardSampler
    sampler = ShardSampler(asdict(BulkSpec(str(default_auto_engines), 4, [0, 1], 0, {}, 2, 1)), str(tmp_path))
    rt, seen = sampler.lanes[0], []
    real = rt.sample
    rt.sample = lambda *a, on_scale=None, **k: real(*a, on_scale=lambda tr: (seen.append(tr.k), on_scale(tr)), **k)
    sampler.stopping.set()
    with pytest.raises(KeyboardInterrupt):
        sampler._sample(rt, [0, 1], sampler.stopping)
    assert seen == [0]                                   # after the first scale, of 4
    assert sampler.sample_shard(0, 0, 2) > 0 and sampler.stopping.is_set() is False     # a shard anew: not stopped
    # a shard whose batch failed: its stop holds for its batches still computing (another lane's) once the next
    # shard began on this worker (Ray Data's retry), which cleared it before: that batch then ran to its end
    sampler._sample, real_sample, told = lambda *a: (told.append(a[-1]), 1 / 0), sampler._sample, []
    with pytest.raises(ZeroDivisionError):
        sampler.sample_shard(1, 2, 4)
    sampler._sample = real_sample
    assert sampler.sample_shard(1, 2, 4) > 0
    assert told[0].is_set() and not sampler.stopping.is_set()
    sampler.close()                                      # (its engines released: a closed runtime refuses to sample)
    with pytest.raises(RuntimeError, match="after shutdown"):                  # (and its threads ended)
        sampler._computes[-1].submit(int)
    with pytest.raises(Exception, match="expected an open source; got one closed"):
        sampler._sample(sampler.lanes[0], [0], sampler.stopping)

