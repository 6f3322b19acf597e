#!/usr/bin/env bash
# One prepared check for a lent GPU machine (PyTorch with CUDA, possibly no TensorRT, no network).
#   usage (device tool):  bash bench/gpu_check.sh        -> everything under $OUT (default bench/out/gpu)
# 1. the gpu-marked tests (CUDA-graph runner vs eager tokens, official parity on the GPU);
# 2. FlowAR-S (random weights, perturbed) at batch 1 and 32: eager, torch and the CUDA-graph runtime in
#    fp32 and bf16 autocast, every row with its token difference to eager (parity) beside its time;
# 3. torch.compile at batch 1 and 32 in fp32 (its compile time reported apart);
# 4. the pipeline as users call it (bench/gpu_pipeline.py): CUDA-graph replay against eager for every
#    schedule, fp32 and bf16 (bf16 GEMMs), batch 1 and 8, tokens compared, ms per image;
# 5. summary.json: ms per image, ratio to eager and token difference per (dtype, backend, batch).
# Each part has its own time limit, so a slow part loses only its own figures; the whole stays
# under 9 minutes (about 20 s + 90 s + 2 x 100 s + 120 s + 90 s = 520 s, plus start-up).
#
# What comes back: the device tool returns at most 8 files from $OUT, and the parts write ~15, so
# they are written to a scratch folder and $OUT gets gpu_check.tgz (every file, re-packed after each
# part, so a run stopped at its limit still returns the parts that finished) beside env.txt,
# gpu_tests.txt, summary.txt and summary.json. The device call (its python3 holds CUDA PyTorch):
#   run(command="PYTHONUNBUFFERED=1 PY=python3 timeout 560 bash bench/gpu_check.sh", timeout_s=590)
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-bench/out/gpu}"
mkdir -p "$DEST"
OUT="$(mktemp -d)"                # every part's files; packed into $DEST after each part
trap 'rm -rf "$OUT"' EXIT
summarize() {     # summary.json / summary.txt from the parts so far (written at every pack: a run stopped at
                  # its limit still returns them)
"$PY" - "$OUT" <<'PYEOF' 2>&1 > "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for f in sorted(out.glob("flowar_s_*.json")):
    d = json.loads(f.read_text())
    for r in d["results"]:
        if r["median_s"] == r["median_s"]:
            rows.append({"file": f.name, "dtype": d["dtype"], "backend": r["backend"], "batch": r["batch"],
                         "ms_per_image": 1e3 * r["median_s"] / r["batch"], "vs_eager": r["speedup_vs_eager"],
                         "max_abs_diff_vs_eager": r["max_abs_diff_vs_eager"], "parity_ok": r["parity_ok"],
                         "build_s": r["build_s"]})
(out / "summary.json").write_text(json.dumps({"rows": rows}, indent=1))
for r in rows:
    print(f"{r['dtype']:<5} {r['backend']:<10} batch {r['batch']:<3} {r['ms_per_image']:9.2f} ms/image  "
          f"x{r['vs_eager'] or 0:6.2f} vs eager  max|dtokens| {r['max_abs_diff_vs_eager']:.1e}  ok {r['parity_ok']}")
PYEOF
}
pack() {
  summarize
  tar czf "$DEST/gpu_check.tgz.part" -C "$OUT" . && mv "$DEST/gpu_check.tgz.part" "$DEST/gpu_check.tgz"
  for f in env.txt gpu_tests.txt summary.txt summary.json; do [ -f "$OUT/$f" ] && cp "$OUT/$f" "$DEST/"; done
  return 0
}
PY="${PY:-python3}"
PRESET="${PRESET:-flowar-s}" BATCHES="${BATCHES:-1,32}"     # e.g. PRESET=tiny BATCHES=1,2 for a dry run on a CPU
export HF_HUB_OFFLINE=1
# the official fixtures for the parity tests: carried into bench/out/fixtures (the device has no ../shared), e.g.
#   cp ../shared/fixtures/official/* bench/out/fixtures/   and   run(..., carry=["bench/out/fixtures"])
[ -d bench/out/fixtures ] && export FLOWAR_FIXTURES="${FLOWAR_FIXTURES:-$PWD/bench/out/fixtures}"
"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/env.txt"
import platform, torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None, "python", platform.python_version())
PYEOF
"$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || echo "editable install failed (see install.log)"
timeout 90 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu_tests.txt" | tail -5
pack
for dt in fp32 bf16; do
  timeout 100 "$PY" bench/latency.py --preset "$PRESET" --batch "$BATCHES" --backends eager,cached,cudagraph \
      --dtype "$dt" --repeat 3 --json "$OUT/flowar_s_$dt.json" --plot "$OUT/flowar_s_$dt.png" 2>&1 \
      | tee "$OUT/bench_$dt.txt" | tail -8
  pack
done
if [ "${COMPILE:-1}" = 1 ]; then       # COMPILE=0 skips this part (120 s)
  timeout 120 "$PY" bench/latency.py --preset "$PRESET" --batch "$BATCHES" --backends eager,compile --repeat 3 \
      --json "$OUT/flowar_s_compile.json" --plot "" 2>&1 | tee "$OUT/bench_compile.txt" | tail -6
  pack
fi
timeout 90 "$PY" bench/gpu_pipeline.py --preset "$PRESET" --batch 1,8 --out "$OUT/pipeline.json" 2>&1 \
    | tee "$OUT/pipeline.txt" | tail -10
pack
cat "$OUT/summary.txt"
echo "done: $DEST (gpu_check.tgz holds every part's files: tar xzf $DEST/gpu_check.tgz)"
