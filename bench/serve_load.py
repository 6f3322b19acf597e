"""A served replica under load and overload, measured from outside, as clients see it.

    python bench/serve_load.py --engine-dir DIR [--threads 2] [--lanes N] [--queue N] [--json bench/out/serve_load.json]

Starts ``flowar-serve --engine-dir DIR`` (one replica, loopback) in its own process and, against
the in-process rate of the same engines (``flowar-run --engine-dir DIR`` sampling eight images
one at a time in one process), measures:

* the replica's start (process start to ``/health`` answering, and what the replica reports);
* 16 requests one after another: latency p50/p99, images/s;
* 16 requests at once: images/s, the first answer's latency, the batch sizes formed (``/metrics``);
* two bursts of 48 requests at once, each with a 60 s client deadline (sent as ``timeout_s``): how
  many got 200, 503 (the replica's for its queue or for the deadline, or Serve's) and
  no answer within the deadline, ``/health``'s latency during each burst, and the memory of the
  serve process tree (resident, all its processes) before, after the first and after the second;
* ``/metrics`` parsed by prometheus_client, its counters against the requests sent;
* the in-process rate again after the server has stopped (this host's speed drifts within
  minutes), and the sequential and concurrent ratios to the mean of both.

Writes the figures as JSON (``--json``) and a chart beside it (``--chart``): each request of each
phase a line from when it was sent to when its answer came, coloured by what came.

Without ``--engine-dir`` the shipped default model is exported first (its time is mostly overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def request(url: str, path: str, body: dict | None = None, timeout: float = 120.0) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    # the token flowar-serve takes from the environment it inherits, sent as every client would (without it
    # every request was a 401 and the run reported 0 answered, with no word why)
    token = os.environ.get("FLOWAR_SERVE_TOKEN")
    req = urllib.request.Request(url + path, data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"} | (
                                     {"Authorization": f"Bearer {token.strip()}"} if token else {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if path != "/metrics" else raw.decode())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())          # the replica's one-line error
        except ValueError:
            return e.code, None                          # Ray Serve's own answer (its router's backpressure)
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError):
        return 0, None                                    # no answer within the deadline


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def load(url: str, n: int, concurrency: int, timeout: float, seed0: int = 0, tell: bool = False,
         classes: int = 10) -> dict:
    """n single-image requests, ``concurrency`` at a time; latencies and codes. ``tell``: each
    request carries the client's deadline (``timeout_s``), as a client with one would send it."""
    results: list[tuple[int, float, float, bool]] = []      # (status, seconds, finished at, the replica answered)
    lock, t_start = threading.Lock(), time.perf_counter()
    queue, sent = list(range(n)), []

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop(0)
            t0 = time.perf_counter()
            body = {"label": i % classes, "seed": seed0 + i} | ({"timeout_s": timeout} if tell else {})
            # told its deadline, the server answers by then (a 504 at the latest): a few seconds more
            # for that answer to arrive, so that it is counted as what it is, not as no answer
            status, body = request(url, "/v1/generate", body, timeout + 5 if tell else timeout)
            with lock:
                results.append((status, time.perf_counter() - t0, time.perf_counter() - t_start, body is not None,
                                "within the request's deadline" in str(body)))
                sent.append(t0 - t_start)
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    ok = [s for code, s, *_ in results if code == 200]
    return {"requests": n, "concurrency": concurrency, "ok": len(ok),
            "refused_503": sum(c == 503 for c, *_ in results),
            "refused_503_by_replica": sum(c == 503 and mine for c, _, _, mine, _ in results),
            "refused_503_for_the_deadline": sum(c == 503 and late for c, *_, late in results),
            "other": sorted({c for c, *_ in results} - {200, 503, 0}), "no_answer": sum(c == 0 for c, *_ in results),
            "wall_s": wall, "images_per_s": len(ok) / wall, "p50_s": percentile(ok, 0.5), "p99_s": percentile(ok, 0.99),
            "first_answer_s": min((done for code, _, done, *_ in results if code == 200), default=None),
            "slowest_answer_s": max((s for _, s, *_ in results), default=None),
            # per request: sent and answered (seconds since the phase began), and what came
            "timeline": [(round(t, 3), round(done, 3), _kind(code, mine, late))
                         for t, (code, _, done, mine, late) in zip(sent, results)]}


