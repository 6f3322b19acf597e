"""flowar-run from the command line."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import invoke
from flowar.commands.cli import run


@pytest.fixture()
def noise25(tmp_path, tiny_v1):
    _, io = tiny_v1
    p = tmp_path / "N.safetensors"
    save_file({f"noise{k}": io[f"sample25.noise{k}"].contiguous() for k in range(5)}, str(p))
    return p


def test_noise_that_is_not_finite_floats_is_one_line(tiny_v1, noise25, tmp_path):
    """--noise in int64 or bool was cast silently (garbage noise, images out); NaN in it was blamed on
    the checkpoint ('NaN or Inf at scale 0 ... check the checkpoint'). The file is named now."""
    from flowar.errors import FlowARError
    from flowar.sampling.batches import read_noise
    model, _ = tiny_v1
    good = load_file(str(noise25))
    assert len(read_noise(noise25, model.config)) == 5
    for name, bad in (("int", good["noise1"].long()), ("bool", good["noise1"] > 0),
                      ("nan", good["noise1"].clone().fill_(float("nan")))):
        save_file(good | {"noise1": bad}, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(FlowARError, match=f"finite floating-point noise in every tensor; got {name}.safetensors: "
                                              "noise1 not"):
            read_noise(tmp_path / f"{name}.safetensors", model.config)


def test_run_reproduces_official_tokens(fixtures_dir, tiny_v1, noise25, tmp_path, official_tokens, assert_tokens):
    _, io = tiny_v1
    out = tmp_path / "T.safetensors"
    res = CliRunner().invoke(run, [
        "--ckpt", str(fixtures_dir / "tiny_v1.safetensors"), "--config", str(fixtures_dir / "tiny_v1.config.json"),
        "--labels", "3,7", "--steps", "25", "--cfg", "4.3", "--guidance", "0.9",
        "--noise", str(noise25), "--save-tokens", str(out)])
    assert res.exit_code == 0, res.output
    tokens = load_file(str(out))["tokens"]
    assert torch.equal(tokens, official_tokens("tiny_v1", "sample25")[1])     # the eager sampler, bit for bit
    assert_tokens(tokens)
    # recorded noise is split row by row into smaller batches: the same tokens per sample
    res = CliRunner().invoke(run, [
        "--ckpt", str(fixtures_dir / "tiny_v1.safetensors"), "--config", str(fixtures_dir / "tiny_v1.config.json"),
        "--labels", "3,7", "--noise", str(noise25), "--batch", "1", "--save-tokens", str(tmp_path / "T1.safetensors")])
    assert res.exit_code == 0, res.output
    assert_tokens(load_file(str(tmp_path / "T1.safetensors"))["tokens"])


def test_save_tokens_replaces_a_token_file_and_nothing_else(fixtures_dir, tmp_path):
    """--save-tokens replaced whatever .safetensors it named: an engine directory's checkpoint or its
    VAE's weights (files that run does not read, so not refused as its inputs) became 1 KB of tokens,
    exit 0. Only a token file is replaced now; any other file is one line, untouched."""
    import shutil
    ckpt = ["--ckpt", str(fixtures_dir / "tiny_v1.safetensors"), "--config", str(fixtures_dir / "tiny_v1.config.json"),
            "--steps", "3"]
    model = tmp_path / "model.safetensors"
    shutil.copy(fixtures_dir / "tiny_v1.safetensors", model)
    (tmp_path / "notes.safetensors").write_text("not tensors")
    for path, held in ((model, "holds other tensors (class_emb.weight"), (tmp_path / "notes.safetensors", "holds no safetensors")):
        before = path.read_bytes()
        res = invoke(run, [*ckpt, "--labels", "1", "--save-tokens", str(path)])
        assert res.returncode == 2 and res.stderr.startswith("error: expected --save-tokens a new file, or a token file "
                                                             f"to replace; got {path}, which {held}"), res.stderr
        assert path.read_bytes() == before
    tokens = tmp_path / "t.safetensors"
    for label in ("1", "2"):                              # a token file: replaced (what the second run sampled)
        assert invoke(run, [*ckpt, "--labels", label, "--save-tokens", str(tokens)]).returncode == 0
    assert load_file(str(tokens))["labels"].tolist() == [2]


def test_an_error_while_a_bar_is_drawn_is_a_line_of_its_own(fixtures_dir, tmp_path, monkeypatch):
    """On a terminal, a bar was left drawn when the work under it failed (or was stopped): the
    command's last line went on after it, "| 2/5 [00:01<00:01, 1.95scale/s]error: expected ...".
    run_sampling closes its bar whatever ends it; a command erases any bar left before its line."""
    import io

    import flowar.commands.build as build
    import flowar.sampling.sampler as sampler
    from flowar.commands.cli import export_cmd
    from flowar.errors import FlowARError

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    real, calls = sampler.run_scale, []

    def fails_at_the_third_scale(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise FlowARError("finite values", "NaN at scale 2", "a test")
        return real(*a, **k)

    def fails_after_a_step(*a, progress, **k):
        progress("exporting ar", 4)
        raise FlowARError("a graph", "none", "a test")

    ckpt = ["--ckpt", str(fixtures_dir / "tiny_v1.safetensors"), "--config", str(fixtures_dir / "tiny_v1.config.json")]
    monkeypatch.setattr(sampler, "run_scale", fails_at_the_third_scale)
    monkeypatch.setattr(build, "build_engine_dir", fails_after_a_step)
    for cmd, args, bar, line in (
            (run, ["--labels", "3", "--steps", "4", "--save-tokens", str(tmp_path / "t.safetensors")], "scales:   0%|",
             "error: expected finite values; got NaN at scale 2. Fix: a test\n"),
            (export_cmd, ["--out", str(tmp_path / "engines")], "export:", "error: expected a graph; got none. Fix: a test\n")):
        term = Terminal()
        monkeypatch.setattr(sys, "stderr", term)
        with pytest.raises(SystemExit) as e:
            cmd.main([*ckpt, *args], cmd.name)
        text = term.getvalue()
        assert e.value.code == 2 and bar in text, text                  # (the bar was drawn)
        assert text.split("\r")[-1] == line, text[-300:]                # and erased before the line
    assert not (tmp_path / "t.safetensors").exists() and not (tmp_path / "engines").exists()
    # run_sampling's own bar (a notebook's, a library's: no command around it) closed by run_sampling itself
    from tqdm import tqdm
    from flowar.model.checkpoint import load_model
    from flowar.sampling.batches import run_sampling
    from flowar.sampling.eager import EagerStages
    from flowar.sampling.schedule import Settings
    model, _ = load_model(fixtures_dir / "tiny_v1.safetensors", config_path=fixtures_dir / "tiny_v1.config.json")
    calls.clear()
    before = set(tqdm._instances)                    # (bars another test left, if any)
    with pytest.raises(FlowARError):
        try:
            run_sampling(EagerStages(model), model.config, [3], Settings().resolve(model.config.n_scales),
                         progress={"file": io.StringIO()})
        finally:
            assert not set(tqdm._instances) - before     # (the failure's traceback holds the frame: not collected)


def test_run_decodes_through_the_mar_vae(fixtures_dir, tmp_path):
    from PIL import Image
    res = CliRunner().invoke(run, [
        "--ckpt", str(fixtures_dir / "tiny_v2.safetensors"), "--config", str(fixtures_dir / "tiny_v2.config.json"),
        "--vae", str(fixtures_dir / "mar_vae_tiny.ckpt"), "--labels", "1,2,3", "--steps", "4",
        "--save-images", str(tmp_path / "imgs"), "--out", str(tmp_path / "grid.png")])
    assert res.exit_code == 0, res.output
    pngs = sorted((tmp_path / "imgs").glob("*.png"))
    assert [p.name for p in pngs] == ["000000.png", "000001.png", "000002.png"]
    assert Image.open(pngs[0]).size == (256, 256)   # 16x16 latent, VAE stride 16
    assert Image.open(tmp_path / "grid.png").size[0] > 256


@pytest.mark.parametrize("args,needle", [
    (["--labels", "3,1000"], "class ids in 0..999"),
    (["--labels", "cat"], "integer class ids"),
    (["--classes", "catt"], "a class name of this model (1000 classes"),
    (["--steps", "0"], "--steps"),
    (["--cfg", "0.2"], "--cfg"),
    (["--guidance", "2"], "--guidance"),
    (["--out", "g.png"], "--vae"),
    (["--threads", "0"], "--threads"),
    (["--labels", "1,,2"], "got '' in '1,,2'"),
    (["--labels", ""], "integer class ids"),
    (["--classes", "cat,,dog"], "class names separated by single commas"),
    (["--out", "g.jpg"], "--out a .png file"),
    (["--save-tokens", "t.pt"], "--save-tokens a .safetensors file (tokens and labels as safetensors); got t.pt"),
])
def test_user_errors_are_one_line(fixtures_dir, args, needle):
    res = CliRunner().invoke(run, ["--ckpt", str(fixtures_dir / "tiny_v1.safetensors"), "--preset", "tiny"] + args)
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: expected") and needle in lines[0]


def test_a_malformed_label_list_is_refused_before_the_source_opens(tmp_path):
    """The form of --labels / --classes / --n-per-class and the seed's range are checked before
    anything opens (the directory here does not exist: the error is about the list or the seed)."""
    for args, needle in ((["--labels", "1,,2"], "got '' in '1,,2'"), (["--classes", "cat,,dog"], "single commas"),
                         (["--n-per-class", "0"], "--n-per-class >= 1"), (["--labels", "1", "--classes", "cat"],
                                                                          "either --labels or --classes"),
                         (["--seed", str(2 ** 63)], f"a seed in [-2^63, 2^63 - 1] (64 bits: what a served request "
                                                    f"takes); got {2 ** 63}"),
                         (["--labels", "3_0"], "got '3_0'"), (["--labels", "\u0661"], "got '\u0661'"),  # (int(): 30, 1)
                         (["--batch", "0"], "--batch >= 1"),
                         (["--noise", str(tmp_path / "none.safetensors")], "no file at")):
        res = CliRunner().invoke(run, ["--engine-dir", str(tmp_path / "none")] + args)
        assert res.exit_code == 2 and needle in res.output, res.output


@pytest.mark.parametrize("raised, code, line", [
    (EOFError("Ran out of input"), 2, "error: expected complete input files; got EOFError: Ran out of input."),
    (KeyboardInterrupt("3 of 8 images written"), 130, "interrupted: 3 of 8 images written"),
    (KeyboardInterrupt(), 130, "interrupted"),
    # (a machine out of threads, or a user at its limit: it was Python's traceback)
    (RuntimeError("can't start new thread"), 2, "error: expected room for new threads; got none (can't start new "
                                                "thread: this user's or the machine's limit reached). Fix: end other "
                                                "processes (or ask for fewer --threads)")])
def test_an_interrupt_or_a_file_that_ends_early_is_exactly_one_line(monkeypatch, tmp_path, raised, code, line):
    """click reports an EOFError as an abort, as it does Ctrl-C, after an empty line of its own: a
    file that ends early is one error line and exit 2, an interrupt one line and exit 130, and
    nothing else is written (the empty line was, above both)."""
    import flowar.runtime.runtime as runtime

    def stopped(*a, **k):
        raise raised
    monkeypatch.setattr(runtime.Runtime, "open", stopped)
    res = CliRunner().invoke(run, ["--ckpt", str(tmp_path / "m.safetensors"), "--labels", "1"])
    assert res.exit_code == code and res.output.startswith(line) and res.output.count("\n") == 1, repr(res.output)


def test_an_unreadable_openmp_thread_count_is_one_line_and_an_empty_one_is_unset(tmp_path):
    """OMP_NUM_THREADS=abc (or 0, or 1.5): GNU OpenMP printed "libgomp: Invalid value for environment
    variable OMP_NUM_THREADS" above the command's output and went on; an empty one did the same. In a
    fresh process (PyTorch loads GNU OpenMP once): abc is one line and exit 2, the empty one is taken
    as unset (no libgomp line), a list of counts passes."""
    from conftest import DEFAULT_CKPT
    args = [sys.executable, "-c", "from flowar.commands.cli import run; run()", "--ckpt", str(DEFAULT_CKPT),
            "--steps", "3", "--save-tokens", str(tmp_path / "t.safetensors")]
    for value, code, said in (("abc", 2, "error: expected OMP_NUM_THREADS a positive integer (or a list of them), "
                                         "or unset; got 'abc'. Fix: unset it"), ("", 0, ""), ("2,1", 0, ""),
                              ("\u00b2", 2, "error: expected OMP_NUM_THREADS")):     # (a digit to isdigit, not to int)
        proc = subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": value}, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == code and "libgomp" not in proc.stderr, (value, proc.stderr)
        assert proc.stderr.startswith(said) and (not said or proc.stderr.count("\n") == 1), (value, proc.stderr)


def test_debug_shows_the_error_itself():
    """--debug lets the error through (its traceback) instead of the one line; the word as another
    option's value is not the flag."""
    from flowar.errors import FlowARError
    res = CliRunner().invoke(run, ["--engine-dir", "/nonexistent-flowar-dir", "--debug"])
    assert isinstance(res.exception, FlowARError) and "error: expected" not in res.output
    res = CliRunner().invoke(run, ["--engine-dir", "/nonexistent-flowar-dir", "--labels", "--debug"])
    assert res.exit_code == 2 and res.output.startswith("error: expected comma-separated integer"), res.output


