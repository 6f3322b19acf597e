"""CUDA graphs as a runner of the one sampler loop: checked on CPU with capture off; the capture
itself on a GPU (marked gpu)."""

import pytest
import torch

from flowar.runtime.cudagraph import GraphRunner
from flowar.runtime.stages import torch_engine_stages
from flowar.sampling.sampler import injected_noise, sample
from flowar.sampling.schedule import Settings, build_schedule
from flowar.sampling.eager import EagerStages


def _noise(io):
    return injected_noise([io[f"sample25.noise{k}"] for k in range(5)])


def test_the_graph_runner_reuses_one_workspace_per_shape_and_matches_eager(tiny_v1, assert_tokens):
    model, io = tiny_v1
    runner = GraphRunner("cpu", capture=False)
    st = torch_engine_stages(model, 2, "cpu")
    traces = []
    for sched in (build_schedule(25, 4.3, 0.9, 5), Settings(schedule="fast").resolve(5)):
        with torch.no_grad():
            a, _ = sample(st, model.config, sched, io["sample25.labels"], _noise(io), runner=runner)
            before = ({k: ws.addresses() for k, ws in runner.workspaces.items()}, st.addresses())
            again = Settings(schedule="fast").resolve(5) if sched.name == "fast" else build_schedule(25, 4.3, 0.9, 5)
            b, _ = sample(st, model.config, again, io["sample25.labels"], _noise(io), runner=runner,
                          on_scale=traces.append)                 # an equal schedule, built anew: the same workspace
            eager, _ = sample(EagerStages(model), model.config, sched, io["sample25.labels"], _noise(io))
        after = ({k: ws.addresses() for k, ws in runner.workspaces.items()}, st.addresses())
        assert after == before and torch.equal(a, b)            # nothing re-allocated between calls
        if sched.name is None:
            assert_tokens(a)
        assert (a - eager).abs().max().item() <= 1e-4, sched.name  # every schedule, the fast one too
    assert len(runner.workspaces) == 2                            # one per (batch, rows, schedule value)
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


class _HostData(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops a CUDA graph capture refuses or cannot record: a tensor made from host data
    (``torch.tensor([...], device=...)``: a host-to-device copy) and a read of a value back to the host."""
    HOST = ("aten::lift_fresh", "aten::lift_fresh_copy", "aten::_local_scalar_dense")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.HOST:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_a_captured_scale_makes_no_tensor_from_host_data(tiny):
    """What a GPU capture records must run on the device alone: every scale's captured call (the AR
    step, the head's constants, the ODE plan, the hand-off) is run under a mode that records host
    data going in or out, for both head blocks' tables. The head's signed rope table was made from a
    host list, which the first capture on a GPU refused ("Cannot copy between CPU and CUDA tensors
    during CUDA graph capture")."""
    _, model, io = tiny
    seen = []

    class Checked(_RecordingRunner):
        def _warm_up(self, fn):
            pass                             # the scale runs once, below (a scale run twice is not the same)

        def _capture(self, fn):
            with _HostData() as mode:
                fn()                         # the call a capture records, run here on a CPU to watch it
            seen.append(mode.seen)
            return self.Recording(fn)

    st = torch_engine_stages(model, 2, "cpu")
    sched = build_schedule(25, 4.3, 0.9, 5)
    with torch.no_grad():
        got, _ = sample(st, model.config, sched, io["sample25.labels"], _noise(io), runner=Checked("cpu", capture=True))
        want, _ = sample(EagerStages(model), model.config, sched, io["sample25.labels"], _noise(io))
    assert len(seen) == 5 and seen == [[]] * 5, seen
    assert (got - want).abs().max().item() <= 1e-4


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
    """flowar-run's choice, without a GPU: on a CUDA device TensorRT and PyTorch stages are captured
    (a checkpoint is PyTorch, behind static buffers), ONNX Runtime sessions are not; on a CPU
    nothing is, and --no-cuda-graphs turns capture off."""
    from flowar.runtime.runtime import captures
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [captures(cuda, b) for b in ("trt", "torch", "ort", "measured")] == [True, True, False, False]
    assert not any(captures(cpu, b) for b in ("trt", "torch", "ort"))
    assert not captures(cuda, "trt", cuda_graphs=False)


def test_batches_are_padded_to_a_captured_bucket_and_the_padding_is_dropped(tiny_v1):
    """A runner that captures runs a batch of 3 in its bucket of 4 (one graph set, not one per
    size): the three samples are those of eager sampling, and what was padded never comes out."""
    from flowar.sampling.batches import run_sampling
    model, _ = tiny_v1
    runner = _RecordingRunner("cpu", capture=True, buckets=(1, 2, 4))
    st = torch_engine_stages(model, 4, "cpu")
    sched = build_schedule(5, 4.3, 0.9, 5)
    with torch.no_grad():
        got = run_sampling(st, model.config, [3, 7, 1], sched, 9, runner=runner)
        want = run_sampling(EagerStages(model), model.config, [3, 7, 1], sched, 9)
    assert {k[0] for k in runner.graphs} == {4} and len(runner.workspaces) == 1
    assert got.tokens.shape[0] == 3 and (got.tokens - want.tokens).abs().max().item() <= 1e-4
    assert [runner.bucket(b) for b in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, 5]
