"""The quality meter: Frechet distance against known math, FID through a stand-in extractor,
and flowar-judge on the official fixture (no judge there: token errors, PSNR, FID)."""

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from flowar.errors import FlowARError
from flowar.eval.quality import feature_stats, frechet_distance, load_extractor, read_fid_stats


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    d1, d2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    exact = ((mu1 - mu2) ** 2).sum() + (d1 + d2 - 2 * np.sqrt(d1 * d2)).sum()
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(exact, rel=1e-10)
    # invariant under a rotation of both (then the covariances no longer commute with the axes)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    got = frechet_distance(q @ mu1, q @ np.diag(d1) @ q.T, q @ mu2, q @ np.diag(d2) @ q.T)
    assert got == pytest.approx(exact, rel=1e-8)
    assert frechet_distance(mu1, np.diag(d1), mu1, np.diag(d1)) == pytest.approx(0, abs=1e-10)
    with pytest.raises(FlowARError, match="same feature size"):
        frechet_distance(mu1, np.diag(d1), mu2[:3], np.diag(d2[:3]))


def test_feature_stats_of_samples_estimate_the_gaussian():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 4, generator=gen)
    b = torch.randn(20000, 4, generator=gen) + torch.tensor([1.0, 0, 0, 0])
    assert frechet_distance(*feature_stats(a), *feature_stats(a[:10000])) < 0.01
    assert frechet_distance(*feature_stats(a), *feature_stats(b)) == pytest.approx(1.0, abs=0.05)