def test_no_traceback_from_the_installed_command(fixtures_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-c", "from flowar.commands.cli import run; run()", "--ckpt",
                           str(tmp_path / "missing.pth"), "--preset", "tiny"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert "no file at" in proc.stderr
    # the export says it as the run does (it spoke of writing and the free disk space: its hash read the file first)
    from flowar.commands.cli import export_cmd
    (tmp_path / "locked.pth").write_bytes(b"x")
    (tmp_path / "locked.pth").chmod(0)
    for ckpt, said in ((tmp_path / "missing.pth", "expected a checkpoint file; got no file at"),
                       (tmp_path / "locked.pth", "expected a checkpoint file this process can read; got")):
        if said.endswith("read; got") and os.access(tmp_path / "locked.pth", os.R_OK):
            continue                                       # (as root every file is readable)
        res = CliRunner().invoke(export_cmd, ["--ckpt", str(ckpt), "--preset", "tiny", "--out", str(tmp_path / "e")])
        assert res.exit_code == 2 and res.output.startswith("error: " + said), res.output


def test_usage_errors_of_the_installed_command_are_one_line_too(fixtures_dir):
    """click's own errors (an unknown option, a folder given for a file) as one line and exit 2,
    not click's usage block."""
    for args, needle in ((["--ckpt", str(fixtures_dir)], "is a directory"), (["--bogus"], "No such option")):
        proc = subprocess.run([sys.executable, "-c", "from flowar.commands.cli import run; run()", *args],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert proc.stderr.startswith("error: ") and needle in proc.stderr and "flowar-run --help" in proc.stderr
    # an image size asked for: the model's one size is said (it was "No such option ... Did you mean --seed?")
    res = CliRunner().invoke(run, ["--engine-dir", "x", "--size", "512"])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0, res.output
    assert res.output.startswith("error: expected no --size: a FlowAR model makes images of one size (FlowAR-S/L/H: "
                                 "256 px") and "Did you mean" not in res.output and "Fix: leave it out" in res.output


def test_an_option_value_of_the_wrong_kind_is_the_projects_line(fixtures_dir):
    """A value click refuses (a folder for a file, an unknown choice, a word for a number) is
    'expected X; got Y. Fix: Z' naming what the option takes (it was click's "Invalid value for
    '--ckpt': File ... is a directory. Fix: see flowar-run --help")."""
    for args, said in (
            (["--ckpt", str(fixtures_dir)], f"expected --ckpt a file; got File '{fixtures_dir}' is a directory. "
                                            "Fix: give --ckpt a file (see flowar-run --help)"),
            (["--backend", "foo"], "expected --backend one of auto, ort, trt, torch; got 'foo'. "
                                   "Fix: give --backend one of auto, ort, trt, torch"),
            (["--batch", "two"], "expected --batch an integer; got 'two'. Fix: give --batch an integer"),
            (["--cfg", "x"], "expected --cfg a number; got 'x'. Fix: give --cfg a number")):
        res = CliRunner().invoke(run, args)
        assert res.exit_code == 2 and res.output.strip().count("\n") == 0, res.output
        assert res.output.startswith("error: " + said), res.output
    from flowar.commands.check import check_cmd                   # a required option left out (it said "got .")
    res = CliRunner().invoke(check_cmd, [])
    assert res.exit_code == 2 and res.output == ("error: expected --engine-dir a path; got nothing (it is required). "
                                                 "Fix: give --engine-dir a path (see flowar-check --help)\n"), res.output
    # a value without its option name (a note said "flowar-check DIR": "got nothing (it is required)"; click's own
    # "Got unexpected extra argument (x) Fix: ..." was not this project's line), with the option where it can tell
    engines = fixtures_dir.parent / "no-such-dir"
    ckpt = fixtures_dir / "tiny_v1.safetensors"
    for cmd, args, said in (
            (check_cmd, [str(fixtures_dir)], f"expected --engine-dir a path; got nothing; {fixtures_dir} came "
                                             "without an option name. Fix: give --engine-dir a path (see"),  # (no manifest)
            (check_cmd, ["--quiet", str(engines), ""], f"got nothing; {engines} '' came without an option name. "
                                                       "Fix: give --engine-dir a path"),
            (run, [str(ckpt)], f"expected options, each value after its name; got {ckpt} without one. Fix: give it "
                               f"as --ckpt {ckpt} (see flowar-run --help)"),
            (run, ["--labels", "1", str(engines)], f"got {engines} without one. Fix: put its option's name "
                                                   "before it (see flowar-run --help)"),
            (run, ["--labels", "1", "", "x" * 300], "got '' " + "x" * 300 + " without one. Fix: put its option's "
                                                    "name before it"),   # (an empty one was an IndexError, a long one
            (run, ["--bogus"], "error: No such option '--bogus'. Did you mean")):    # an OSError: tracebacks)
        res = CliRunner().invoke(cmd, args)
        assert res.exit_code == 2 and res.output.count("\n") == 1 and said in res.output, res.output
        assert "?." not in res.output, res.output


def test_a_moved_checkpoint_is_passed_beside_the_engine_directory_for_the_torch_backend(fixtures_dir, tmp_path):
    """--backend torch reads the checkpoint a directory was exported from; where it has moved, the
    error says to put it back or pass it with --ckpt beside --engine-dir, and that works (it was refused
    as both). (The commands without --ckpt, flowar-sample and flowar-serve, were told to pass it.)"""
    import shutil

    from flowar.commands.build import build_engine_dir
    src = tmp_path / "a.safetensors"
    shutil.copy(fixtures_dir / "tiny_v1.safetensors", src)
    build_engine_dir(src, tmp_path / "e", preset="tiny", max_batch=1, verify=False)
    moved = src.rename(tmp_path / "b.safetensors")
    args = ["--engine-dir", str(tmp_path / "e"), "--backend", "torch", "--labels", "1", "--steps", "4",
            "--save-tokens", str(tmp_path / "t.safetensors")]
    res = CliRunner().invoke(run, args)
    assert res.exit_code == 2 and f"put it back at {src}, or pass it with --ckpt beside --engine-dir" in res.output
    res = CliRunner().invoke(run, args + ["--ckpt", str(moved)])
    assert res.exit_code == 0 and (tmp_path / "t.safetensors").is_file(), res.output
    assert "timing run" not in res.output
    res = CliRunner().invoke(run, args[:-2] + ["--ckpt", str(moved)])           # no output asked: said so
    said = "a timing run of 1 token map, nothing decoded or written: pass --out"      # (before the work: it came after)
    assert res.exit_code == 0 and said in res.output and res.output.index(said) < res.output.index("sampled 1 x"), res.output
    res = CliRunner().invoke(run, args[:2] + ["--ckpt", str(moved), "--labels", "1"])         # not with other engines
    assert res.exit_code == 2 and "exactly one of --ckpt or --engine-dir" in res.output


def test_export_then_run_from_the_engine_directory(fixtures_dir, tiny_v1, noise25, tmp_path, assert_tokens):
    from flowar.commands.cli import export_cmd
    _, io = tiny_v1
    # a training checkpoint (raw and EMA weights, the raw ones off): its EMA weights run, and the last line says so
    sd = load_file(str(fixtures_dir / "tiny_v1.safetensors"))
    torch.save({"model": {k: v + 0.5 for k, v in sd.items()}, "model_ema": sd}, tmp_path / "train.pth")
    res = CliRunner().invoke(export_cmd, ["--ckpt", str(tmp_path / "train.pth"), "--preset", "tiny",
                                          "--out", str(tmp_path / "eng"), "--max-batch", "2", "--no-verify"])
    assert res.exit_code == 0, res.output
    assert "max batch 2; tokens only, no decoder: export with --vae for images; its EMA weights)" in res.output
    assert "note: the stages were not compared with eager PyTorch (--no-verify)" in res.output     # (said nowhere)
    torch.save({"model": sd}, tmp_path / "one.pth")          # one set of weights: none named
    res = CliRunner().invoke(export_cmd, ["--ckpt", str(tmp_path / "one.pth"), "--preset", "tiny",
                                          "--out", str(tmp_path / "one"), "--max-batch", "2", "--no-verify"])
    assert res.exit_code == 0 and "export with --vae for images) in " in res.output, res.output
    out = tmp_path / "T.safetensors"
    res = CliRunner().invoke(run, ["--engine-dir", str(tmp_path / "eng"), "--labels", "3,7", "--noise", str(noise25),
                                   "--save-tokens", str(out), "--threads", "2"])      # row blocks on two cores
    assert res.exit_code == 0, res.output
    assert "ONNX Runtime" in res.output
    assert_tokens(load_file(str(out))["tokens"])
    # one core: no row blocks, the same tokens as the blocks on every core
    one = tmp_path / "T1.safetensors"
    res = CliRunner().invoke(run, ["--engine-dir", str(tmp_path / "eng"), "--labels", "3,7", "--noise", str(noise25),
                                   "--save-tokens", str(one), "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert (load_file(str(one))["tokens"] - load_file(str(out))["tokens"]).abs().max().item() <= 1e-5
    # the CUDA-graph runner (capture off on the CPU) runs the same plan: the same tokens, bit for bit
    plain = tmp_path / "T2.safetensors"
    res = CliRunner().invoke(run, ["--engine-dir", str(tmp_path / "eng"), "--labels", "3,7", "--noise", str(noise25),
                                   "--save-tokens", str(plain), "--no-cuda-graphs"])
    assert res.exit_code == 0 and "CUDA graphs off" in res.output, res.output
    assert torch.equal(load_file(str(plain))["tokens"], load_file(str(out))["tokens"])
    assert "--cuda-graphs / --no-cuda-graphs" in CliRunner().invoke(run, ["--help"]).output
    # the directory's default schedule is official; --schedule fast runs the skip solver on the same engines
    res = CliRunner().invoke(run, ["--engine-dir", str(tmp_path / "eng"), "--labels", "3,7", "--schedule", "fast",
                                   "--save-tokens", str(tmp_path / "F.safetensors")])
    assert res.exit_code == 0, res.output
    assert "schedule: fast: skip" in res.output and "45 head evaluations per sample" in res.output
    # images need a decoder, which this directory does not have: one clear line
    res = CliRunner().invoke(run, ["--engine-dir", str(tmp_path / "eng"), "--out", str(tmp_path / "g.png")])
    assert res.exit_code == 2 and "re-export with --vae" in res.output


def test_the_installed_command_ends_once_its_output_is_out_and_its_exit_handlers_ran(fixtures_dir, tmp_path):
    """A command run as a program ends without the interpreter's teardown (0.4 s after PyTorch was
    imported): what it wrote and printed is complete, the status is its own, the exit handlers ran
    (Ray's shutdown, temporary folders), and a thread of the program's own that still runs is
    waited for, as an ordinary exit does."""
    script = ("import atexit, os, pathlib, threading, time\n"
              "marks = pathlib.Path(os.environ['MARKS'])\n"
              "atexit.register(lambda: ((marks / 'exit-handler').write_text('ran'), print('a handler said')))\n"
              "class Teardown:\n"
              "    def __del__(self):\n"
              "        (marks / 'teardown').write_text('ran')\n"
              "kept = Teardown()\n"
              "if os.environ.get('THREAD'):\n"
              "    threading.Thread(target=lambda: (time.sleep(1), (marks / 'thread').write_text('done'))).start()\n"
              "from flowar.commands.cli import run\nrun()\n")
    sample = ["--ckpt", str(fixtures_dir / "tiny_v1.safetensors"), "--preset", "tiny", "--labels", "1,2", "--steps", "4"]

    def program(args, marks, **env):
        marks.mkdir()
        proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                              env={**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},   # stdout buffered
                                   "MARKS": str(marks), **env})
        return proc, {p.name for p in marks.iterdir()}

    t0 = time.perf_counter()
    proc, ran = program(sample + ["--save-tokens", str(tmp_path / "t.safetensors")], tmp_path / "a")
    wall = time.perf_counter() - t0
    assert proc.returncode == 0 and proc.stdout.startswith("sampled 2 x "), proc
    assert proc.stdout.endswith("\na handler said\n"), proc.stdout                  # (printed after the command's output)
    assert ran == {"exit-handler"}, ran                                  # handlers yes, teardown no
    res = CliRunner().invoke(run, sample + ["--save-tokens", str(tmp_path / "u.safetensors")])
    assert res.exit_code == 0, res.output
    # the whole command as a person timing it sees it (the lines said 3.0 s of 4.3): within the wall time around
    # the program, its parts the other lines' figures, its start PyTorch's loading (> 0.2 s anywhere seen) in a
    # program of its own, and next to nothing called in a process that has PyTorch already
    for out, program_of_its_own in ((proc.stderr + proc.stdout, True), (res.output, False)):
        total, start, opening, sampling = map(float, re.search(
            r"whole command ([\d.]+) s: starting Python and PyTorch ([\d.]+) s, opening ([\d.]+) s, sampling ([\d.]+) s",
            out).groups())
        # (each printed to 0.01 s: three parts may sum to 0.015 s above the printed total, as 0.00 + 0.03 + 0.15 of 0.17 did)
        assert f"in {opening:.2f} s" in out and f"in {sampling:.2f} s" in out and start + opening + sampling <= total + 0.015 + 1e-9
        assert (total <= wall and start > 0.2) if program_of_its_own else start < 0.2, (out, wall)
    assert torch.equal(load_file(str(tmp_path / "t.safetensors"))["tokens"], load_file(str(tmp_path / "u.safetensors"))["tokens"])
    proc, ran = program(["--ckpt", str(tmp_path / "missing.pth"), "--preset", "tiny"], tmp_path / "b")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc
    assert ran == {"exit-handler"}, ran
    proc, ran = program(["--help"], tmp_path / "c", THREAD="1")
    assert proc.returncode == 0 and "--engine-dir" in proc.stdout and ran == {"exit-handler", "thread", "teardown"}, ran
    closed = subprocess.run([sys.executable, "-c", "from flowar.commands.cli import run; run()", "--help"],
                            preexec_fn=lambda: os.close(1), stderr=subprocess.PIPE, text=True)   # (started without a stdout)
    assert closed.returncode == 0 and closed.stderr == "", closed.stderr


def test_settings_that_do_not_go_together_are_refused_before_the_source_opens(fixtures_dir, tmp_path, monkeypatch):
    """--stride without the skip solver (here or in what the directory records) is one line before
    anything is opened (it was refused only after the checkpoint had loaded: FlowAR-H 25 s)."""
    from flowar.commands.build import build_engine_dir
    from flowar.runtime.runtime import Runtime
    build_engine_dir(fixtures_dir / "tiny_v1.safetensors", tmp_path / "e", preset="tiny", max_batch=1, verify=False)
    monkeypatch.setattr(Runtime, "open", classmethod(lambda *a, **k: (_ for _ in ()).throw(AssertionError("opened"))))
    for source in (["--ckpt", str(fixtures_dir / "tiny_v1.safetensors"), "--preset", "tiny"],
                   ["--engine-dir", str(tmp_path / "e")]):
        res = CliRunner().invoke(run, source + ["--stride", "2", "--labels", "1"])
        assert res.exit_code == 2 and "--stride with the skip solver" in res.output, res.output
    # a batch above the directory's max batch, a noise file that is none: one line, before opening (it was
    # the "opened" and "backend" lines, then the error)
    (tmp_path / "noise.safetensors").write_bytes(b"not safetensors")
    for args, said in ((["--batch", "2"], "expected --batch at most 1 (the engines' max batch); got 2"),
                       (["--backend", "torch", "--batch", "2"], "expected --batch at most 1 (the engines' max batch)"),
                       (["--noise", str(tmp_path / "noise.safetensors")], "expected a readable safetensors noise file")):
        res = CliRunner().invoke(run, ["--engine-dir", str(tmp_path / "e"), "--labels", "1,2"] + args)
        assert res.exit_code == 2 and res.output.startswith(f"error: {said}") and res.output.count("\n") == 1, res.output


def test_save_images_never_mixes_runs_or_overwrites_the_grid(tmp_path):
    """--save-images into a folder holding an earlier, larger run's numbered PNGs mixed the two (a tool
    reading the folder took both); --out at one of the numbered names was overwritten by sample 0
    while the command said the grid was written. Both are refused before sampling; a grid beside the
    images, and the same command again, are fine."""
    from conftest import DEFAULT_CKPT, DEFAULT_VAE
    src = ["--ckpt", str(DEFAULT_CKPT), "--vae", str(DEFAULT_VAE), "--steps", "4"]
    folder = tmp_path / "s"
    res = CliRunner().invoke(run, src + ["--labels", "1,2,3", "--save-images", str(folder)])
    assert res.exit_code == 0 and sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.png" for i in range(3)]
    res = CliRunner().invoke(run, src + ["--labels", "1", "--save-images", str(folder)])
    assert res.exit_code == 2 and "2 more in" in res.output and "sampled" not in res.output, res.output
    res = CliRunner().invoke(run, src + ["--labels", "1,2,3", "--save-images", str(folder), "--out",
                                         str(folder / "000001.png")])
    assert res.exit_code == 2 and "which sample 1 overwrites" in res.output, res.output
    res = CliRunner().invoke(run, src + ["--labels", "1,2,3", "--save-images", str(folder), "--out",
                                         str(folder / "grid.png")])
    assert res.exit_code == 0 and (folder / "grid.png").is_file(), res.output
    for option in ("--save-images", "--out", "--save-tokens"):     # an empty path wrote nothing and said nothing
        res = CliRunner().invoke(run, src + ["--labels", "1", option, ""])
        assert res.exit_code == 2 and f"expected a path for {option}; got an empty one" in res.output, res.output


def test_saved_tokens_decode_later_into_the_images_the_run_wrote(default_auto_engines, tmp_path):
    """flowar-decode of what flowar-run --save-tokens wrote: the grid (its --n-per-class columns too) and
    PNGs that run wrote, byte for byte (the directory's decode stage, opened alone); from the checkpoint and its VAE (eager) the same images within
    float32 noise; tokens of another model or a file that is not tokens: one line, nothing written."""
    import numpy as np
    from PIL import Image

    from conftest import DEFAULT_CKPT, DEFAULT_VAE
    from flowar.commands.decode import decode_cmd
    from flowar.io.images import psnr
    t, d = tmp_path / "t.safetensors", str(default_auto_engines)
    res = CliRunner().invoke(run, ["--engine-dir", d, "--labels", "1,7,3", "--n-per-class", "2", "--seed", "4", "--steps", "4",
                                   "--save-tokens", str(t), "--out", str(tmp_path / "run.png"),
                                   "--save-images", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(decode_cmd, ["--engine-dir", d, "--tokens", str(t), "--out", str(tmp_path / "dec.png"),
                                          "--save-images", str(tmp_path / "dec")])
    assert res.exit_code == 0 and "decoded 6 token maps" in res.output, res.output
    assert (tmp_path / "dec.png").read_bytes() == (tmp_path / "run.png").read_bytes()
    names = [f"{i:06d}.png" for i in range(6)]         # (the grid: 2 columns, one per sample of a class)
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == names
    assert all((tmp_path / "dec" / n).read_bytes() == (tmp_path / "run" / n).read_bytes() for n in names)
    res = CliRunner().invoke(decode_cmd, ["--ckpt", str(DEFAULT_CKPT), "--vae", str(DEFAULT_VAE), "--tokens", str(t),
                                          "--save-images", str(tmp_path / "eager")])
    assert res.exit_code == 0, res.output

    def pngs(folder):
        return torch.tensor(np.stack([np.asarray(Image.open(folder / n)) for n in names])).permute(0, 3, 1, 2) / 127.5 - 1
    assert psnr(pngs(tmp_path / "eager"), pngs(tmp_path / "run")) >= 40
    from flowar.errors import FlowARError
    from flowar.runtime.runtime import Runtime
    with Runtime.open(d, True, only=("decode",)) as rt:         # (what flowar-decode opens: the decoder alone)
        assert list(rt.stages.engines) == ["decode"]
        with pytest.raises(FlowARError, match="expected a source opened with its sampling stages"):
            rt.sample([1], rt.schedule())
        names, scale = list(rt.class_names), rt.config.latent_scale
    with pytest.raises(FlowARError, match=r"only= stages with the stages their inputs come from; got \('velocity',\), "
                                          r"without the one making c, rope"):               # (a KeyError)
        Runtime.open(d, True, only=("velocity",))
    save_file({"tokens": torch.zeros(2, 3, 5, 5)}, tmp_path / "other.safetensors")
    (tmp_path / "text.safetensors").write_text("not tokens")
    saved = load_file(t)
    from safetensors import safe_open
    with safe_open(t, "pt") as f:                              # (what made them, for flowar-decode to check)
        made = json.loads(f.metadata()["flowar_tokens"])
    assert made == {"columns": 2, "class_names": names, "latent_scale": scale}, made
    # another model's token maps of the same shape: decoded with this one's VAE and captioned with its class names
    save_file(saved, tmp_path / "names.safetensors",
              metadata={"flowar_tokens": json.dumps(made | {"class_names": ["circle", *names[1:]]})})
    save_file(saved, tmp_path / "scale.safetensors", metadata={"flowar_tokens": json.dumps(made | {"latent_scale": scale * 2})})
    # a file of before (its grid's columns alone): decoded as it was, the same grid
    save_file(saved, tmp_path / "before.safetensors", metadata={"columns": "2"})
    res = CliRunner().invoke(decode_cmd, ["--engine-dir", d, "--tokens", str(tmp_path / "before.safetensors"), "--out",
                                          str(tmp_path / "before.png")])
    assert res.exit_code == 0 and (tmp_path / "before.png").read_bytes() == (tmp_path / "run.png").read_bytes()
    for bad, said in (("names.safetensors", f"sampled by a model with 'circle' where this one has {names[0]!r}"),
                      ("scale.safetensors", f"sampled at latent scale {scale * 2:g} where this model's is {scale:g}")):
        res = CliRunner().invoke(decode_cmd, ["--engine-dir", d, "--tokens", str(tmp_path / bad), "--out",
                                              str(tmp_path / "x.png")])
        assert res.exit_code == 2 and said in res.output and "Fix: decode them with the model that sampled" in res.output
        assert not (tmp_path / "x.png").exists()
    save_file({"tokens": saved["tokens"], "labels": saved["labels"] + 1000}, tmp_path / "labels.safetensors")
    save_file({"tokens": saved["tokens"].index_fill(0, torch.tensor([1]), float("nan")), "labels": saved["labels"]},
              tmp_path / "nan.safetensors")
    for bad, said in (("other.safetensors", "expected token maps of this model: (B, "),
                      ("text.safetensors", "expected a safetensors file of token maps from flowar-run --save-tokens"),
                      ("labels.safetensors", "expected labels of this model's classes"),
                      ("nan.safetensors", "NaN or infinite values in token map 1")):
        res = CliRunner().invoke(decode_cmd, ["--engine-dir", d, "--tokens", str(tmp_path / bad), "--out",
                                              str(tmp_path / "x.png")])
        assert res.exit_code == 2 and said in res.output and res.output.strip().count("\n") <= 1, res.output
        assert not (tmp_path / "x.png").exists()
    # a checkpoint given as tokens: four of its tensors named, and their count (its ~100 names, several KB, were one line)
    res = CliRunner().invoke(decode_cmd, ["--engine-dir", d, "--tokens", str(DEFAULT_CKPT), "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and re.search(r"with no 'tokens' \(it holds class_emb\.weight, [^,]+, [^,]+, [^,]+, \.\.\. \d+ "
                                            r"tensors\)\. Fix", res.output), res.output


def test_an_output_is_refused_before_any_work_where_it_would_write_over_an_input_or_another_output(fixtures_dir,
                                                                                                    tmp_path):
    """--save-tokens at the checkpoint (or at the VAE folder's weights, or at the noise file) wrote over
    it and exited 0; flowar-judge --json at the checkpoint too; --out and --save-images at one path
    wrote the grid, then failed; an empty --out wrote into the working directory (flowar-sample,
    flowar-train). Each is one line now, before anything opens, and every input is untouched."""
    import shutil

    from flowar.commands.cli import judge_cmd, train_cmd
    from flowar.commands.cli_ray import sample_cmd
    ck = tmp_path / "ck.safetensors"
    shutil.copy(fixtures_dir / "tiny_v1.safetensors", ck)
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    noise = tmp_path / "n.safetensors"
    noise.write_bytes(b"noise")
    before = {p: p.read_bytes() for p in (ck, vae / "diffusion_pytorch_model.safetensors", noise)}
    base = ["--ckpt", str(ck), "--preset", "tiny", "--labels", "1"]
    for command, args, said in (
            (run, base + ["--save-tokens", str(ck)], f"--save-tokens apart from the inputs; got {ck} is {ck}"),
            (run, base + ["--vae", str(vae), "--save-tokens", str(vae / "diffusion_pytorch_model.safetensors")],
             "is a file of"),
            (run, base + ["--noise", str(noise), "--save-tokens", str(noise)], "--save-tokens apart from the inputs"),
            (run, base + ["--out", str(tmp_path / "g.png"), "--save-images", str(tmp_path / "g.png")],
             "--save-images apart from --out"),
            (judge_cmd, ["--ckpt", str(ck), "--preset", "tiny", "--json", str(ck)], "--json apart from the inputs"),
            (sample_cmd, ["--engine-dir", str(tmp_path), "--num-images", "1", "--out", ""], "a path for --out; got an "
                                                                                             "empty one"),
            (train_cmd, ["--vae", str(vae), "--out", ""], "a path for --out; got an empty one")):
        res = CliRunner().invoke(command, args)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and said in lines[0], (args, res.output)
        assert "leave it out" not in lines[0], lines[0]            # (said of a required --out)
    assert {p: p.read_bytes() for p in before} == before and not (tmp_path / "g.png").exists()
    # other files in an input folder may be written again (an earlier run's grid, a bulk run's folder inside
    # the engine directory, resumed): only the files the input is made of are refused
    import json

    from flowar.errors import FlowARError
    from flowar.io.files import check_outputs
    eng = tmp_path / "eng"
    eng.mkdir()
    (eng / "manifest.json").write_text(json.dumps({"stages": {"ar": {"file": "ar.onnx", "data": "ar.onnx.data"}}}))
    for name in ("ar.onnx", "ar.onnx.data", "grid.png"):
        (eng / name).write_bytes(b"x")
    (eng / "samples").mkdir()
    check_outputs([("--out", str(eng / "grid.png")), ("--save-images", str(eng / "samples"))], [str(eng)])
    for name in ("ar.onnx", "ar.onnx.data", "manifest.json"):
        with pytest.raises(FlowARError, match=f"--save-tokens apart from the inputs; got .*{name} is a file of"):
            check_outputs([("--save-tokens", str(eng / name))], [str(eng)])


def test_more_images_than_memory_or_disk_hold_are_refused_before_sampling(default_auto_engines, tmp_path,
                                                                          monkeypatch):
    """flowar-run keeps every image until it writes them: more than the memory available is one line
    before sampling (--n-per-class 10^8 built its label list until the memory ran out), and so is a
    flowar-sample count whose shards, samples.npz and PNGs the disk cannot hold (10^12 images filled
    24 GB listing their shards); nothing is written."""
    import flowar.io.memory as memory
    from flowar.commands.cli_ray import sample_cmd
    eng = ["--engine-dir", str(default_auto_engines)]
    res = CliRunner().invoke(run, eng + ["--n-per-class", str(10 ** 8), "--out", str(tmp_path / "g.png")])
    assert res.exit_code == 2 and "--n-per-class at most 10000" in res.output, res.output
    monkeypatch.setattr(memory, "available_bytes", lambda: 500_000)          # 20 images of 32x32 take 0.49 MB, 40 twice
    res = CliRunner().invoke(run, eng + ["--labels", "1", "--n-per-class", "40", "--out", str(tmp_path / "g.png")])
    assert res.exit_code == 2 and "memory for 40 images of 32x32" in res.output, res.output
    assert CliRunner().invoke(run, eng + ["--labels", "1", "--n-per-class", "20", "--out",
                                          str(tmp_path / "g.png")]).exit_code == 0
    res = CliRunner().invoke(sample_cmd, eng + ["--num-images", str(10 ** 12), "--out", str(tmp_path / "s")])
    assert res.exit_code == 2 and f"free for {10 ** 12} images of 32x32" in res.output, res.output
    assert not (tmp_path / "s").exists()


def test_a_loop_of_symbolic_links_as_an_input_is_one_line(tmp_path):
    """check_outputs follows every input's links: a loop was a RuntimeError traceback in every command."""
    from flowar.errors import FlowARError
    from flowar.io.files import check_outputs
    (tmp_path / "a.safetensors").symlink_to(tmp_path / "b.safetensors")
    (tmp_path / "b.safetensors").symlink_to(tmp_path / "a.safetensors")
    with pytest.raises(FlowARError, match="a loop of links"):
        check_outputs([("--out", tmp_path / "g.png")], [tmp_path / "a.safetensors"])
    with pytest.raises(FlowARError, match="a loop of links"):
        check_outputs([("--out", tmp_path / "a.safetensors")], [])


def test_messages_name_what_was_given_and_where(default_auto_engines, tmp_path, monkeypatch):
    """Lines a walkthrough found pointing elsewhere: flowar-decode was told to drop --raw-weights and
    --precision it has no option for; a graph of an engine directory given as --engine-dir was offered
    flowar-export --ckpt on it; --ema-decay 2 was "in its range (see --help)", where help says none;
    --data FILE "no folder at"; "48.7 GB free at .. Fix" (the folder "."); NaN tokens to decode blamed
    the checkpoint "at scale 3"."""
    import math

    from flowar.commands.check import check_cmd
    from flowar.commands.cli import train_cmd
    from flowar.commands.decode import decode_cmd
    from flowar.errors import FlowARError
    from flowar.io.memory import require_free_space
    from pathlib import Path
    ROOT = Path(__file__).resolve().parents[1]
    res = CliRunner().invoke(run, ["--engine-dir", str(default_auto_engines), "--labels", "3", "--save-tokens",
                                   str(tmp_path / "t.safetensors")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(decode_cmd, ["--tokens", str(tmp_path / "t.safetensors"), "--engine-dir",
                                          str(default_auto_engines), "--preset", "tiny", "--out", str(tmp_path / "g.png")])
    assert res.exit_code == 2 and "expected no --preset with --engine-dir; got --preset. Fix:" in res.output, res.output
    graph = default_auto_engines / "ar.onnx"
    res = CliRunner().invoke(check_cmd, ["--engine-dir", str(graph)])
    assert res.exit_code == 2 and f"Fix: pass the folder it is in: --engine-dir {default_auto_engines}" in res.output
    (tmp_path / "d.safetensors").write_bytes(b"x")
    import flowar.train.trainer as trainer        # (a check that regresses fails here, not after a training)
    monkeypatch.setattr(trainer, "load_latents", lambda *a, **k: pytest.fail("went on past a refusal"))
    for args, said in ((["--ema-decay", "2"], "expected --ema-decay in [0, 1); got 2.0"),
                       (["--data", str(tmp_path / "d.safetensors")], "d.safetensors, a file, not a folder")):
        res = CliRunner().invoke(train_cmd, ["--out", str(tmp_path / "run"), "--vae", str(ROOT / "models/default/vae"),
                                             *args])
        assert res.exit_code == 2 and said in res.output, res.output
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FlowARError, match=f"free at {re.escape(str(tmp_path.resolve()))}. Fix"):
        require_free_space(".", 1 << 62, "a test")
    from flowar import FlowARPipeline
    with FlowARPipeline.from_pretrained(str(default_auto_engines)) as pipe:
        bad = load_file(str(tmp_path / "t.safetensors"))["tokens"] * math.nan
        with pytest.raises(FlowARError, match="expected finite token maps; got NaN or Inf in the tokens passed"):
            pipe.decode(bad)
    # a second walkthrough's: --labels given twice kept the last alone (--classes joins); --batch 100000 was told
    # to re-export with --max-batch 100000 (at most 1024); --out / and a --out not in UTF-8 were tracebacks
    res = CliRunner().invoke(run, ["--engine-dir", str(default_auto_engines), "--labels", "1", "--labels", "2,3",
                                   "--save-tokens", str(tmp_path / "twice.safetensors")])
    assert res.exit_code == 0 and load_file(str(tmp_path / "twice.safetensors"))["labels"].tolist() == [1, 2, 3]
    res = CliRunner().invoke(run, ["--engine-dir", str(default_auto_engines), "--labels", "1", "--batch", "100000"])
    assert res.exit_code == 2 and "or re-export with --max-batch 1024" in res.output, res.output
    from flowar.commands.cli import export_cmd
    for out, said in (("/", "expected --out a folder to write; got /, the file system's root"),
                      (os.fsdecode(bytes(tmp_path) + b"/out\xfe"), "expected --out a path in UTF-8")):
        res = CliRunner().invoke(export_cmd, ["--ckpt", str(ROOT / "models/default/flowar.safetensors"), "--out", out])
        assert res.exit_code == 2 and said in res.output and "Traceback" not in res.output, res.output


def test_a_caption_beyond_ascii_is_drawn_in_a_font_that_has_it(tmp_path):
    """Pillow's default font draws 'ü', 'ï' and '中' as the same box: a class folder 'chat ünï' was captioned
    "chat" and boxes. Where the system has DejaVu Sans, such a caption is drawn in it (two captions that differ
    in those letters differ in the grid); ASCII captions keep the default font."""
    import numpy as np
    from PIL import Image, ImageFont

    from flowar.io.images import save_grid
    try:
        ImageFont.truetype("DejaVuSans.ttf", 10)
    except OSError:
        pytest.skip("no DejaVu Sans on this system")
    images = torch.zeros(1, 3, 32, 32)
    grids = {}
    for caption in ("chat ü", "chat ï", "chat u", "chat i"):
        save_grid(images, [caption], tmp_path / "g.png")
        grids[caption] = np.asarray(Image.open(tmp_path / "g.png"))
    assert not np.array_equal(grids["chat ü"], grids["chat ï"])
    assert not np.array_equal(grids["chat u"], grids["chat i"])
