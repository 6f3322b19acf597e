"""The lean runtime: static buffers, the engine interface, and parity with the eager stages."""

import pytest
import torch

from flowar.export.specs import stage_specs
from flowar.runtime.pipeline import BufferPlan, EngineStages, torch_engines
from flowar.sampler import injected_noise, sample
from flowar.schedule import build_schedule
from flowar.stages import TorchStages


def _torch_engine_stages(model, max_batch=2):
    specs = stage_specs(model.config)
    return EngineStages(torch_engines(model, specs), model.config, max_batch, torch.device("cpu"), specs)


class Recording:
    """Wraps an engine and records the output addresses it was handed."""

    def __init__(self, inner):
        self.inner, self.name, self.seen = inner, inner.name, []

    def infer(self, inputs, outputs, profile=0):
        self.seen.append((profile, tuple(inputs.get("x", next(iter(inputs.values()))).shape),
                          tuple(t.data_ptr() for t in outputs.values())))
        self.inner.infer(inputs, outputs, profile)


def test_buffer_plan_allocates_each_tensor_once_at_its_largest():
    from flowar.config import get_preset
    c = get_preset("tiny")
    plan = BufferPlan(stage_specs(c), c, max_rows=4, device=torch.device("cpu"))
    assert plan.storage["ar.semantics"].numel() == 4 * c.seq_len * c.ar_width
    assert plan.storage["head_prep.c"].numel() == 4 * 256 * c.head_width
    assert "velocity.x" not in plan.storage           # the sampler owns x and t
    v = plan.view("ar", "semantics", (2, 21, c.ar_width))
    assert v.data_ptr() == plan.storage["ar.semantics"].data_ptr() and v.is_contiguous()


def test_engine_stages_match_the_eager_stages_and_never_reallocate(tiny_v1):
    model, io = tiny_v1
    st = _torch_engine_stages(model)
    rec = Recording(st.engines["velocity"])
    st.engines["velocity"] = rec
    before = st.buffers.addresses()
    noise = injected_noise([io[f"sample25.noise{k}"] for k in range(5)])
    sched = build_schedule(25, 4.3, 0.9, 5)
    with torch.no_grad():
        ours, _ = sample(st, model.config, sched, torch.tensor([3, 7]), noise)
        ref, _ = sample(TorchStages(model), model.config, sched, torch.tensor([3, 7]),
                        injected_noise([io[f"sample25.noise{k}"] for k in range(5)]))
    assert (ours - ref).abs().max().item() <= 1e-4
    assert (ours - io["sample25.tokens"]).abs().max().item() <= 1e-4
    assert st.buffers.addresses() == before
    # every velocity call of a (scale, rows) wrote to the same address
    by_shape = {}
    for profile, shape, ptrs in rec.seen:
        by_shape.setdefault((profile, shape), set()).add(ptrs)
    assert len(rec.seen) == 120 and all(len(p) == 1 for p in by_shape.values())


def test_batch_above_the_engines_max_is_refused(tiny_v1):
    from flowar.errors import FlowARError
    model, _ = tiny_v1
    st = _torch_engine_stages(model, max_batch=2)
    with pytest.raises(FlowARError, match="at most 2 samples"):
        st.start(torch.tensor([1, 2, 3, 1000, 1000, 1000]))
