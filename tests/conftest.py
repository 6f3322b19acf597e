"""Shared test fixtures.

The official-code fixtures live in ``../shared/fixtures/official`` beside the repository, or
wherever ``FLOWAR_FIXTURES`` points. Where they are absent (a clone outside this team) the
tests that need them skip with the reason; with ``FLOWAR_REQUIRE_FIXTURES=1`` (set by
``.ci/run``) their absence is a failure instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("FLOWAR_FIXTURES", ROOT.parent / "shared" / "fixtures" / "official"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not (FIXTURES / "tiny_v1.safetensors").is_file():
        msg = f"official FlowAR fixtures not found at {FIXTURES} (set FLOWAR_FIXTURES to their folder)"
        if os.environ.get("FLOWAR_REQUIRE_FIXTURES") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return FIXTURES


def _load_tiny(fixtures_dir: Path, name: str):
    from safetensors.torch import load_file
    from flowar.config import FlowARConfig
    from flowar.model import FlowAR
    cfg = FlowARConfig.load(fixtures_dir / f"{name}.config.json")
    model = FlowAR(cfg).eval()
    model.load_state_dict(load_file(str(fixtures_dir / f"{name}.safetensors")), strict=True)
    io = load_file(str(fixtures_dir / f"{name}_io.safetensors"))
    return model, io


@pytest.fixture(scope="session", params=["tiny_v1", "tiny_v2"])
def tiny(request, fixtures_dir):
    """(name, model, io) for each official tiny fixture."""
    model, io = _load_tiny(fixtures_dir, request.param)
    return request.param, model, io


@pytest.fixture(scope="session")
def tiny_v1(fixtures_dir):
    model, io = _load_tiny(fixtures_dir, "tiny_v1")
    return model, io
