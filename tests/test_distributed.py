"""Beyond one process, on Ray: bulk sampling (flowar-sample) and the served endpoint (flowar-serve).

Ray runs here on loopback only, with usage stats off, no dashboard and 2 CPUs; every test that
starts it shuts it down. Request validation is tested without Ray.
"""

import base64
import http.client
import io
import json
import os
import re
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


# ---- bulk sampling ---------------------------------------------------------------------------------

N = 12                                       # images per bulk run: 6 shards of 2, 3 of 4


def _sample(engines, out, workers, shard, n=N, wait=True, more=()):
    args = [str(EXE / "flowar-sample"), "--engine-dir", str(engines), "--num-images", str(n), "--out", str(out),
            "--shard-size", str(shard), "--workers", str(workers), "--seed", "3", *more]
    if not wait:
        return subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    proc = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def w2(engines, tmp_path_factory):
    """(folder, the run) of N images on two workers, shards of 4, in batches of 2: what other runs must equal."""
    out = tmp_path_factory.mktemp("bulk") / "w2"
    return out, _sample(engines, out, 2, 4, more=("--batch", "2"))


@pytest.mark.slow
def test_bulk_gives_the_same_bytes_for_any_worker_count_and_resumes_after_kill(engines, w2, tmp_path):
    first, w2 = w2
    import re
    assert re.search(r"sampling: 12/12 images, [0-9.]+ images/s at batch 2, 0.0 min left", w2.stderr), w2.stderr
    z = np.load(first / "samples.npz")
    assert z["arr_0"].shape == (N, 32, 32, 3) and z["arr_0"].dtype == np.uint8
    assert z["arr_1"].tolist() == [i % 10 for i in range(N)]                 # class-balanced
    assert len(list((first / "png").rglob("*.png"))) == N
    assert len({z["arr_0"][i].tobytes() for i in range(N)}) == N            # N different images
    run = json.loads((first / "run.json").read_text())
    ran = run["engines"]
    assert len(ran) == 1 and ran[0].startswith("auto: "), ran          # the engines auto chose, as flowar-run names them
    [tp] = run["throughput"]
    assert tp["images"] == N and tp["batch"] == [2] and tp["images_per_s"] > 0, tp
    from flowar.runtime.runtime import Runtime
    plan = json.loads((engines / "manifest.json").read_text())["call_plan"]["per_image"]
    with Runtime.open(engines) as rt:                      # without --batch: the best images/s measured at export
        assert rt.batch == int(min(plan, key=plan.get)), (rt.batch, plan)
    # kill -9 the driver once some shards are written; the same command then completes the run
    out = tmp_path / "killed"
    proc = _sample(engines, out, 1, 2, wait=False, more=("--batch", "2"))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "shards").is_dir() and any((out / "shards").glob("*.npz")):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / "shards").glob("*.npz")))
    assert 0 < done_before < N // 2, done_before
    rerun = _sample(engines, out, 1, 2, more=("--batch", "2"))
    kept = int(re.search(r"\((\d+) of them kept from before\)", rerun.stdout).group(1))
    assert done_before <= kept < N // 2, (done_before, kept)         # (a worker may finish its shard after the kill)
    assert "at batch 2" in rerun.stdout and len(json.loads((out / "run.json").read_text())["throughput"]) == 1
    # one worker, shards of 2, killed and resumed: the bytes of two workers with shards of 4 (both in batches
    # of 2; another batch size differs by float rounding: tests/test_default_model.py)
    assert (out / "samples.npz").read_bytes() == (first / "samples.npz").read_bytes()
    # another setting into the same folder is refused, not mixed in
    bad = subprocess.run([str(EXE / "flowar-sample"), "--engine-dir", str(engines), "--num-images", str(N), "--out",
                          str(out), "--shard-size", "2", "--seed", "4"], env=ENV, capture_output=True, text=True)
    assert bad.returncode == 2 and "seed" in bad.stderr and "Traceback" not in bad.stderr
    big = subprocess.run([str(EXE / "flowar-sample"), "--engine-dir", str(engines), "--num-images", "2", "--out",
                          str(tmp_path / "big"), "--batch", "999"], env=ENV, capture_output=True, text=True)
    assert big.returncode == 2 and "--batch in 1.." in big.stderr and "Traceback" not in big.stderr, big.stderr
    # shards sampled by other engines (a run resumed on another CPU kind, where the directory's bf16 engines
    # fall back to fp32, or on mixed nodes) are not joined into one run's samples.npz: they were, exit 0
    shard = out / "shards" / "00000.npz"
    with np.load(shard) as z:
        assert str(z["engines"].reshape(-1)[0]) == ran[0]                                   # each shard says what made it
        np.savez(shard.with_name("x.npz"), **{k: z[k] for k in z.files} | {"engines": np.asarray("ort: elsewhere")})
    os.replace(shard.with_name("x.npz"), shard)
    (out / "samples.npz").unlink()
    mixed = subprocess.run([str(EXE / "flowar-sample"), "--engine-dir", str(engines), "--num-images", str(N), "--out",
                            str(out), "--shard-size", "2", "--seed", "3", "--batch", "2"], env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert mixed.returncode == 2 and "shards [0] by ort: elsewhere" in mixed.stderr and not (out / "samples.npz").exists(), \
        mixed.stderr


def _session_alive(sid: int) -> list[str]:
    """The processes of a session (the command and every process Ray started for it)."""
    ps = subprocess.run(["ps", "-eo", "sid=,pid=,comm="], capture_output=True, text=True).stdout.splitlines()
    return [ln for ln in ps if ln.split() and ln.split()[0] == str(sid)]


def _reap(proc, wait_s=15) -> list[str]:
    """The processes of ``proc``'s session still alive ``wait_s`` seconds after ``proc`` ended (at
    once, without waiting, if it has not ended: a test that failed), then ``proc`` and its whole
    session killed, so that nothing outlives the test."""
    deadline = time.time() + wait_s
    while proc.poll() is not None and _session_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    left = _session_alive(proc.pid)
    if proc.poll() is None:
        proc.kill()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return left


@pytest.mark.slow
def test_bulk_samples_on_a_cluster_that_ray_start_started_by_its_address(engines, w2, tmp_path):
    """`ray start --head` (token authentication on, Ray's default), then flowar-sample --ray-address
    HOST:PORT: the same images as a local run; and a local run meanwhile starts a cluster of its own
    beside that one (two images, the first two of the local run's).
    (Before: refused by the cluster, "token is missing", and reported as a path error; "auto"
    worked; and a local run joined the running cluster and failed.) A HOME of its own holds the token."""
    env = {k: v for k, v in ENV.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))} | {"HOME": str(tmp_path)}
    # a token in HOME (as any local Ray start leaves one, flowar-serve's too): `ray start` then requires it
    subprocess.run([str(EXE / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    port = _free_port()
    head = subprocess.Popen([str(EXE / "ray"), "start", "--head", "--port", str(port), "--num-cpus", "2",
                             "--include-dashboard", "false", "--node-ip-address", "127.0.0.1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert head.wait(timeout=120) == 0, head.stderr.read()[-2000:]
        log = tmp_path / "cluster.err"                     # (a file: a pipe left unread while the local run goes)
        with open(log, "w") as f:
            proc = subprocess.Popen([str(EXE / "flowar-sample"), "--engine-dir", str(engines), "--num-images", str(N),
                                     "--out", str(tmp_path / "cluster"), "--shard-size", "4", "--workers", "2",
                                     "--seed", "3", "--batch", "2", "--ray-address", f"127.0.0.1:{port}"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=f)
        try:
            _sample(engines, tmp_path / "here", 1, 2, n=2, more=("--batch", "2"))   # meanwhile, a local cluster of its own
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        err = log.read_text()
    finally:
        for line in _session_alive(head.pid):                 # the head's processes only (not `ray stop`: every cluster)
            try:
                os.kill(int(line.split()[1]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        current = Path("/tmp/ray/ray_current_cluster")        # where `ray start` named it for ray.init(): no more
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink(missing_ok=True)
    assert proc.returncode == 0, err[-2000:]
    a, here = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in ("cluster", "here"))
    b = np.load(w2[0] / "samples.npz")["arr_0"]
    assert a.shape == (N, 32, 32, 3) and np.array_equal(a, b) and np.array_equal(here, b[:2])


@pytest.mark.slow
def test_sigterm_stops_bulk_sampling_on_ray_like_ctrl_c_and_leaves_no_process(engines, tmp_path):
    """flowar-sample on two Ray workers, stopped by SIGTERM once shards are written: one line that
    says how far it got and that the same command resumes, exit 130, no traceback, and no process
    of its local Ray cluster left after a few seconds. Before, Ray's own handler had SIGTERM: the
    command died silently (143) and the cluster's processes ran on for a minute; a Ctrl-C printed
    Ray Data's tracebacks."""
    out = tmp_path / "stopped"
    proc = subprocess.Popen([str(EXE / "flowar-sample"), "--engine-dir", str(engines), "--num-images", "4000", "--out",
                             str(out), "--shard-size", "8", "--workers", "2"], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not any((out / "shards").glob("*.npz")):
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        left = _reap(proc)
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert rc == 130 and "Traceback" not in err, (rc, err[-2000:])
    assert last.startswith("interrupted: ") and last.endswith("images written to " + str(out) + "; the same "
                                                               "command resumes"), last
    written = int(last.split()[1])
    assert 0 < written < 4000 and written == 8 * len(list((out / "shards").glob("*.npz"))), last
    assert not left, left


# ---- the served endpoint ----------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout=60):
    return _exchange(url, body, timeout)[:2]


def _exchange(url, body, timeout=60):
    """POST /v1/generate: (status, the JSON answer or {"raw": text}, the answer's headers); (0, None, {})
    when nothing answered; (0, {"cut": status}, headers) when an answer's body was cut short (its headers
    came, then the connection closed: a replica killed while its answer was under way)."""
    req = urllib.request.Request(url + "/v1/generate", data=json.dumps(body).encode() if isinstance(body, dict)
                                 else body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            try:
                return r.status, json.loads(r.read()), dict(r.headers)
            except http.client.IncompleteRead:
                return 0, {"cut": r.status}, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw), dict(e.headers)
        except ValueError:                                    # Serve's own error pages are plain text
            return e.code, {"raw": raw.decode(errors="replace")}, dict(e.headers)
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError):
        return 0, None, {}


def _get(url, path):
    try:
        with urllib.request.urlopen(url + path, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:           # (a draining replica's /health: 503, its JSON)
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_a_worker_that_dies_on_every_shard_fails_the_command_instead_of_hanging_it(engines, tmp_path):
    """flowar-sample on two Ray workers whose process exits on every shard (the sampler replaced by
    os._exit(1) in Ray's worker processes alone, by a sitecustomize on PYTHONPATH): its restarts and
    retries (here 1, set by the same sitecustomize in the command's process), then one error line and
    exit 2. Before, Ray Data restarted the workers and retried the shards forever: the command never ended (measured: still retrying after 100 s)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if sys.argv and sys.argv[0].endswith('default_worker.py'):      # Ray's worker processes only\n"
        "    import flowar.commands.bulk as bulk\n"
        "    bulk.ShardSampler.__call__ = lambda self, batch: os._exit(1)\n"
        "elif sys.argv and sys.argv[0].endswith('flowar-sample'):        # one retry, not 3: each restart costs a\n"
        "    import flowar.commands.bulk as bulk                         # worker's start (a bound at all is what\n"
        "    bulk.WORKER_RETRIES = 1                                     # is tested: unbounded, it never ends)\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = tmp_path / "crashing"
    args = [str(EXE / "flowar-sample"), "--engine-dir", str(engines), "--num-images", "4", "--out", str(out),
            "--shard-size", "2", "--workers", "2"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    finally:                                     # a hang: the command and its local cluster go with the test
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    ours = [ln for ln in err.splitlines() if ln.startswith("error:")]         # (Ray's retry notes around it)
    assert proc.returncode == 2 and "Traceback" not in err, (proc.returncode, err[-2000:])
    assert len(ours) == 1 and ours[0].startswith("error: expected workers that sample their shards"), ours
    assert not (out / "samples.npz").exists()


@pytest.fixture(scope="module")
def server(engines):
    from flowar.commands.serve import serve_forever
    port = _free_port()
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    serve_forever(str(engines), "127.0.0.1", port, 1, 16, 1, None, block=False, queue=16)
    yield f"http://127.0.0.1:{port}"
    from flowar.commands.cluster import stop_ray
    stop_ray()                              # (the local cluster serve_forever started, Serve's processes with it)


def _metric(url, name, labels=()):
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels))


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
    # 12 concurrent requests: batches larger than one form, and the replica's metrics say so, labelled by it
    rep = health["replica"]
    before = (_metric(server, "flowar_batch_size_count", [("replica", rep)]),
              _metric(server, "flowar_images_total", [("replica", rep)]))
    threads = [threading.Thread(target=_post, args=(server, {"label": i % 10, "seed": i})) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    batches = _metric(server, "flowar_batch_size_count", [("replica", rep)]) - before[0]
    assert _metric(server, "flowar_images_total", [("replica", rep)]) - before[1] == 12 and 1 <= batches < 12


def test_a_burst_beyond_the_queue_is_refused_by_the_replica_with_its_one_line_answer(server):
    # 160 requests at once on a queue of 16 images: what does not fit is refused by the replica
    # (503, one line that says how to fix it), never by Serve's router with its own plain text
    # (with the router's bound at the replica's queue, as before: 17-54 of 160 such answers)
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(_post(server, {"label": i % 10, "seed": 500 + i},
                                                                      timeout=120)))
               for i in range(160)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    codes = [code for code, _ in results]
    assert len(results) == 160 and codes.count(200) >= 16 and codes.count(503) > 0, sorted(set(codes))
    refused = [body for code, body in results if code != 200]
    assert all(code in (200, 503) for code in codes), [b for b in refused if "raw" in b][:1]
    assert all("error" in b and b["error"].startswith("expected") for b in refused), [b for b in refused if "raw" in b][:1]


def _not_the_error_line(code, body, headers):
    """What keeps a non-200 answer from being the service's error (README "Serving", "Errors"):
    JSON ``{"error": "expected X; got Y. Fix: Z"}``, that one line and nothing else, no traceback in
    it, and on a 503 a Retry-After in whole seconds that says when to come back (only a request too
    large even for an idle replica gets none); None when it is all that."""
    text = body.get("error", body.get("raw", "")) if isinstance(body, dict) else repr(body)
    if "Traceback" in text or 'File "' in text:
        return "a traceback in the answer"
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], str):
        return "not the service's JSON {\"error\": one line}"
    if "\n" in text.strip() or not re.fullmatch(r"expected .+; got .+\. Fix: .+", text.strip()):
        return "not one line 'expected X; got Y. Fix: Z'"
    retry = {k.lower(): v for k, v in headers.items()}.get("retry-after", "")
    if code == 503 and not (retry.isdigit() and int(retry) >= 1):
        return f"a 503 without a Retry-After in seconds ({retry!r})"
    return None


@pytest.mark.slow
def test_a_killed_replica_fails_or_retries_requests_never_hangs(server):
    """8 requests of 4 images at once on a replica that holds 16, killed 0.5 s in: each is
    answered (computed, refused by the replica since its queue was full, or failed with the
    replica), none hangs, every answer the replica sent is its one-line error (the only other: Ray
    Serve's proxy's plain 500 for a request in flight when the replica died), and Serve starts the
    replica again."""
    results = []

    def client(i):
        t0 = time.time()
        results.append((*_exchange(server, {"label": i % 10, "seed": 100 + i, "n": 4}, timeout=90), time.time() - t0))

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
    # each request answered: computed (200), refused by the replica (503: 32 images asked of a queue of 16),
    # or failed by the replica's death (500, or, rarely, an answer whose headers Ray Serve's proxy had sent
    # when the replica died: its body cut short); never a gateway timeout, never no answer
    codes = sorted(code for code, body, *_ in results if not (code == 0 and body and "cut" in body))
    assert all(code in (200, 500, 503) for code in codes) and 503 in codes, codes
    deadline = time.time() + 90                                       # and the service comes back by itself
    while time.time() < deadline:
        if _post(server, {"label": 1}, timeout=30)[0] == 200:
            break
        time.sleep(1)
    else:
        pytest.fail("the service did not come back after its replica was killed")
    # every answer the replica sent is its one line; the only other is Ray Serve's proxy's for a request
    # in flight when the replica died (README "Errors": plain text, outside the replica)
    wrong = [(code, body, why) for code, body, headers, _ in results if code not in (0, 200) and not (
             (code, body) == (500, {"raw": "Internal Server Error"})) and (why := _not_the_error_line(code, body, headers))]
    assert not wrong, wrong[:2]


def test_beyond_loopback_a_token_is_required_before_anything_starts(engines, tmp_path):
    proc = subprocess.run([str(EXE / "flowar-serve"), "--engine-dir", str(engines), "--host", "0.0.0.0", "--port",
                           str(_free_port())], env={k: v for k, v in ENV.items() if k != "FLOWAR_SERVE_TOKEN"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: expected a bearer token") and \
        proc.stderr.strip().count("\n") == 0, proc.stderr


def test_a_port_in_use_is_one_line_before_ray_starts(engines):
    # (before: Ray and Serve started, then "expected Ray Serve and its replicas to start", 14 s later,
    # with a fix that pointed at the engines)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([str(EXE / "flowar-serve"), "--engine-dir", str(engines), "--port", str(port)],
                              env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith(f"error: expected an address to listen on (127.0.0.1:{port}); got Address "
                                  "already in use. Fix: choose another --port"), proc.stderr
    # an address that is none of this machine's: said so, before the token it would need (it was told to bring one)
    proc = subprocess.run([str(EXE / "flowar-serve"), "--engine-dir", str(engines), "--host", "999.1.1.1"],
                          env={k: v for k, v in ENV.items() if k != "FLOWAR_SERVE_TOKEN"}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: expected an address to listen on (999.1.1.1:"), \
        proc.stderr


def test_a_replica_that_cannot_start_is_said_by_its_own_error_line():
    """Ray 2.60 raises "Deploying application flowar failed: Failed to update the deployments [...]" for a replica that
    cannot start; its cause (a graph changed since the export, here) is in the deployment's status only, and the
    command said the generic line. The replica's own line is said (the report recorded from Ray 2.60, abridged);
    without one, the report's last line."""
    from types import SimpleNamespace

    from flowar.commands.serve import start_failure
    status = ("The deployment failed to start 3 times in a row. This may be due to a problem with its constructor or "
              "initial health check failing. See controller logs for details. Error:\n\x1b[36mray::ServeReplica:flowar:"
              "FlowARService.initialize_and_get_metadata()\x1b[39m (pid=21791, ip=192.0.2.2)\n  File \"/work/main/flowar/"
              "pipeline/pipeline.py\", line 158, in from_pretrained\n    raise in_python_terms(e) from None\n"
              "flowar.errors.EngineDirError: expected velocity.onnx with the sha256 recorded at export; got a different "
              "file (modified or corrupt). Fix: rebuild it: flowar-export --ckpt m.safetensors --out engd")
    serve = SimpleNamespace(status=lambda: SimpleNamespace(applications={"flowar": SimpleNamespace(deployments={
        "FlowARService": SimpleNamespace(message=status)})}))
    e = RuntimeError("Deploying application flowar failed: Failed to update the deployments ['FlowARService'].")
    assert str(start_failure(e, serve, "engd")) == ("expected velocity.onnx with the sha256 recorded at export; got a "
                                                    "different file (modified or corrupt). Fix: rebuild it: flowar-export "
                                                    "--ckpt m.safetensors --out engd")
    said = str(start_failure(e, SimpleNamespace(status=lambda: 1 / 0), "engd"))       # (no status to read)
    assert said == ("expected Ray Serve and its replicas to start; got RuntimeError: Deploying application flowar "
                    "failed: Failed to update the deployments ['FlowARService'].. Fix: run flowar-run --engine-dir engd "
                    "--labels 0 to see the engines open")


def test_a_ray_address_where_nothing_answers_is_one_line_at_once(engines, tmp_path):
    # (before: Ray retried for minutes, printing warnings)
    port = _free_port()                                  # free: nothing listens there
    for cmd in (["flowar-sample", "--engine-dir", str(engines), "--num-images", "8", "--out", str(tmp_path / "o")],
                ["flowar-serve", "--engine-dir", str(engines)]):
        args = [str(EXE / cmd[0]), *cmd[1:], "--ray-address", f"127.0.0.1:{port}"]
        if cmd[0] == "flowar-serve":              # serving on a cluster asks for a token first (a cluster's Serve
            proc = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=60)   # keeps its own host)
            assert proc.returncode == 2 and "a bearer token to serve on an existing cluster" in proc.stderr, proc.stderr
        proc = subprocess.run(args, env=ENV | {"FLOWAR_SERVE_TOKEN": "t0k3n"}, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert proc.stderr.startswith(f"error: expected a running Ray cluster (--ray-address 127.0.0.1:{port}); "
                                      f"got no answer at 127.0.0.1:{port}"), proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_cluster_that_refuses_the_token_is_one_line_naming_the_token(server, engines, tmp_path):
    """A running cluster that authenticates by another token (here the served replica's own local
    cluster): Ray tried for 20 s, printing a warning a second, and the line said to start a cluster
    (with auto) where one was running. Now a few tries, Ray's warnings held back, one line on the token."""
    import ray
    gcs = ray.get_runtime_context().gcs_address
    env = {k: v for k, v in ENV.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))} | {"HOME": str(tmp_path)}
    for address in (gcs, "auto"):
        proc = subprocess.run([str(EXE / "flowar-sample"), "--engine-dir", str(engines), "--num-images", "8", "--out",
                               str(tmp_path / "o"), "--ray-address", address], env=env, capture_output=True,
                              text=True, timeout=120)
        line, = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and line.startswith(f"error: expected a running Ray cluster (--ray-address "
                                                        f"{address}) that takes this client; got the cluster at "), line
        assert "refused this command's token" in line and "Fix: put the cluster's token in ~/.ray/auth_token" in line
    assert not (tmp_path / "o").exists()


def test_bulk_says_when_workers_or_threads_ask_for_more_cores_than_there_are(engines, tmp_path, monkeypatch):
    """--workers 5 on 2 cores ran slower than 2 (13 against 17.4 images/s) and --threads 8 became 2 (recorded
    so in run.json), neither said. Each is a note before the work; within the cores, none."""
    from click.testing import CliRunner

    import flowar.commands.bulk as bulk
    from flowar.commands.cli_ray import sample_cmd
    from flowar.engines.ort import cpu_threads
    from flowar.errors import FlowARError
    asked = []

    def stub(spec, out, workers, ray_address=None):
        asked.append((workers, spec.threads))
        raise FlowARError("the stub's work", "none", "none")
    monkeypatch.setattr(bulk, "run_bulk", stub)
    cores = cpu_threads()
    for more, said in ((["--workers", str(cores + 1)], f"ask for {cores + 1} of the {cores} cores"),
                       (["--threads", str(os.cpu_count() + 6)], f"is more than this machine's {os.cpu_count()} cores"),
                       ([], None)):
        res = CliRunner().invoke(sample_cmd, ["--engine-dir", str(engines), "--num-images", "2", "--out",
                                              str(tmp_path / "o"), *more])
        notes = [ln for ln in res.output.splitlines() if ln.startswith("note: ")]
        assert res.exit_code == 2 and "the stub's work" in res.output, res.output
        # (under pytest -n 2 a worker may use one core of two: --threads 2 is then also said to ask for more)
        assert (said is None and not notes) or any(said in n for n in notes), (more, res.output)
    assert asked[1][1] == min(os.cpu_count() + 6, os.cpu_count())          # (what it took: said above)


def test_bulk_counts_below_one_are_one_line_before_anything_starts(engines, tmp_path):
    """--workers 0 (it divided by it for a note first: a traceback), --threads 0, --batch 0."""
    from click.testing import CliRunner

    from flowar.commands.cli_ray import sample_cmd
    for opt, needle in (("--workers", "--workers and --threads >= 1"), ("--threads", "--workers and --threads >= 1"),
                        ("--batch", "Fix: use e.g. --batch 1")):
        res = CliRunner().invoke(sample_cmd, ["--engine-dir", str(engines), "--num-images", "2", "--out",
                                              str(tmp_path / "b"), opt, "0"])
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.output
        assert not (tmp_path / "b").exists()


def _stderr_until(proc, start: str) -> str:
    """Read ``proc``'s stderr up to the first line that starts with ``start`` (returned); fails
    with the last lines read if the stream ends or 400 lines pass first."""
    seen = [proc.stderr.readline()]
    while not seen[-1].startswith(start) and seen[-1] and len(seen) < 400:
        seen.append(proc.stderr.readline())
    assert seen[-1].startswith(start), "".join(seen[-40:])
    return seen[-1]


@pytest.mark.slow
def test_sigterm_answers_what_is_in_flight_refuses_what_comes_and_exits_0(engines, tmp_path):
    """flowar-serve as systemd (KillMode=control-group, its default) or `timeout` stop it: SIGTERM
    to every process of its group at once, Ray's included, while a long request runs. That request
    is answered 200 with all its images; one sent while it drains gets 503 with the one-line error;
    the command exits 0 within the grace period with one line, no stack dump, and leaves no process.
    (Before, Ray's processes died at once: exit 1 after 60 s, the request lost, Ray's workers left.)
    The token is asked for on loopback with --require-token. (SIGTERM to the command alone, as
    Kubernetes sends it: the next test.)"""
    port = _free_port()
    (tmp_path / "token").write_text("t0k3n\n")
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(EXE / "flowar-serve"), "--engine-dir", str(engines), "--port", str(port),
                             "--threads", "1", "--require-token", "--token-file", str(tmp_path / "token"),
                             "--grace", "60"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        line = _stderr_until(proc, "serving ")                           # Ray's own notices first
        seen = time.perf_counter() - t0
        assert "bearer token required" in line, line
        # ready counted from the command's start (it said 7.0 s where /health answered after 12.6): within the
        # time this test saw, beyond Ray Serve's part
        since, serve_s = map(float, re.search(r"ready ([\d.]+) s after the command started \(Ray Serve and the "
                                              r"replicas ([\d.]+) s\)", line).groups())
        assert serve_s < since <= seen + 0.1 and since > serve_s + 0.5, (line, seen)

        def post(body, token="t0k3n", timeout=120):
            req = urllib.request.Request(url + "/v1/generate", data=json.dumps(body).encode(), method="POST",
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                text = e.read().decode(errors="replace")
                try:
                    return e.code, json.loads(text)
                except ValueError:      # not our app's answer (Ray's proxy): kept for the message
                    return e.code, {"error": text}
        assert post({"label": 1}, token=None)[0] == 401
        before = _get(url, "/health")[1]["replica"]
        long = []
        # in flight for about 10 s on 2 cores (the drain is seen and a request refused well within it)
        worker = threading.Thread(target=lambda: long.append(post({"label": 3, "n": 16, "steps": 100})))
        worker.start()
        time.sleep(1.5)                                                  # in flight
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGTERM)
        draining, during = False, None
        while time.time() - t0 < 30 and not draining:
            try:
                code, health = _get(url, "/health")
                draining, during = (code, health["status"]) == (503, "draining"), health["replica"]
            except Exception:   # noqa: BLE001 - not answering yet
                pass
            time.sleep(0.2)
        refused = post({"label": 2}) if draining else None
        worker.join(120)
        rc = proc.wait(timeout=90)
        rest = proc.stderr.read()
    finally:
        left = _reap(proc)
    assert long and long[0][0] == 200 and len(long[0][1]["images"]) == 16
    assert draining and refused[0] == 503, refused
    assert during == before              # drained in place: no new replica started (engines opened again) to refuse
    assert refused[1]["error"].startswith("expected a server that is not stopping"), refused
    assert rc == 0 and time.time() - t0 < 60 and "Traceback" not in rest, rest[-2000:]
    assert [ln for ln in rest.splitlines() if ln.strip()][-1].startswith("stopped on SIGTERM")
    assert not left, left


@pytest.mark.slow
def test_a_sigterm_while_the_service_starts_stops_it_once_it_is_up(engines):
    """SIGTERM while Serve deploys the application (held there 2 s): the command stops as soon as
    it is up, with its one line and exit 0; a second signal while it starts stops the start itself
    (exit 130, one line). Before, Ray's own handler had SIGTERM: exit 15 and a native stack dump,
    or the signal was lost and the service kept serving (both seen)."""
    code = ("import os, sys, time\nfrom ray import serve\nreal = serve.run\n"
            "def slow(*a, **k):\n    print('deploying', file=sys.stderr, flush=True)\n"
            "    time.sleep(float(os.environ['TEST_DEPLOY_HOLD_S']))\n"
            "    return real(*a, **k)\nserve.run = slow\nfrom flowar.commands.cli_ray import serve_cmd\nserve_cmd()\n")
    # the two services start at once (each its own local Ray cluster), each stopped while it deploys: the
    # first held 2 s (signalled as soon as it says so), the second held until its second signal ends the
    # start (signalled once the first was: its hold outlasts however far apart the two starts are)
    cases = (((signal.SIGTERM,), "2"), ((signal.SIGTERM, signal.SIGINT), "120"))
    procs = [subprocess.Popen([sys.executable, "-c", code, "--engine-dir", str(engines), "--port", str(_free_port()),
                               "--threads", "1"], env=ENV | {"TEST_DEPLOY_HOLD_S": hold}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _, hold in cases]
    results = []
    try:
        for proc, (signals, _) in zip(procs, cases):
            _stderr_until(proc, "deploying")
            for sig in signals:
                proc.send_signal(sig)
                time.sleep(0.3)
        for proc in procs:
            rest = proc.communicate(timeout=120)[1]
            rc = proc.returncode
            assert "SIGTERM received" not in rest and "Traceback" not in rest, (rc, rest[-2000:])
            results.append((rc, [ln for ln in rest.splitlines() if ln.strip()][-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert results[0][0] == 0 and results[0][1].startswith("stopped on SIGTERM"), results
    assert results[1] == (130, "interrupted: a second SIGINT while Ray Serve started; nothing was served"), results
