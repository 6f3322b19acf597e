"""The local Ray cluster a command starts: stopped at once, and only its own processes.

Ray stops a local cluster by SIGTERM, a second's wait, then SIGKILL, per kind of process; the
commands' clusters block SIGTERM (so that a SIGTERM to the whole group reaches the command alone),
so every wait was spent (5.3 s per stop). ``stop_ray`` kills them itself once the driver has left.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray", reason="Ray is in the [serve] extra")

from flowar.commands.cluster import _blocks_sigterm  # noqa: E402
from flowar.io.memory import descendants  # noqa: E402

# In a process of its own (Ray stays out of pytest's): start the local cluster as the commands do,
# run a task (a worker below the raylet), then stop it, recording every SIGKILL the stop sends and
# whether the driver had left the cluster at that moment (the raylet is needed until it has).
STOP = r"""
import os, signal, subprocess, sys
from flowar.commands.cluster import start_ray, stop_ray
from flowar.io.memory import descendants, process_running as alive
ray = start_ray(None, 1)
driver = ray._private.worker.global_worker
before = {p: open(f"/proc/{p}/comm").read().strip() for p in descendants(os.getpid())}
worker = ray.get(ray.remote(lambda: os.getpid()).remote())
bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])   # a child not Ray's
sent, real_kill = [], os.kill
def kill(pid, sig):
    if sig == signal.SIGKILL:
        sent.append((pid, hasattr(driver, "core_worker")))
    return real_kill(pid, sig)
os.kill = kill
stop_ray()
print(repr((before, worker, sent, [p for p in set(before) | {worker} if alive(p)], alive(bystander.pid))))
bystander.kill()
"""


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_a_local_cluster_is_killed_once_the_driver_left_every_process_of_it():
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-c", STOP], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, worker, sent, alive, bystander_alive = eval(proc.stdout.strip().splitlines()[-1])
    killed = {pid for pid, _ in sent}
    names = set(before.values())
    assert {"raylet", "gcs_server"} <= names, names
    # the raylet's agents and idle workers too (the task's worker may have ended as the driver left)
    assert set(before) - {worker} <= killed, (before, worker, sent)
    assert not any(driver_there for _, driver_there in sent), sent        # never while the driver needs the raylet
    # none left running once the stop returns (the task's worker included: the raylet ends it as the driver
    # leaves, or the stop kills it); seen once in CI before the stop waited for what it killed to end
    assert not alive, (alive, before, worker, sent)
    assert bystander_alive                   # a child of the command that is not the cluster's: left alone


# A local cluster as the commands start it, and two clients: one with the token Ray keeps for this user
# (~/.ray/auth_token, which Ray writes readable by every user: others read it where the home folder is
# open), one with the cluster's own. Ray's servers listen on every interface (Ray 2.60 has no
# loopback-only setting): the token is what keeps others out.
TOKEN = r"""
import os, subprocess, sys, time
from flowar.commands.cluster import start_ray, stop_ray
ray = start_ray(None, 1)
ours, address = os.environ.get("RAY_AUTH_TOKEN"), ray.get_runtime_context().gcs_address
join = "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); print('joined')"
def client(token):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"RAY_AUTH_MODE": "token"}
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", join, address], env=env | ({"RAY_AUTH_TOKEN": token} if token else {}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    joined = False
    for line in proc.stdout:            # (refused, Ray retries for 20 s: its first refusal is enough)
        if "InvalidAuthToken" in line or line.strip() == "joined":
            joined = line.strip() == "joined"
            break
    proc.kill()
    proc.wait()
    return joined, round(time.time() - t0, 1)
results = (ours is not None, client(None), client(ours))
stop_ray()
left = os.environ.get("RAY_AUTH_TOKEN")
ray = start_ray(None, 1)                       # a second local cluster in the process (its own token): joined
again = ray.get(ray.remote(lambda: 1).remote()) == 1 and os.environ.get("RAY_AUTH_TOKEN") != ours
stop_ray()
print(repr(results + (left, again)))
"""


def test_a_local_cluster_answers_only_its_own_token(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("1" * 64)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"RAY_USAGE_STATS_ENABLED": "0",
                                                                                  "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", TOKEN], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    made, (home_joined, _), (own_joined, _), left, again = eval(proc.stdout.strip().splitlines()[-1])
    assert made and not home_joined and own_joined, proc.stdout[-1000:]
    assert left is None and again            # (not the token of a cluster the process joins next)


# A stop (Ctrl-C, SIGTERM) that comes inside ray.init while Ray starts the node's processes (Ray records
# the node only once they are all up, so its own stop knew none of them): every process it had started is
# gone once the process has ended (Ray's dashboard and runtime-env agents outlived the command by minutes).
STOPPED_START = r"""
import atexit, os, ray._private.node as node
from flowar.commands.cluster import start_ray
from flowar.io.memory import descendants
real = node.Node.__init__
def init(self, *a, **k):
    real(self, *a, **k)
    started = descendants(os.getpid())
    atexit.register(lambda: print(repr(started), flush=True))
    raise KeyboardInterrupt
