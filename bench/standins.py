"""Full-size stand-ins for the released files, with random weights (the real ones cannot be
downloaded here). Time and memory measured on them are real; accuracy is not.

    python bench/standins.py --out /data/standins --presets flowar-s,flowar-l,flowar-h --vae

* ``FlowAR-S.pth`` / ``FlowAR-L.pth`` / ``FlowAR-H.pth``: ``torch.save(state_dict)`` of this
  project's module at the preset, flat float32, buffers included, as the released files are
  (687 MB, 2.35 GB, 7.65 GB). Keys and shapes are checked against the official key tables
  (``keys_flowar_{small,large,huge}.tsv`` in the fixtures).
* ``kl16.ckpt``: ``torch.save({"model": state_dict})`` with exactly the keys and shapes of
  ``keys_mar_kl16.tsv`` (MAR's KL-16 VAE, ch 128, 66.5 M parameters).

The weights are drawn so that activations keep a trained model's scale (not the constructor's
zeros, which make the head's output identically its bias): every Linear/conv weight
N(0, 1/fan_in) (the flow head's zero-initialised final layer included), biases N(0, 0.01^2),
norm weights 1. Seeded: the same command writes the same files. Never commit them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

TABLES = {"flowar-s": "keys_flowar_small.tsv", "flowar-l": "keys_flowar_large.tsv",
          "flowar-h": "keys_flowar_huge.tsv", "kl16": "keys_mar_kl16.tsv"}
FILES = {"flowar-s": "FlowAR-S.pth", "flowar-l": "FlowAR-L.pth", "flowar-h": "FlowAR-H.pth", "kl16": "kl16.ckpt"}


def fixtures_dir() -> Path:
    here = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("FLOWAR_FIXTURES", here.parent / "shared" / "fixtures" / "official"))


def key_table(name: str) -> dict[str, tuple[int, ...]]:
    """key -> shape from an official key table (first line: provenance, second: header)."""
    path = fixtures_dir() / TABLES[name]
    if not path.is_file():
        sys.exit(f"error: expected the official key table {path.name}; got no file at {path}. "
                 "Fix: set FLOWAR_FIXTURES to the fixtures folder")
    rows = [line.split("\t") for line in path.read_text().splitlines()[2:] if line.strip()]
    return {k: tuple(int(x) for x in shape.strip("[]").split(",") if x.strip()) for k, shape, _ in rows}


def _fill(name: str, t: torch.Tensor, gen: torch.Generator) -> None:
    """Trained-scale random values, in place (see the module docstring)."""
    if t.ndim >= 2:
        fan_in = math.prod(t.shape[1:])
        t.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
    elif name.endswith("bias"):
        t.normal_(0.0, 0.01, generator=gen)
    else:                                   # norm weights
        t.fill_(1.0)


def flowar_state_dict(preset: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The module's state dict at ``preset`` with trained-scale random weights; the buffers (mask,
    RoPE frequencies) are the constructor's."""
    from flowar.config import get_preset
    from flowar.model.ar import FlowAR
    model = FlowAR(get_preset(preset))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            _fill(name, p, gen)
    return model.state_dict()


def vae_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """MAR KL-16 (ch 128) keys and shapes from the official table, trained-scale random values."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in key_table("kl16").items():
        t = torch.empty(shape)
        _fill(k, t, gen)
        out[k] = t
    return out


def check_against_table(sd: dict[str, torch.Tensor], name: str) -> None:
    want = key_table(name)
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if got != want:
        missing = sorted(set(want) - set(got))[:3]
        extra = sorted(set(got) - set(want))[:3]
        shapes = [k for k in set(want) & set(got) if want[k] != got[k]][:3]
        sys.exit(f"error: expected the keys and shapes of {TABLES[name]}; got missing {missing}, extra {extra}, "
                 f"other shapes {shapes}. Fix: the preset no longer matches the released files")


def write(name: str, out: Path, seed: int = 0) -> Path:
    t0 = time.perf_counter()
    sd = vae_state_dict(seed) if name == "kl16" else flowar_state_dict(name, seed)
    check_against_table(sd, name)
    obj = {"model": sd} if name == "kl16" else sd
    path = out / FILES[name]
    tmp = path.with_name(path.name + ".partial")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:                                  # (a failed or interrupted save left gigabytes of .partial behind)
        tmp.unlink(missing_ok=True)
    n = sum(v.numel() for v in sd.values())
    print(f"{path}: {len(sd)} tensors, {n / 1e6:.1f} M values, {path.stat().st_size / 1e9:.2f} GB "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    from entry import Parser
    ap = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the files (never inside the repository)")
    ap.add_argument("--presets", default="flowar-s", help="comma-separated: flowar-s, flowar-l, flowar-h")
    ap.add_argument("--vae", action="store_true", help="also write kl16.ckpt")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    names = [p.strip() for p in a.presets.split(",") if p.strip()]
    bad = [p for p in names if p not in FILES or p == "kl16"]
    if bad or not (names or a.vae):
        print(f"error: expected presets among flowar-s, flowar-l, flowar-h; got {bad}. Fix: e.g. --presets flowar-s",
              file=sys.stderr)
        return 2
    out = Path(a.out)
    repo = Path(__file__).resolve().parents[1]
    if out.resolve() == repo or repo in out.resolve().parents:       # (its help said never; 687 MB were written there)
        print(f"error: expected --out outside the repository (stand-ins are never committed); got {out}, inside {repo}. "
              "Fix: choose a folder elsewhere, e.g. --out /tmp/standins", file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
        for n in names + (["kl16"] if a.vae else []):
            write(n, out, a.seed)
    except OSError as e:
        print(f"error: expected a folder for --out with room for the files; got {e}. Fix: choose another --out",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from entry import run_script
    raise SystemExit(run_script(main))
