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


def test_import_flowar_and_every_light_module_without_the_heavy_packages():
    code = ("import flowar, flowar.model, flowar.sampler, flowar.schedule, flowar.checkpoint, flowar.stages, flowar.run, "
            "flowar.cli, flowar.source, flowar.device, flowar.export, flowar.engines, flowar.runtime, flowar.bulk, "
            "flowar.serve, flowar.quality, flowar.autoprec, flowar.build, flowar.export.manifest, flowar.export.specs, "
            "flowar.runtime.load, flowar.runtime.pipeline, flowar.runtime.engines, flowar.runtime.cudagraph, "
            "flowar.engines.trt, flowar.engines.ort\nprint('ok')")
    p = _probe(code)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def test_cli_help_without_the_heavy_packages():
    for entry in ("run_main", "export_main", "sample_main", "serve_main", "judge_main"):
        p = _probe(f"import sys\nsys.argv = ['prog', '--help']\nfrom flowar.cli import {entry}\n{entry}()")
        assert p.returncode == 0 and "--help" in p.stdout, (entry, p.stderr[-2000:])


def test_a_heavy_package_missing_at_use_is_one_line():
    """flowar-export --backend trt on a machine without TensorRT: one line naming the install."""
    p = _probe("import sys\nsys.argv = ['flowar-export', '--ckpt', 'x.pth', '--out', '/tmp/flowar-imports-e', "
               "'--backend', 'trt']\nfrom flowar.cli import export_main\nexport_main()")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error: expected TensorRT")
