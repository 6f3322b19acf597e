"""Imports point down the data flow (../shared/DESIGN.md, README "Layout").

Every module of the installed packages and of ``bench/`` is parsed (not imported), and every import
it makes, at the top or inside a function (the late imports of heavy paths count too), is checked:
a module may import from its own layer or the layers below, never above. The bench sits below the
commands: it opens sources through the runtime and runs the commands as a user does, in their
own processes (``flowar-export``, ``flowar-serve``). The checker is shown to fail on an upward
import planted in a copy of the real tree, in a package and in the bench.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module belongs to the layer of its longest matching prefix.
LAYERS = [
    ("base", ("flowar.config", "flowar.errors", "flowar.device", "flowar.io")),
    ("model", ("flowar.model",)),
    ("sampling", ("flowar.sampling",)),
    ("train", ("flowar.train",)),
    ("eval", ("flowar.eval",)),
    ("export", ("flowar.export",)),
    ("engines", ("flowar.engines",)),
    ("runtime", ("flowar.runtime",)),
    ("pipeline", ("flowar.pipeline",)),
    ("bench", ("bench",)),
    ("commands", ("flowar.commands",)),
]
RANK = {prefix: i for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes}
TOP = len(LAYERS)
# Where each installed package's files are (setuptools package-dir), and the bench's scripts.
PACKAGE_DIRS = {"flowar": "flowar", "flowar.export": "export", "flowar.engines": "engines", "flowar.runtime": "runtime",
                "bench": "bench"}


def layer_of(module: str) -> int | None:
    """Rank of a flowar module; the package root ``flowar`` re-exports the base (config, errors)."""
    if module == "flowar":
        return 0
    best = None
    for prefix, rank in RANK.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, rank)
    return None if best is None else best[1]


INSTALLED = {pkg: folder for pkg, folder in PACKAGE_DIRS.items() if pkg != "bench"}


def modules(root: Path, packages: dict[str, str] = PACKAGE_DIRS) -> dict[str, Path]:
    """Every module of ``packages`` (default: the installed ones and the bench) under ``root``:
    dotted name -> file."""
    out = {}
    for pkg, folder in packages.items():
        base = root / folder
        for f in sorted(base.rglob("*.py")):
            rel = f.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if pkg == "flowar" and parts and parts[0] in ("export", "engines", "runtime"):
                continue
            out[".".join([pkg, *parts])] = f
    return out


def imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported flowar module, line) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((mod, node.lineno))
            # ``from flowar.x import y`` may import the submodule flowar.x.y
            found += [(f"{mod}.{a.name}", node.lineno) for a in node.names]
    return [(m, line) for m, line in found if m == "flowar" or m.startswith("flowar.") or m.split(".")[0] == "bench"]


def upward_imports(root: Path) -> list[str]:
    """'source:line imports target (layer a -> layer b)' for every import that points up."""
    mods = modules(root)
    problems = []
    for name, path in mods.items():
        src = TOP if name == "flowar" else layer_of(name)
        assert src is not None, f"{name} ({path}) is in no layer: add it to LAYERS and the README's layout table"
        for target, line in imports(name, path):
            if target.split(".")[0] == "bench" and not name.startswith("bench"):
                problems.append(f"{path.relative_to(root)}:{line} imports {target} (no package imports the bench)")
                continue
            if target not in mods and target.rsplit(".", 1)[0] in mods:
                target = target.rsplit(".", 1)[0]           # ``from flowar.x import name``: the module is flowar.x
            dst = layer_of(target)
            if dst is not None and dst > src:
                problems.append(f"{path.relative_to(root)}:{line} imports {target} "
                                f"({LAYERS[src][0] if src < TOP else 'root'} -> {LAYERS[dst][0]})")
    return list(dict.fromkeys(problems))


def test_every_module_is_in_a_layer_and_imports_point_down():
    mods = modules(ROOT)
    assert len(mods) > 40 and "flowar.sampling.sampler" in mods and "flowar.runtime.stages" in mods
    assert "bench.latency" in mods and "bench.latency_backends" in mods
    assert upward_imports(ROOT) == []


def _copy_tree(tmp_path: Path) -> Path:
    for folder in set(PACKAGE_DIRS.values()):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_a_planted_upward_import_fails(tmp_path):
    root = _copy_tree(tmp_path)
    assert upward_imports(root) == []
    head = root / "flowar" / "model" / "head.py"
    head.write_text(head.read_text() + "\n\ndef _late():\n    from flowar.runtime.runtime import Runtime\n")
    problems = upward_imports(root)
    assert len(problems) == 1 and "flowar/model/head.py" in problems[0] and "model -> runtime" in problems[0]


def test_a_relative_upward_import_and_an_import_of_the_bench_fail(tmp_path):
    root = _copy_tree(tmp_path)
    sampler = root / "flowar" / "sampling" / "sampler.py"
    sampler.write_text(sampler.read_text() + "\nfrom ..eval import quality\n")
    spec = root / "export" / "specs.py"
    spec.write_text(spec.read_text() + "\nimport bench.latency\n")
    problems = upward_imports(root)
    assert any("sampler.py" in p and "sampling -> eval" in p for p in problems), problems
    assert any("specs.py" in p and "bench" in p for p in problems), problems


def test_an_upward_import_from_the_bench_fails(tmp_path):
    """The bench runs the commands in their own processes; importing them is an upward import."""
    root = _copy_tree(tmp_path)
    lat = root / "bench" / "latency_backends.py"
    lat.write_text(lat.read_text() + "\n\ndef _late():\n    from flowar.commands.build import build_engine_dir\n")
    problems = upward_imports(root)
    assert len(problems) == 1 and "bench/latency_backends.py" in problems[0] and "bench -> commands" in problems[0]


def test_no_product_module_above_400_lines():
    """A module a newcomer reads at once: the installed packages' files stay at or under 400 lines
    (issue 28; the bench and the tests aside)."""
    files = [p for pkg, folder in PACKAGE_DIRS.items() if pkg != "bench" for p in (ROOT / folder).rglob("*.py")]
    assert len(files) > 40
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def layout_rows(readme: str) -> dict[str, str]:
    """The README's layout table: layer name -> its row (the header aside)."""
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    return {cells[1].strip(): row for row in section.splitlines()
            if row.startswith("| ") and len(cells := row.split("|")) > 3 and cells[1].strip() not in ("layer", "---")}


def unnamed_modules(readme: str) -> list[str]:
    """Modules whose file the README's layout table does not name in their layer's row."""
    rows = layout_rows(readme)
    missing = []
    for name, path in modules(ROOT).items():
        if path.name == "__init__.py":
            continue
        layer = LAYERS[layer_of(name)][0]
        if f"`{path.name}`" not in rows.get(layer, ""):
            missing.append(f"{path.relative_to(ROOT)} (layer {layer})")
    return missing


def test_the_readme_layout_table_names_every_module_in_its_layer():
    """A newcomer finds each file by the table (six were missing from it: the bench's fresh-process and
    load scripts, the bf16 engines, the commands' shared options); the check fails on a row that
    loses one."""
    readme = (ROOT / "README.md").read_text()
    assert set(layout_rows(readme)) == {name for name, _ in LAYERS}
    assert unnamed_modules(readme) == []
    assert unnamed_modules(readme.replace("`bf16.py`", "bf16")) == ["runtime/bf16.py (layer runtime)"]
