"""flowar-train: exact resume, self-describing checkpoints, torchrun, the VAE trainer."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """A 2-class image folder (16x16) and a random diffusers VAE (4x down -> 4x4 latents)."""
    from PIL import Image
    from flowar.train.vae import VAETrainArgs, build_vae
    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    for ci, name in enumerate(["disc", "square"]):
        (root / "data" / name).mkdir(parents=True)
        for i in range(12):
            img = np.zeros((16, 16), np.uint8)
            c = rng.integers(5, 11, 2)
            yy, xx = np.mgrid[:16, :16]
            mask = ((yy - c[0]) ** 2 + (xx - c[1]) ** 2 < 16) if ci == 0 else ((abs(yy - c[0]) < 4) & (abs(xx - c[1]) < 4))
            img[mask] = 255
            Image.fromarray(img).convert("RGB").save(root / "data" / name / f"{i}.png")
    torch.manual_seed(0)
    build_vae(VAETrainArgs(size=16, channels=(8, 8, 8), groups=4)).save_pretrained(root / "vae")
    return root


def _args(world, out, **kw):
    from flowar.train.trainer import TrainArgs
    base = dict(out=str(out), vae=str(world / "vae"), data=str(world / "data"), size=16, steps=6, batch=8,
                log_every=100, sample_every=0, ckpt_every=100, warmup=2, cache_dir=str(world / "cache"))
    base.update(kw)
    return TrainArgs(**base)


def test_resume_repeats_the_loss_sequence(small_world, tmp_path):
    from flowar.train.trainer import train
    full = train(_args(small_world, tmp_path / "a"), progress=False)
    part = train(_args(small_world, tmp_path / "b"), progress=False, max_steps_this_run=3)
    assert part.step == 3
    rest = train(_args(small_world, tmp_path / "b", resume=True), progress=False)
    assert rest.step == 6 and len(full.losses) == 6
    assert rest.losses == full.losses               # bitwise: same floats
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_are_self_describing(small_world, tmp_path):
    from flowar.model.checkpoint import load_model, read_checkpoint
    from flowar.train.trainer import train
    train(_args(small_world, tmp_path / "r", steps=2, ckpt_every=1), progress=False)
    model, ck = load_model(tmp_path / "r" / "model.safetensors")
    assert ck.class_names == ["disc", "square"] and ck.config.scales == (1, 2, 4)
    assert ck.config.latent_channels == 4 and ck.config.num_classes == 2
    ema = read_checkpoint(tmp_path / "r" / "checkpoint-last.safetensors")
    raw = read_checkpoint(tmp_path / "r" / "checkpoint-last.safetensors", use_ema=False)
    assert ema.source == "model_ema" and raw.source == "model"
    assert ema.metadata["step"] == "2" and "optim.0.exp_avg" not in ema.state_dict
    assert any(not torch.equal(ema.state_dict[k], raw.state_dict[k]) for k in ema.state_dict)
    assert (tmp_path / "r" / "loss.png").stat().st_size > 1000


def test_refuses_to_overwrite_a_run(small_world, tmp_path):
    """A run folder is new, empty, or resumed: one of other files (a model.safetensors and loss.png of
    the user's were replaced) is refused before any work, untouched."""
    from flowar.errors import FlowARError
    from flowar.train.trainer import train
    train(_args(small_world, tmp_path / "r", steps=1), progress=False)
    with pytest.raises(FlowARError, match="--resume"):
        train(_args(small_world, tmp_path / "r", steps=2), progress=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.safetensors").write_bytes(b"the user's")
    with pytest.raises(FlowARError, match="holds model.safetensors"):
        train(_args(small_world, mine, steps=1), progress=False)
    assert [p.name for p in mine.iterdir()] == ["model.safetensors"] and (mine / "model.safetensors").read_bytes() == b"the user's"
    own = tmp_path / "own"                            # a run killed after a sample grid, before its first checkpoint
    (own / "samples").mkdir(parents=True)
    (own / "samples" / "step0000005.png").write_bytes(b"an earlier start's grid")
    (own / "loss.png").write_bytes(b"png")
    assert train(_args(small_world, own, steps=1), progress=False).step == 1
    # its grids and plot were not this run's: gone (they sat beside the new run's, nothing telling them apart)
    assert not (own / "samples" / "step0000005.png").exists() and (own / "loss.png").read_bytes() != b"png"
    # a samples/ folder of other files (the data itself, say) is not the run's: refused, not emptied
    data = tmp_path / "run" / "samples" / "disc"
    data.mkdir(parents=True)
    (data / "0.png").write_bytes(b"a training image")
    with pytest.raises(FlowARError, match="holds samples"):
        train(_args(small_world, tmp_path / "run", steps=1), progress=False)
    assert (data / "0.png").read_bytes() == b"a training image"


def test_a_resume_after_the_last_checkpoint_still_writes_the_last_grid(small_world, tmp_path):
    """Stopped after the last step's checkpoint, before its sample grid: the resume has no step left,
    and wrote the final model but never the grid."""
    from flowar.train.trainer import train
    train(_args(small_world, tmp_path / "r", steps=2, ckpt_every=2, sample_every=2, sample_steps=2), progress=False)
    last = tmp_path / "r" / "samples" / "step0000002.png"
    png = last.read_bytes()
    last.unlink()
    assert train(_args(small_world, tmp_path / "r", steps=2, ckpt_every=2, sample_every=2, sample_steps=2,
                       resume=True), progress=False).step == 2
    assert last.read_bytes() == png             # the same grid: the same weights, the same noise


def test_a_diverged_loss_stops_training_instead_of_writing_nan_weights(small_world, tmp_path):
    """A learning rate that sends the loss to NaN or Inf ends the run in one line, naming the step,
    with no final weights (it printed "weights -> model.safetensors" over NaN tensors and exited 0);
    a model too small to have two scales is refused (--size 7 trained one 1x1 scale)."""
    from flowar.errors import FlowARError
    from flowar.train.trainer import train
    with pytest.raises(FlowARError, match="a finite training loss|finite weights at the end"):
        train(_args(small_world, tmp_path / "r", steps=6, lr=1e30, warmup=0, grad_clip=1e30), progress=False)
    assert not (tmp_path / "r" / "model.safetensors").exists()
    from flowar.train.vae import VAETrainArgs, train_vae
    with pytest.raises(FlowARError, match="a finite training loss"):
        train_vae(VAETrainArgs(data=str(small_world / "data"), out=str(tmp_path / "v"), size=16, channels=(8, 8),
                               groups=4, steps=4, batch=4, lr=1e30), progress=False)
    assert not (tmp_path / "v").exists()
    with pytest.raises(FlowARError, match="at least 2x2"):     # before the data is encoded (none cached)
        train(_args(small_world, tmp_path / "s", size=7, steps=1, cache_dir=str(tmp_path / "c7")), progress=False)
    assert not (tmp_path / "c7").exists() or not any((tmp_path / "c7").rglob("*"))
    # a size the VAE does not divide: its latents were those of the size below, the model said to make those images
    from flowar.model.vae import folder_downsample
    down = folder_downsample(small_world / "vae")
    with pytest.raises(FlowARError, match=rf"a multiple of the VAE's down-sampling \({down}\).* got --size {4 * down + 1}: "
                                          rf"4x4, 1 px over. Fix: use e.g. --size {4 * down}$"):
        train(_args(small_world, tmp_path / "s", size=4 * down + 1, steps=1, cache_dir=str(tmp_path / "c7")), progress=False)


def test_batch_above_the_dataset_is_one_line_before_any_work(small_world, tmp_path, monkeypatch):
    """24 images, --batch 26: one line, exit 2, and no run folder, checkpoint or latent cache written."""
    from click.testing import CliRunner
    from flowar.commands.cli import train_cmd
    monkeypatch.chdir(tmp_path)                      # the default --cache-dir is relative to here
    res = CliRunner().invoke(train_cmd, ["--out", str(tmp_path / "run"), "--vae", str(small_world / "vae"),
                                         "--data", str(small_world / "data"), "--size", "16", "--steps", "2",
                                         "--batch", "26", "--sample-every", "0"])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: expected --batch"), res.output
    assert "at most the 24 images" in lines[0] and "got --batch 26" in lines[0] and "Fix: pass --batch 24" in lines[0]
    assert "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []            # nothing encoded, cached or checkpointed


def test_a_config_that_cannot_be_read_is_one_line_before_any_encoding(small_world, tmp_path, monkeypatch):
    """--config missing or not JSON: said before the data is encoded (it was read after the encoding, which takes
    minutes on a real dataset)."""
    from click.testing import CliRunner
    from flowar.commands.cli import train_cmd
    import flowar.train.trainer as trainer
    monkeypatch.setattr(trainer, "load_latents", lambda *a, **k: pytest.fail("encoded before --config was read"))
    (tmp_path / "bad.json").write_text("{not json")
    for config, said in ((tmp_path / "none.json", "config JSON file; got no file at"),
                         (tmp_path / "bad.json", "JSON config; got invalid JSON in")):
        res = CliRunner().invoke(train_cmd, ["--out", str(tmp_path / "run"), "--vae", str(small_world / "vae"),
                                             "--data", str(small_world / "data"), "--size", "16", "--steps", "2",
                                             "--batch", "4", "--config", str(config)])
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: expected a "), res.output
        assert said in lines[0] and "Traceback" not in res.output, res.output


def test_a_resume_with_other_settings_or_fewer_steps_is_one_line_before_any_encoding(small_world, tmp_path,
                                                                                       monkeypatch):
    """--resume keeps what the losses so far came from: another --lr (or data, batch, seed...) or a
    --steps below the checkpoint's step is refused before the latents are encoded (the first carried
    on silently, the second trained nothing, wrote no weights and said it had); the same settings
    with paths written another way from another folder (./data there, the absolute path here) resume."""
    import flowar.train.trainer as trainer
    from flowar.errors import FlowARError
    monkeypatch.chdir(small_world)
    trainer.train(_args(small_world, tmp_path / "r", steps=2, vae="vae", data="./data"), progress=False)  # as written here
    monkeypatch.chdir(tmp_path)
    real = trainer.load_latents
    monkeypatch.setattr(trainer, "load_latents", lambda *a, **k: (_ for _ in ()).throw(AssertionError("encoded")))
    for kw, needle in ((dict(lr=2e-3), "lr 0.002, began with 0.001"), (dict(steps=1), "--steps 1 below its step 2"),
                       (dict(seed=1, batch=4), "batch 4, began with 8; seed 1, began with 0")):
        with pytest.raises(FlowARError, match="expected the settings the run began with") as e:
            trainer.train(_args(small_world, tmp_path / "r", resume=True, **kw), progress=False)
        assert needle in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(trainer, "load_latents", real)              # from elsewhere, the same paths written out
    st = trainer.train(_args(small_world, tmp_path / "r", resume=True, steps=3), progress=False)
    assert st.step == 3



def test_resume_alone_takes_the_runs_own_settings(small_world, tmp_path, capsys, monkeypatch):
    """`flowar-train --out RUN --vae VAE --resume` was refused unless every setting was typed again
    ("batch 64, began with 8": the default against the run's own). Settings left at their defaults
    take the run's, with a note; the run continues as the uninterrupted one does, to its own --steps (it trained on
    to the default 2000)."""
    from flowar.train.trainer import TrainArgs, train
    whole = train(_args(small_world, tmp_path / "whole", steps=3), progress=False)
    train(_args(small_world, tmp_path / "r", steps=3), progress=False, max_steps_this_run=2)     # (stopped at 2)
    capsys.readouterr()
    st = train(TrainArgs(out=str(tmp_path / "r"), vae=str(small_world / "vae"), data=str(small_world / "data"),
                         sample_every=0, cache_dir=str(small_world / "cache"), resume=True), progress=False)
    err = capsys.readouterr().err
    assert ("note: --resume takes the run's own size 16, batch 8, warmup 2, steps 3 (not given here, or given at their "
            "defaults)") in err, err
    assert st.step == 3 and st.losses == whole.losses
    # the command too, without --vae (it was required: "Error: expected --vae a path"); a new run still needs it
    from click.testing import CliRunner

    from flowar.commands.cli import train_cmd
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    res = CliRunner().invoke(train_cmd, ["--out", str(tmp_path / "r"), "--resume", "--steps", "4", "--data",
                                         str(small_world / "data"), "--sample-every", "0"])
    assert res.exit_code == 0 and f"the run's own vae {str(small_world / 'vae')!r}" in res.output, res.output
    assert "trained to step 4 " in res.output, res.output
    # --steps given at the default (2000) extends the run to 2000 (it was taken for "not given": the run's own)
    from flowar.train.resume import with_recorded_settings
    from flowar.train.trainer import RUN_DEFINING
    for given, want in ((2000, 2000), (None, 4)):
        asked = TrainArgs(out=str(tmp_path / "r"), vae=str(small_world / "vae"), steps=given, resume=True)
        assert with_recorded_settings(asked, RUN_DEFINING + ("steps",), say=False).steps == want, given
    res = CliRunner().invoke(train_cmd, ["--out", str(tmp_path / "new"), "--steps", "1"])
    assert res.exit_code == 2 and "expected --vae: the VAE the latents come from; got none" in res.output, res.output


def test_a_resume_with_an_edited_config_file_or_renamed_class_folders_is_refused_before_encoding(small_world, tmp_path,
                                                                                               monkeypatch):
    """The settings' names stayed while what they name changed: a --config file edited since (its
    latent_scale: weights trained at one were written with another, exit 0; its head: a traceback
    from load_state_dict) or --data's class folders renamed (class 0 then stood for other images,
    exit 0) are one line naming what differs, before the latents are encoded; unchanged, the run
    resumes."""
    import shutil
    import flowar.train.trainer as trainer
    from flowar.errors import FlowARError
    from flowar.model.checkpoint import load_model
    data, cache = tmp_path / "data", str(tmp_path / "cache")
    shutil.copytree(small_world / "data", data)
    trainer.train(_args(small_world, tmp_path / "d", steps=1, data=str(data), cache_dir=cache), progress=False)
    _, ck = load_model(tmp_path / "d" / "model.safetensors")
    (tmp_path / "c.json").write_text(ck.config.to_json())
    trainer.train(_args(small_world, tmp_path / "r", steps=1, data=str(data), config=str(tmp_path / "c.json"),
                        cache_dir=cache), progress=False)
    resume = _args(small_world, tmp_path / "r", steps=2, data=str(data), config=str(tmp_path / "c.json"),
                   cache_dir=cache, resume=True)
    real = trainer.load_latents
    monkeypatch.setattr(trainer, "load_latents", lambda *a, **k: (_ for _ in ()).throw(AssertionError("encoded")))
    other = "v2" if ck.config.head_block == "v1" else "v1"
    for edit, needle in ((dict(latent_scale=0.5), f"--config's latent_scale 0.5, began with {ck.config.latent_scale!r}"),
                         (dict(head_block=other), f"--config's head_block '{other}'")):
        (tmp_path / "c.json").write_text(ck.config.replace(**edit).to_json())
        with pytest.raises(FlowARError, match="expected the settings the run began with") as e:
            trainer.train(resume, progress=False)
        assert needle in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "c.json").write_text(ck.config.to_json())
    (data / "disc").rename(data / "zz disc")                     # the same images, class ids swapped
    with pytest.raises(FlowARError, match=r"--data's classes: id 0 'square' \(was 'disc'\), id 1 'zz disc' \(was 'square'\)"):
        trainer.train(resume, progress=False)
    (data / "zz disc").rename(data / "disc")
    # what the paths hold, changed under the same names: an image (it was re-encoded, and the run went on in silence)
    png = data / "disc" / "0.png"
    kept = png.read_bytes()
    png.write_bytes((data / "disc" / "1.png").read_bytes())
    with pytest.raises(FlowARError, match=r"--data's contents \(sha256 [0-9a-f]{12}\.\.\., began with [0-9a-f]{12}"):
        trainer.train(resume, progress=False)
    png.write_bytes(kept)
    monkeypatch.setattr(trainer, "load_latents", real)
    assert trainer.train(resume, progress=False).step == 2
    # ... and a VAE trained again in place (flowar-train-vae --out into the same folder)
    from flowar.train.vae import VAETrainArgs, build_vae
    vae = tmp_path / "vae"
    shutil.copytree(small_world / "vae", vae)
    trainer.train(_args(small_world, tmp_path / "v", steps=1, vae=str(vae), data=str(data), cache_dir=cache),
                  progress=False)
    torch.manual_seed(1)
    build_vae(VAETrainArgs(size=16, channels=(8, 8, 8), groups=4)).save_pretrained(vae)
    with pytest.raises(FlowARError, match=r"--vae's contents \(sha256 "):
        trainer.train(_args(small_world, tmp_path / "v", steps=2, vae=str(vae), data=str(data), cache_dir=cache,
                            resume=True), progress=False)


def test_class_folders_that_differ_only_in_case_are_refused_before_training(small_world, tmp_path):
    """Requests name classes whatever the case: folders "disc" and "Disc" trained a model whose two
    classes no name could reach; refused before the first step, no run folder left."""
    import shutil
    from flowar.errors import FlowARError
    from flowar.train.trainer import train
    shutil.copytree(small_world / "data", tmp_path / "data")
    (tmp_path / "data" / "square").rename(tmp_path / "data" / "Disc")
    with pytest.raises(FlowARError, match="differ beyond case and spacing .*got 'Disc' and 'disc'"):
        train(_args(small_world, tmp_path / "r", data=str(tmp_path / "data"), cache_dir=str(tmp_path / "c")),
              progress=False)
    assert not (tmp_path / "r").exists()
    # a run begun before the check (made here without it) still resumes: renaming, as told, would remap its classes
    import flowar.train.trainer as trainer
    real, trainer.check_names = trainer.check_names, lambda *a: None
    try:
        train(_args(small_world, tmp_path / "r", steps=1, data=str(tmp_path / "data"), cache_dir=str(tmp_path / "c")),
              progress=False)
    finally:
        trainer.check_names = real
    assert train(_args(small_world, tmp_path / "r", steps=2, data=str(tmp_path / "data"), cache_dir=str(tmp_path / "c"),
                       resume=True), progress=False).step == 2


def test_a_model_opened_with_another_vae_than_it_was_trained_with_is_told(small_world, tmp_path, capsys, monkeypatch):
    """flowar-train records its VAE's sha256 (an engine directory's hash of a VAE): opened (or exported)
    with another VAE of the same channels (noise, exit 0 before) a note says so; the same VAE from
    another folder, a README beside its weights, says nothing."""
    import shutil
    from flowar.commands.build import build_engine_dir
    from flowar.runtime.runtime import Runtime
    from flowar.train.trainer import train
    from flowar.train.vae import VAETrainArgs, build_vae
    train(_args(small_world, tmp_path / "r", steps=1), progress=False)
    model = tmp_path / "r" / "model.safetensors"
    torch.manual_seed(1)
    build_vae(VAETrainArgs(size=16, channels=(8, 8, 8), groups=4)).save_pretrained(tmp_path / "other")
    shutil.copytree(small_world / "vae", tmp_path / "same")
    (tmp_path / "same" / "README.md").write_text("notes")     # (not the VAE: its digest of every file noted it)
    capsys.readouterr()
    for vae, told in ((tmp_path / "same", False), (tmp_path / "other", True)):
        with Runtime.open(model, vae=str(vae)):
            pass
        err = capsys.readouterr().err
        assert ("is not the one model.safetensors was trained with" in err) == told, err
        # and the run's checkpoint-last.safetensors, which an export also takes (it said nothing)
        with Runtime.open(model.parent / "checkpoint-last.safetensors", vae=str(vae)):
            pass
        err = capsys.readouterr().err
        assert ("is not the one checkpoint-last.safetensors was trained with" in err) == told, err
    import flowar.commands.build as build                # (the export's own check, before its graphs: stopped there)
    monkeypatch.setattr(build, "_require_disk", lambda *a: (_ for _ in ()).throw(LookupError("checked")))
    with pytest.raises(LookupError, match="checked"):
        build_engine_dir(model, tmp_path / "eng", vae_path=tmp_path / "other", max_batch=1, verify=False)
    assert "is not the one model.safetensors was trained with" in capsys.readouterr().err
    # ... and exported anyway, flowar-check says it too (it said "intact" alone: the note at export was the only word)
    monkeypatch.undo()
    from click.testing import CliRunner
    from flowar.commands.check import check_cmd
    for vae, told in ((tmp_path / "same", False), (tmp_path / "other", True)):
        build_engine_dir(model, tmp_path / f"eng_{vae.name}", vae_path=vae, max_batch=1, verify=False)
        res = CliRunner().invoke(check_cmd, ["--engine-dir", str(tmp_path / f"eng_{vae.name}"), "--quiet"])
        assert res.exit_code == 0 and ("note: its decoder is not the VAE model.safetensors was trained with (sha256 "
                                       in res.output) == told, res.output

def test_the_loss_lines_go_where_the_bar_would(small_world, tmp_path, capsys):
    """Where stderr is not a terminal the trainer prints a loss line every --log-every steps instead of
    its bar (README); they went to stdout, so `flowar-train ... 2>log` left the log empty."""
    from flowar.train.trainer import train
    train(_args(small_world, tmp_path / "r", steps=2, log_every=1), progress=True)
    got = capsys.readouterr()
    assert "step 1/2 loss " in got.err and "step 2/2 loss " in got.err and "step 1/2" not in got.out, got
    # with the time taken and left (a log had neither), and whether the warm-up outlasts the run (nothing was said)
    assert re.search(r"step 1/2 loss [\d.]+ lr [\d.e+-]+ [\d.]+ step/s, \d+ s, [\d.]+ min left\n", got.err), got.err
    assert "note: --warmup" not in got.err
    train(_args(small_world, tmp_path / "w", steps=2, warmup=3), progress=True)
    assert "note: --warmup 3 is more than --steps 2: the learning rate never reaches --lr" in capsys.readouterr().err
    # a line at least every 30 s between --log-every's (a slow run said nothing for a minute or more): the 30 s made 0 here
    import flowar.train.pictures as pictures
    train(_args(small_world, tmp_path / "s", steps=2, log_every=100), progress=True)
    assert "step 1/2" not in capsys.readouterr().err
    pictures.LINE_EVERY_S, every = 0.0, pictures.LINE_EVERY_S
    try:
        train(_args(small_world, tmp_path / "t", steps=2, log_every=100), progress=True)
    finally:
        pictures.LINE_EVERY_S = every
    err = capsys.readouterr().err
    assert "step 1/2 loss " in err and "step 2/2 loss " in err, err


def test_a_config_whose_latent_scale_is_not_the_datas_is_said(small_world, tmp_path, capsys):
    """--config's latent_scale was taken on trust (another VAE's 1.07 where this one's measures 0.61: the
    loss 4.8, not 2.4, without a word); the run's own measured scale in a config is taken in silence."""
    from flowar.model.checkpoint import load_model
    from flowar.train.trainer import train
    train(_args(small_world, tmp_path / "d", steps=1), progress=False)
    _, ck = load_model(tmp_path / "d" / "model.safetensors")
    capsys.readouterr()
    for scale, said in ((ck.config.latent_scale, False), (ck.config.latent_scale * 2, True)):
        (tmp_path / "c.json").write_text(ck.config.replace(latent_scale=scale).to_json())
        train(_args(small_world, tmp_path / f"r{said}", steps=1, config=str(tmp_path / "c.json")), progress=False)
        err = capsys.readouterr().err
        assert (f"note: --config's latent_scale {scale:.4g} is not this data's through this VAE, "
                f"{ck.config.latent_scale:.4g} (measured)" in err) == said, err


def test_an_interrupted_run_says_which_step_it_resumes_from(small_world, tmp_path, monkeypatch, capsys):
    """Ctrl-C (or SIGTERM) said "interrupted" alone: where the run stopped, the step its checkpoint
    holds and that --resume continues from there; before the first checkpoint, that there is none."""
    import flowar.train.trainer as trainer
    real, calls = trainer.train_step, []

    def stop_at_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(trainer, "train_step", stop_at_third)
    ckpt = tmp_path / "r" / "checkpoint-last.safetensors"
    with pytest.raises(KeyboardInterrupt, match=rf"^at step 2; {re.escape(str(ckpt))} holds step 2: the same command "
                                                r"with --resume continues from there$"):
        trainer.train(_args(small_world, tmp_path / "r", steps=6, ckpt_every=2), progress=False)
    monkeypatch.setattr(trainer, "train_step", real)
    assert trainer.train(_args(small_world, tmp_path / "r", steps=6, ckpt_every=2, resume=True), progress=False).step == 6
    # Ctrl-C before the first checkpoint (every 100 steps here, 500 by default) lost every step so far: the step
    # computing ends (the stop waits for it, as the command's handler records it), then its checkpoint is written,
    # and the resumed run gives the losses of an uninterrupted one
    from flowar.errors import stop_asked, stops_cleared

    def ctrl_c_at_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            stop_asked(signal.SIGINT, None)
        return real(*a, **k)
    calls.clear()
    monkeypatch.setattr(trainer, "train_step", ctrl_c_at_third)
    ckpt = tmp_path / "n" / "checkpoint-last.safetensors"
    try:
        with pytest.raises(KeyboardInterrupt, match=rf"^at step 3; {re.escape(str(ckpt))} holds step 3: the same "
                                                    r"command with --resume continues from there$"):
            trainer.train(_args(small_world, tmp_path / "n", steps=6), progress=False)
    finally:
        stops_cleared()
    assert "stopping at this step's end, with a checkpoint there (another Ctrl-C or SIGTERM: at once, without it)" in \
        capsys.readouterr().err
    monkeypatch.setattr(trainer, "train_step", real)
    resumed = trainer.train(_args(small_world, tmp_path / "n", steps=6, resume=True), progress=False)
    assert resumed.losses == trainer.train(_args(small_world, tmp_path / "u", steps=6), progress=False).losses
    # a second Ctrl-C stops at once (it waited for the step's end too), without a checkpoint of that step

    def twice_at_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            stop_asked(signal.SIGINT, None)
            stop_asked(signal.SIGINT, None)
        return real(*a, **k)
    calls.clear()
    monkeypatch.setattr(trainer, "train_step", twice_at_third)
    try:
        with pytest.raises(KeyboardInterrupt, match=r"^at step 2; no checkpoint yet"):
            trainer.train(_args(small_world, tmp_path / "t", steps=6), progress=False)
    finally:
        stops_cleared()
    monkeypatch.setattr(trainer, "train_step", real)
    # a stop while the first checkpoint is written leaves none in place: not promised ("holds step 2" was)
    monkeypatch.setattr(trainer, "save_training_checkpoint", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt, match=r"^at step 2; no checkpoint yet"):
        trainer.train(_args(small_world, tmp_path / "w", steps=6, ckpt_every=2), progress=False)


def test_the_trainer_joins_torchrun_over_gloo_also_where_a_gpu_is_seen(monkeypatch):
    """It computes on the CPU, so its process group is gloo's (NCCL takes CUDA tensors only: it
    chose NCCL wherever PyTorch saw a GPU)."""
    import flowar.train.trainer as trainer
    seen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, *a, **k: seen.append(backend))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    assert trainer.init_process_group() == (2, 1) and seen == ["gloo"]


