"""One velocity call of a preset at its last scale (the work that dominates an image), on every
engine this machine has: time per call and error relative to eager float32.

    python bench/velocity_engines.py --preset flowar-s [--rows 2] [--repeat 7]

Engines: eager fp32; eager with weights and activations in bf16; ``torch-bf16`` (bf16 GEMMs,
float32 around them: what --precision auto|bf16 runs); bf16 autocast; ONNX Runtime fp32 on the
exported graph; OpenVINO fp32 and bf16 on the same graph when ``openvino`` is installed (it is
not a dependency), with a check of what its compiled graph gives when a second set of shapes
follows the first (scale 2 after scale 1, as in the sampler). Random weights of trained scale
(bench/standins.py), so the errors are indicative, not a verdict on a real checkpoint.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="flowar-s")
    ap.add_argument("--rows", type=int, default=2, help="rows of the call (2 = one guided sample)")
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from standins import flowar_state_dict
    from torch.utils.flop_counter import FlopCounterMode

    from flowar.config import get_preset
    from flowar.engines.cpu import cpu_kind, describe
    from flowar.export.onnx_export import Reduced, export_stage
    from flowar.export.specs import sample_inputs, stage_specs
    from flowar.model.ar import FlowAR
    from flowar.runtime.bf16 import bf16_gemms
    from flowar.eval.quality import relative_error
    c = get_preset(a.preset)
    model = FlowAR(c)
    model.load_state_dict(flowar_state_dict(a.preset))
    model.eval()
    spec = stage_specs(c)["velocity"]
    mod = spec.module(model, None)
    k = c.n_scales - 1
    ins = sample_inputs(spec, c, k, a.rows, torch.Generator().manual_seed(0))
    args = tuple(ins[n] for n in spec.inputs)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        ref = mod(*args)
    print(f"# {a.preset} velocity, {a.rows} rows x {c.tokens_per_scale[k]} tokens, {fc.get_total_flops() / 1e9:.1f} "
          f"GFLOP per call; {describe(cpu_kind())}, {torch.get_num_threads()} threads")
    rows = []

    def report(name: str, fn) -> None:
        with torch.no_grad():
            out = fn()
            t = _timed(fn, a.repeat)
        rows.append((name, t, relative_error(torch.as_tensor(out).float(), ref)))
        print(f"  {name:<34} {t * 1e3:8.1f} ms   rel rms error {rows[-1][2]:.4f}", flush=True)

    report("eager fp32", lambda: mod(*args))
    reduced = Reduced(mod, torch.bfloat16, tuple(spec.inputs)).eval()
    report("eager, weights and activations bf16", lambda: reduced(*args))
    gemms = bf16_gemms(mod)
    report("torch-bf16 (bf16 GEMMs, fp32 around)", lambda: gemms(*args))

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return mod(*args).float()
    report("eager under bf16 autocast", autocast)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "velocity.onnx"
        export_stage(spec, mod, c, path, 2 * 8)
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feed = {n: ins[n].numpy() for n in spec.inputs}
        report("ONNX Runtime fp32", lambda: torch.from_numpy(sess.run(None, feed)[0]))
        try:
            import openvino as ov
        except ImportError:
            print("  (OpenVINO not installed: pip install openvino to measure it)")
            return 0
        core = ov.Core()
        for prec in ("f32", "bf16"):
            cm = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": prec,
                                                       "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                                       "PERFORMANCE_HINT": "LATENCY"})
            req = cm.create_infer_request()
            report(f"OpenVINO {prec}", lambda: torch.from_numpy(req.infer(feed)[0].copy()))
            # shapes as the sampler meets them: one compiled graph, scale after scale
            worst = 0.0
            for kk in range(c.n_scales):
                small = sample_inputs(spec, c, kk, a.rows, torch.Generator().manual_seed(kk))
                with torch.no_grad():
                    want = mod(*(small[n] for n in spec.inputs))
                got = torch.from_numpy(cm.create_infer_request().infer({n: small[n].numpy() for n in spec.inputs})[0])
                worst = max(worst, relative_error(got, want))
            print(f"    OpenVINO {prec}, scales in turn on one compiled graph: worst rel rms error {worst:.4f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flowar.errors import run_script
    run_script(main)
