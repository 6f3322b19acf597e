"""TrtEngine executed against a recording stand-in of the TensorRT runtime API (not TensorRT).

The stand-in implements exactly the calls TrtEngine makes (runtime, engine, execution context
with user-managed memory) and behaves like TensorRT where it matters here: it reads inputs from
and writes outputs to the raw addresses it was given, with the shapes set on the context, by
running the stage's reference module. So the sampler runs end to end through TrtEngine on the
CPU, and the test can see every call: contexts per profile, the profile chosen per scale, shapes
set on every call, addresses stable across calls, one shared scratch block, and failures.
"""

import ctypes

import numpy as np
import pytest
import torch

from flowar.errors import FlowARError
from flowar.export.specs import stage_specs
from flowar.runtime.engines import SharedDeviceMemory, TrtEngine
from flowar.runtime.stages import EngineStages, torch_engine_stages
from flowar.sampling.sampler import injected_noise, sample
from flowar.sampling.schedule import build_schedule

_CT = {torch.float32: ctypes.c_float, torch.int64: ctypes.c_int64}


def _at(address: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over memory at a raw address, as TensorRT would see it."""
    n = int(np.prod(shape)) if shape else 1
    buf = (_CT[dtype] * n).from_address(address)
    return torch.from_numpy(np.ctypeslib.as_array(buf)).view(shape)


class StandInContext:
    def __init__(self, engine, strategy):
        self.engine, self.strategy, self.calls = engine, strategy, []
        self.shapes, self.addresses, self.profile = {}, {}, None

    def set_optimization_profile_async(self, p, stream):
        self.calls.append(("profile", p))
        self.profile = p
        return p < self.engine.num_optimization_profiles

    def set_device_memory(self, ptr, size):
        self.calls.append(("memory", ptr, size))

    def set_input_shape(self, name, shape):
        self.calls.append(("shape", name, tuple(shape)))
        self.shapes[name] = tuple(shape)
        return not self.engine.fail.get("shape", False)

    def set_tensor_address(self, name, ptr):
        self.calls.append(("address", name, ptr))
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        self.calls.append(("execute", self.profile))
        if self.engine.fail.get("execute"):
            return False
        spec = self.engine.spec
        ins = [_at(self.addresses[n], self.shapes[n], spec.dtypes[n]) for n in spec.inputs]
        with torch.no_grad():
            out = self.engine.module(*ins)
        for n, t in zip(spec.outputs, out if isinstance(out, tuple) else (out,)):
            _at(self.addresses[n], tuple(t.shape), spec.dtypes[n]).copy_(t)
        return True


class StandInEngine:
    def __init__(self, module, spec, profiles, memory, fail):
        self.module, self.spec, self.num_optimization_profiles = module, spec, profiles
        self.device_memory_size_v2, self.fail, self.contexts = memory, fail, []

    def create_execution_context(self, strategy):
        ctx = StandInContext(self, strategy)
        self.contexts.append(ctx)
        return ctx


class StandInTensorRT:
    """The module TrtEngine is handed instead of ``tensorrt``: plans are files naming their stage."""

    class Logger:
        ERROR = 1

        def __init__(self, severity):
            pass

    class ExecutionContextAllocationStrategy:
        USER_MANAGED = "user-managed"

    def __init__(self, modules: dict, specs: dict, config, fail=None):
        self.modules, self.specs, self.config, self.fail = modules, specs, config, fail or {}
        self.engines = {}
        outer = self

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                name = data.decode()
                if outer.fail.get("load"):
                    return None
                profiles = outer.config.n_scales if outer.specs[name].per_scale else 1
                eng = StandInEngine(outer.modules[name], outer.specs[name], profiles,
                                    1000 * (1 + list(outer.specs).index(name)), outer.fail)
                outer.engines[name] = eng
                return eng
        self.Runtime = Runtime


def _stages(model, tmp_path, fail=None):
    c = model.config
    specs = stage_specs(c)
    trt = StandInTensorRT({n: s.module(model) for n, s in specs.items()}, specs, c, fail)
    shared = SharedDeviceMemory(torch.device("cpu"))
    engines = {}
    for n in specs:
        plan = tmp_path / f"{n}.plan"
        plan.write_text(n)
        engines[n] = TrtEngine(n, plan, trt, shared, stream=lambda: 0).__enter__()
    return EngineStages(engines, c, 2, torch.device("cpu"), specs), trt, shared


def _sample(stages, model, io):
    noise = injected_noise([io[f"sample25.noise{k}"] for k in range(5)])
    with torch.no_grad():
        return sample(stages, model.config, build_schedule(25, 4.3, 0.9, 5), torch.tensor([3, 7]), noise)[0]


def test_trt_engine_samples_what_the_reference_stages_sample(tiny_v1, tmp_path):
    model, io = tiny_v1
    got = _sample(_stages(model, tmp_path)[0], model, io)
    want = _sample(torch_engine_stages(model, 2, "cpu"), model, io)
    assert torch.equal(got, want)                     # same modules on the same inputs, through raw addresses


def test_one_context_per_profile_the_scales_profile_shapes_every_call_and_stable_addresses(tiny_v1, tmp_path):
    model, io = tiny_v1
    c = model.config
    stages, trt, shared = _stages(model, tmp_path)
    _sample(stages, model, io)
    first = {n: [list(ctx.calls) for ctx in eng.contexts] for n, eng in trt.engines.items()}
    _sample(stages, model, io)
    for name, eng in trt.engines.items():
        assert len(eng.contexts) == c.n_scales and all(x.strategy == "user-managed" for x in eng.contexts)
        for p, ctx in enumerate(eng.contexts):
            assert ctx.calls[0] == ("profile", p)
            runs = [x for x in ctx.calls if x[0] == "execute"]
            assert runs and all(r == ("execute", p) for r in runs)              # scale k runs on profile k
            shapes = [x for x in ctx.calls if x[0] == "shape"]
            assert len(shapes) == len(runs) * len(trt.specs[name].inputs)       # every input, every call
            tokens = c.tokens_per_scale[p]
            for _, n, shape in shapes:
                if n in ("x", "cond", "c"):
                    assert shape[1] == tokens, (name, p, n, shape)
            # the second sampling binds the same addresses as the first
            addr = lambda calls: {(x[1], x[2]) for x in calls if x[0] == "address"}   # noqa: E731
            assert addr(ctx.calls[len(first[name][p]):]) == addr(first[name][p])
    velocity_rows = {x[2][0] for ctx in trt.engines["velocity"].contexts for x in ctx.calls
                     if x[0] == "shape" and x[1] == "x"}
    assert velocity_rows == {2, 4}                    # B rows where guidance cannot act, 2B elsewhere
    mem = {x[1:] for eng in trt.engines.values() for ctx in eng.contexts for x in ctx.calls if x[0] == "memory"}
    assert mem == {(shared.ptr(), 3000)}              # one block, the largest stage's size, for every stage


@pytest.mark.parametrize("fail,needle", [({"load": True}, "load the plan"),
                                         ({"shape": True}, "accept labels of shape"),
                                         ({"execute": True}, "run at scale 0")])
def test_tensorrt_failures_are_one_line_errors(tiny_v1, tmp_path, fail, needle):
    model, io = tiny_v1
    with pytest.raises(FlowARError) as e:
        _sample(_stages(model, tmp_path, fail)[0], model, io)
    msg = str(e.value)
    assert needle in msg and "ar" in msg and "\n" not in msg and msg.startswith("expected TensorRT to")
