"""Bad input, faults and trust: clear one-line errors, nothing half-written trusted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from flowar.commands.cli import run

EXE = Path(sys.executable).parent


def _ctrl_c_on() -> None:
    """In a child about to start: Ctrl-C as a terminal gives it (a test run started in the background,
    `cmd &` in a script, ignores SIGINT, and its children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _flowar_run_after(setup: str, out: Path) -> subprocess.CompletedProcess:
    """flowar-run of the shipped model (4 steps, one image to ``out``) in a process of its own, after
    ``setup`` (Python) ran there; Ctrl-C as a terminal gives it."""
    from conftest import DEFAULT_CKPT, DEFAULT_VAE
    code = setup + "from flowar.commands.cli import run\nrun()\n"
    return subprocess.run([sys.executable, "-c", code, "--ckpt", str(DEFAULT_CKPT), "--vae", str(DEFAULT_VAE), "--labels",
                           "1", "--steps", "4", "--out", str(out)], capture_output=True, text=True, timeout=120,
                          preexec_fn=_ctrl_c_on)


def _one_line_error(res, needle):
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: expected") and needle in errors[0], res.output
    assert "Traceback" not in res.output


def test_nan_from_a_stage_is_named_with_scale_and_step(fixtures_dir, tmp_path):
    sd = load_file(str(fixtures_dir / "tiny_v1.safetensors"))
    sd["flownet.final_layer.linear.bias"][0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(sd, str(bad))
    res = CliRunner().invoke(run, ["--ckpt", str(bad), "--preset", "tiny", "--labels", "1", "--steps", "4"])
    _one_line_error(res, "NaN or Inf at scale 0 (1x1), head evaluation 0 (t = 1.0000)")     # (the grid starts at 1)
    assert "velocity" in res.output


@pytest.mark.parametrize("library", ["swallows it", "fails after it"])
def test_a_ctrl_c_that_a_library_catches_still_stops_the_command_and_commits_nothing(fixtures_dir, tmp_path,
                                                                                    monkeypatch, request, library):
    """Ctrl-C while PyTorch imported a part of itself late (inside torch.onnx.export) was caught there:
    the export went on and replaced the engine directory with exit 0, or failed with an AttributeError
    of a half-imported module. Here a library call of each command's last steps (PNG writing; the ONNX
    Runtime sessions an export prepares) gets the Ctrl-C and catches it, as PyTorch did."""
    import PIL.Image

    def catching(original):
        def call(*a, **k):
            try:
                signal.raise_signal(signal.SIGINT)          # the user's Ctrl-C, while the library works
                time.sleep(0.5)
            except KeyboardInterrupt:                       # caught inside the library
                if library == "fails after it":
                    raise AttributeError("partially initialized module 'x' has no attribute 'y'") from None
            return original(*a, **k)
        return call

    out = tmp_path / "grid.png"
    before = signal.signal(signal.SIGINT, signal.default_int_handler)     # (a run started in the background ignores it)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, before))
    monkeypatch.setattr(PIL.Image.Image, "save", catching(PIL.Image.Image.save))
    from conftest import DEFAULT_CKPT, DEFAULT_VAE
    res = CliRunner().invoke(run, ["--ckpt", str(DEFAULT_CKPT), "--vae", str(DEFAULT_VAE), "--labels", "1",
                                   "--steps", "4", "--out", str(out)])
    assert res.exit_code == 130 and res.output.strip().splitlines()[-1].startswith("interrupted"), res.output
    assert not out.exists() and not list(tmp_path.iterdir()), list(tmp_path.iterdir())    # no PNG, no temporary file
    monkeypatch.undo()
    from flowar.commands.cli import export_cmd
    target = tmp_path / "eng"
    import onnxruntime                      # (the graphs themselves come from the suite's export memo)
    monkeypatch.setattr(onnxruntime, "InferenceSession", catching(onnxruntime.InferenceSession))
    res = CliRunner().invoke(export_cmd, ["--ckpt", str(fixtures_dir / "tiny_v1.safetensors"), "--preset", "tiny",
                                          "--out", str(target), "--max-batch", "1", "--no-verify"])
    assert res.exit_code == 130 and res.output.strip().splitlines()[-1] == "interrupted", res.output
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())       # no directory, no temporary one
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler    # the command's handler is gone


def test_a_stop_during_the_swap_of_a_directory_ends_the_command_after_the_swap(tmp_path, monkeypatch):
    """Ctrl-C between the two renames of an engine directory's swap said "interrupted" over the new
    directory and left the old one beside it (.eng.old-PID, until the next export): the swap is one
    step under a command's handler, the stop raised once it is done."""
    import flowar.io.files as files
    from flowar.errors import stop_asked, stops_cleared
    target = tmp_path / "eng"
    target.mkdir()
    (target / "manifest.json").write_text("old")
    real, renames = os.replace, []

    def replace(a, b):
        renames.append(Path(b).name)
        if len(renames) == 1:
            signal.raise_signal(signal.SIGINT)          # between the old directory's rename and the new one's
        real(a, b)
    stops_cleared()
    before = signal.signal(signal.SIGINT, stop_asked)   # (as a command runs)
    try:
        with pytest.raises(KeyboardInterrupt):
            with files.staged_directory(target, "manifest.json") as tmp:
                (tmp / "manifest.json").write_text("new")
                monkeypatch.setattr(files.os, "replace", replace)
    finally:
        signal.signal(signal.SIGINT, before)
        monkeypatch.undo()
        stops_cleared()
    assert renames[0].startswith(".eng.old-") and renames[1] == "eng"
    assert (target / "manifest.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["eng"]


def test_a_directory_this_user_may_not_move_is_refused_before_the_work_and_finished_work_is_kept(tmp_path,
                                                                                                 monkeypatch):
    """Another user's engine directory in a sticky folder (/tmp, a shared scratch folder): an export
    into it did all its work, failed at the swap ("Operation not permitted") and left the finished
    directory hidden (.eng.tmp-..., owner-only) without a word. It is refused before the work (here as
    a user who owns neither the folder nor the directory), and where a rename fails only at the swap
    the finished directory is kept under a name the line gives."""
    import flowar.io.files as files
    from flowar.errors import FlowARError
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    target = shared / "eng"
    target.mkdir()
    (target / "manifest.json").write_text("theirs")
    with monkeypatch.context() as mp:
        mp.setattr(files.os, "geteuid", lambda: 4242)
        with pytest.raises(FlowARError, match="belongs to another user, in .*shared, where only a folder's owner"):
            files.check_replaceable(target, "manifest.json", "--out")
    files.check_replaceable(target, "manifest.json", "--out")           # (its owner, or root, may)
    real = os.replace

    def replace(a, b):
        if Path(a) == target:
            raise PermissionError(1, "Operation not permitted", str(a))
        real(a, b)
    with pytest.raises(FlowARError, match="a folder this user may replace; got .*Operation not permitted.* kept at") as e:
        with files.staged_directory(target, "manifest.json") as tmp:
            (tmp / "manifest.json").write_text("mine")
            monkeypatch.setattr(files.os, "replace", replace)
    monkeypatch.undo()
    kept = Path(str(e.value).split("kept at ")[1].split(":")[0])
    assert (kept / "manifest.json").read_text() == "mine" and (target / "manifest.json").read_text() == "theirs"
    assert sorted(p.name for p in shared.iterdir()) == sorted(["eng", kept.name]) and kept.name.startswith(".eng.kept-")


def test_a_stop_while_pytorch_imports_is_raised_once_it_is_imported(tmp_path):
    """PyTorch runs Python code from C++ while it imports: a Ctrl-C or SIGTERM raised in there ended
    flowar-run with "terminate called after throwing an instance of 'pybind11::error_already_set'"
    (SIGABRT, a C++ trace). The command imports it first, as one step: a SIGTERM sent as that import
    begins (here from inside it) is raised once PyTorch is whole, and the command ends as stopped."""
    code = ("import atexit, builtins, os, signal, sys\n"
            "real = builtins.__import__\n"
            "def imp(name, *a, **k):\n"
            "    if name == 'torch' and 'torch' not in sys.modules:\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = imp\n"
            "atexit.register(lambda: print('torch whole' if hasattr(sys.modules.get('torch'), 'Tensor') else 'torch cut',"
            " file=sys.stderr))\n"
            "from flowar.commands.cli import run\n"
            "run()\n")
    proc = subprocess.run([sys.executable, "-c", code, "--ckpt", "nothing.safetensors", "--labels", "1"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 130 and lines[-2:] == ["interrupted: SIGTERM", "torch whole"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_stop_while_a_command_leaves_changes_nothing(tmp_path):
    """A SIGTERM or Ctrl-C that comes once the outputs are written, while the exit handlers run
    (here sent from one), printed "Exception ignored in atexit callback" and a KeyboardInterrupt
    traceback; the command now ends as it would have, without a word more."""
    out = tmp_path / "grid.png"
    proc = _flowar_run_after("import atexit, os, signal, time\n"
                             "def late():\n"
                             "    os.kill(os.getpid(), signal.SIGTERM)\n"
                             "    time.sleep(0.2)\n"
                             "atexit.register(late)\n", out)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-2000:]


def test_a_stop_that_comes_while_a_finalizer_runs_stops_the_command_without_a_traceback(tmp_path):
    """A Ctrl-C handled while a finalizer ran (PyTorch's weak-reference callbacks, in a garbage
    collection) printed "Exception ignored in: ... KeyboardInterrupt" with a traceback, and the
    command went on to its next step: it is now raised where the work is, without the print. (In a
    process of its own: pytest takes such exceptions for warnings.)"""
    out = tmp_path / "grid.png"
    proc = _flowar_run_after("import gc, signal, time, PIL.Image\n"
                             "class Finalized:\n"
                             "    def __del__(self):\n"
                             "        signal.raise_signal(signal.SIGINT)          # handled here, inside the finalizer\n"
                             "        time.sleep(0.1)\n"
                             "real = PIL.Image.Image.save\n"
                             "def save(*a, **k):\n"
                             "    Finalized()\n"
                             "    gc.collect()\n"
                             "    time.sleep(0.5)                                   # (the work goes on a while)\n"
                             "    return real(*a, **k)\n"
                             "PIL.Image.Image.save = save\n", out)
    assert proc.returncode == 130 and proc.stderr.strip().splitlines()[-1].startswith("interrupted"), proc.stderr
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


def _running_with_args(*args: str) -> list[int]:
    """The processes running now (zombies not counted: an orphan ended but not reaped is one) with these arguments."""
    want, found = "\0".join(args).encode() + b"\0", []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == want and "State:\tZ" not in Path(f"/proc/{pid}/status").read_text():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_a_sigterm_to_the_command_alone_ends_the_processes_it_started_for_its_work(tmp_path):
    """SIGTERM sent to flowar-export alone while AOTInductor compiled: the command said "interrupted",
    but the compiler went on after it (Python's subprocess.run kills the process it started, g++, and
    not the one g++ started, cc1plus). Here the image writing runs such a pair (a shell and the sleep
    it waits for) when the SIGTERM comes: nothing of it may run once the command has ended."""
    marker = f"{time.time() % 1000 + 1000:.6f}"            # this test's own sleep, found by its arguments
    out = tmp_path / "grid.png"
    try:
        proc = _flowar_run_after("import os, signal, subprocess, threading, PIL.Image\n"
                                 "def save(*a, **k):\n"
                                 "    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()\n"
                                 f"    subprocess.run(['sh', '-c', 'sleep {marker}; true'], stdout=subprocess.DEVNULL,"
                                 " stderr=subprocess.DEVNULL)\n"
                                 "PIL.Image.Image.save = save\n", out)
        assert proc.returncode == 130 and proc.stderr.strip().splitlines()[-1].startswith("interrupted: SIGTERM"), proc.stderr
        deadline = time.monotonic() + 5                      # (a signalled process takes a moment to end)
        while _running_with_args("sleep", marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running_with_args("sleep", marker), "the command's helper outlived it"
    finally:
        for pid in _running_with_args("sleep", marker):
            os.kill(pid, signal.SIGKILL)


def test_a_stop_leaves_the_processes_a_program_started_before_it_ran_the_command(tmp_path, monkeypatch):
    """A program that runs a command in its own process (click's runner, cmd.main([...])): a SIGTERM
    during the command ends the processes the command started, not those the program had started."""
    import PIL.Image
    from conftest import DEFAULT_CKPT, DEFAULT_VAE
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.1)

        def save(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
        monkeypatch.setattr(PIL.Image.Image, "save", save)
        res = CliRunner().invoke(run, ["--ckpt", str(DEFAULT_CKPT), "--vae", str(DEFAULT_VAE), "--labels", "1",
                                       "--steps", "4", "--out", str(tmp_path / "grid.png")])
        assert res.exit_code == 130 and "interrupted: SIGTERM" in res.output, res.output
        time.sleep(0.2)
        assert bystander.poll() is None, "the program's own process was ended by the command's stop"
        # the program goes on: the stop was the command's (it stayed recorded, and the program's next write of a
        # file, here the next test's export, raised it as a KeyboardInterrupt)
        from flowar.errors import stopped
        assert stopped() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_command_that_writes_a_path_another_command_is_writing_is_refused_at_once(fixtures_dir, tmp_path,
                                                                                    default_auto_engines):
    """Two flowar-sample runs with other seeds into one new --out both ended with exit 0, the images of
    one under the other's run.json; two exports into one --out both said they had written it, and the
    directory held the second. While one command writes a path, another (here an export and a bulk
    run, while a process holds it) is refused at once with one line that names the holder, and writes
    nothing; a holder killed with SIGKILL (its lock file left behind) blocks nothing after."""
    from flowar.commands.bulk import BulkSpec, run_bulk
    from flowar.commands.cli import export_cmd
    from flowar.errors import FlowARError
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom flowar.io.files import used_alone\n"
                               "with used_alone(sys.argv[1], 'flowar-sample'):\n    print('held', flush=True)\n"
                               "    time.sleep(120)\n", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = CliRunner().invoke(export_cmd, ["--ckpt", str(fixtures_dir / "tiny_v1.safetensors"), "--preset", "tiny",
                                              "--no-verify", "--out", str(out)])
        _one_line_error(res, f"is being written by process {holder.pid}")
        with pytest.raises(FlowARError, match=f"is being written by process {holder.pid}"):
            run_bulk(BulkSpec(str(default_auto_engines), 2, [0, 1], 0, {}, 1, 1), out, progress=False)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / ".out.lock").is_file()
    rep = run_bulk(BulkSpec(str(default_auto_engines), 2, [0, 1], 0, {}, 1, 1), out, progress=False)
    assert rep.shards_total == 2 and (out / "samples.npz").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # an --out whose folders are still to be made is held too (two such runs mixed their images), and a
    # refused command leaves none of them behind
    from flowar.io.files import used_alone
    nested = tmp_path / "new" / "sub" / "out"
    with used_alone(nested, "flowar-sample"):
        with pytest.raises(FlowARError, match=f"is being written by process {os.getpid()}"):
            run_bulk(BulkSpec(str(default_auto_engines), 2, [0, 1], 1, {}, 1, 1), nested, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # (and a disk too small is said in units that show it: it was "0.0 GB free for ...; got 0.0 GB free")
    import shutil as sh
    from types import SimpleNamespace

    from flowar.io.memory import require_free_space
    real = sh.disk_usage
    try:
        sh.disk_usage = lambda p: SimpleNamespace(free=1 << 20)
        with pytest.raises(FlowARError, match=r"expected 3\.0 MB free for 40 images; got 1\.0 MB free at"):
            require_free_space(tmp_path, 3 << 20, "40 images")
    finally:
        sh.disk_usage = real


# Each command and each of its outputs, with a location that cannot be written: below a file, and
# inside /proc (a folder that exists but takes no files, so only a real write attempt finds out).
UNWRITABLE = ["{tmp}/afile/x/out", "/proc/flowar-no-such-dir/out"]


def _command_args(fixtures_dir, tmp_path, command, option, where):
    ckpt, vae = str(fixtures_dir / "tiny_v1.safetensors"), str(fixtures_dir / "mar_vae_tiny.ckpt")
    if command == "flowar-run":
        return ["--ckpt", ckpt, "--preset", "tiny", "--vae", vae, "--labels", "1", "--steps", "2", option, where]
    if command == "flowar-export":
        return ["--ckpt", ckpt, "--preset", "tiny", "--no-verify", "--out", where]
    if command == "flowar-decode":
        return ["--tokens", str(tmp_path / "t.safetensors"), "--ckpt", ckpt, "--preset", "tiny", "--vae", vae, option, where]
    if command == "flowar-train":
        return ["--vae", vae, "--steps", "1", "--out", where]
    if command == "flowar-train-vae":
        return ["--steps", "1", "--out", where]
    if command == "flowar-judge":
        # (the judge's cache is checked where a judge is used: the shipped Animal-MNIST model's)
        from conftest import DEFAULT_CKPT, DEFAULT_VAE
        return ["--ckpt", str(DEFAULT_CKPT), "--vae", str(DEFAULT_VAE), "--per-class", "1", option, where]
    return ["--preset", "tiny", "--steps", "2", "--repeat", "1", "--warmup", "0", "--backends", "eager",
            "--json", str(tmp_path / "ok.json"), "--plot", str(tmp_path / "ok.png")] + [option, where]


OUTPUTS = [("flowar-run", "--save-tokens"), ("flowar-run", "--out"), ("flowar-run", "--save-images"),
           ("flowar-export", "--out"), ("flowar-train", "--out"), ("flowar-train-vae", "--out"),
           ("flowar-judge", "--judge-cache"), ("flowar-judge", "--json"), ("bench", "--json"), ("bench", "--plot"),
           ("flowar-decode", "--out"), ("flowar-decode", "--save-images")]


def test_an_output_is_held_also_when_the_folders_of_its_lock_go_as_it_is_opened(tmp_path, monkeypatch):
    """A command that ended removes its lock and the folders it made for it; a second one whose open of the lock came
    just after took the missing folder for a file system without locks and ran unguarded, a third beside it. Now
    the folders are made again and the lock taken: the third is refused."""
    import shutil as sh

    from flowar.errors import FlowARError
    from flowar.io.files import used_alone
    target, real, gone = tmp_path / "a" / "b" / "out", os.open, []

    def open_(path, *a, **k):
        if str(path).endswith(".out.lock") and not gone:        # the holder before it ends: its folders removed
            gone.append(path)
            sh.rmtree(tmp_path / "a")
        return real(path, *a, **k)
    monkeypatch.setattr(os, "open", open_)
    with used_alone(target, "flowar-sample"):
        assert gone and (tmp_path / "a" / "b" / ".out.lock").is_file()
        with pytest.raises(FlowARError, match=f"is being written by process {os.getpid()}"):
            with used_alone(target, "flowar-sample"):
                pass
    assert list(tmp_path.iterdir()) == []                       # (its folders removed at its end)


@pytest.mark.parametrize("where", UNWRITABLE)
@pytest.mark.parametrize("command,option", OUTPUTS)
def test_unwritable_output_is_one_line_before_any_work(fixtures_dir, tmp_path, command, option, where, capsys, bench):
    from flowar.commands import cli
    from flowar.commands.decode import decode_cmd
    (tmp_path / "afile").write_text("x")
    where = where.format(tmp=tmp_path)
    args = _command_args(fixtures_dir, tmp_path, command, option, where)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    if command == "bench":
        assert bench.main(args) == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: expected a writable location for " + option), err
    else:
        cmd = {"flowar-run": cli.run, "flowar-export": cli.export_cmd, "flowar-train": cli.train_cmd,
               "flowar-train-vae": cli.train_vae_cmd, "flowar-judge": cli.judge_cmd, "flowar-decode": decode_cmd}[command]
        res = CliRunner().invoke(cmd, args)
        _one_line_error(res, f"a writable location for {option}")
        assert "sampled" not in res.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before            # nothing written


def test_an_output_of_the_wrong_kind_is_refused(fixtures_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    res = CliRunner().invoke(run, ["--ckpt", str(fixtures_dir / "tiny_v1.safetensors"), "--preset", "tiny",
                                   "--save-images", str(tmp_path / "afile")])
    assert res.exit_code == 2 and "is a file" in res.output and "Traceback" not in res.output   # click's own check
    from flowar.errors import FlowARError
    from flowar.io.files import check_writable
    with pytest.raises(FlowARError, match="--save-tokens to be a file; got .* exists as a folder"):
        check_writable(tmp_path / "adir", False, "--save-tokens")


def test_a_failed_write_after_the_checks_is_one_line_too(fixtures_dir, tmp_path, monkeypatch):
    """Disk full or a path removed while sampling: the OSError becomes the one-line error."""
    import flowar.io.outputs
    def full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "t.safetensors"))
    monkeypatch.setattr(flowar.io.outputs, "write_outputs", full)
    res = CliRunner().invoke(run, ["--ckpt", str(fixtures_dir / "tiny_v1.safetensors"), "--preset", "tiny",
                                   "--labels", "1", "--steps", "2", "--save-tokens", str(tmp_path / "t.safetensors")])
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in res.output


def test_same_seed_same_backend_gives_identical_files(fixtures_dir, tmp_path):
    outs = []
    for i in range(2):
        d = tmp_path / f"r{i}"
        res = CliRunner().invoke(run, ["--ckpt", str(fixtures_dir / "tiny_v2.safetensors"),
                                  "--config", str(fixtures_dir / "tiny_v2.config.json"), "--labels", "5,9",
                                  "--steps", "6", "--seed", "42", "--vae", str(fixtures_dir / "mar_vae_tiny.ckpt"),
                                  "--out", str(d / "grid.png"), "--save-tokens", str(d / "t.safetensors")])
        assert res.exit_code == 0, res.output
        outs.append(((d / "grid.png").read_bytes(), (d / "t.safetensors").read_bytes()))
    assert outs[0] == outs[1]


def test_sampling_works_with_networking_unavailable(fixtures_dir, tmp_path):
    """Every socket call fails in this process; sampling and decoding through a diffusers folder still work."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, norm_num_groups=32,
                  sample_size=32).save_pretrained(tmp_path / "vae")
    code = ("import socket\n"
            "def deny(*a, **k): raise OSError('network disabled for this test')\n"
            "socket.socket.connect = deny; socket.create_connection = deny; socket.getaddrinfo = deny\n"
            "from flowar.commands.cli import run; run()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DIFFUSERS_"))}
    proc = subprocess.run([sys.executable, "-c", code, "--ckpt", str(fixtures_dir / "tiny_v1.safetensors"), "--preset",
                           "tiny", "--labels", "1", "--steps", "3", "--vae", str(tmp_path / "vae"),
                           "--save-images", str(tmp_path / "imgs")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert (tmp_path / "imgs" / "000000.png").is_file()


@pytest.mark.slow
def test_sigkill_during_export_leaves_the_previous_directory_valid(fixtures_dir, tmp_path):
    from flowar.export.manifest import EngineDirError, read_manifest
    target = tmp_path / "eng"
    args = [str(EXE / "flowar-export"), "--ckpt", str(fixtures_dir / "tiny_v1.safetensors"), "--preset", "tiny",
            "--out", str(target), "--max-batch", "2", "--no-verify"]
    from flowar.commands.build import build_engine_dir
    build_engine_dir(fixtures_dir / "tiny_v1.safetensors", target, preset="tiny", max_batch=2, verify=False)   # the previous one
    def files():                          # (ONNX Runtime's optimized copies, prepared by the export, included)
        return {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    before = files()
    assert any(n.startswith(".ort-cache/") for n in before)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        tmps = [p for p in tmp_path.iterdir() if p.name.startswith(".eng.tmp-")]
        if tmps and list(tmps[0].glob("*.onnx")):
            partial = tmps[0]
            break
        time.sleep(0.05)
    assert partial is not None, "the exporter finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate(timeout=60)[1]       # (until the memory poller, which shares the command's stderr, ends)
    assert "Traceback" not in err, err          # (the poller printed a BrokenPipeError's once the command was gone)
    assert files() == before                                                   # untouched
    read_manifest(target)                                                      # and still trusted
    with pytest.raises(EngineDirError, match="manifest.json"):
        read_manifest(partial)                                                 # the half-built one is not
    # the same command again (here in this process): it succeeds, and what the killed one left is gone
    from click.testing import CliRunner
    from flowar.commands.cli import export_cmd
    res = CliRunner().invoke(export_cmd, args[1:])
    assert res.exit_code == 0, res.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".eng.")], list(tmp_path.iterdir())
    read_manifest(target)
    # Ctrl-C in a terminal (SIGINT to the whole process group): one line, exit 130, the directory kept; the
    # export's memory poller, a child in the group, printed a KeyboardInterrupt traceback of its own
    before = files()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_ctrl_c_on)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(tmp_path.glob(".eng.tmp-*")):    # exporting
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err
    assert files() == before
    # SIGTERM to the command (kill, timeout, Kubernetes) stops it as Ctrl-C does (it ended at once, exit -15,
    # leaving its temporary folder until the next export)
    left = set(tmp_path.glob(".eng.tmp-*"))         # (one the last export had not yet removed: not this one's)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not set(tmp_path.glob(".eng.tmp-*")) - left:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted: SIGTERM", \
        (proc.returncode, err)
    assert files() == before and not list(tmp_path.glob(".eng.tmp-*"))


def test_a_stop_just_after_the_export_made_its_folder_leaves_none(tmp_path, monkeypatch):
    """SIGTERM that the command's handler takes between the temporary folder made and the export
    holding its name (a CI run: SIGTERM as soon as the folder showed, the command descheduled there)
    left the folder behind; it is raised once the folder is named, and the folder removed."""
    import tempfile

    import flowar.io.files as files
    from flowar.errors import stop_asked, stops_cleared
    real = tempfile.mkdtemp

    def made_then_stopped(*a, **k):
        d = real(*a, **k)
        stop_asked(signal.SIGTERM, None)          # as the command's handler takes it, right after the mkdir
        return d
    monkeypatch.setattr(files.tempfile, "mkdtemp", made_then_stopped)
    stops_cleared()
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            with files.staged_directory(tmp_path / "eng", "manifest.json"):
                pytest.fail("the work began after the stop")
    finally:
        stops_cleared()
    assert list(tmp_path.iterdir()) == []


def test_export_never_replaces_a_folder_it_did_not_write(fixtures_dir, tmp_path, monkeypatch):
    """--out may be new, empty, or an engine directory (replaced): a folder of other files, or one
    holding the checkpoint being exported, is refused with one line before any work, untouched
    (an export once replaced such folders whole: a checkpoint folder given as --out lost its
    checkpoint)."""
    import shutil as sh

    from click.testing import CliRunner

    from flowar.commands.cli import export_cmd
    ckpt = fixtures_dir / "tiny_v1.safetensors"
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    holds = tmp_path / "model"
    holds.mkdir()
    sh.copy(ckpt, holds / "flowar.safetensors")
    webapp = tmp_path / "webapp"                 # another tool's manifest.json: the folder was replaced whole
    webapp.mkdir()
    (webapp / "manifest.json").write_text('{"name": "an extension", "version": "1"}')
    (webapp / "bg.js").write_text("mine")
    broken = tmp_path / "broken"                 # and one that is not JSON, beside files no export writes
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    (broken / "ar.onnx").write_bytes(b"an export's")
    (broken / "notes.md").write_text("mine")
    base = ["--preset", "tiny", "--max-batch", "1", "--no-verify"]
    for out, src, said in ((notes, ckpt, "holds other files (notes.txt)"),
                           (holds, holds / "flowar.safetensors", "flowar.safetensors inside"),
                           (webapp, ckpt, "also holds bg.js, manifest.json. Fix"),
                           (broken, ckpt, "also holds notes.md. Fix")):
        before = sorted(p.name for p in out.iterdir())
        res = CliRunner().invoke(export_cmd, ["--ckpt", str(src), "--out", str(out), *base])
        assert res.exit_code == 2 and said in res.output and len(res.output.strip().splitlines()) == 1, res.output
        assert sorted(p.name for p in out.iterdir()) == before
    assert (notes / "notes.txt").read_text() == "mine" and (holds / "flowar.safetensors").read_bytes() == ckpt.read_bytes()
    assert (webapp / "bg.js").read_text() == "mine" and (broken / "notes.md").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]          # nothing started
    here = tmp_path / "here" / "in"            # --out . (or ..) from an empty folder: the shell's folder kept
    here.mkdir(parents=True)
    for out in (".", ".."):
        with monkeypatch.context() as mp:
            mp.chdir(here)
            res = CliRunner().invoke(export_cmd, ["--ckpt", str(ckpt), "--out", out, *base])
        assert res.exit_code == 2 and "working directory" in res.output and len(res.output.strip().splitlines()) == 1, \
            res.output
        assert here.is_dir() and not any(here.iterdir()) and sorted(p.name for p in here.parent.iterdir()) == ["in"]
    eng = tmp_path / "eng"
    eng.mkdir()                                      # empty: taken (its own is replaced: the SIGKILL test below)
    res = CliRunner().invoke(export_cmd, ["--ckpt", str(ckpt), "--out", str(eng), *base])
    assert res.exit_code == 0 and (eng / "manifest.json").is_file(), res.output
    # a bulk run's folder and a grid written into it since: a re-export (which replaces the directory
    # whole) refuses, both kept; what the export wrote alone (its cache too) is replaced as before
    (eng / ".ort-cache").mkdir(exist_ok=True)
    (eng / "run1").mkdir()
    (eng / "run1" / "samples.npz").write_bytes(b"mine")
    (eng / "grid.png").write_bytes(b"png")
    res = CliRunner().invoke(export_cmd, ["--ckpt", str(ckpt), "--out", str(eng), *base])
    assert res.exit_code == 2 and "also holds grid.png, run1" in res.output and \
        len(res.output.strip().splitlines()) == 1, res.output
    assert (eng / "run1" / "samples.npz").read_bytes() == b"mine" and (eng / "grid.png").read_bytes() == b"png"
    sh.rmtree(eng / "run1")
    (eng / "grid.png").unlink()
    (eng / ".git").mkdir()                           # hidden, and the user's (the directory versioned): kept too
    (eng / ".git" / "HEAD").write_text("ref: refs/heads/main")
    res = CliRunner().invoke(export_cmd, ["--ckpt", str(ckpt), "--out", str(eng), *base])
    assert res.exit_code == 2 and "also holds .git. Fix" in res.output, res.output
    assert (eng / ".git" / "HEAD").read_text() == "ref: refs/heads/main"
    sh.rmtree(eng / ".git")
    (eng / "timing.cache").write_bytes(b"full TensorRT's")     # (the export's own, not in the manifest)
    (eng / ".DS_Store").write_bytes(b"macOS's")                # (and a write of its manifest killed before its rename)
    (eng / ".manifest.json.4242-x1.tmp").write_bytes(b"{")
    res = CliRunner().invoke(export_cmd, ["--ckpt", str(ckpt), "--out", str(eng), *base])
    assert res.exit_code == 0 and (eng / "manifest.json").is_file(), res.output


def test_only_temporary_folders_of_dead_exports_are_removed(tmp_path):
    from flowar.io.files import staged_directory
    done = subprocess.Popen(["true"])
    done.wait()                                                   # a process id that is gone
    dead_tmp, dead_old = tmp_path / f".eng.tmp-{done.pid}-abc", tmp_path / f".eng.old-{done.pid}"
    alive = tmp_path / f".eng.tmp-{os.getpid()}-xyz"             # an export running now (this process)
    other = tmp_path / f".other.tmp-{done.pid}-abc"              # another target's
    for d in (dead_tmp, dead_old, alive, other):
        d.mkdir()
        (d / "ar.onnx").write_bytes(b"partial")
    with staged_directory(tmp_path / "eng", "manifest.json") as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert not dead_tmp.exists() and not dead_old.exists() and alive.is_dir() and other.is_dir()


def test_the_swap_changes_only_the_modes_that_differ(tmp_path):
    """The finished directory's files are made readable by others (safetensors writes 0600), but a
    file whose mode is already right keeps its change time: the records of files found whole hold it
    (ONNX Runtime's optimized copies, made by the export, were hashed again on the first open)."""
    from flowar.io.files import _umask, staged_directory
    want = 0o666 & ~_umask()
    with staged_directory(tmp_path / "eng", "manifest.json") as tmp:
        (tmp / "manifest.json").write_text("{}")
        (tmp / "right").write_bytes(b"x")
        os.chmod(tmp / "right", want)
        (tmp / "owner-only").write_bytes(b"x")
        os.chmod(tmp / "owner-only", 0o600)
        before = {n: (tmp / n).stat().st_ctime_ns for n in ("right", "owner-only")}
        time.sleep(0.01)
    eng = tmp_path / "eng"
    assert (eng / "right").stat().st_ctime_ns == before["right"]
    assert (eng / "owner-only").stat().st_mode & 0o777 == want and (eng / "owner-only").stat().st_ctime_ns != before["owner-only"]


def test_files_that_appear_in_out_during_an_export_keep_the_finished_directory_and_say_where(tmp_path):
    """Someone writes into --out while the export works: the swap is refused (the folder is no longer
    one the command made), and the finished directory is kept and named in the line, not left unnamed."""
    from flowar.errors import FlowARError
    from flowar.io.files import staged_directory
    with pytest.raises(FlowARError) as e:
        with staged_directory(tmp_path / "eng", "manifest.json") as tmp:
            (tmp / "manifest.json").write_text("{}")
            (tmp_path / "eng").mkdir()
            (tmp_path / "eng" / "notes.txt").write_text("mine")
    [kept] = tmp_path.glob(".eng.kept-*")
    assert f"the finished directory is kept at {kept}" in str(e.value) and "\n" not in str(e.value)
    assert (kept / "manifest.json").is_file() and (tmp_path / "eng" / "notes.txt").read_text() == "mine"
    (tmp_path / "eng" / "notes.txt").unlink()
    with staged_directory(tmp_path / "eng", "manifest.json") as again:          # the next export there leaves it
        (again / "manifest.json").write_text("{}")
    assert (kept / "manifest.json").is_file() and oct(kept.stat().st_mode & 0o777) == "0o755"


@pytest.mark.parametrize("extra,needle", [
    (["--max-memory", "8"], "--max-memory with --precision auto or bf16"),
    (["--compute-capability", "sm89"], "--compute-capability with --backend trt or all"),
    (["--vae", "missing-vae.ckpt"], "a VAE at --vae (MAR kl16.ckpt or a diffusers folder); got no file or folder at"),
    # (these two were refused after every graph was exported and verified)
    (["--backend", "trt", "--compute-capability", "sm7"], "expected --compute-capability"),
    (["--precision", "bf16", "--auto-candidates", "ort-fp32"], "--auto-candidates with a bf16 engine for --precision bf16"),
    # (an infinite bound was written as Infinity, no JSON; "" was taken as every candidate: a full export)
    (["--precision", "auto", "--max-memory", "inf"], "expected --max-memory in GB, > 0 and finite; got inf"),
    (["--precision", "auto", "--auto-candidates", ""], "expected --auto-candidates among ort-fp32"),
])
def test_export_options_that_would_do_nothing_or_point_nowhere_are_one_line_before_any_work(fixtures_dir, tmp_path,
                                                                                           monkeypatch, extra, needle):
    import flowar.model.checkpoint as checkpoint
    from flowar.commands.cli import export_cmd
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    res = CliRunner().invoke(export_cmd, ["--ckpt", str(fixtures_dir / "tiny_v1.safetensors"), "--preset", "tiny",
                                          "--out", str(tmp_path / "eng"), *extra])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.output
    assert not (tmp_path / "eng").exists()


def test_malformed_files_are_one_line_not_a_traceback(fixtures_dir, tmp_path):
    """Inputs a reader can meet (found by a review of the trust boundaries): an empty weights file
    (mmap's bare ValueError), manifest records of the wrong shape or with a NUL in a path, class
    names in a checkpoint's metadata that are not a list of strings, a VAE checkpoint whose tensors
    have the right names and the wrong shapes (load_state_dict's RuntimeError)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from flowar.commands.build import build_engine_dir
    from flowar.errors import FlowARError
    from flowar.export.manifest import read_manifest
    from flowar.io.tensors import map_safetensors
    from flowar.model.checkpoint import read_checkpoint
    from flowar.model.vae import load_vae
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(FlowARError, match="empty.safetensors is empty"):
        map_safetensors(tmp_path / "empty.safetensors", "0" * 64)
    # headers that do not describe their bytes (a crafted file whose hash is recorded: a traceback, or a tensor
    # read to the end of the file)
    import struct
    for header in ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, [1, 2],
                   {"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}},
                   {"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, {"w": 5},
                   {"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}):
        raw = json.dumps(header).encode()
        (tmp_path / "odd.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
        with pytest.raises(FlowARError, match="odd.safetensors: .*header") as e:
            map_safetensors(tmp_path / "odd.safetensors")
        assert "\n" not in str(e.value), header
    raw = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "odd.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    assert map_safetensors(tmp_path / "odd.safetensors")["w"].shape == (2, 2)
    build_engine_dir(fixtures_dir / "tiny_v1.safetensors", tmp_path / "e", preset="tiny", max_batch=1, verify=False)
    m = json.loads((tmp_path / "e" / "manifest.json").read_text())
    stage = next(iter(m["stages"]))
    for broken, needle in ((m | {"stages": []}, "stages a mapping in manifest.json"),
                           (m | {"stages": m["stages"] | {stage: {"file": m["stages"][stage]["file"]}}}, "stages.ar.sha256 a non-empty string"),
                           (m | {"stages": m["stages"] | {stage: m["stages"][stage] | {"file": "a\u0000b"}}},
                            "manifest paths relative to the engine directory")):
        d = tmp_path / "broken"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(tmp_path / "e", d)
        (d / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(FlowARError, match=needle) as e:
            read_manifest(d)
        assert "\n" not in str(e.value)
    sd = load_file(str(fixtures_dir / "tiny_v1.safetensors"))
    save_file(sd, str(tmp_path / "named.safetensors"), metadata={"class_names": '{"a": 1}'})
    with pytest.raises(FlowARError, match="class names in the metadata as a JSON list of strings"):
        read_checkpoint(tmp_path / "named.safetensors")
    vae = torch.load(fixtures_dir / "mar_vae_tiny.ckpt", weights_only=True, map_location="cpu")
    vae["model"]["decoder.conv_out.bias"] = vae["model"]["decoder.conv_out.bias"][:2]
    torch.save(vae, tmp_path / "vae.ckpt")
    with pytest.raises(FlowARError, match="a VAE checkpoint whose tensors fit AutoencoderKL's shapes"):
        load_vae(tmp_path / "vae.ckpt")


def test_too_little_disk_is_one_line_before_any_work(fixtures_dir, tmp_path, monkeypatch):
    import shutil as sh
    from flowar.commands.build import build_engine_dir
    from flowar.errors import FlowARError
    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    with pytest.raises(FlowARError) as e:
        build_engine_dir(fixtures_dir / "tiny_v1.safetensors", tmp_path / "eng", preset="tiny", max_batch=1)
    import re
    assert re.search(r"expected [\d.]+ MB free for the engine directory .*got 1\.0 MB free", str(e.value)), e.value
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []           # nothing started


def test_a_checkpoint_written_while_it_is_exported_is_refused_not_recorded_with_the_new_files_hash(fixtures_dir,
                                                                                                   tmp_path, monkeypatch):
    """The checkpoint is hashed before it is loaded, and refused where it changed before the manifest is written (a
    training writing checkpoint-last): the export recorded the sha256 of the file written meanwhile, a checkpoint its
    graphs were not made from, and flowar-check then said the directory matched it."""
    import shutil as sh
    from flowar.commands import build
    from flowar.errors import CheckpointError
    ckpt = tmp_path / "last.safetensors"
    sh.copy(fixtures_dir / "tiny_v1.safetensors", ckpt)
    real = build.export_graphs

    def export_then_write(*a, **k):
        stages = real(*a, **k)
        sh.copy(fixtures_dir / "tiny_v2.safetensors", ckpt)     # (the next save of a training)
        return stages
    monkeypatch.setattr(build, "export_graphs", export_then_write)
    with pytest.raises(CheckpointError, match="unchanged while it is exported.*changed since it was read") as e:
        build.build_engine_dir(ckpt, tmp_path / "eng", preset="tiny", max_batch=1, verify=False)
    assert "\n" not in str(e.value) and not (tmp_path / "eng").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]     # (no staged folder left)


def test_engine_dir_from_another_checkpoint_is_refused_for_the_torch_backend(fixtures_dir, tmp_path):
    from flowar.commands.build import build_engine_dir
    from flowar.errors import FlowARError
    from flowar.runtime.runtime import Runtime
    d = tmp_path / "e"
    build_engine_dir(fixtures_dir / "tiny_v1.safetensors", d, preset="tiny", max_batch=1, verify=False)
    with pytest.raises(FlowARError, match="the checkpoint the engine directory was exported from"):
        Runtime.open_engine_dir(d, backend="torch", ckpt=fixtures_dir / "tiny_v2.safetensors")


def test_tensorrt_plans_for_another_version_or_gpu_are_refused(monkeypatch):
    import flowar.engines.trt as trt_mod
    from flowar.runtime import directory as load
    from types import SimpleNamespace
    m = SimpleNamespace(tensorrt={"flavour": "tensorrt", "version": "10.0", "compute_capability": "sm90", "plans": {}})
    assert load._trt_usable(SimpleNamespace(tensorrt=None)) == (False, "the directory has no TensorRT plans")
    monkeypatch.setattr(load, "_probe", load._probe.__wrapped__)   # (probed once per process: here, each time)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trt_mod, "load_builder", lambda flavour=None: trt_mod.Builder(None, "tensorrt", "11.0"))
    monkeypatch.setattr(trt_mod, "gpu_compute_capability", lambda: "sm90")
    ok, why = load._trt_usable(m)
    assert not ok and "10.0" in why and "11.0" in why
    m.tensorrt["version"] = "11.0"
    monkeypatch.setattr(trt_mod, "gpu_compute_capability", lambda: "sm80")
    ok, why = load._trt_usable(m)
    assert not ok and "sm90" in why and "sm80" in why


class _NaNAtScale:
    """The reference stages, except that the velocity at one scale is NaN."""

    def __init__(self, inner, scale: int):
        self.inner, self.scale, self.k = inner, scale, 0

    def start(self, labels):
        self.inner.start(labels)

    def ar(self, k, x):
        self.k = k
        return self.inner.ar(k, x)

    def prepare(self, k, cond):
        return self.inner.prepare(k, cond)

    def velocity(self, ctx, x, t):
        v = self.inner.velocity(ctx, x, t)
        return v * float("nan") if self.k == self.scale else v

    def decode(self, latent):
        return self.inner.decode(latent)


def test_check_scale_names_the_scale_once_and_check_none_leaves_it_to_the_caller(tiny_v1):
    """check="scale" (the GPU default: one sync per scale) catches a NaN at the end of its scale."""
    from flowar.errors import FlowARError
    from flowar.sampling.sampler import per_sample_noise, sample
    from flowar.sampling.schedule import Settings
    from flowar.sampling.eager import EagerStages
    model, _ = tiny_v1
    c = model.config
    sched = Settings(steps=5).resolve(c.n_scales)
    st = _NaNAtScale(EagerStages(model), 2)
    with torch.inference_mode():
        with pytest.raises(FlowARError) as e:
            sample(st, c, sched, torch.tensor([1, 2]), per_sample_noise(0, range(2)), check="scale")
        assert e.value.got == "NaN or Inf at scale 2 (4x4)"
        tokens, _ = sample(st, c, sched, torch.tensor([1, 2]), per_sample_noise(0, range(2)), check="none")
    assert torch.isnan(tokens).any()


def test_a_staged_directory_gives_its_files_the_modes_a_plain_write_gives(tmp_path):
    """Files written owner-only inside a staged output folder (safetensors writes 0600: flowar-train-vae's
    weights were unreadable to the other users of a shared volume) and temporary subfolders (0700)
    get what a plain write gives under the umask; an executable stays executable."""
    import stat
    import tempfile as tf

    from flowar.io.files import staged_directory
    old = os.umask(0o022)
    try:
        with staged_directory(tmp_path / "vae", "config.json") as tmp:
            (tmp / "config.json").write_text("{}")
            w = tmp / "weights.safetensors"
            w.write_bytes(b"x")
            os.chmod(w, 0o600)
            sub = Path(tf.mkdtemp(dir=tmp))
            (sub / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(sub / "run.sh", 0o700)
    finally:
        os.umask(old)
    out = tmp_path / "vae"
    mode = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert mode["weights.safetensors"] == 0o644 and mode["config.json"] == 0o644, mode
    assert mode[sub.name] == 0o755 and mode[f"{sub.name}/run.sh"] == 0o755, mode
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    old = os.umask(0o077)                           # a private umask: the folder too (it was 0755 whatever the umask)
    try:
        with staged_directory(tmp_path / "private", "config.json") as tmp:
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "private" / "config.json").stat().st_mode) == 0o600


def test_numbered_images_are_written_all_or_none(tmp_path, monkeypatch):
    """Ctrl-C while --save-images writes leaves none of this run's PNGs (11 of 200 were left, each
    whole but the set not), and a folder the call made is removed; into an existing folder a
    finished call puts every image, each with the mode a plain write gives."""
    import stat

    from PIL import Image

    from flowar.io.images import save_images
    images = torch.zeros(6, 3, 4, 4)
    real, calls = Image.Image.save, []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_images(images, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    import flowar.io.images as images_mod            # a stop right after the folder was made (it was left, empty)
    with monkeypatch.context() as m:
        m.setattr(images_mod, "remove_stale", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            save_images(images, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "notes.txt").write_text("mine")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        save_images(images, tmp_path / "old")
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["notes.txt"]
    monkeypatch.setattr(Image.Image, "save", real)
    paths = save_images(images, tmp_path / "old", first=3)
    assert [p.name for p in paths] == [f"{i:06d}.png" for i in range(3, 9)]
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == [p.name for p in paths] + ["notes.txt"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~_umask() for p in paths)


def test_a_stop_while_the_pngs_or_a_file_are_put_in_place_leaves_all_or_nothing_and_says_which(tmp_path, monkeypatch):
    """SIGTERM taken by the command's handler right after a staging folder (--save-images) or temporary
    file (--save-tokens, --out) is made: nothing left behind (they were, until the next write); taken
    while the PNGs are renamed into place: every one is there (the first ones were) and the line the
    command ends with says they were written (it said the folder held what it held before)."""
    import tempfile

    from flowar.errors import stop_asked, stops_cleared, stopped, stops_held
    from flowar.io.files import atomic_write_bytes
    from flowar.io.images import save_images
    from flowar.io.outputs import write_outputs
    from flowar.sampling.batches import SampleResult
    images = torch.linspace(-1, 1, 4 * 3 * 4 * 4).reshape(4, 3, 4, 4)
    real_dir, real_file = tempfile.mkdtemp, tempfile.mkstemp

    def then_stopped(real):
        def made(*a, **k):
            r = real(*a, **k)
            stop_asked(signal.SIGTERM, None)          # as the command's handler takes it, right after the mkdir
            return r
        return made
    stops_cleared()
    try:
        monkeypatch.setattr(tempfile, "mkdtemp", then_stopped(real_dir))
        (tmp_path / "old").mkdir()
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            save_images(images, tmp_path / "old")
        assert list((tmp_path / "old").iterdir()) == []
        stops_cleared()
        monkeypatch.setattr(tempfile, "mkstemp", then_stopped(real_file))
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            atomic_write_bytes(tmp_path / "old" / "t.bin", lambda t: Path(t).write_bytes(b"new"))
        assert list((tmp_path / "old").iterdir()) == []
        monkeypatch.setattr(tempfile, "mkdtemp", real_dir)
        monkeypatch.setattr(tempfile, "mkstemp", real_file)

        real_replace, renamed, stop_at = os.replace, [], [0]

        def replace(a, b):
            real_replace(a, b)
            renamed.append(b)
            if len(renamed) == stop_at[0]:
                stop_asked(signal.SIGTERM, None)      # taken right after that rename
        monkeypatch.setattr(os, "replace", replace)
        result = SampleResult(torch.zeros(4, 1, 1, 1), images, [0, 1, 2, 3], 0.0)
        old = [tmp_path / "old" / f"{i:06d}.png" for i in range(4)]
        want = [tmp_path / "again" / f"{i:06d}.png" for i in range(4)]
        # the tokens renamed, then the stop: they are said written, the PNGs untouched
        for p in old:
            p.write_bytes(b"old")
        stops_cleared()
        renamed.clear()
        stop_at[0] = 1
        with pytest.raises(KeyboardInterrupt) as e:
            write_outputs(result, None, tmp_path / "t.safetensors", None, tmp_path / "old")
        assert str(e.value) == (f"SIGTERM: while writing; written: tokens (4, 1, 1, 1) -> {tmp_path / 't.safetensors'}; "
                                "the other outputs hold what they held before"), str(e.value)
        assert [p.read_bytes() for p in old] == [b"old"] * 4 and (tmp_path / "t.safetensors").is_file()
        # the first or the last PNG renamed, then the stop: all four in place, and said so
        stop_at[0] = 0
        stops_cleared()
        save_images(images, tmp_path / "again")
        for at in (1, 4):
            for p in old:
                p.write_bytes(b"old")
            stops_cleared()
            renamed.clear()
            stop_at[0] = at
            with pytest.raises(KeyboardInterrupt) as e:
                write_outputs(result, None, None, None, tmp_path / "old")
            assert stopped() == "SIGTERM" and len(renamed) == 4, at
            assert str(e.value).startswith("SIGTERM: while writing; written: 4 PNGs -> "), (at, str(e.value))
            assert sorted(p.name for p in (tmp_path / "old").iterdir()) == [p.name for p in want]
            assert [p.read_bytes() for p in old] == [p.read_bytes() for p in want], at
        # into a folder the write makes: kept with them (it was removed, PNGs and all, after they were said written)
        stops_cleared()
        renamed.clear()
        stop_at[0] = 2
        with pytest.raises(KeyboardInterrupt) as e:
            write_outputs(result, None, None, None, tmp_path / "new")
        assert str(e.value).startswith("SIGTERM: while writing; written: 4 PNGs -> "), str(e.value)
        assert [(tmp_path / "new" / p.name).read_bytes() for p in want] == [p.read_bytes() for p in want]
        # within a held step (a training step's files): the stop waits for the end of that step
        stops_cleared()
        renamed.clear()
        stop_at[0], after = 1, []
        with pytest.raises(KeyboardInterrupt):
            with stops_held():
                save_images(images, tmp_path / "old")
                after.append("the step went on")
        assert after == ["the step went on"]
    finally:
        stops_cleared()


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


@pytest.mark.parametrize("script,args", [("serve_load.py", []), ("bulk_rate.py", ["--engine-dir", "{tmp}"]),
                                         ("lane_batches.py", ["--engine-dir", "{tmp}"])])
def test_the_bench_scripts_check_their_outputs_first_and_say_so_in_one_line(tmp_path, script, args):
    """A bench script's unwritable --json is one line and exit 2 before any work (it was a traceback
    after minutes of serving or sampling, and the figures were lost)."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "bench" / script), *[a.format(tmp=tmp_path) for a in args],
                           "--json", "/proc/flowar/none.json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: expected a writable location for --json"), proc.stderr


def test_what_killed_writers_left_is_removed_by_the_next_write(tmp_path):
    """A temporary file or staging folder carries its writer's process id: the next write of the same
    name removes those of processes that are gone (SIGKILL left them for good: 9.8 GB for a 50k-image
    samples.npz), not those of a writer still at work."""
    from flowar.io.files import atomic_write_bytes
    from flowar.io.images import save_images
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = [tmp_path / f".samples.npz.{dead.pid}-x1.tmp", tmp_path / "png" / f".flowar-images-{dead.pid}-y2"]
    alive = [tmp_path / f".samples.npz.{os.getpid()}-z3.tmp", tmp_path / "png" / f".flowar-images-{os.getpid()}-w4"]
    (tmp_path / "png").mkdir()
    for p in left + alive:
        p.mkdir() if "images" in p.name else p.write_bytes(b"half")
    mine = [tmp_path / ".samples.npz.20260105", tmp_path / f".samples.npz.{dead.pid}-of-3.npz"]   # a user's: kept
    for p in mine:
        p.write_bytes(b"mine")
    atomic_write_bytes(tmp_path / "samples.npz", lambda t: Path(t).write_bytes(b"whole"))
    save_images(torch.zeros(1, 3, 4, 4), tmp_path / "png")
    assert [p.exists() for p in left + alive + mine] == [False, False, True, True, True, True]
    assert (tmp_path / "samples.npz").read_bytes() == b"whole" and (tmp_path / "png" / "000000.png").is_file()


def test_a_run_binding_a_folder_anew_drops_the_pngs_of_the_start_before(tmp_path):
    """A first start that stopped before any shard was done binds nothing: the next run (other settings)
    takes the folder, and the PNGs of the first start's unfinished shards sat beside its own."""
    from flowar.commands.bulk import BulkSpec
    from flowar.commands.shards import begin_run, check_run, write_run_json
    out = tmp_path / "run"
    first = BulkSpec("eng", 200, [0], 0, {}, 8, 1)
    out.mkdir()
    write_run_json(out, first, None)
    (out / "png" / "00000").mkdir(parents=True)
    (out / "png" / "00000" / "000004.png").write_bytes(b"seed 0")
    second = BulkSpec("eng", 16, [0], 3, {}, 4, 1)
    assert check_run(out, second) is False                  # (it writes nothing: a start refused after it leaves none)
    assert (out / "png").exists()
    begin_run(out, second)
    assert not (out / "png").exists() and json.loads((out / "run.json").read_text())["seed"] == 3


def test_ctrl_c_while_the_outputs_are_written_says_which_are_new(tmp_path, monkeypatch):
    """Each file is whole, old or new; stopped between them, the grid and tokens were the new run's and
    the PNG folder still the old one's, and the line said only "interrupted"."""
    import flowar.io.images
    from flowar.io.outputs import write_outputs
    from flowar.sampling.batches import SampleResult

    def stopped(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(flowar.io.images, "save_images", stopped)
    res = SampleResult(torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 4, 4), [0], 0.0)
    with pytest.raises(KeyboardInterrupt) as e:
        write_outputs(res, None, tmp_path / "t.safetensors", tmp_path / "g.png", tmp_path / "imgs")
    said = str(e.value)
    assert f"-> {tmp_path / 't.safetensors'}" in said and f"grid of 1 image -> {tmp_path / 'g.png'}" in said and \
        "imgs" not in said                                                    # (it said "grid of 1 images")
    assert "hold what they held before" in said


def test_a_bulk_run_resumes_with_its_engine_directory_moved(tmp_path):
    """run.json records the engine directory's manifest hash: the same engines at another path (a
    volume mounted elsewhere on the next node, a moved folder) resume the run; other engines do not."""
    from flowar.commands.bulk import BulkSpec
    from flowar.commands.shards import check_run, write_run_json
    from flowar.errors import FlowARError
    out = tmp_path / "run"
    out.mkdir()
    write_run_json(out, BulkSpec("/mnt/a/eng", 16, [0], 0, {}, 8, 1, manifest_sha256="abc"), None)
    (out / "shards").mkdir()
    (out / "shards" / "00000.npz").write_bytes(b"done")
    check_run(out, BulkSpec("/mnt/b/eng", 16, [0], 0, {}, 8, 1, manifest_sha256="abc"))
    with pytest.raises(FlowARError, match="other engine_dir, manifest_sha256"):
        check_run(out, BulkSpec("/mnt/c/eng", 16, [0], 0, {}, 8, 1, manifest_sha256="def"))
    with pytest.raises(FlowARError, match=r"\(batch: here 4, there not given\)"):       # (it said "there None")
        check_run(out, BulkSpec("/mnt/b/eng", 16, [0], 0, {}, 8, 1, batch=4, manifest_sha256="abc"))


def test_onnx_runtime_sends_nothing_and_writes_nothing_in_home(tmp_path):
    """ONNX Runtime 1.29+ uploads telemetry and writes a device id under ~/.cache/Microsoft when it is
    imported (and warns, before a command's one line, where it cannot): our modules switch it off."""
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"} | {"HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", "import flowar.engines.ort, onnxruntime as o; o.get_available_providers()"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "telemetry" not in out.stderr, out.stderr
    assert not list(tmp_path.rglob("*")), list(tmp_path.rglob("*"))
