"""How many of this project's functions one image crosses: ``flowar-run --engine-dir`` of the
shipped default model, profiled in this process with ``sys.setprofile`` (every thread).

    python bench/call_path.py [--engine-dir DIR] [--list]

Counts distinct functions (code objects: file, first line, qualified name) defined in this
repository's packages (``flowar/``, ``export/``, ``engines/``, ``runtime/``) that run while the
command opens the directory, samples one image and writes it; comprehensions and generator
expressions are not counted (they belong to the function that holds them), nor are module and class
bodies (they run at import), nor the program's quick exit (``flowar.commands.options._leave``, one
function, not run when the command is called with its arguments, as here). Without
``--engine-dir`` the default model is exported first (``flowar-export``, in a subprocess, not
counted). A measure of how much a newcomer must read to follow one image (issue 28).
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = tuple(str(ROOT / p) + os.sep for p in ("flowar", "export", "engines", "runtime"))
SKIP = ("<genexpr>", "<listcomp>", "<dictcomp>", "<setcomp>")


def trace(argv: list[str]) -> dict[tuple[str, int, str], int]:
    """Distinct project functions called while ``flowar-run argv`` runs here, with call counts."""
    from importlib.metadata import entry_points
    main = next(ep for ep in entry_points(group="console_scripts") if ep.name == "flowar-run").load()
    seen: dict[tuple[str, int, str], int] = {}

    def prof(frame, event, arg):
        if event == "call":
            co = frame.f_code
            # functions and methods only: module and class bodies run at import, comprehensions belong to their function
            if co.co_filename.startswith(PACKAGES) and co.co_flags & inspect.CO_NEWLOCALS and co.co_name not in SKIP:
                key = (os.path.relpath(co.co_filename, ROOT), co.co_firstlineno, co.co_qualname)
                seen[key] = seen.get(key, 0) + 1

    threading.setprofile(prof)
    sys.setprofile(prof)
    try:
        main(list(argv), "flowar-run")         # (given its arguments, the command returns here instead of ending the process)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return seen


def main(argv: list[str]) -> int:
    from entry import Parser
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine-dir", help="an engine directory of the default model [default: export one now]")
    ap.add_argument("--list", action="store_true", help="print every function, grouped by file")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        engines = a.engine_dir
        if engines is None:
            engines = str(Path(tmp) / "engines")
            bindir = Path(sys.executable).parent
            subprocess.run([str(bindir / "flowar-export"), "--ckpt", str(ROOT / "models/default/flowar.safetensors"),
                            "--vae", str(ROOT / "models/default/vae"), "--out", engines, "--no-verify"], check=True,
                           stdout=subprocess.DEVNULL)
        seen = trace(["--engine-dir", engines, "--labels", "3", "--seed", "0", "--out", str(Path(tmp) / "one.png")])
    files = sorted({f for f, _, _ in seen})
    if a.list:
        for f in files:
            names = sorted((line, q) for g, line, q in seen if g == f)
            print(f"{f} ({len(names)})")
            for line, q in names:
                print(f"    {line:5d} {q}")
    print(f"one image of flowar-run --engine-dir crosses {len(seen)} functions of this project in {len(files)} files")
    return 0


if __name__ == "__main__":
    from entry import run_script
    sys.exit(run_script(main))
