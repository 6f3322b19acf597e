"""A bounded load test of flowar-serve on loopback: N concurrent single-image requests against the
same N requests sent one at a time, p50 / p99 latency, images/s and the batch sizes formed.

    python bench/serve_load.py --requests 64                     # exports the default model, serves it
    python bench/serve_load.py --url http://127.0.0.1:8000       # against a running flowar-serve

Every request has its own deadline (--timeout), so the test ends by itself even if the server
does not answer; failed or timed-out requests are counted, never waited for.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def post(url: str, body: dict, timeout: float) -> tuple[int, float, dict | None]:
    """(HTTP status or 0 for no answer, seconds, JSON answer)."""
    t0 = time.perf_counter()
    req = urllib.request.Request(url + "/v1/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, time.perf_counter() - t0, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, time.perf_counter() - t0, None
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError):
        return 0, time.perf_counter() - t0, None


def get(url: str, path: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url + path, timeout=timeout) as r:
        return json.loads(r.read())


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def load(url: str, n: int, concurrency: int, timeout: float, seed0: int = 0) -> dict:
    bodies = [{"label": i % 10, "seed": seed0 + i} for i in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda b: post(url, b, timeout), bodies))
    wall = time.perf_counter() - t0
    ok = [s for code, s, _ in results if code == 200]
    return {"requests": n, "concurrency": concurrency, "ok": len(ok),
            "failed": sum(1 for code, _, _ in results if code not in (200, 0)),
            "no_answer": sum(1 for code, _, _ in results if code == 0), "wall_s": wall,
            "images_per_s": len(ok) / wall, "p50_s": percentile(ok, 0.5) if ok else None,
            "p99_s": percentile(ok, 0.99) if ok else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server; default: export the default model and serve it here")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--max-batch", type=int, default=16, help="engines' max batch (when this script serves)")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--json", default="bench/out/serve_load.json")
    a = ap.parse_args(argv)
    url = a.url
    tmp = None
    server = None
    if url is None:                           # the commands a user runs, each in its own process
        import subprocess
        bindir = Path(sys.executable).parent
        tmp = tempfile.TemporaryDirectory()
        eng = Path(tmp.name) / "engines"
        subprocess.run([str(bindir / "flowar-export"), "--ckpt", str(ROOT / "models/default/flowar.safetensors"),
                        "--vae", str(ROOT / "models/default/vae"), "--out", str(eng), "--max-batch", str(a.max_batch),
                        "--no-verify"], check=True, stdout=subprocess.DEVNULL)
        server = subprocess.Popen([str(bindir / "flowar-serve"), "--engine-dir", str(eng), "--port", str(a.port),
                                   "--threads", "2"], stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{a.port}"
        server.stderr.readline()              # "serving ... Ctrl-C stops": the replica is up
    try:
        health = get(url, "/health")
        load(url, 8, 8, a.timeout, seed0=10_000)                           # warm-up, not measured
        before = len(get(url, "/v1/stats")["batches"])
        concurrent = load(url, a.requests, a.requests, a.timeout)
        batches = get(url, "/v1/stats")["batches"][before:]
        sequential = load(url, a.requests, 1, a.timeout)
        out = {"server": health, "concurrent": concurrent, "sequential": sequential,
               "batches_formed_under_load": batches,
               "images_per_s_ratio": concurrent["images_per_s"] / sequential["images_per_s"]}
        for name in ("concurrent", "sequential"):
            r = out[name]
            print(f"{name:<10} {r['ok']}/{r['requests']} ok, {r['failed']} failed, {r['no_answer']} unanswered; "
                  f"{r['images_per_s']:.2f} images/s; latency p50 {r['p50_s']:.3f} s, p99 {r['p99_s']:.3f} s")
        print(f"batches formed under load: {batches}; dynamic batching gives {out['images_per_s_ratio']:.2f}x "
              "the images/s of sequential serving")
        from flowar.io.files import atomic_write_bytes
        atomic_write_bytes(a.json, lambda t: Path(t).write_text(json.dumps(out, indent=1)))
        return 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
