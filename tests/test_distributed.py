"""Beyond one process, on Ray: bulk sampling (flowar-sample) and the served endpoint (flowar-serve).

Ray runs here on loopback only, with usage stats off, no dashboard and 2 CPUs; every test that
starts it shuts it down. Request validation is tested without Ray.
"""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CKPT, VAE = ROOT / "models/default/flowar.safetensors", ROOT / "models/default/vae"
EXE = Path(sys.executable).parent
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

ray = pytest.importorskip("ray", reason="Ray is in the [serve] extra")


@pytest.fixture(scope="module")
def engines(default_auto_engines):
    """Exported with --precision auto: serve and bulk must run what auto chose, as flowar-run does."""
    return default_auto_engines


# ---- request validation (no Ray) ----------------------------------------------------------------

@pytest.mark.parametrize("body,status,needle", [
    (b"not json", 400, "a JSON object"),
    (b"[1, 2]", 400, "a JSON object"),
    (b'{"label": 3, "class": "cat"}', 422, "exactly one of label or class"),
    (b'{"label": 10}', 422, "label an integer in 0..9"),
    (b'{"label": true}', 422, "label an integer"),
    (b'{"class": "unicorn"}', 422, "a class name of this model (10 classes, e.g. bear"),
    (b'{"label": 1, "n": 0}', 422, "n an integer in 1..16"),
    (b'{"label": 1, "n": 17}', 422, "n an integer in 1..16"),
    (b'{"label": 1, "seed": -1}', 422, "seed an integer"),
    (b'{"label": 1, "schedule": "turbo"}', 422, "expected schedule one of official, fast"),
    (b'{"label": 1, "cfg": 99}', 422, "expected cfg in [1, 50]"),
    (b'{"label": 1, "steps": 1}', 422, "expected steps an integer in 2..1000"),
    (b'{"label": 1, "colour": "red"}', 422, "fields among"),
    (b'{"label": 1, "pad": "' + b"x" * 20000 + b'"}', 413, "at most 16384 bytes"),
])
def test_bad_requests_are_refused_with_the_status_and_one_line(body, status, needle):
    from flowar.commands.serve import RequestError, parse_generate
    names = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
    with pytest.raises(RequestError) as e:
        parse_generate(body, 10, names, 16)
    assert e.value.status == status and needle in str(e.value) and "\n" not in str(e.value)


def test_a_request_names_its_images_by_seed_and_index():
    from flowar.commands.serve import parse_generate
    items = parse_generate(b'{"class": "cat", "seed": 7, "n": 3, "schedule": "fast"}', 10, ["bear", "bird", "cat"], 16)
    assert [(i.label, i.seed, i.index) for i in items] == [(2, 7, 0), (2, 7, 1), (2, 7, 2)]
    from flowar.sampling.schedule import Settings
    assert items[0].settings == Settings(schedule="fast")


# ---- bulk sampling ---------------------------------------------------------------------------------

N = 12                                       # images per bulk run: 6 shards of 2, 3 of 4


def _sample(engines, out, workers, shard, n=N, wait=True):
    args = [str(EXE / "flowar-sample"), "--engine-dir", str(engines), "--num-images", str(n), "--out", str(out),
            "--shard-size", str(shard), "--workers", str(workers), "--seed", "3"]
    if not wait:
        return subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    proc = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_bulk_gives_the_same_bytes_for_any_worker_count_and_resumes_after_kill(engines, tmp_path):
    _sample(engines, tmp_path / "w2", 2, 4)
    z = np.load(tmp_path / "w2" / "samples.npz")
    assert z["arr_0"].shape == (N, 32, 32, 3) and z["arr_0"].dtype == np.uint8
    assert z["arr_1"].tolist() == [i % 10 for i in range(N)]                 # class-balanced
    assert len(list((tmp_path / "w2" / "png").rglob("*.png"))) == N
    assert len({z["arr_0"][i].tobytes() for i in range(N)}) == N            # N different images
    ran = json.loads((tmp_path / "w2" / "run.json").read_text())["engines"]
    assert len(ran) == 1 and ran[0].startswith("measured: auto: "), ran          # the engines auto chose
    # kill -9 the driver once some shards are written; the same command then completes the run
    out = tmp_path / "killed"
    proc = _sample(engines, out, 1, 2, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "shards").is_dir() and any((out / "shards").glob("*.npz")):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / "shards").glob("*.npz")))
    assert 0 < done_before < N // 2, done_before
    rerun = _sample(engines, out, 1, 2)
    import re
    kept = int(re.search(r"(\d+) kept from before", rerun.stdout).group(1))
    assert done_before <= kept < N // 2, (done_before, kept)         # (a worker may finish its shard after the kill)
    # one worker, shards of 2, killed and resumed: the bytes of two workers with shards of 4
    assert (out / "samples.npz").read_bytes() == (tmp_path / "w2" / "samples.npz").read_bytes()
    # another setting into the same folder is refused, not mixed in
    bad = subprocess.run([str(EXE / "flowar-sample"), "--engine-dir", str(engines), "--num-images", str(N), "--out",
                          str(out), "--shard-size", "2", "--seed", "4"], env=ENV, capture_output=True, text=True)
    assert bad.returncode == 2 and "seed" in bad.stderr and "Traceback" not in bad.stderr


