"""CUDA graphs as a runner of the one sampler loop: checked on CPU with capture off; the capture
itself on a GPU (marked gpu)."""

import pytest
import torch

from flowar.runtime.cudagraph import GraphRunner
from flowar.runtime.stages import torch_engine_stages
from flowar.sampling.sampler import injected_noise, sample
from flowar.sampling.schedule import build_schedule, named_schedule
from flowar.sampling.eager import EagerStages


def _noise(io):
    return injected_noise([io[f"sample25.noise{k}"] for k in range(5)])


def test_the_graph_runner_reuses_one_workspace_per_shape_and_matches_eager(tiny_v1, assert_tokens):
    model, io = tiny_v1
    runner = GraphRunner("cpu", capture=False)
    st = torch_engine_stages(model, 2, "cpu")
    traces = []
    for sched in (build_schedule(25, 4.3, 0.9, 5), named_schedule("fast", 4.3, 0.9, 5)):
        with torch.no_grad():
            a, _ = sample(st, model.config, sched, io["sample25.labels"], _noise(io), runner=runner)
            before = ({k: ws.addresses() for k, (_, ws) in runner.workspaces.items()}, st.buffers.addresses())
            b, _ = sample(st, model.config, sched, io["sample25.labels"], _noise(io), runner=runner,
                          on_scale=traces.append)
            eager, _ = sample(EagerStages(model), model.config, sched, io["sample25.labels"], _noise(io))
        after = ({k: ws.addresses() for k, (_, ws) in runner.workspaces.items()}, st.buffers.addresses())
        assert after == before and torch.equal(a, b)            # nothing re-allocated between calls
        if sched.name is None:
            assert_tokens(a)
        assert (a - eager).abs().max().item() <= 1e-4 or sched.name == "fast"
    assert len(runner.workspaces) == 2                            # one per (batch, rows, schedule)
    assert [len(t.head_rows) for t in traces] == [24] * 5 + [9] * 5      # each plan ran under the runner


class _RecordingRunner(GraphRunner):
    """The graph runner's own logic with capture on, on a CPU: a captured scale is a recording of
    the call it was made from, and a replay runs that recording again, with the workspace and
    buffers it was captured with (as a CUDA graph would: same addresses, new contents)."""

    class Recording:
        def __init__(self, fn):
            self.fn, self.replays = fn, 0

        def replay(self):
            self.replays += 1
            self.fn()

    def _warm_up(self, fn):
        fn()

    def _capture(self, fn):
        return self.Recording(fn)


def test_replayed_scales_read_what_the_sampler_copies_in(tiny_v1):
    """Capture once, replay for other labels and other noise: the replays must give eager's tokens
    for those, which holds only if every input a graph reads (labels, noise, the hand-off) is
    copied into the static buffers it was captured with."""
    model, io = tiny_v1
    runner = _RecordingRunner("cpu", capture=True)
    st = torch_engine_stages(model, 2, "cpu")
    sched = build_schedule(25, 4.3, 0.9, 5)
    from flowar.sampling.sampler import per_sample_noise
    with torch.no_grad():
        sample(st, model.config, sched, torch.tensor([3, 7]), per_sample_noise(0, [0, 1]), runner=runner)
        traces = []
        got, _ = sample(st, model.config, sched, torch.tensor([1, 5]), per_sample_noise(9, [4, 6]), runner=runner,
                        on_scale=traces.append)
        want, _ = sample(EagerStages(model), model.config, sched, torch.tensor([1, 5]), per_sample_noise(9, [4, 6]))
    assert len(runner.graphs) == 5 and all(g.replays == 1 for g in runner.graphs.values())
    assert (got - want).abs().max().item() <= 1e-4
    assert [len(t.head_rows) for t in traces] == [24] * 5 and traces[-1].head_rows[-1] == 4


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager_cuda(tiny_v1):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model, io = tiny_v1
    model = model.cuda()
    sched = build_schedule(25, 4.3, 0.9, 5)
    runner = GraphRunner("cuda")
    st = torch_engine_stages(model, 2, "cuda")
    labels = io["sample25.labels"].cuda()
    first, _ = sample(st, model.config, sched, labels, _noise(io), device="cuda", runner=runner)     # warm-up + capture
    got, _ = sample(st, model.config, sched, labels, _noise(io), device="cuda", runner=runner)       # replay
    assert len(runner.graphs) == 5
    with torch.no_grad():
        ref, _ = sample(EagerStages(model), model.config, sched, labels, _noise(io), device="cuda")
    assert (got - ref).abs().max().item() <= 1e-4 and (first - ref).abs().max().item() <= 1e-4
    assert (got.cpu() - io["sample25.tokens"]).abs().max().item() <= 1e-3
    model.cpu()


def test_which_sources_are_captured():
    """flowar-run's choice, without a GPU: engine directories (ONNX Runtime, TensorRT, or the
    reference modules behind the runtime) keep their own static-buffer stages; only a checkpoint
    on CUDA is rebuilt on static buffers; on a CPU a checkpoint runs the plain loop."""
    import torch
    from flowar.runtime.source import Source, graph_runner
    stages = object()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    def src(backend, device, manifest):
        return Source(stages, None, None, device, True, "", backend, manifest=manifest)
    for backend, capture in (("torch", True), ("trt", True), ("ort", False)):
        runner, st, _ = graph_runner(src(backend, cuda, object()), True, 2)
        assert st is stages and runner.capture is capture, backend
        runner, st, what = graph_runner(src(backend, cpu, object()), True, 2)
        assert st is stages and runner.capture is False and "CPU" in what
    assert graph_runner(src("torch", cpu, None), True, 2) == (None, stages, "off")
    assert graph_runner(src("trt", cuda, object()), False, 2) == (None, stages, "off")