def _kind(code: int, mine: bool, late: bool) -> str:
    if code == 200:
        return "200"
    if code == 503:
        return "503 deadline" if late else "503 queue" if mine else "503 Serve"
    return "no answer" if code == 0 else str(code)


COLORS = {"200": "#2a9d43", "503 deadline": "#e08a1e", "503 queue": "#c9b21a", "503 Serve": "#8a8a8a",
          "no answer": "#d62728"}


def chart(out: dict, path: str) -> None:
    """One panel per phase: each request a line from when it was sent to when its answer came
    (an unanswered one: to the client's deadline), coloured by what came."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    phases = [(f"{out['sequential']['requests']} one after another", out["sequential"]),
              (f"{out['concurrent']['requests']} at once", out["concurrent"])] + [
        (f"burst {i + 1}: {b['requests']} at once, {out['deadline_s']:.0f} s deadline", b)
        for i, b in enumerate(out.get("bursts", []))]
    fig, axes = plt.subplots(len(phases), 1, figsize=(9, 2.1 * len(phases) + 0.8), squeeze=False)
    for ax, (title, r) in zip(axes[:, 0], phases):
        rows = sorted(r["timeline"], key=lambda x: (round(x[0]), x[1]))      # by when sent (to the second), then answered
        for y, (t0, t1, kind) in enumerate(rows):
            ax.plot([t0, t1], [y, y], color=COLORS.get(kind, "black"), lw=2.2, solid_capstyle="butt")
            ax.plot([t1], [y], marker="|", color=COLORS.get(kind, "black"), ms=5)
        if title.startswith("burst"):
            ax.axvline(out["deadline_s"], color="black", ls="--", lw=0.8)
        counts = {k: sum(1 for *_, kind in rows if kind == k) for k in COLORS}
        ax.set_title(f"{title}: " + ", ".join(f"{n} x {k}" for k, n in counts.items() if n), fontsize=9, loc="left")
        ax.set_ylabel("request", fontsize=8)
        ax.set_ylim(-1, len(rows))
        ax.tick_params(labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since the phase began (a line: sent -> answered)", fontsize=8)
    handles = [plt.Line2D([], [], color=c, lw=3, label=k) for k, c in COLORS.items()]
    # (two lines: on one, a long CPU name ran the title off the figure)
    fig.suptitle(f"flowar-serve, one replica: each request from sent to answered\n{out['cpu']}, {out['threads']} cores, "
                 f"{out['in_process_s_per_image']:.2f} s per image in-process", fontsize=10, x=0.01, y=0.995, ha="left")
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.01, 0.955), ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def tree_rss_gb(pid: int) -> float:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return total / 1e9


def metric(text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def in_process_rate(engine_dir: str, threads: int | None, classes: int = 10) -> float:
    """Seconds per image of flowar-run sampling eight images one at a time in one process."""
    import re
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([str(BIN / "flowar-run"), "--engine-dir", engine_dir, "--labels",
                               ",".join(str(i % classes) for i in range(8)), "--batch", "1", "--save-images", tmp]
                              + (["--threads", str(threads)] if threads else []), capture_output=True, text=True)
    if done.returncode != 0:                  # (flowar-run's own line: it was lost in a CalledProcessError traceback)
        raise SystemExit(f"flowar-run --engine-dir {engine_dir} failed: {done.stderr.strip().splitlines()[-1:]}")
    return float(re.search(r"sampled .* in ([0-9.]+) s", done.stdout).group(1)) / 8


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine-dir", help="an engine directory (with a VAE) [default: export the default model]")
    ap.add_argument("--threads", type=int, default=None, help="cores of the replica (and of the in-process run)")
    ap.add_argument("--lanes", type=int, default=None, help="flowar-serve --lanes [default: its own]")
    ap.add_argument("--queue", type=int, default=None, help="flowar-serve --queue [default: its own]")
    ap.add_argument("--sequential", type=int, default=16)
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--burst", type=int, default=48)
    ap.add_argument("--deadline", type=float, default=60.0, help="client deadline of a burst's requests")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--json", default="bench/out/serve_load.json")
    ap.add_argument("--chart", default=None, help="the timeline chart (PNG) [default: beside --json]")
    a = ap.parse_args(argv)
    from flowar.io.files import check_writable          # (before minutes of serving, not after them)
    check_writable(a.json, False, "--json")
    check_writable(a.chart, False, "--chart")
    if min(a.sequential, a.concurrent, a.burst) < 1 or not a.deadline > 0 or (a.threads is not None and a.threads < 1):
        raise SystemExit("error: expected --sequential, --concurrent, --burst and --threads >= 1 and --deadline > 0; "
                         f"got {a.sequential} / {a.concurrent} / {a.burst} / {a.threads} / {a.deadline}")
    tmp = tempfile.TemporaryDirectory()
    engine_dir = a.engine_dir
    if engine_dir is None:
        engine_dir = str(Path(tmp.name) / "engines")
        subprocess.run([str(BIN / "flowar-export"), "--ckpt", str(ROOT / "models/default/flowar.safetensors"),
                        "--vae", str(ROOT / "models/default/vae"), "--out", engine_dir, "--no-verify"], check=True,
                       stdout=subprocess.DEVNULL)
    from flowar.export.manifest import read_manifest
    try:
        classes = read_manifest(engine_dir).config.num_classes      # (the requests' labels cycle through them)
    except Exception as e:   # noqa: BLE001 - one line
        raise SystemExit(f"error: {e}") from None
    per_image = in_process_rate(engine_dir, a.threads, classes)
    print(f"in-process: {per_image:.3f} s per image (flowar-run, eight images one at a time)", flush=True)
    if a.port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            a.port = s.getsockname()[1]
    url = f"http://127.0.0.1:{a.port}"
    t0 = time.perf_counter()
    server = subprocess.Popen([str(BIN / "flowar-serve"), "--engine-dir", engine_dir, "--port", str(a.port)]
                              + (["--threads", str(a.threads)] if a.threads else [])
                              + (["--lanes", str(a.lanes)] if a.lanes else [])
                              + (["--queue", str(a.queue)] if a.queue else []),
                              env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
                              stdout=subprocess.DEVNULL, stderr=open(Path(tmp.name) / "serve.log", "w"),
                              start_new_session=True)      # (its stderr kept: why it did not come up)
    from flowar.engines.cpu import cpu_record
    from flowar.engines.ort import cpu_threads
    out: dict = {"engine_dir": engine_dir, **cpu_record(), "threads": a.threads or cpu_threads(),
                 "in_process_s_per_image": per_image, "deadline_s": a.deadline}
    try:
        while request(url, "/health", timeout=5)[0] != 200:
            if server.poll() is not None or time.perf_counter() - t0 > 600:
                said = (Path(tmp.name) / "serve.log").read_text().strip().splitlines()
                raise SystemExit(f"flowar-serve did not come up: {said[-1] if said else 'nothing said'}")
            time.sleep(0.5)
        out["start_s"] = time.perf_counter() - t0
        out["health"] = request(url, "/health")[1]
        out["rss_gb_start"] = tree_rss_gb(server.pid)
        print(f"replica ready in {out['start_s']:.1f} s (its engines opened in {out['health']['start_seconds']:.1f} s, "
              f"{out['health'].get('lanes', 1)} lane(s)); "
              f"{out['rss_gb_start']:.2f} GB resident", flush=True)
        request(url, "/v1/generate", {"label": 0, "seed": 10_000})                 # the first image: not measured
        m0 = request(url, "/metrics")[1]
        out["sequential"] = load(url, a.sequential, 1, 600, seed0=100, classes=classes)
        out["concurrent"] = load(url, a.concurrent, a.concurrent, 600, seed0=200, classes=classes)
        m1 = request(url, "/metrics")[1]
        rep = out["health"]["replica"]
        out["concurrent"]["batches_formed"] = metric(m1, "flowar_batch_size_count", replica=rep) - metric(
            m0, "flowar_batch_size_count", replica=rep) - out["sequential"]["ok"]
        for name in ("sequential", "concurrent"):
            r = out[name]
            if not r["ok"]:                   # (no answer to time: it stopped on formatting None)
                print(f"{name:<10} 0/{r['requests']} ok: {r}", flush=True)
                continue
            print(f"{name:<10} {r['ok']}/{r['requests']} ok; {r['images_per_s']:.3f} images/s "
                  f"({r['images_per_s'] * per_image:.2f}x in-process); p50 {r['p50_s']:.2f} s "
                  f"({r['p50_s'] / per_image:.2f}x in-process per image), p99 {r['p99_s']:.2f} s; "
                  f"first answer after {r['first_answer_s']:.2f} s", flush=True)
        bursts = []
        for b in range(2):
            probe: list[float] = []

            def health_probe():
                time.sleep(2.0)
                t = time.perf_counter()
                request(url, "/health", timeout=30)
                probe.append(time.perf_counter() - t)
            h = threading.Thread(target=health_probe)
            h.start()
            r = load(url, a.burst, a.burst, a.deadline, seed0=1000 * (b + 1), tell=True, classes=classes)
            h.join()
            time.sleep(2.0)
            r |= {"health_s": probe[0] if probe else None, "rss_gb_after": tree_rss_gb(server.pid),
                  "computable_in_deadline": a.deadline / per_image}
            bursts.append(r)
            print(f"burst {b + 1}: {a.burst} at once, {a.deadline:.0f} s deadline: {r['ok']} answered 200 (of "
                  f"{r['computable_in_deadline']:.0f} computable in the deadline in-process), "
                  f"{r['refused_503']} refused 503 ({r['refused_503_by_replica']} by the replica, "
                  f"{r['refused_503_for_the_deadline']} of them for the deadline; the rest by Serve), "
                  f"{r['no_answer']} without an answer, other {r['other']}; slowest "
                  f"{r['slowest_answer_s']:.1f} s; /health in {r['health_s']:.2f} s; {r['rss_gb_after']:.2f} GB resident",
                  flush=True)
        out["bursts"] = bursts
        text = request(url, "/metrics")[1]
        sent_ok = 1 + out["sequential"]["ok"] + out["concurrent"]["ok"] + sum(x["ok"] for x in bursts)
        out["metrics"] = {"requests_200": metric(text, "flowar_requests_total", replica=rep, status="200"),
                          "requests_503": metric(text, "flowar_requests_total", replica=rep, status="503"),
                          "sent_200": sent_ok, "sent_503": sum(x["refused_503"] for x in bursts),
                          "sent_503_refused_by_the_replica": sum(x["refused_503_by_replica"] for x in bursts)}
        print(f"/metrics: {out['metrics']}", flush=True)
    finally:
        server.terminate()                  # SIGTERM to the command alone, as Kubernetes and systemd send it
        try:
            server.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        out["exit_code"] = server.returncode
        # the host drifts within minutes: the rate again, the ratios to the mean of both
        if "concurrent" in out and out["sequential"]["p50_s"] and out["concurrent"]["images_per_s"]:
            after = out["in_process_s_per_image_after"] = in_process_rate(engine_dir, a.threads, classes)
            mean = (per_image + after) / 2
            out["vs_mean_in_process"] = {"sequential_p50": out["sequential"]["p50_s"] / mean,
                                         "concurrent_rate": out["concurrent"]["images_per_s"] * mean,
                                         "first_answer_vs_sequential_p50": out["concurrent"]["first_answer_s"]
                                         / out["sequential"]["p50_s"]}
            v = out["vs_mean_in_process"]
            print(f"in-process again: {after:.3f} s per image; against the mean of both ({mean:.3f} s): sequential "
                  f"p50 {v['sequential_p50']:.2f}x the time per image, {a.concurrent} at once "
                  f"{v['concurrent_rate']:.2f}x the rate, first answer "
                  f"{v['first_answer_vs_sequential_p50']:.2f}x the sequential p50", flush=True)
        tmp.cleanup()
    from flowar.io.files import atomic_write_bytes
    atomic_write_bytes(a.json, lambda t: Path(t).write_text(json.dumps(out, indent=1)))
    print(f"JSON -> {a.json}; flowar-serve exited {out['exit_code']} on SIGTERM")
    if "bursts" in out:
        png = a.chart or str(Path(a.json).with_suffix(".png"))
        atomic_write_bytes(png, lambda t: chart(out, t))
        print(f"chart -> {png}")
    return 0


if __name__ == "__main__":
    from flowar.errors import run_script
    run_script(main)
