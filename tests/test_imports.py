"""Heavy dependencies are imported late: the core, every command module and ``flowar-run --help``
work in an interpreter where the heavy packages cannot be imported at all (not merely where they
happen not to be imported), as on a machine without them."""

import subprocess
import sys

HEAVY = ["onnxruntime", "tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings", "diffusers", "cuda", "onnx", "polygraphy",
         "ray"]

# Makes every HEAVY package (and its submodules) unimportable in the probe's interpreter.
BLOCK = f"""
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ImportError(f"{{name}} is absent in this test")
        return None
sys.meta_path.insert(0, _Absent())
"""


def _probe(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True)


def test_the_blocker_blocks():
    """The check below can fail: importing a heavy package directly under the blocker is an error."""
    p = _probe("import onnxruntime")
    assert p.returncode != 0 and "absent in this test" in p.stderr


def test_import_flowar_and_every_module_without_the_heavy_packages():
    """Every module of the installed packages (walked, not listed by hand) imports without them."""
    from test_layers import INSTALLED, ROOT, modules
    names = sorted(modules(ROOT, INSTALLED))
    assert len(names) > 40
    code = "import importlib\nfor n in " + repr(names) + ":\n    importlib.import_module(n)\nprint('ok')"
    p = _probe(code)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def test_cli_help_without_the_heavy_packages():
    for module, entry in (("cli", "run"), ("cli", "export_cmd"), ("cli_ray", "sample_cmd"),
                          ("cli_ray", "serve_cmd"), ("cli", "judge_cmd")):
        p = _probe(f"import sys\nsys.argv = ['prog', '--help']\nfrom flowar.commands.{module} import {entry}\n{entry}()")
        assert p.returncode == 0 and "--help" in p.stdout, (entry, p.stderr[-2000:])


def test_a_heavy_package_missing_at_use_is_one_line():
    """flowar-export --backend trt on a machine without TensorRT: one line naming the install."""
    p = _probe("import sys\nsys.argv = ['flowar-export', '--ckpt', 'x.pth', '--out', '/tmp/flowar-imports-e', "
               "'--backend', 'trt']\nfrom flowar.commands.cli import export_cmd\nexport_cmd()")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error: expected TensorRT")


def test_the_serving_command_itself_never_imports_pytorch(default_auto_engines):
    """flowar-serve's own process checks the directory and starts Ray; only its replicas compute, so
    PyTorch (a second of its start) is not imported there. Stopped here before Ray starts (the port is
    taken): the checks ran, PyTorch was not imported."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        code = ("import atexit, sys\n"
                "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules, flush=True))\n"
                f"sys.argv = ['flowar-serve', '--engine-dir', {str(default_auto_engines)!r}, '--port', "
                f"'{s.getsockname()[1]}']\n"
                "import flowar.commands.serve\n"
                "from flowar.commands.cli_ray import serve_cmd\nserve_cmd()\n")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 2 and "Address already in use" in p.stderr, p.stderr[-2000:]
    assert p.stdout.strip() == "torch imported: False", p.stdout
