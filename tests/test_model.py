"""The reference modules against numbers recorded from the official code."""

import torch

from flowar.model.head import timestep_integers
from flowar.model.ar import block_causal_mask


def test_strict_load_and_buffers(tiny):
    name, model, io = tiny
    sd = model.state_dict()
    assert "mask" in sd and any(k.endswith("attn.rope.freqs") for k in sd)
    # the block-causal mask we build equals the one stored by the official code
    assert torch.equal(block_causal_mask(model.config.tokens_per_scale), sd["mask"])


def test_velocity_embeds_the_official_integer_timesteps(tiny):
    """Exact. (The velocity itself is compared in test_parity.py, within measured float32 noise.)"""
    name, model, io = tiny
    assert torch.equal(timestep_integers(io["velocity.t"]), io["velocity.t_int"])


def test_semantics_match_official(official):
    """The one-pass masked AR (training, export) on the recorded teacher-forced inputs.

    s_hat was recorded on one CPU only, so the official float32 noise is taken to be the size of
    ours: |ours - official| <= 2 * (own + own), own = |float32 - float64| of our code here
    (measured 1.2e-6 / 8.3e-7 against bounds of 6.8e-6 / 5.2e-6 on an AVX-512 Xeon).
    """
    from parity import max_abs
    io = official.a
    x_in = torch.cat([io[f"semantics.inputs_scale{k}"] for k in range(1, 5)], dim=1)
    with torch.no_grad():
        s = official.model.semantics(io["semantics.labels"], x_in)
        s64 = official.model64.semantics(io["semantics.labels"], x_in.double())
    own = max_abs(s, s64)
    assert max_abs(s, io["semantics.s_hat"]) <= 4 * own, (max_abs(s, io["semantics.s_hat"]), own)


def test_kv_cached_steps_equal_the_masked_prefix(tiny):
    """The official sampler's KV-cache path and the one-pass masked path give the same semantics:
    within float32 noise, measured here as the masked path's distance from its float64 twin (each
    float32 path is about that far from float64; a fixed 2e-6 was one host's rounding)."""
    import copy
    from parity import max_abs
    name, model, io = tiny
    c = model.config
    labels = io["semantics.labels"]
    inputs = [io[f"semantics.inputs_scale{k}"] for k in range(1, 5)]
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        caches = model.new_caches(labels.shape[0])
        cls = model.class_emb(labels)
        steps = [model.ar_step(k, cls, None if k == 0 else inputs[k - 1], caches) for k in range(c.n_scales)]
        full = model.semantics(labels, torch.cat(inputs, dim=1))
        noise = max_abs(full, model64.semantics(labels, torch.cat(inputs, dim=1).double()))
        # a shorter prefix gives the same leading scales (block-causality)
        part = model.semantics(labels, torch.cat(inputs[:2], dim=1), last_scale=2)
    assert 0 < noise < 1e-4
    assert max_abs(torch.cat(steps, dim=1), full) <= 4 * noise, (max_abs(torch.cat(steps, dim=1), full), noise)
    assert max_abs(part, full[:, : c.scale_end[2]]) <= 4 * noise, (max_abs(part, full[:, : c.scale_end[2]]), noise)


def test_time_truncation_happens_in_float32():
    t64 = torch.tensor([0.6799999999999999, 0.5599999999999999], dtype=torch.float64)
    assert timestep_integers(t64.float()).tolist() == [680, 560]
    assert (t64 * 1000).long().tolist() == [679, 559]   # what truncating in float64 would give