# ---- the served endpoint ----------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout=60):
    req = urllib.request.Request(url + "/v1/generate", data=json.dumps(body).encode() if isinstance(body, dict)
                                 else body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:                                    # Serve's own error pages are plain text
            return e.code, {"raw": raw.decode(errors="replace")}
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError):
        return 0, None


def _get(url, path):
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return r.status, json.loads(r.read())


@pytest.fixture(scope="module")
def server(engines):
    from flowar.commands.serve import serve_forever
    port = _free_port()
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    serve_forever(str(engines), "127.0.0.1", port, 1, 16, 1, None, block=False)
    yield f"http://127.0.0.1:{port}"
    from ray import serve
    serve.shutdown()
    ray.shutdown()


def _png(b64):
    from PIL import Image
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(np.float64)


@pytest.mark.slow
def test_served_images_are_flowar_runs_and_bad_requests_leave_it_serving(server, engines, tmp_path):
    from click.testing import CliRunner
    from PIL import Image
    from flowar.commands.cli import run
    status, got = _post(server, {"label": 3, "seed": 5, "n": 2})
    assert status == 200 and got["labels"] == [3, 3] and got["seeds"] == [5, 5] and got["indices"] == [0, 1]
    res = CliRunner().invoke(run, ["--engine-dir", str(engines), "--labels", "3,3", "--seed", "5",
                                   "--save-images", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    for i in range(2):
        ref = np.array(Image.open(tmp_path / "run" / f"{i:06d}.png").convert("RGB"), float)
        mse = ((_png(got["images"][i]) - ref) ** 2).mean()
        assert mse == 0 or 10 * np.log10(255 ** 2 / mse) >= 40            # the same image, up to float rounding
    assert ((_png(got["images"][0]) - _png(got["images"][1])) ** 2).mean() > 100   # two samples, two images
    for body, code in ((b"nope", 400), ({"label": 99}, 422), ({"label": 1, "n": 1000}, 422)):
        status, answer = _post(server, body)
        assert status == code and answer["error"].startswith("expected"), (body, status, answer)
    status, health = _get(server, "/health")
    assert status == 200 and health["backend"] == "measured" and health["engines"].startswith("auto: "), health
    # 12 concurrent requests: batches larger than one form
    before = len(_get(server, "/v1/stats")[1]["batches"])
    threads = [threading.Thread(target=_post, args=(server, {"label": i % 10, "seed": i})) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    formed = _get(server, "/v1/stats")[1]["batches"][before:]
    assert sum(formed) == 12 and max(formed) > 1, formed


@pytest.mark.slow
def test_a_killed_replica_fails_or_retries_requests_never_hangs(server):
    results = []

    def client(i):
        t0 = time.time()
        results.append((_post(server, {"label": i % 10, "seed": 100 + i}, timeout=90)[0], time.time() - t0))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "FlowARService" in a["name"]]
    assert replicas, "no replica actor found"
    assert all("Controller" not in a["name"] and "Proxy" not in a["name"] for a in replicas), replicas
    for a in replicas:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=False)
    for t in threads:
        t.join(120)
    assert len(results) == 8 and all(not t.is_alive() for t in threads)
    assert all(code in (200, 500, 502, 503, 504) for code, _ in results), results   # answered, one way or another
    deadline = time.time() + 90                                       # and the service comes back by itself
    while time.time() < deadline:
        if _post(server, {"label": 1}, timeout=30)[0] == 200:
            break
        time.sleep(1)
    else:
        pytest.fail("the service did not come back after its replica was killed")
