import json

import pytest
import torch

from flowar.config import JSON_FIELDS, PRESETS, FlowARConfig, get_preset
from flowar.errors import ConfigError


def test_json_fields_are_the_file_format():
    d = PRESETS["flowar-s"].to_dict()
    assert list(d) == list(JSON_FIELDS)
    assert FlowARConfig.from_json(json.dumps(d)) == PRESETS["flowar-s"]


def test_fixture_config_files_load(fixtures_dir):
    for name in ("tiny_v1", "tiny_v2"):
        raw = json.loads((fixtures_dir / f"{name}.config.json").read_text())
        cfg = FlowARConfig.load(fixtures_dir / f"{name}.config.json")
        assert cfg.to_dict() == raw
    assert FlowARConfig.load(fixtures_dir / "tiny_v1.config.json") == PRESETS["tiny"]


def test_derived_values():
    c = PRESETS["flowar-l"]
    assert c.tokens_per_scale == (1, 4, 16, 64, 256)
    assert c.seq_len == 341
    assert c.scale_begin == (0, 1, 5, 21, 85)
    assert c.scale_end == (1, 5, 21, 85, 341)
    assert c.ar_head_dim == 64 and c.head_head_dim == 64 and c.null_class == 1000


@pytest.mark.parametrize("preset,tsv", [("flowar-s", "small"), ("flowar-l", "large"), ("flowar-h", "huge")])
def test_preset_keys_match_official_checkpoints(fixtures_dir, preset, tsv):
    from flowar.model.checkpoint import expected_shapes
    rows = [line.rstrip("\n").split("\t") for line in (fixtures_dir / f"keys_flowar_{tsv}.tsv").read_text().splitlines()
            if line and not line.startswith("#")][1:]
    official = {k: tuple(json.loads(shape)) for k, shape, _ in rows}
    assert expected_shapes(PRESETS[preset]) == official


def test_preset_parameter_counts(fixtures_dir):
    # The TSV header states the official parameter count; buffers (mask, rope freqs) are not parameters.
    from flowar.model.ar import FlowAR
    for preset, tsv in (("flowar-s", "small"),):
        header = (fixtures_dir / f"keys_flowar_{tsv}.tsv").read_text().splitlines()[0]
        n_official = int(header.split("parameters=")[1].split()[0])
        with torch.device("meta"):
            m = FlowAR(PRESETS[preset])
        assert sum(p.numel() for p in m.parameters()) == n_official


@pytest.mark.parametrize("bad, said", [
    (dict(head_block="v3"), "head_block='v3' (needs 'v1' or 'v2')"),
    (dict(ar_heads=5), "ar_width divisible by ar_heads, got 64 and 5"),
    (dict(scales=(1, 4, 2)), "scales=(1, 4, 2) (needs strictly increasing"),
    (dict(latent_scale=0.0), "latent_scale=0.0 (needs a finite number > 0)"),
    (dict(head_heads=3), "head_width divisible by head_heads, got 128 and 3"),
    (dict(ar_heads=32), "ar head dim divisible by 4 for 2-D RoPE, got 2"),
    # a value out of range is said alone: the head checks divide by it
    (dict(ar_heads=0, head_heads=3), "got ar_heads=0 (needs an int in 1..128). Fix"),
    (dict(scales=(2, 3, 6)), "the first 1"),     # (the first scale is the class token's one position: training failed)
])
def test_inconsistent_configs_are_refused_naming_what_is_wrong(bad, said):
    with pytest.raises(ConfigError) as e:
        PRESETS["tiny"].replace(**bad)
    assert said in str(e.value)


def test_unknown_and_missing_fields_are_named():
    d = PRESETS["tiny"].to_dict()
    d["depth"] = 3
    del d["ar_width"]
    with pytest.raises(ConfigError) as e:
        FlowARConfig.from_dict(d)
    assert "ar_width" in str(e.value) and "depth" in str(e.value)


def test_an_inconsistent_config_file_is_its_one_line_and_a_value_error():
    """A refusal is a ValueError, as diffusers' are (``except ValueError`` around a call catches it),
    and a config file's inconsistency stays its own line (not wrapped as "values of the right types")."""
    d = PRESETS["tiny"].to_dict() | {"latent_scale": float("inf")}
    with pytest.raises(ValueError) as e:
        FlowARConfig.from_json(json.dumps(d), "c.json")
    assert isinstance(e.value, ConfigError) and e.value.expected == "a consistent FlowAR config", str(e.value)
    assert str(e.value).count("expected") == 1 and "latent_scale=inf (needs a finite number > 0)" in str(e.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="flowar-s"):
        get_preset("flowar-xl")