node.Node.__init__ = init
start_ray(None, 1)
"""


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_a_stop_while_the_local_cluster_starts_leaves_none_of_its_processes():
    from flowar.io.memory import process_running
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-c", STOPPED_START], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr, proc.stderr[-2000:]
    started = eval(proc.stdout.strip().splitlines()[-1])
    assert len(started) >= 3, started                  # gcs_server, raylet, agents
    deadline = time.time() + 10                        # (Ray's own stop of what it knows may still run)
    while time.time() < deadline and any(process_running(p) for p in started):
        time.sleep(0.1)
    left = [p for p in started if process_running(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, [open(f"/proc/{p}/cmdline").read()[:120] for p in left if os.path.exists(f"/proc/{p}")]


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_only_processes_that_block_sigterm_are_taken_for_the_cluster():
    """A child of the command that is not Ray's (SIGTERM not blocked) is never taken; one that
    blocks it is, with its own children (which inherit the mask)."""
    blocked = ("import signal, subprocess, sys, time\n"
               "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
               "time.sleep(60)\n")
    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ray_like = subprocess.Popen([sys.executable, "-c", blocked])
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not descendants(ray_like.pid):
            time.sleep(0.05)
        [grandchild] = descendants(ray_like.pid)
        below = descendants(os.getpid())
        assert {plain.pid, ray_like.pid, grandchild} <= set(below), below
        taken = {p for p in below if _blocks_sigterm(p)}
        assert {ray_like.pid, grandchild} <= taken and plain.pid not in taken, (taken, plain.pid)
    finally:
        for p in (plain, ray_like):
            p.kill()
            p.wait()
        try:
            os.kill(grandchild, signal.SIGKILL)
        except (ProcessLookupError, NameError):
            pass


def test_a_sigterm_while_ray_starts_is_the_commands_not_rays():
    """ray.init sets a SIGTERM handler of its own (Ray's: a native stack dump and SIGABRT, or sys.exit
    without a word); a SIGTERM that came while it started a local cluster (held by the mask until then)
    reached that handler, and after joining a cluster (--ray-address) Ray's stayed for good. start_ray
    sets the command's handler again. In a process of its own (one thread, as a command is while Ray
    starts: the mask holds the signal), with a stand-in for Ray that sets a handler and, starting a
    local cluster, is sent SIGTERM."""
    code = r"""
import os, signal, sys, types
from flowar.commands import cluster
said = []
def init(address=None, **kw):
    signal.signal(signal.SIGTERM, lambda *a: said.append("ray's handler"))
    if address == "local":
        os.kill(os.getpid(), signal.SIGTERM)
sys.modules["ray"] = types.SimpleNamespace(is_initialized=lambda: False, init=init)
cluster.stop_ray = lambda: None
cluster._answers = lambda address: None
def command(signum, frame):
    said.append("the command's handler")
    raise KeyboardInterrupt
signal.signal(signal.SIGTERM, command)
try:
    cluster.start_ray(None, 1)
except KeyboardInterrupt:
    said.append("interrupted")
cluster.start_ray("auto", None)
print(said, signal.getsignal(signal.SIGTERM) is command)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[\"the command's handler\", 'interrupted'] True", (out.stdout, out.stderr)


def test_what_ray_could_not_write_is_one_line_that_says_what_to_set(tmp_path, monkeypatch):
    """A long TMPDIR (a batch system's per-job folder) and a home folder a service account may not
    write stopped the local cluster with "paths this command can read and write; got : ..." and a fix
    about free disk space: the line names TMPDIR or HOME (a stand-in for Ray raises what Ray raised)."""
    import tempfile
    import types

    from flowar.commands import cluster
    from flowar.errors import FlowARError
    home = tmp_path / "home"                     # (a TMPDIR under HOME is still TMPDIR's fault)
    long_tmp = home / ("job-scratch-" + "x" * 40)
    long_tmp.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(long_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    raised = []

    def init(**kw):
        raise raised[0]
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False, init=init))
    for error, said in (
            (OSError("validate_socket_filename failed: AF_UNIX path length cannot exceed 107 bytes"),
             f"TMPDIR {long_tmp} ({len(str(long_tmp))} characters). Fix: start the command with a short one"),
            (PermissionError(13, "Permission denied", str(home / ".ray")), "set HOME"),
            (PermissionError(13, "Permission denied", str(long_tmp / "ray")), "set TMPDIR")):
        raised[:] = [error]
        with pytest.raises(FlowARError, match=re.escape(said)):
            cluster.start_ray(None, 1)
    raised[:] = [OSError(28, "No space left on device", "/data/x")]      # another path's: as it was
    with pytest.raises(OSError, match="No space left"):
        cluster.start_ray(None, 1)


def test_an_address_ray_cannot_read_and_a_cluster_that_does_not_start_are_one_line(monkeypatch):
    """--ray-address garbage:::, localhost or localhost:abc gave Ray's ValueError traceback; a local
    cluster that did not start (--workers 99999999999: 10^11 CPUs) Ray's "timed out during startup"
    traceback after 33 s. Both are one line; "auto" still goes to Ray."""
    import ray

    from flowar.commands import cluster
    from flowar.errors import FlowARError
    for bad in ("garbage:::", ":::", "localhost", "localhost:abc", "ray://", "ray://:6379", "host:0", "host:70000"):
        with pytest.raises(FlowARError, match=r"^expected --ray-address auto, HOST:PORT or ray://HOST:PORT; got '"):
            cluster._answers(bad)
    assert cluster._answers("auto") is None and cluster._answers("anyscale://mine") is None   # (Ray's to read)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(cluster, "_kill_cluster", lambda: None)       # (nothing started here)

    def no_start(**kw):
        raise Exception("The current node timed out during startup. This could happen because ...\nmore")
    monkeypatch.setattr(ray, "init", no_start)
    with pytest.raises(FlowARError, match=r"^expected a local Ray cluster that starts \(asked for 99999999999 CPUs\); "
                                          r"got Exception: The current node timed out during startup\. This could "
                                          r"happen because \.\.\.\. Fix: ask for fewer workers or replicas"):
        cluster.start_ray(None, 99999999999)
    assert "RAY_AUTH_TOKEN" not in os.environ            # (the token made for the cluster that did not start: gone)
