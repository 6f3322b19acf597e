"""The one FlowAR config: a frozen dataclass, named presets, and its JSON form.

The JSON field names are a file format (checkpoints and engine manifests store them), so they
never change: ``scales``, ``latent_channels``, ``latent_scale``, ``num_classes``, ``ar_*`` and
``head_*``. Everything else (tokens per scale, segment offsets, sequence length, head dims) is
derived once here and read everywhere else.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowar.errors import ConfigError, FlowARError

JSON_FIELDS = (
    "scales", "latent_channels", "latent_scale", "num_classes",
    "ar_width", "ar_heads", "ar_encoder_depth", "ar_decoder_depth", "ar_mlp_hidden",
    "head_block", "head_width", "head_heads", "head_depth", "head_mlp_hidden",
)


# What a command samples with when neither the user nor the engine directory says otherwise (the
# official FlowAR evaluation: its Euler sampler, guidance 4.3 at the last scale, only at t <= 0.9).
SAMPLING_DEFAULTS = {"schedule": "official", "cfg": 4.3, "guidance": 0.9}
# The seeds that name images: 64-bit signed, what a served request takes (JSON int64), so that any seed
# flowar-run or the pipeline takes names an image a replica can give too.
SEED_RANGE = (-2 ** 63, 2 ** 63 - 1)
MAX_BATCH = 1024                     # an engine directory's --max-batch at most


# Upper bounds of the integer fields, well above the largest released model (FlowAR-H's sizes in
# the comments), so that a typo is refused in one line instead of asking the allocator for terabytes.
INT_LIMITS = {
    "latent_channels": 256,                                 # 16 (KL-16)
    "num_classes": 100_000,                                 # 1000 (ImageNet-21k has 21841)
    "ar_width": 8192, "head_width": 8192,                   # 1536, 1536
    "ar_heads": 128, "head_heads": 128,                     # 16, 24
    "ar_encoder_depth": 64, "ar_decoder_depth": 64, "head_depth": 64,    # 15, 15, 12
    "ar_mlp_hidden": 32768, "head_mlp_hidden": 32768,       # 4096, 4096
}
MAX_SCALE_SIDE = 1024                                       # 16 (1024: a 16384 px image through a /16 VAE)


def check_seed(seed: int) -> int:
    """``seed``, or a one-line error where it is not an int in :data:`SEED_RANGE`."""
    lo, hi = SEED_RANGE
    if type(seed) is not int or not lo <= seed <= hi:
        raise FlowARError("a seed in [-2^63, 2^63 - 1] (64 bits: what a served request takes)", repr(seed),
                          "use a seed in that range, e.g. 0")
    return seed


@dataclass(frozen=True)
class FlowARConfig:
    scales: tuple[int, ...]      # side of each token map, coarse to fine; the last is the latent side
    latent_channels: int         # VAE latent channels = token dim (patch size 1)
    latent_scale: float          # tokens = VAE latent * latent_scale (0.2325 for MAR KL-16)
    num_classes: int             # class ids 0..num_classes-1; id num_classes is the null (CFG) class
    ar_width: int                # AR transformer width D (also the semantic dim fed to the head)
    ar_heads: int                # AR attention heads
    ar_encoder_depth: int        # adaLN blocks in the AR encoder stack
    ar_decoder_depth: int        # adaLN blocks in the AR decoder stack
    ar_mlp_hidden: int           # SwiGLU hidden size in the AR (official: int(D*4*2/3))
    head_block: str              # "v1" (Spatial-adaLN) or "v2" (adaLN + cross-attention)
    head_width: int              # flow head width W
    head_heads: int              # flow head attention heads (official: W // 64)
    head_depth: int              # flow head blocks
    head_mlp_hidden: int         # SwiGLU hidden size in the head

    # Derived once (not part of the JSON form).
    tokens_per_scale: tuple[int, ...] = field(init=False, repr=False, compare=False)
    scale_begin: tuple[int, ...] = field(init=False, repr=False, compare=False)
    scale_end: tuple[int, ...] = field(init=False, repr=False, compare=False)
    seq_len: int = field(init=False, repr=False, compare=False)
    n_scales: int = field(init=False, repr=False, compare=False)
    latent_size: int = field(init=False, repr=False, compare=False)       # side of the final latent grid
    null_class: int = field(init=False, repr=False, compare=False)        # the class id of the guidance's null rows
    ar_head_dim: int = field(init=False, repr=False, compare=False)
    head_head_dim: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if problems := self._problems():
            raise ConfigError("a consistent FlowAR config", "; ".join(problems),
                              "correct the config file or use a preset (" + ", ".join(PRESETS) + ")")
        object.__setattr__(self, "scales", tuple(self.scales))
        tokens = tuple(s * s for s in self.scales)
        ends, total = [], 0
        for n in tokens:
            total += n
            ends.append(total)
        object.__setattr__(self, "tokens_per_scale", tokens)
        object.__setattr__(self, "scale_end", tuple(ends))
        object.__setattr__(self, "scale_begin", tuple(e - n for e, n in zip(ends, tokens)))
        object.__setattr__(self, "seq_len", total)
        for name, value in (("n_scales", len(self.scales)), ("latent_size", self.scales[-1]),
                            ("null_class", self.num_classes), ("ar_head_dim", self.ar_width // self.ar_heads),
                            ("head_head_dim", self.head_width // self.head_heads)):
            object.__setattr__(self, name, value)

    def _problems(self) -> list[str]:
        """Each field's own type and range: ints (not bools, not 64.0) within :data:`INT_LIMITS`; once
        those hold, attention heads that split each width evenly, into head dims that 2-D RoPE can use."""
        problems = [f"{name}={getattr(self, name)!r} (needs an int in 1..{hi})" for name, hi in INT_LIMITS.items()
                    if not (type(getattr(self, name)) is int and 1 <= getattr(self, name) <= hi)]
        s = self.scales
        # (the first scale is the class token's one position: a first side of 2 sampled it broadcast, and trained
        # only to fail, "AR input has 46 tokens, scales 0..2 need 49")
        if not (isinstance(s, (tuple, list)) and s and all(type(x) is int and 1 <= x <= MAX_SCALE_SIDE for x in s)
                and all(a < b for a, b in zip(s, s[1:])) and s[0] == 1):
            problems.append(f"scales={s!r} (needs strictly increasing ints in 1..{MAX_SCALE_SIDE}, the first 1)")
        x = self.latent_scale
        if not (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0):
            problems.append(f"latent_scale={x!r} (needs a finite number > 0)")
        if not (isinstance(self.head_block, str) and self.head_block in ("v1", "v2")):
            problems.append(f"head_block={self.head_block!r} (needs 'v1' or 'v2')")
        if problems:                     # (the divisions below need positive ints)
            return problems
        for name, width, heads in (("ar", self.ar_width, self.ar_heads), ("head", self.head_width, self.head_heads)):
            if width % heads:
                problems.append(f"{name}_width divisible by {name}_heads, got {width} and {heads}")
            elif (width // heads) % 4:
                problems.append(f"{name} head dim divisible by 4 for 2-D RoPE, got {width // heads}")
        return problems

    # ---- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in JSON_FIELDS}
        d["scales"] = list(self.scales)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "FlowARConfig":
        if not isinstance(d, dict):
            raise ConfigError("a JSON object with the FlowAR config fields", f"{type(d).__name__} in {source}",
                              "write the config as {\"scales\": [...], \"ar_width\": ..., ...}")
        missing = [k for k in JSON_FIELDS if k not in d]
        unknown = [k for k in d if k not in JSON_FIELDS]
        if missing or unknown:
            got = (f"missing {missing}" if missing else "") + (" and " if missing and unknown else "") + (
                f"unknown {unknown}" if unknown else "")
            raise ConfigError(f"exactly the fields {list(JSON_FIELDS)}", f"{got} in {source}",
                              "start from a preset: flowar-export/flowar-run accept --preset, or copy a "
                              "preset's JSON (FlowARConfig.to_json)")
        try:
            return cls(**{k: d[k] for k in JSON_FIELDS})
        except FlowARError:                 # (__post_init__'s own line: it is a ValueError too)
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError("config values of the right types", f"{e} in {source}", "correct the config file") from e

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> "FlowARConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError("a JSON config", f"invalid JSON in {source} ({e})", "correct the file") from e
        return cls.from_dict(d, source)

    @classmethod
    def load(cls, path: str | Path) -> "FlowARConfig":
        p = Path(path)
        if not p.is_file():
            raise ConfigError("a config JSON file", f"no file at {p}", "check the --config path")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError("a config JSON file in UTF-8", f"{p}: bytes that are not UTF-8 ({e.reason} at byte "
                              f"{e.start})", "pass the JSON config file (save it as UTF-8)") from None
        except OSError as e:
            raise ConfigError("a readable config JSON file", f"{p}: {e.strerror or e}",
                              "check the --config path and its permissions") from None
        return cls.from_json(text, str(p))

    def replace(self, **changes: Any) -> "FlowARConfig":
        return dataclasses.replace(self, **changes)


def _preset(**kw: Any) -> FlowARConfig:
    base = dict(scales=(1, 2, 4, 8, 16), latent_channels=16, latent_scale=0.2325, num_classes=1000)
    base.update(kw)
    return FlowARConfig(**base)


# Sizes of the released FlowAR models (the official factories with the eval.py flow-head
# arguments); head_mlp_hidden = int(W*4*2/3) and head_heads = W // 64 as in the official head.
PRESETS: dict[str, FlowARConfig] = {
    "flowar-s": _preset(ar_width=768, ar_heads=12, ar_encoder_depth=6, ar_decoder_depth=6, ar_mlp_hidden=2048,
                        head_block="v1", head_width=1024, head_heads=16, head_depth=2, head_mlp_hidden=2730),
    "flowar-l": _preset(ar_width=1024, ar_heads=16, ar_encoder_depth=8, ar_decoder_depth=8, ar_mlp_hidden=2730,
                        head_block="v2", head_width=1024, head_heads=16, head_depth=12, head_mlp_hidden=2730),
    "flowar-h": _preset(ar_width=1536, ar_heads=16, ar_encoder_depth=15, ar_decoder_depth=15, ar_mlp_hidden=4096,
                        head_block="v2", head_width=1536, head_heads=24, head_depth=12, head_mlp_hidden=4096),
    # Small enough that the test suite and a CPU demo run in seconds (1.1M parameters); the
    # same sizes as the official-code fixture tiny_v1.
    "tiny": _preset(ar_width=64, ar_heads=4, ar_encoder_depth=2, ar_decoder_depth=2, ar_mlp_hidden=170,
                    head_block="v1", head_width=128, head_heads=2, head_depth=2, head_mlp_hidden=341),
}


def get_preset(name: str) -> FlowARConfig:
    if name not in PRESETS:
        raise ConfigError("a preset name", repr(name), "use one of " + ", ".join(PRESETS))
    return PRESETS[name]
