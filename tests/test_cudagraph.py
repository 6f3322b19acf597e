"""CUDA-graph planning, checked on CPU; the capture itself on a GPU (marked gpu)."""

import pytest
import torch

from flowar.runtime.cudagraph import GraphedSampler
from flowar.runtime.pipeline import torch_engine_stages
from flowar.sampler import injected_noise, sample
from flowar.schedule import build_schedule
from flowar.stages import TorchStages


def _noise(io):
    return injected_noise([io[f"sample25.noise{k}"] for k in range(5)])


def test_plan_has_one_graph_per_scale_over_static_buffers(tiny_v1, assert_tokens):
    model, io = tiny_v1
    sched = build_schedule(25, 4.3, 0.9, 5)
    gs = GraphedSampler(torch_engine_stages(model, 2, "cpu"), model.config, sched, 2, "cpu", capture=False).build()
    plan = gs.plan()
    assert [p["side"] for p in plan] == [1, 2, 4, 8, 16] and all(p["rows"] == 4 for p in plan)
    assert plan[4]["reads"] == {"draw": (4, 256, 16), "next_in": (4, 256, 16)} and plan[4]["writes"] == {"z": (2, 256, 16)}
    before = (gs.ws.addresses(), gs.stages.buffers.addresses())
    a = gs.sample(io["sample25.labels"], _noise(io))
    b = gs.sample(io["sample25.labels"], _noise(io))
    assert (gs.ws.addresses(), gs.stages.buffers.addresses()) == before      # nothing re-allocated between replays
    assert torch.equal(a, b)
    assert_tokens(a)


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager_cuda(tiny_v1):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model, io = tiny_v1
    model = model.cuda()
    sched = build_schedule(25, 4.3, 0.9, 5)
    gs = GraphedSampler(torch_engine_stages(model, 2, "cuda"), model.config, sched, 2, "cuda").build()
    assert len(gs.graphs) == 5
    got = gs.sample(io["sample25.labels"], _noise(io)).cpu()
    with torch.no_grad():
        ref, _ = sample(TorchStages(model), model.config, sched, io["sample25.labels"].cuda(), _noise(io), device="cuda")
    assert (got - ref.cpu()).abs().max().item() <= 1e-4
    assert (got - io["sample25.tokens"]).abs().max().item() <= 1e-3
    model.cpu()
