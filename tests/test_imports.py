"""Heavy dependencies are imported late."""

import subprocess
import sys

HEAVY = ["onnxruntime", "tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings", "diffusers", "cuda", "onnx", "polygraphy", "ray"]


def _loaded_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    return [m for m in out.split(",") if m]


def test_import_flowar_is_light():
    assert _loaded_after("import flowar") == []


def test_core_modules_and_cli_help_are_light():
    code = ("import flowar.model, flowar.sampler, flowar.schedule, flowar.checkpoint, flowar.stages, flowar.run, "
            "flowar.cli, flowar.export, flowar.engines, flowar.runtime, flowar.bulk, flowar.serve, flowar.quality, flowar.autoprec")
    assert _loaded_after(code) == []
    proc = subprocess.run([sys.executable, "-c", "from flowar.cli import run_main; run_main()", "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "--engine-dir" in proc.stdout