class StandIn(torch.nn.Module):
    """A small feature extractor with the StyleGAN3 Inception's calling convention."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        f = torch.relu(self.conv(img.float() / 127.5 - 1)).mean(dim=(2, 3))
        return f if return_features else f.sum(1, keepdim=True)


def test_extractors_load_from_torchscript_and_torch_export(tmp_path):
    net = StandIn().eval()
    img = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    torch.export.save(torch.export.export(net, (img,), {"return_features": True}), str(tmp_path / "s.pt2"))
    with pytest.warns(DeprecationWarning):
        torch.jit.save(torch.jit.script(net), str(tmp_path / "s.pt"))
    want = net(img, return_features=True).double()
    for f in ("s.pt", "s.pt2"):
        got = load_extractor(tmp_path / f)(img)
        assert got.shape == (3, 8) and torch.allclose(got, want, atol=1e-6), f


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_judge_reports_fidelity_convergence_and_fid(fixtures_dir, tmp_path, monkeypatch):
    import flowar.eval.quality
    from PIL import Image
    monkeypatch.setattr(flowar.eval.quality, "CONVERGED_POINTS", 51)    # a converged reference (2x the official steps), at test size
    from flowar.commands.cli import judge_cmd, run
    extractor = tmp_path / "standin.pt"
    torch.jit.save(torch.jit.script(StandIn()), str(extractor))
    ckpt = ["--ckpt", str(fixtures_dir / "tiny_v1.safetensors"), "--config", str(fixtures_dir / "tiny_v1.config.json"),
            "--vae", str(fixtures_dir / "mar_vae_tiny.ckpt")]
    sched = ["--schedule", "fast", "--steps", "13", "--seed", "4"]
    # reference statistics made independently: flowar-run's PNGs of the same samples, read back
    res = CliRunner().invoke(run, ckpt + sched + ["--labels", "0,0,0,1,1,1", "--save-images", str(tmp_path / "png"),
                                                  "--save-tokens", str(tmp_path / "fast.safetensors")])
    assert res.exit_code == 0, res.output
    u8 = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                      for p in sorted((tmp_path / "png").glob("*.png"))])
    feats = torch.jit.load(str(extractor))(u8, return_features=True)
    mu, sigma = feature_stats(feats)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    import flowar.io.progress
    bars, real_bar = [], flowar.io.progress.progress_bar
    monkeypatch.setattr(flowar.io.progress, "progress_bar", lambda **kw: bars.append(kw["desc"]) or real_bar(**kw))
    res = CliRunner().invoke(judge_cmd, ckpt + sched + ["--per-class", "3", "--classes-limit", "2", "--converged",
                                                        "--fid-stats", str(tmp_path / "stats.npz"), "--fid-extractor",
                                                        str(extractor), "--json", str(tmp_path / "q.json")])
    assert res.exit_code == 0, res.output
    # each run's bar names its schedule: the converged reference's (most of the time) was one more "scales" bar
    assert bars == ["scales (custom schedule)", "scales (official schedule)", "scales (converged reference schedule)"], bars
    rep = json.loads((tmp_path / "q.json").read_text())
    assert rep["n_samples"] == 6 and rep["class_accuracy"] is None          # no judge for this model
    assert rep["fid"] == pytest.approx(0.0, abs=1e-6)                        # the same images as the statistics
    o, c = rep["vs_official"], rep["vs_converged"]
    # (random weights: the fast schedule is not meant to be close here, only measured) what each figure compares,
    # sampled here on the reference modules: the schedule asked for, the official one at its cfg and guidance (same
    # noise: seed 4, samples 0-5), the converged reference (51 points of Euler, uniform)
    from safetensors.torch import load_file

    from flowar.model.checkpoint import load_model
    from flowar.sampling.batches import run_sampling
    from flowar.sampling.eager import EagerStages
    from flowar.sampling.schedule import Settings, build_schedule
    model, _ = load_model(fixtures_dir / "tiny_v1.safetensors", config_path=fixtures_dir / "tiny_v1.config.json")
    n = model.config.n_scales
    fast = Settings(schedule="fast", steps=13).resolve(n)
    with torch.inference_mode():          # (the fast schedule's: flowar-run's above)
        tokens = {name: run_sampling(EagerStages(model), model.config, [0, 0, 0, 1, 1, 1], sch, 4).tokens for name, sch in (
            ("official", Settings(schedule="official", cfg=fast.cfg, guidance=fast.guidance).resolve(n)),
            ("converged", build_schedule(51, fast.cfg, fast.guidance, n, "euler", "uniform")))}
    tokens["fast"] = load_file(str(tmp_path / "fast.safetensors"))["tokens"]
    d = {k: (tokens["fast"] - tokens[k]).abs() for k in ("official", "converged")}
    want = {"o": (d["official"].max(), d["official"].mean()), "c": (d["converged"].max(), d["converged"].mean(),
                                                                     (tokens["official"] - tokens["converged"]).abs().mean())}
    got = {"o": (o["token_max"], o["token_mean"]), "c": (c["token_max"], c["token_mean"], c["official_token_mean"])}
    for k in want:
        assert np.allclose(got[k], [float(v) for v in want[k]], rtol=1e-4, atol=1e-6), (k, got[k], want[k])
    assert 0 < d["official"].mean() and 0 < o["psnr_worst"] <= o["psnr_median"] < float("inf")
    assert "FID against stats.npz: 0.000 (from 6 samples: biased high, not comparable with published FIDs" in res.output
    # the official schedule itself: nothing to compare it with, and the report says so
    res = CliRunner().invoke(judge_cmd, ckpt + ["--per-class", "1", "--classes-limit", "2",
                                                "--json", str(tmp_path / "o.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o.json").read_text())["vs_official"] == {}
    assert "this is the official schedule" in res.output


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_without_a_decoder_the_judge_measures_tokens_and_refuses_a_distance_between_images(tmp_path, monkeypatch):
    """The shipped model's metadata names Animal-MNIST: without --vae, --judge auto measures the
    token errors (it stopped, asking for a decoder, against the help's "omit for token errors
    only"), and --fid-stats is refused before any sampling (the distance was dropped without a word)."""
    from conftest import DEFAULT_CKPT
    from flowar.commands.cli import judge_cmd
    monkeypatch.chdir(tmp_path)
    common = ["--ckpt", str(DEFAULT_CKPT), "--per-class", "1", "--classes-limit", "2", "--steps", "3"]
    res = CliRunner().invoke(judge_cmd, common + ["--json", str(tmp_path / "q.json")])
    assert res.exit_code == 0 and "vs the official schedule (same noise): tokens max" in res.output, res.output
    assert "no images to judge: the source has no decoder (pass --vae" in res.output, res.output   # (it was silent)
    # and before the sampling, with the VAE the checkpoint was trained with (it was said only at the end)
    assert res.output.startswith("note: no decoder, token errors only (pass --vae "), res.output
    assert json.loads((tmp_path / "q.json").read_text())["class_accuracy"] is None
    # --json replaces a report, never another file (the checkpoint an engine directory was exported from went)
    import shutil
    from flowar.io.outputs import check_json_output
    check_json_output(tmp_path / "q.json")                                     # (a report: replaced)
    held = tmp_path / "model.safetensors"
    shutil.copy(DEFAULT_CKPT, held)
    res = CliRunner().invoke(judge_cmd, common + ["--json", str(held)])
    assert res.exit_code == 2 and "expected --json a new file, or a JSON report to replace; got " in res.output, \
        res.output
    assert len(res.output.strip().splitlines()) == 1 and held.read_bytes() == DEFAULT_CKPT.read_bytes()
    torch.jit.save(torch.jit.script(StandIn()), str(tmp_path / "x.pt"))
    np.savez(tmp_path / "s.npz", mu=np.zeros(8), sigma=np.eye(8))
    res = CliRunner().invoke(judge_cmd, common + ["--fid-stats", str(tmp_path / "s.npz"), "--fid-extractor",
                                                  str(tmp_path / "x.pt")])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "expected a decoder for --fid-stats" in lines[0], res.output


def test_the_official_schedule_against_other_engines_is_not_told_to_compare_with_other_engines():
    """The report of the official schedule said "compare other engines with --vs-engine-dir" right
    above the comparison --vs-engine-dir gave; alone, it still says so."""
    from flowar.eval.quality import QualityReport, report_lines
    d = {"token_max": 1e-3, "token_mean": 1e-4, "psnr_median": 40.0, "psnr_worst": 30.0}
    alone = report_lines(QualityReport("official", 96, 2, 0.1), 0, True, None)
    assert any("this is the official schedule (compare other engines with --vs-engine-dir" in ln for ln in alone), alone
    vs = report_lines(QualityReport("official", 96, 2, 0.1, vs_reference=d), 0, True, None, "other (ONNX Runtime)")
    assert not any("--vs-engine-dir" in ln for ln in vs) and any(ln.startswith("vs other (ONNX Runtime), same samples")
                                                               for ln in vs), vs


def test_the_class_accuracy_is_said_with_its_95_percent_interval():
    """"0.0 %" of 20 images (flowar-judge --per-class 2) read as a model that never hits: the share is
    said with its Wilson 95 % interval, against closed forms (none of n hit: 0 to z^2/(n + z^2);
    all: its mirror) and a textbook value (900 of 1000: 0.8798-0.9171)."""
    from flowar.eval.quality import QualityReport, report_lines
    for n, acc, interval in ((20, 0.0, f"0.0%-{1.96**2 / (20 + 1.96**2):.1%}"),
                             (20, 1.0, f"{20 / (20 + 1.96**2):.1%}-100.0%"), (1000, 0.9, "88.0%-91.7%")):
        rep = QualityReport("official", 96, n, 0.1, class_accuracy=acc, per_class=[acc] * 10,
                            judge_held_out_accuracy=0.99, frechet_judge=1.0)
        line = next(ln for ln in report_lines(rep, 0, True, None) if ln.startswith("judge"))
        assert f"{acc:.1%} judged the requested class (95 % interval {interval} over {n} images)" in line, line


def test_bad_fid_inputs_are_one_line(fixtures_dir, tmp_path):
    from flowar.commands.cli import judge_cmd
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(FlowARError, match="arrays mu and sigma"):
        read_fid_stats(tmp_path / "bad.npz")
    # a file that is no .npz: said so, not numpy's advice to load it with pickles allowed
    (tmp_path / "tok.npz").write_bytes(b"\x80\x04not an archive")
    with pytest.raises(FlowARError, match=r"tok\.npz: not an \.npz archive of arrays\. Fix: pass FID reference") as e:
        read_fid_stats(tmp_path / "tok.npz")
    assert "pickle" not in str(e.value)
    (tmp_path / "x.pt").write_bytes(b"not torchscript")
    base = ["--ckpt", str(fixtures_dir / "tiny_v1.safetensors"), "--preset", "tiny", "--per-class", "1"]
    for extra, needle in ((["--fid-stats", str(tmp_path / "bad.npz")], "together"),
                          (["--fid-stats", str(tmp_path / "bad.npz"), "--fid-extractor", str(tmp_path / "x.pt")],
                           "arrays mu and sigma")):
        res = CliRunner().invoke(judge_cmd, base + extra)
        assert res.exit_code == 2 and "Traceback" not in res.output and needle in res.output, res.output
    # a long reason is shortened at a word's end (it was cut at 120 characters, mid-word)
    (tmp_path / "x.pt").write_bytes(b"garbage" * 50)
    with pytest.raises(Exception) as said:
        torch.jit.load(str(tmp_path / "x.pt"))
    with pytest.raises(FlowARError) as e:
        load_extractor(tmp_path / "x.pt")
    kept = e.value.got.removeprefix("x.pt: ").removesuffix(" [...]")
    reason = " ".join(str(said.value).split())
    assert e.value.got.endswith(" [...]") and reason.startswith(kept) and reason[len(kept)] == " ", (e.value.got, reason)


@pytest.mark.slow
def test_judge_on_an_engine_directory_against_another(fixtures_dir, tmp_path):
    """flowar-judge --engine-dir with --vs-engine-dir: the same samples (index, noise, batch split)
    on both sides. Against itself the difference must be exactly zero; against the eager
    checkpoint's samples it is float32 noise, while a shifted sample order would be 1e-1."""
    from flowar.commands.build import build_engine_dir
    from flowar.commands.cli import judge_cmd
    ckpt = fixtures_dir / "tiny_v1.safetensors"
    build_engine_dir(ckpt, tmp_path / "e", config_path=str(fixtures_dir / "tiny_v1.config.json"),
                     vae_path=fixtures_dir / "mar_vae_tiny.ckpt", max_batch=2, verify=False)
    common = ["--per-class", "3", "--classes-limit", "2", "--steps", "5", "--batch", "4"]
    # (a --judge-cache nowhere writable is no matter where no judge is trained: it was refused)
    res = CliRunner().invoke(judge_cmd, ["--engine-dir", str(tmp_path / "e"), "--vs-engine-dir", str(tmp_path / "e"),
                                         "--json", str(tmp_path / "self.json"), "--judge-cache",
                                         "/proc/flowar/judge.safetensors"] + common)
    assert res.exit_code == 0, res.output
    # strict JSON: identical images' PSNR is "inf" (it was written as Infinity, which JSON parsers refuse)
    rep = json.loads((tmp_path / "self.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert rep["n_samples"] == 6 and rep["vs_reference"]["token_max"] == 0.0
    assert rep["vs_reference"]["psnr_median"] == "inf", rep["vs_reference"]
    # images against a directory without a decoder: refused before sampling (it was after the first source had)
    build_engine_dir(ckpt, tmp_path / "t", config_path=str(fixtures_dir / "tiny_v1.config.json"), max_batch=2,
                     verify=False)
    res = CliRunner().invoke(judge_cmd, ["--engine-dir", str(tmp_path / "e"), "--vs-engine-dir", str(tmp_path / "t")]
                             + common)
    assert res.exit_code == 2 and "--vs-engine-dir with a decoder" in res.output and "sampling" not in res.output, \
        res.output
    # judged alone, a directory without a decoder is told how to get one (--vae: refused with --engine-dir)
    res = CliRunner().invoke(judge_cmd, ["--engine-dir", str(tmp_path / "t")] + common)
    assert res.exit_code == 0 and res.output.startswith("note: no decoder, token errors only (re-export with --vae)\n")
    # the engines against the eager checkpoint, sample by sample: flowar-judge --ckpt with the same options
    res = CliRunner().invoke(judge_cmd, ["--ckpt", str(ckpt), "--config", str(fixtures_dir / "tiny_v1.config.json"),
                                         "--vae", str(fixtures_dir / "mar_vae_tiny.ckpt"), "--vs-engine-dir",
                                         str(tmp_path / "e"), "--json", str(tmp_path / "eager.json")] + common)
    assert res.exit_code == 0, res.output
    vs = json.loads((tmp_path / "eager.json").read_text())["vs_reference"]
    assert 0 < vs["token_max"] <= 1e-3 and vs["psnr_worst"] >= 60, vs


def test_a_judge_cache_that_cannot_be_written_under_home_names_it_and_how_to_move_it(monkeypatch):
    """Under a HOME that does not exist (a service account) the judge's default cache was refused as
    "a writable location for --judge-cache; got / is not a writable folder": neither the option, which
    was not given, nor the folder, nor the path. The line names the cache's path and the folder that
    stops it, and says to pass --judge-cache or set XDG_CACHE_HOME."""
    from conftest import DEFAULT_CKPT, DEFAULT_VAE
    from flowar.commands.cli import judge_cmd
    monkeypatch.setenv("HOME", "/proc/flowar-no-home")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    res = CliRunner().invoke(judge_cmd, ["--ckpt", str(DEFAULT_CKPT), "--vae", str(DEFAULT_VAE), "--per-class", "1"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert ("expected a writable place for the judge's cache ($XDG_CACHE_HOME/flowar, else ~/.cache/flowar); got "
            "/proc/flowar-no-home/.cache/flowar/judge.safetensors: its nearest existing folder /proc is not a writable "
            "folder") in res.output and "Fix: pass --judge-cache PATH, or set XDG_CACHE_HOME" in res.output, res.output


def test_the_judge_cache_is_used_only_for_what_it_was_trained_on(tmp_path):
    from safetensors.torch import save_file
    from flowar.eval.judge import _read_cache
    key = {"format": "flowar-judge-v1", "epochs": "6", "seed": "0", "data": "abc"}
    save_file({"w": torch.ones(2)}, str(tmp_path / "j.safetensors"), metadata=key)
    assert torch.equal(_read_cache(tmp_path / "j.safetensors", key)["w"], torch.ones(2))
    assert _read_cache(tmp_path / "j.safetensors", key | {"data": "other images"}) is None
    assert _read_cache(tmp_path / "j.safetensors", key | {"epochs": "2"}) is None
    save_file({"w": torch.ones(2)}, str(tmp_path / "old.safetensors"))        # a cache of before: no metadata
    assert _read_cache(tmp_path / "old.safetensors", key) is None
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    assert _read_cache(tmp_path / "bad.safetensors", key) is None
    assert _read_cache(tmp_path / "none.safetensors", key) is None


# Stand-in images for the judge's data (the animal-mnist package is not installed for the tests)
FAKE_DATA = ("import torch\nfrom flowar.train.data import ImageSet\n"
             "fake = lambda size=32: ImageSet(torch.rand(100, 3, 32, 32, generator=torch.Generator()"
             ".manual_seed(0)) * 2 - 1, torch.arange(100) % 10, [str(c) for c in range(10)])\n")


def test_a_judge_being_trained_by_another_process_is_waited_for_and_used(tmp_path, capfd, monkeypatch):
    """Two flowar-judge runs on a fresh cache trained a judge each, and the cache kept the last: one
    run's figures came from a judge no longer there (Frechet distances 2589 and 2825 for the same
    images; a later run gave the second). A run that finds another training the judge waits for it
    and uses that judge: here the other process (holding the cache's lock) writes a judge with one
    weight marked, and the run returns it instead of its own (judges of 0 epochs, to be quick)."""
    import subprocess
    import sys

    from safetensors.torch import load_file
    cache = tmp_path / "judge.safetensors"
    other = subprocess.Popen([sys.executable, "-c", FAKE_DATA + (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from safetensors import safe_open\n"
        "from safetensors.torch import load_file, save_file\n"
        "from flowar.io.files import used_alone\n"
        "import flowar.eval.judge as J\n"
        "J.load_animal_mnist = fake\n"
        "cache = Path(sys.argv[1])\n"
        "mine = cache.with_name('mine.safetensors')\n"
        "with used_alone(cache, 'training the judge'):\n"
        "    print('held', flush=True)\n"
        "    J.train_judge(epochs=0, seed=1, cache=mine)\n"
        "    with safe_open(str(mine), 'pt') as f:\n"
        "        meta = f.metadata()\n"
        "    sd = load_file(str(mine))\n"
        "    first = sorted(sd)[0]\n"
        "    sd[first] = sd[first] + 7.0\n"
        "    time.sleep(1)\n"
        "    save_file(sd, str(cache), metadata=meta)\n"), str(cache)], stdout=subprocess.PIPE, text=True)
    import flowar.eval.judge as J
    namespace: dict = {}
    exec(FAKE_DATA, namespace)
    monkeypatch.setattr(J, "load_animal_mnist", namespace["fake"])
    try:
        assert other.stdout.readline().strip() == "held"
        judge = J.train_judge(epochs=0, seed=1, cache=cache)
    finally:
        other.wait(timeout=120)
    assert other.returncode == 0
    theirs, ours = load_file(str(cache)), judge.net.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), "trained a judge of its own instead of the other's"
    assert f"note: waiting for process {other.pid}" in capfd.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["judge.safetensors", "mine.safetensors"]


def test_the_judge_is_chosen_by_the_checkpoint_metadata_or_by_the_flag(fixtures_dir, monkeypatch):
    """The Animal-MNIST judge runs for a checkpoint whose metadata says it was trained on
    Animal-MNIST (the shipped model) or when --judge names it; never by guessing from class names."""
    import flowar.eval.judge as judge
    from conftest import DEFAULT_CKPT, DEFAULT_VAE
    from flowar.commands.cli import judge_cmd

    class Called(Exception):
        pass

    def called(cache=None, progress=False):
        raise Called()
    monkeypatch.setattr(judge, "train_judge", called)
    base = ["--per-class", "1", "--classes-limit", "1", "--steps", "3"]
    default = ["--ckpt", str(DEFAULT_CKPT), "--vae", str(DEFAULT_VAE)]
    assert isinstance(CliRunner().invoke(judge_cmd, default + base).exception, Called)          # its metadata
    res = CliRunner().invoke(judge_cmd, default + base + ["--judge", "none"])
    assert res.exit_code == 0 and res.output.endswith("\nno class accuracy: --judge none\n"), res.output
    # a source with images and no judge to use says so (it ended with exit 0 without a word)
    from flowar.eval.quality import QualityReport, report_lines
    for data, why, names in ((None, "the source records no training data; --judge animal-mnist judges Animal-MNIST's",
                              list("abcdefghij")), ("cifar-10", "no judge of cifar-10", None)):   # (that judge: 10 classes)
        assert report_lines(QualityReport("official", 96, 2, 0.1), 0, True, names, judged=("auto", data))[-1] == \
            f"no class accuracy: {why}"
    tiny = ["--ckpt", str(fixtures_dir / "tiny_v1.safetensors"), "--preset", "tiny"]
    assert CliRunner().invoke(judge_cmd, tiny + base).exit_code == 0                           # no metadata: none
    res = CliRunner().invoke(judge_cmd, tiny + base + ["--judge", "animal-mnist"])
    assert res.exit_code == 2 and "a 10-class model with a decoder" in res.output, res.output


class Raises(torch.nn.Module):
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


class GivesNaN(torch.nn.Module):
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img.float().mean(dim=(2, 3)) * float("nan")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_statistics_or_an_extractor_that_cannot_give_a_distance_are_one_line(tmp_path):
    """NaN statistics gave "FID ...: 0.000" and exit 0; an extractor that raised or gave NaN a
    traceback (RuntimeError, LinAlgError) after the sampling. Each is one FlowARError."""
    from flowar.eval.quality import load_extractor
    np.savez(tmp_path / "nan.npz", mu=np.array([0.0, np.nan]), sigma=np.eye(2))
    with pytest.raises(FlowARError, match=r"expected finite mu and sigma in the statistics file; got nan.npz with 1 "):
        read_fid_stats(tmp_path / "nan.npz")
    # not a covariance (it gave "FID: 0.000", exit 0), or mu of another shape (said as the extractor's feature size)
    for name, mu, sigma, said in (("neg", np.zeros(3), -np.eye(3), "smallest eigenvalue -1"),
                                  ("skew", np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), "smallest eigenvalue"),
                                  ("shape", np.zeros((1, 3)), np.eye(3), "mu (1, 3) and sigma (3, 3)")):
        np.savez(tmp_path / f"{name}.npz", mu=mu, sigma=sigma)
        with pytest.raises(FlowARError, match=re.escape(said)):
            read_fid_stats(tmp_path / f"{name}.npz")
    feats = np.random.default_rng(0).normal(size=(50, 3))             # a covariance made as FID's are: taken
    np.savez(tmp_path / "ok.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    assert read_fid_stats(tmp_path / "ok.npz")[1].shape == (3, 3)
    img = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    for net, said in ((Raises(), r"x.pt failed: .*boom"), (GivesNaN(), "x.pt gave NaN or inf")):
        torch.jit.save(torch.jit.script(net), str(tmp_path / "x.pt"))
        with pytest.raises(FlowARError, match="expected a feature extractor that maps uint8 images .*; got " + said):
            load_extractor(tmp_path / "x.pt")(img)


def test_a_judge_cache_path_holding_another_file_is_refused_not_replaced(tmp_path):
    """--judge-cache naming a file that is no judge's (a FlowAR checkpoint) was replaced by the judge
    trained, without a word. Refused before training, the file untouched; a judge's cache of other
    settings is still replaced."""
    import hashlib

    from safetensors.torch import save_file

    from flowar.eval.judge import _a_judge, train_judge
    from conftest import DEFAULT_CKPT
    mine = tmp_path / "flowar.safetensors"
    mine.write_bytes(DEFAULT_CKPT.read_bytes())
    before = hashlib.sha256(mine.read_bytes()).hexdigest()
    with pytest.raises(FlowARError, match=r"expected a judge's cache at --judge-cache, or no file there yet .*; got "
                                          r".*flowar.safetensors, a file that is no judge's"):
        train_judge(cache=mine)
    assert hashlib.sha256(mine.read_bytes()).hexdigest() == before
    (tmp_path / "junk").write_bytes(b"not safetensors")
    save_file({"w": torch.ones(1)}, str(tmp_path / "old.safetensors"), metadata={"format": "flowar-judge-v0"})
    assert not _a_judge(tmp_path / "junk") and _a_judge(tmp_path / "old.safetensors") and not _a_judge(mine)
    # a judge's cache from before the cache recorded its format (the judge's tensors alone), and an empty file
    from flowar.eval.judge import JudgeNet
    save_file(JudgeNet(10).state_dict(), str(tmp_path / "before.safetensors"))
    (tmp_path / "empty").write_bytes(b"")
    assert _a_judge(tmp_path / "before.safetensors") and _a_judge(tmp_path / "empty")


def test_a_judge_request_that_would_not_fit_in_memory_is_refused_before_sampling():
    """--per-class 99999999999 grew to 14 GB in 45 s and was killed, without a word."""
    from conftest import DEFAULT_CKPT, DEFAULT_VAE
    from flowar.commands.cli import judge_cmd
    res = CliRunner().invoke(judge_cmd, ["--ckpt", str(DEFAULT_CKPT), "--vae", str(DEFAULT_VAE), "--per-class",
                                         "99999999999", "--judge", "none"])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith(
        "error: expected memory for 999999999990 samples, held 1x (the judged, the references) (about "), res.output


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_an_extractor_that_cannot_serve_the_statistics_is_refused_before_any_sampling(tmp_path, monkeypatch):
    """An extractor that raised on the source's images, or gave features of another size than the
    statistics', was found after the whole sampling (minutes at full size). Refused first, one line."""
    from conftest import DEFAULT_CKPT, DEFAULT_VAE
    from flowar.commands.cli import judge_cmd
    from flowar.runtime.runtime import Runtime
    class Sampled(Exception):
        pass

    def sample(*a, **k):
        raise Sampled

    monkeypatch.setattr(Runtime, "sample", sample)
    monkeypatch.chdir(tmp_path)
    common = ["--ckpt", str(DEFAULT_CKPT), "--vae", str(DEFAULT_VAE), "--per-class", "1", "--classes-limit", "2",
              "--judge", "none", "--fid-stats", str(tmp_path / "s.npz"), "--fid-extractor", str(tmp_path / "x.pt")]
    torch.jit.save(torch.jit.script(StandIn()), str(tmp_path / "x.pt"))               # 8 features
    np.savez(tmp_path / "s.npz", mu=np.zeros(4), sigma=np.eye(4))
    for net, said in ((StandIn(), r"expected an extractor of the statistics' feature size \(4\); got 8 features from "
                                  r"\d+x\d+ images"), (Raises(), r"x.pt failed: .*boom")):
        torch.jit.save(torch.jit.script(net), str(tmp_path / "x.pt"))
        res = CliRunner().invoke(judge_cmd, common)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and re.search(said, lines[0]), res.output
    np.savez(tmp_path / "s.npz", mu=np.zeros(8), sigma=np.eye(8))                       # the right size: it samples
    torch.jit.save(torch.jit.script(StandIn()), str(tmp_path / "x.pt"))
    res = CliRunner().invoke(judge_cmd, common)
    assert isinstance(res.exception, Sampled), res.output