@pytest.mark.parametrize("command,args,needle", [
    ("train_vae_cmd", ["--steps", "0"], "--steps > 0, finite; got 0"), ("train_vae_cmd", ["--lr", "-1"], "--lr > 0"),
    ("train_cmd", ["--ema-decay", "1.5"], "--ema-decay in [0, 1); got 1.5"), ("train_cmd", ["--grad-clip", "0"], "--grad-clip > 0"),
    ("train_cmd", ["--sample-every", "-1"], "--sample-every >= 0; got -1"),
    ("train_cmd", ["--lr", "inf"], "--lr > 0, finite; got inf"), ("train_vae_cmd", ["--lr", "nan"], "--lr > 0, finite"),
])
def test_training_options_out_of_range_are_one_line_before_any_work(small_world, tmp_path, monkeypatch, command, args,
                                                                     needle):
    from click.testing import CliRunner
    import flowar.commands.cli as cli
    monkeypatch.chdir(tmp_path)
    extra = ["--vae", str(small_world / "vae"), "--data", str(small_world / "data")] if command == "train_cmd" else []
    res = CliRunner().invoke(getattr(cli, command), ["--out", str(tmp_path / "run"), *extra, *args])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.output
    assert list(tmp_path.iterdir()) == []


def test_a_batch_whose_step_cannot_fit_in_memory_is_one_line_before_any_work(small_world, tmp_path, monkeypatch):
    """flowar-train-vae --batch 100000 grew until the system killed it (exit 137, no word; measured 4.2 MB
    an image); flowar-train's --batch up to the data's size likewise (6.0 MB an image of the tiny model).
    With the memory available made small: one line naming the batch that fits, nothing written; that
    batch passes the check."""
    import re
    from click.testing import CliRunner
    import flowar.commands.cli as cli
    import flowar.io.memory
    from flowar.errors import FlowARError
    from flowar.train.memory import require_batch_memory, vae_image_bytes
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for command, free, args in (("train_vae_cmd", 1 << 30, ["--batch", "5000", "--data", str(small_world / "data"),
                                                              "--size", "16"]),
                                ("train_cmd", 1 << 20, ["--batch", "20", "--data", str(small_world / "data"), "--size",
                                                        "16", "--vae", str(small_world / "vae")])):
        monkeypatch.setattr(flowar.io.memory, "available_bytes", lambda: free)
        res = CliRunner().invoke(getattr(cli, command), ["--out", str(tmp_path / "run"), "--steps", "1", *args])
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and re.search(
            r"expected a --batch whose flowar-train(-vae)? step fits in memory \(about [0-9.]+ MB an image\); got --batch "
            r"\d+: about [0-9.]+ GB, with [0-9.]+ GB available. Fix: pass --batch \d+ or less", lines[0]), res.output
        assert not (tmp_path / "run").exists()
    # the data at a --size too large to hold (2048 was PyTorch's traceback, 640 grew until the system killed it)
    monkeypatch.setattr(flowar.io.memory, "available_bytes", lambda: 100 << 20)      # 24 images at 512: ~151 MB
    res = CliRunner().invoke(cli.train_cmd, ["--out", str(tmp_path / "run"), "--steps", "1", "--batch", "4", "--data",
                                             str(small_world / "data"), "--size", "512", "--vae", str(small_world / "vae")])
    assert res.exit_code == 2 and res.output.startswith("error: expected memory for the 24 images of --data at --size "
                                                        "512") and len(res.output.strip().splitlines()) == 1, res.output
    assert "Fix: use a smaller --size" in res.output and not (tmp_path / "run").exists()
    fits = int(0.8 * (1 << 30) // vae_image_bytes(32))
    monkeypatch.setattr(flowar.io.memory, "available_bytes", lambda: 1 << 30)
    require_batch_memory(fits, vae_image_bytes(32), "flowar-train-vae")              # what the fix says passes
    with pytest.raises(FlowARError, match=f"Fix: pass --batch {fits} or less"):
        require_batch_memory(2 * fits, vae_image_bytes(32), "flowar-train-vae")


def _bmp_folder(root, seed):
    """ROOT/<class>/<image>.bmp: BMP keeps the file size when pixels change, so only contents can tell."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}.bmp")
    return root


def test_latent_cache_is_keyed_by_contents_not_paths(small_world, tmp_path, monkeypatch):
    import shutil
    from PIL import Image
    from safetensors.torch import load_file, save_file
    import flowar.train.data as data
    encoded = []
    real_encode = data.encode_latents
    monkeypatch.setattr(data, "encode_latents", lambda images, vae: encoded.append(1) or real_encode(images, vae))
    cache = tmp_path / "cache"
    def latents(folder, vae=small_world / "vae"):
        return data.load_latents(str(folder), 16, str(vae), str(cache), data.index_dataset(str(folder)))

    first = latents(_bmp_folder(tmp_path / "A", 0))
    assert len(encoded) == 1 and len(list(cache.glob("*.safetensors"))) == 1
    again = latents(tmp_path / "A")                                   # unchanged: reused
    assert len(encoded) == 1 and torch.equal(again.mean, first.mean) and again.class_names == ["a", "b"]
    # the same contents in another folder, with other file times: reused
    shutil.copytree(tmp_path / "A", tmp_path / "B", copy_function=shutil.copy)
    for f in (tmp_path / "B").rglob("*.bmp"):
        os.utime(f, (1_000_000_000, 1_000_000_000))
    moved = latents(tmp_path / "B")
    assert len(encoded) == 1 and torch.equal(moved.mean, first.mean)
    # one image changed (same name, same file size): re-encoded into its own cache file
    img = tmp_path / "B" / "b" / "1.bmp"
    size = img.stat().st_size
    Image.fromarray(255 - np.asarray(Image.open(img))).save(img)
    assert img.stat().st_size == size
    changed = latents(tmp_path / "B")
    assert len(encoded) == 2 and len(list(cache.glob("*.safetensors"))) == 2
    assert torch.equal(changed.mean[:3], first.mean[:3]) and not torch.equal(changed.mean[3], first.mean[3])
    # the VAE: a copy elsewhere is reused, a changed weight is not
    shutil.copytree(small_world / "vae", tmp_path / "vae2")
    latents(tmp_path / "A", tmp_path / "vae2")
    assert len(encoded) == 2
    w = next((tmp_path / "vae2").glob("*.safetensors"))
    sd = load_file(str(w))
    k = next(k for k in sd if k.endswith("conv_in.weight"))
    sd[k] = sd[k] * 2
    save_file(sd, str(w), metadata={"format": "pt"})
    latents(tmp_path / "A", tmp_path / "vae2")
    assert len(encoded) == 3


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(small_world, tmp_path):
    """Two ranks under torchrun train what one process computes with the two ranks' half batches and
    their gradients averaged (DDP's all-reduce): the same losses and EMA weights within float32
    rounding. Without DDP each rank trained alone on its half (rank 0's weights were written), and
    every assertion but this one held. Over an epoch the ranks' halves hold every image once."""
    import dataclasses
    from flowar.model.checkpoint import read_checkpoint
    from flowar.train.data import Latents, index_dataset, load_latents
    from flowar.train.trainer import FlowLoss, batches, build_config, build_run, ema_update, lr_at
    exe = Path(sys.executable).parent / "flowar-train"
    env = dict(os.environ, OMP_NUM_THREADS="1", XDG_CACHE_HOME=str(tmp_path / "cache"))     # (its latents: read below)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--no-python", str(exe),
         "--out", str(tmp_path / "ddp"), "--vae", str(small_world / "vae"), "--data", str(small_world / "data"),
         "--size", "16", "--steps", "3", "--batch", "8", "--sample-every", "0", "--ckpt-every", "3", "--warmup", "1"],
        capture_output=True, text=True, env=env, timeout=300,
        cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trained to step 3" in proc.stdout and proc.stdout.count("trained to step") == 1
    ck = read_checkpoint(tmp_path / "ddp" / "checkpoint-last.safetensors")
    losses = json.loads(ck.metadata["losses"])
    # the reference: one process, both ranks' batches, the mean of their losses (DDP averages the gradients)
    args = _args(small_world, tmp_path / "ref", steps=3, warmup=1, cache_dir=str(tmp_path / "cache" / "flowar" / "latents"))
    lat = load_latents(args.data, args.size, args.vae, args.cache_dir, index_dataset(args.data))
    config = build_config(args, lat)
    run = build_run(args, config, 1, tmp_path / "none")
    objective, ref_losses = FlowLoss(run.model), []
    for (step, *half0), (_, *half1) in zip(*(batches(lat, config, args, r, 2, 0, 3) for r in (0, 1))):
        for grp in run.opt.param_groups:
            grp["lr"] = lr_at(step, args)
        loss = (objective(*half0) + objective(*half1)) / 2
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
        run.opt.step()
        ema_update(run.ema, run.model, step, args.ema_decay)
        ref_losses.append(loss.item())
    assert np.allclose(losses, ref_losses, rtol=1e-5, atol=0), (losses, ref_losses)
    ema = run.ema.state_dict()        # (within 1 % of one step at --lr 1e-3: a step's update is about the lr)
    worst = max((ck.state_dict[k] - ema[k]).abs().max().item() for k in ema if k != "mask")   # (mask: -inf by design)
    assert worst < 1e-5, worst
    assert all(torch.isfinite(v).all() for k, v in ck.state_dict.items() if k != "mask")
    # the halves: with no posterior noise each x is its image's mean; an epoch (3 steps of 8 of 24) holds each once
    exact = Latents(lat.mean, torch.zeros_like(lat.std), lat.labels, lat.class_names)
    seen = torch.cat([x for r in (0, 1) for _, x, *_ in batches(exact, config, dataclasses.replace(args, label_drop=0),
                                                                 r, 2, 0, 3)])
    assert seen.shape[0] == lat.mean.shape[0] == 24
    assert sorted(map(bytes, (seen / config.latent_scale).numpy().round(5).reshape(24, -1))) == \
        sorted(map(bytes, lat.mean.numpy().round(5).reshape(24, -1)))


def _child_of_rank(pid: int, rank: int) -> int:
    """The process torchrun (``pid``) started for ``rank`` (read from /proc: its parent and its RANK)."""
    for d in Path("/proc").iterdir():
        try:
            parent = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) if d.name.isdigit() else None
            if parent == pid and f"RANK={rank}".encode() in (d / "environ").read_bytes().split(b"\0"):
                return int(d.name)
        except OSError:
            continue
    raise AssertionError(f"no rank {rank} under {pid}")


@pytest.mark.slow
def test_a_stop_under_torchrun_is_taken_by_every_rank_at_one_step_with_its_checkpoint(small_world, tmp_path):
    """SIGINT to one worker of a torchrun job (a scheduler's, or a kill of its pid): every rank stops at the
    same step's end and rank 0 writes the checkpoint there (rank 1 left alone and rank 0 then failed in its
    all-reduce with gloo's "Connection closed by peer", a traceback and no checkpoint); the run resumes."""
    exe = Path(sys.executable).parent / "flowar-train"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["--out", str(tmp_path / "ddp"), "--vae", str(small_world / "vae"), "--data", str(small_world / "data"),
            "--size", "16", "--batch", "8", "--sample-every", "0", "--warmup", "1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--no-python", str(exe), *args]
    proc = subprocess.Popen(torchrun + ["--steps", "5000", "--log-every", "1"], stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    try:
        lines: list[str] = []
        while not (lines and lines[-1].startswith("step 3/")):       # (rank 0's loss lines: training has begun)
            lines.append(proc.stderr.readline())
            assert lines[-1], "".join(lines)
        os.kill(_child_of_rank(proc.pid, 1), signal.SIGINT)
        err = "".join(lines) + proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    said = re.findall(r"interrupted: at step (\d+); \S+ holds step (\d+)", err)
    assert len(said) == 2 and len({n for pair in said for n in pair}) == 1, err[-3000:]
    # (torchrun itself reports its workers' exit 130 with a traceback of its own: none from this project's code)
    assert not re.search(r'File "[^"]*/flowar/', err) and "Connection closed" not in err, err[-3000:]
    from flowar.model.checkpoint import read_checkpoint
    step = int(said[0][0])
    assert int(read_checkpoint(tmp_path / "ddp" / "checkpoint-last.safetensors").metadata["step"]) == step >= 3
    done = subprocess.run(torchrun + ["--steps", str(step + 1), "--resume"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0 and f"trained to step {step + 1}" in done.stdout, done.stderr[-2000:]


@pytest.mark.slow
def test_a_stop_on_one_rank_after_the_last_step_leaves_no_rank_waiting(small_world, tmp_path):
    """A stop that reaches one rank after the last step's all-reduce (two gloo ranks, as torchrun starts
    them): the run's last outputs are written, the ranks meet, and the stopped rank then says where its
    checkpoint is (rank 0 failed in the final barrier with "Connection closed by peer", and rank 1 said
    "no checkpoint yet" of the checkpoint rank 0 had written)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = f"""
import signal, sys
from flowar.errors import stop_asked
from flowar.train import trainer
real, n, rank = trainer.mean_over_ranks, [0], int(sys.argv[1])
def stop_after_last(loss, world):
    out = real(loss, world)
    n[0] += 1
    if rank == 1 and n[0] == 4:
        stop_asked(signal.SIGINT, None)
    return out
trainer.mean_over_ranks = stop_after_last
args = trainer.TrainArgs(out={str(tmp_path / "r")!r}, vae={str(small_world / "vae")!r}, data={str(small_world / "data")!r},
                         size=16, steps=4, batch=8, log_every=100, sample_every=0, ckpt_every=100, warmup=2,
                         cache_dir={str(small_world / "cache")!r})
try:
    trainer.train(args, progress=False)
    print("returned")
except KeyboardInterrupt as e:
    print("interrupted:", e)
"""
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"))
             for r in (0, 1)]
    out = [p.communicate(timeout=300) for p in procs]
    assert out[0][0].strip() == "returned", out[0]
    ckpt = tmp_path / "r" / "checkpoint-last.safetensors"
    assert out[1][0].strip() == f"interrupted: at step 4; {ckpt} holds step 4: the same command with --resume " \
                                "continues from there", out[1]
    assert (tmp_path / "r" / "model.safetensors").is_file()


def test_vae_trainer_writes_a_loadable_folder(small_world, tmp_path):
    from flowar.train.vae import VAETrainArgs, train_vae
    from flowar.model.vae import load_vae
    res = train_vae(VAETrainArgs(data=str(small_world / "data"), out=str(tmp_path / "v"), size=16, channels=(8, 8),
                                 groups=4, steps=3, batch=4), progress=False)
    vae = load_vae(res["out"], expect_channels=4)
    assert vae.downsample == 2 and not (tmp_path / ".v.tmp").exists()
    # trained again into its own folder: replaced; into a diffusers VAE it did not write (a downloaded one, the
    # shipped default's that its model was trained with): refused, untouched (replaced in silence, having a config.json)
    import shutil
    from flowar.errors import FlowARError
    again = dict(data=str(small_world / "data"), size=16, channels=(8, 8), groups=4, steps=1, batch=4)
    train_vae(VAETrainArgs(out=str(tmp_path / "v"), **again), progress=False)
    theirs = tmp_path / "downloaded"
    shutil.copytree(small_world / "vae", theirs)
    before = {p.name: p.read_bytes() for p in theirs.iterdir()}
    with pytest.raises(FlowARError, match="holds other files"):
        train_vae(VAETrainArgs(out=str(theirs), **again), progress=False)
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == before
    (tmp_path / "v" / "notes.md").write_text("mine")             # and ours, holding a file of the user's since
    with pytest.raises(FlowARError, match="also holds notes.md"):
        train_vae(VAETrainArgs(out=str(tmp_path / "v"), **again), progress=False)


def test_a_stopped_vae_training_keeps_its_vae_and_resumes_as_the_uninterrupted_one(small_world, tmp_path, monkeypatch,
                                                                                     capsys):
    """Ctrl-C lost every step of flowar-train-vae (not resumable): the step computing ends, the folder
    holds the VAE at that step (loadable) and its training state, and --resume (alone: the run's own
    settings) continues to the uninterrupted run's losses and weights; a finished VAE, other settings
    and too few steps are one line each."""
    import signal

    from click.testing import CliRunner
    from safetensors.torch import load_file

    import flowar.train.vae as tv
    from flowar.commands.cli import train_vae_cmd
    from flowar.errors import stop_asked, stops_cleared
    from flowar.model.vae import load_vae
    kw = dict(data=str(small_world / "data"), size=16, channels=(8, 8), groups=4, steps=6, batch=4)
    whole = tv.train_vae(tv.VAETrainArgs(out=str(tmp_path / "whole"), **kw), progress=False)
    real, calls = tv.build_vae, []

    def stopping(a):                            # (Ctrl-C while the third step computes)
        m = real(a)
        encode = m.encode

        def counted(x, *args, **kws):
            calls.append(1)
            if len(calls) == 3:
                stop_asked(signal.SIGINT, None)
            return encode(x, *args, **kws)
        m.encode = counted
        return m
    monkeypatch.setattr(tv, "build_vae", stopping)
    out = tmp_path / "v"
    try:
        with pytest.raises(KeyboardInterrupt, match=rf"^at step 3 of 6; {re.escape(str(out))} holds the VAE at that "
                                                    r"step: the same command with --resume continues from there$"):
            tv.train_vae(tv.VAETrainArgs(out=str(out), **kw), progress=False)
    finally:
        stops_cleared()
    monkeypatch.setattr(tv, "build_vae", real)
    assert "stopping at this step's end, with the VAE there" in capsys.readouterr().err
    assert load_vae(out, expect_channels=4).downsample == 2 and (out / tv.STATE).is_file()
    res = CliRunner().invoke(train_vae_cmd, ["--out", str(out), "--resume", "--data", kw["data"]])
    assert res.exit_code == 0, res.output
    assert "note: --resume takes the run's own size 16, channels (8, 8), groups 4, batch 4, steps 6 (not given here, or " \
           "given at their defaults)" in res.output and "resuming at step 3 of 6" in res.output, res.output
    assert not (out / tv.STATE).exists()                # (a finished VAE)
    name = "diffusion_pytorch_model.safetensors"
    a, b = load_file(str(out / name)), load_file(str(tmp_path / "whole" / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for args, said in ((["--resume"], "expected --out a VAE folder whose training stopped (it holds "
                                      "training-state.safetensors) for --resume; got " + f"{out}: a finished VAE"),
                       (["--size", "24"], "expected the settings the run began with for --resume; got size: here 24, "
                                          "there 16"),
                       (["--steps", "3"], "expected --steps above the 3 the run has done, for --resume; got 3")):
        if args != ["--resume"]:
            monkeypatch.setattr(tv, "build_vae", stopping)
            calls.clear()
            try:
                with pytest.raises(KeyboardInterrupt):
                    tv.train_vae(tv.VAETrainArgs(out=str(tmp_path / "s"), **kw), progress=False)
            finally:
                stops_cleared()
            monkeypatch.setattr(tv, "build_vae", real)
        res = CliRunner().invoke(train_vae_cmd, ["--out", str(out if args == ["--resume"] else tmp_path / "s"),
                                                 "--resume", "--data", kw["data"], *args])
        assert res.exit_code == 2 and said in res.output, (args, res.output)
    assert whole["losses"][3:] == tv.train_vae(tv.VAETrainArgs(out=str(tmp_path / "s"), resume=True, **kw),
                                               progress=False)["losses"]
    # a stop on the last step keeps the finished VAE (it lost the run); --steps typed (the old default 1500) extends
    # a resumed run (it took the run's 6); the data folder named from another directory, a Path, is the run's
    monkeypatch.setattr(tv, "build_vae", stopping)
    calls[:] = [1]
    try:
        with pytest.raises(KeyboardInterrupt, match=rf"^at step 2 of 2, the last; {re.escape(str(tmp_path / 'l'))} "
                                                    r"holds the finished VAE$"):
            tv.train_vae(tv.VAETrainArgs(out=str(tmp_path / "l"), **kw | {"steps": 2}), progress=False)
        stops_cleared()
        calls.clear()
        with pytest.raises(KeyboardInterrupt, match="at step 3 of 6"):
            tv.train_vae(tv.VAETrainArgs(out=tmp_path / "p", **kw | {"data": small_world / "data"}), progress=False)
    finally:
        stops_cleared()
    monkeypatch.setattr(tv, "build_vae", real)
    assert load_vae(tmp_path / "l", expect_channels=4).downsample == 2 and not (tmp_path / "l" / tv.STATE).exists()
    monkeypatch.chdir(small_world)
    res = CliRunner().invoke(train_vae_cmd, ["--out", str(tmp_path / "p"), "--resume", "--data", "data", "--steps", "8"])
    assert res.exit_code == 0 and "resuming at step 3 of 8" in res.output, res.output


def test_the_flow_loss_is_the_official_objective(official_v1):
    """FlowLoss against the objective assembled from the official recordings: the official per-scale
    targets and the conditioning the official training forward gives the head (s_hat), the path
    x_t = (1 - t) x0 + t e, the target e - x0, and each scale weighted by its share s^2 / S^2.
    Swapping the interpolation, the target's sign or a scale's weight moves the loss far beyond
    float32 noise (1e-5 relative)."""
    from flowar.train.trainer import FlowLoss
    o = official_v1
    c, io = o.model.config, o.a
    B = io["semantics.labels"].shape[0]
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(c.n_scales, B, generator=gen)
    noise = [torch.randn(B, n, c.latent_channels, generator=gen) for n in c.tokens_per_scale]
    with torch.no_grad():
        loss = FlowLoss(o.model)(io["semantics.latent"], io["semantics.labels"], t, noise)
        terms = []
        for k, side in enumerate(c.scales):
            x0, e, tk = io[f"semantics.gt_scale{k}"], noise[k], t[k][:, None, None]
            cond = io["semantics.s_hat"][:, c.scale_begin[k]:c.scale_end[k]]
            v = o.model.flownet((1 - tk) * x0 + tk * e, t[k], cond)
            terms.append(((v - (e - x0)) ** 2).mean() * side ** 2 / c.latent_size ** 2)
    ref = sum(terms)
    assert abs(float(loss) - float(ref)) <= 1e-5 * float(ref), (float(loss), float(ref))
    # each scale counts: without the weights the sum is another number altogether
    assert abs(float(sum(t_ * c.latent_size ** 2 / s ** 2 for t_, s in zip(terms, c.scales))) - float(ref)) > 0.1 * float(ref)


def test_an_image_folder_takes_its_class_folders_only_and_names_a_bad_file(small_world, tmp_path):
    """Hidden and system folders (.ipynb_checkpoints, __MACOSX) and macOS's ._x.png files beside the
    images are not data: a .ipynb_checkpoints folder became class 0 and shifted every label, silently.
    A class folder without images, and an image PIL cannot read, are one line each (the latter blamed
    the paths' permissions and the free disk)."""
    import shutil

    from flowar.errors import FlowARError
    from flowar.train.data import load_image_folder
    d = tmp_path / "data"
    shutil.copytree(small_world / "data", d)
    for junk in (".ipynb_checkpoints", "__MACOSX"):
        (d / junk).mkdir()
        shutil.copy(d / "disc" / "0.png", d / junk / "0.png")
    (d / "disc" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    got = load_image_folder(d, 16)
    assert got.class_names == ["disc", "square"] and got.labels.tolist() == [0] * 12 + [1] * 12
    (d / "empty").mkdir()
    with pytest.raises(FlowARError, match="images .* in every class folder; got none in empty"):
        load_image_folder(d, 16)
    (d / "empty").rmdir()
    (d / "square" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(FlowARError, match="image files PIL can read in the class folders; got .*bad.png"):
        load_image_folder(d, 16)


def test_animal_mnist_below_its_28_pixels_is_refused_not_cropped():
    """--size 16 on Animal-MNIST trained on the centre 16x16 of each silhouette (padding by a negative
    amount crops), without a word; padded to 32, every pixel stays."""
    from flowar.errors import FlowARError
    from flowar.train.data import load_animal_mnist, pad_to
    with pytest.raises(FlowARError, match="--size at least 28 for Animal-MNIST .* got 16. Fix: use --size 32"):
        load_animal_mnist(16)
    x = torch.rand(2, 28, 28, generator=torch.Generator().manual_seed(0)) + 1
    padded = pad_to(x, 32)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert padded.shape == (2, 32, 32) and torch.equal(padded[:, 2:30, 2:30], x) and bool((padded[:, border] == 0).all())


def test_the_sample_grid_takes_40_images_whatever_the_classes(monkeypatch, tmp_path):
    """A 1000-class model's grid sampled all 1000 classes at every --sample-every; now 40 spread over
    them (first and last included), and a 10-class model's 4 of each as before."""
    from types import SimpleNamespace

    from flowar.config import get_preset
    from flowar.train.pictures import sample_grid
    seen = []

    class Stop(Exception):
        pass
    # (in sys.modules: test_export re-imports flowar.model.vae, so the package's attribute may be another module
    # than the one sample_grid's import finds)
    import flowar.model.vae  # noqa: F401
    import flowar.sampling.sampler  # noqa: F401
    monkeypatch.setattr(sys.modules["flowar.model.vae"], "load_vae", lambda *a, **k: SimpleNamespace(decode=None))
    monkeypatch.setattr(sys.modules["flowar.sampling.sampler"], "sample", lambda stages, c, sched, labels, *a, **k: (seen.append(labels.tolist()),
                                                                                     (_ for _ in ()).throw(Stop()))[1])
    for n in (1000, 10):
        ema = SimpleNamespace(config=get_preset("tiny").replace(num_classes=n), eval=lambda: None)
        args = SimpleNamespace(vae="v", sample_steps=4, sample_cfg=2.0)
        with pytest.raises(Stop):
            sample_grid(ema, args, [str(i) for i in range(n)], tmp_path / "g.png")
    assert len(seen[0]) == 40 and seen[0][0] == 0 and seen[0][-1] == 999 and len(set(seen[0])) == 40
    assert seen[1] == [k for k in range(10) for _ in range(4)]


def test_the_latent_cache_is_keyed_by_the_vae_hash_a_model_records(tmp_path):
    """One VAE hash for the trainer's cache and the model's record (vae_sha256: a file, or a folder's
    config and weights): a README beside the weights keeps the cache, other weights do not; a missing
    VAE is one line."""
    import shutil
    from conftest import DEFAULT_VAE
    from flowar.errors import FlowARError
    from flowar.train.data import DatasetIndex, latent_cache_path
    index = DatasetIndex("d" * 64, 3)
    vae = tmp_path / "vae"
    shutil.copytree(DEFAULT_VAE, vae)
    first = latent_cache_path(tmp_path, index, vae, 32)
    (vae / "README.md").write_text("notes")
    assert latent_cache_path(tmp_path, index, vae, 32) == first
    w = next(vae.glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:-1] + b"\1")
    assert latent_cache_path(tmp_path, index, vae, 32) != first
    with pytest.raises(FlowARError, match="nothing at"):
        latent_cache_path(tmp_path, index, tmp_path / "none", 32)
