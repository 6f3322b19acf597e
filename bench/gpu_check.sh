#!/usr/bin/env bash
# One prepared check for a lent GPU machine (PyTorch with CUDA, no TensorRT, no network).
# Runs the gpu-marked tests and the FlowAR-S latency bench (random weights) at batch 1 and 32
# for eager, torch.compile and the CUDA-graph runtime, in fp32 and bf16 (autocast), and writes
# everything under $OUT.
# Budget: well under 8 minutes on an H200.
#   usage (device tool):  bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out/gpu}"
mkdir -p "$OUT"
PY="${PY:-python3}"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the package's sub-packages live in export/, engines/, runtime/: map them without installing
"$PY" - <<'PYEOF' > "$OUT/env.txt" 2>&1
import torch, platform
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print("python", platform.python_version())
PYEOF
cat "$OUT/env.txt"
"$PY" -m pip install -q --no-deps -e . > "$OUT/install.log" 2>&1 || echo "editable install failed (see install.log)"
timeout 150 "$PY" -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.txt" | tail -5
for dt in fp32 bf16; do
  sched=official; [ "$dt" = fp32 ] && sched=official,fast
  timeout 170 "$PY" bench/latency.py --preset flowar-s --batch 1,32 --backends eager,torch,compile,cudagraph \
      --schedules "$sched" --dtype "$dt" --repeat 3 --json "$OUT/flowar_s_$dt.json" --plot "$OUT/flowar_s_$dt.png" 2>&1 \
      | tee "$OUT/bench_$dt.txt" | tail -12
done
echo "done: $OUT"
