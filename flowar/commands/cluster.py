"""Ray for the commands that scale out (``flowar-sample`` with several workers, ``flowar-serve``)."""

from __future__ import annotations

import inspect
import logging
import os
from contextlib import contextmanager

from flowar.errors import FlowARError


def start_ray(address: str | None, num_cpus: int | None):
    """Connect to a cluster, or start a local one (with a token of its own) without dashboard or usage stats."""
    import sys
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # `ray start --head` authenticates by token where a token exists (~/.ray/auth_token: any local
    # Ray start leaves one); Ray's client then connects by "auto" but not by an address (refused:
    # "token is missing") unless the mode is set before Ray is imported: set here as "auto" decides
    # it (a cluster started with RAY_AUTH_MODE=disabled: the client sets it too)
    token = bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                 or os.path.isfile(os.path.expanduser("~/.ray/auth_token")))
    if address and address != "auto" and token and "RAY_AUTH_MODE" not in os.environ and "ray" not in sys.modules:
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
    except ImportError:
        raise FlowARError("Ray (the [serve] extra)", "it is not installed",
                          "pip install 'flowar-deploy[serve]' (or 'ray[data,serve]')") from None
    if ray.is_initialized():
        return ray
    # Ray's servers listen on every interface of this machine (Ray 2.60 turns 127.0.0.1 into the machine's
    # address and has no loopback-only setting) and answer only clients that present the cluster's token: a
    # local cluster gets one of its own, in this process's environment, which its processes inherit and other
    # users cannot read (~/.ray/auth_token, Ray's otherwise, is readable by every user where the home folder is)
    if not address and not any(os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        import secrets
        os.environ["RAY_AUTH_TOKEN"] = _TOKEN[0] = secrets.token_hex(32)
    _reread_token()
    # Ray 2.60 announces on every start that token authentication is on, its default: that line
    # alone is dropped (auth stays on); the commands say what they started themselves
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if _not_token_enabled not in auth.filters:
        auth.addFilter(_not_token_enabled)
    kw = dict(include_dashboard=False, configure_logging=False, log_to_driver=False)
    import signal
    import threading
    # ray.init sets a SIGTERM handler of its own (a native stack dump, or sys.exit(15) without a word):
    # the command's is set again after it, so that SIGTERM stops the command as Ctrl-C does
    handler = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if address:
        _answers(address)
        try:
            with _few_tries():
                ray.init(address=address, **kw)
            if handler is not None:
                signal.signal(signal.SIGTERM, handler)
        except ConnectionError as e:        # "auto" with none running (an OSError: not a path's fault)
            got = str(e).splitlines()[0].split(". ")[0].rstrip(".")
            if "InvalidAuthToken" in str(e.__cause__):   # (it said "start one" of a cluster that was running)
                found = got.rpartition(" at ")[2]
                raise FlowARError(f"a running Ray cluster (--ray-address {address}) that takes this client",
                                  f"the cluster at {found} refused this command's token (none, or another)" + (
                                      " (auto took one running on this machine: another command's own local "
                                      "cluster, such as flowar-serve's, takes no other client)" if address == "auto"
                                      else ""), _TOKEN_FIX) from None
            raise FlowARError(f"a running Ray cluster (--ray-address {address})", got,
                              _START if "auto" in address or token else _TOKEN_FIX) from None
        return ray
    # The local cluster's processes are started with SIGTERM blocked (they inherit this thread's
    # mask), as Ray starts them with SIGINT blocked: a SIGTERM sent to every process at once
    # (systemd's default KillMode=control-group, `timeout`, `kill -- -PGID`) then reaches only this
    # command, which stops gracefully and shuts Ray down. Unblocked, Ray's processes died at once:
    # the command waited 60 s for its GCS, exited 1 and lost the requests in flight.
    import atexit
    # (the command's handler is set again before the mask is lifted: a SIGTERM that came while Ray
    # started reached Ray's, which aborted the process with a native stack dump)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        # "local": a cluster of its own even where `ray start` runs one on this machine (ray.init
        # joined that, and refused num_cpus: "When connecting to an existing cluster ...")
        try:
            ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kw)
        except OSError as e:                # Ray's own files (its token, sessions, sockets): say which, and what to set
            _forget_token()
            raise _ray_files(e) from None
        except BaseException as e:          # a stop while it started: what had started goes too (Ray's dashboard
            _kill_cluster()                 # and runtime-env agents outlived the command by minutes)
            ray.shutdown()
            _forget_token()
            if isinstance(e, Exception):    # (Ray's own traceback: e.g. "timed out during startup" for 10^11 CPUs)
                raise FlowARError(f"a local Ray cluster that starts (asked for {num_cpus or 'every'} CPUs)",
                                  f"{type(e).__name__}: {(str(e).strip().splitlines() or ['?'])[0][:200]}",
                                  "ask for fewer workers or replicas, or fewer --threads, or see Ray's session logs "
                                  "(under $RAY_TMPDIR or the temporary folder, ray/session_latest/logs)") from e
            raise
        _LOCAL[0] = True
        atexit.unregister(stop_ray)
        atexit.register(stop_ray)           # (runs before Ray's own handler, which then finds Ray stopped)
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    return ray


def _ray_files(e: OSError) -> Exception:
    """What Ray could not write when it started a local cluster, as one line (it was "paths this command
    can read and write; got : validate_socket_filename ..." with a fix about disk space)."""
    import tempfile
    from pathlib import Path
    where, tmp = Path(str(e.filename or "/")), tempfile.gettempdir()
    if "AF_UNIX" in str(e):
        return FlowARError("a temporary folder short enough for Ray's socket paths (107 bytes with its own names)",
                           f"TMPDIR {tmp} ({len(tmp)} characters)", "start the command with a short one, e.g. TMPDIR=/tmp")
    if ".ray" in where.parts:
        return FlowARError("a writable home folder for Ray (it keeps its token in ~/.ray)", f"{where}: {e.strerror or e}",
                           "set HOME to a folder this user may write")
    if where.is_relative_to(tmp):
        return FlowARError("a writable temporary folder for Ray's session files", f"{where}: {e.strerror or e}",
                           "set TMPDIR to a folder this user may write, e.g. TMPDIR=/tmp")
    return e


_LOCAL = [False]            # whether this process started the local cluster it is connected to
_TOKEN: list[str | None] = [None]   # the token start_ray made for it (removed from the environment after)


def stop_ray() -> None:
    """Shut Ray down; a local cluster this process started is stopped at once.

    Ray stops a local cluster by sending each of its processes SIGTERM, waiting a second for it to
    end, then SIGKILL, one kind of process after the other. Ours block SIGTERM (above), so each
    wait was spent in full: 5.3 s after every local ``flowar-sample --workers N`` and every
    ``flowar-serve`` stop. Here, once this process has left the cluster (Ray's driver is gone: the
    raylet is not needed any more, and it is only then that Ray stops the processes), the
    processes below this one that block SIGTERM, i.e. the cluster's (they inherit the mask), are
    killed at once; Ray then finds them ended. Without ``/proc``, Ray's own waits apply."""
    import threading

    import ray

    local, _LOCAL[0] = _LOCAL[0], False
    try:
        if not local or not ray.is_initialized():
            ray.shutdown()
            return
        # (Ray's driver is private: where it is not found, the processes are killed at once and the
        # driver's disconnect waits for the raylet instead, as long as Ray's own waits: slower, not wrong)
        driver = getattr(getattr(getattr(ray, "_private", None), "worker", None), "global_worker", None)
        done = threading.Event()

        def kill_once_the_driver_left() -> None:
            while driver is not None and hasattr(driver, "core_worker") and not done.wait(0.005):
                pass
            _kill_cluster()

        watcher = threading.Thread(target=kill_once_the_driver_left, name="flowar-ray-stop", daemon=True)
        watcher.start()
        try:
            ray.shutdown()
        finally:
            done.set()
            watcher.join()
    finally:
        _forget_token()


def _reread_token() -> None:
    """Ray keeps the token it read first for the process: it reads the one set now (a second cluster
    in one process, or one joined after a local cluster had gone, was sent the token of before)."""
    try:
        from ray._raylet import AuthenticationTokenLoader        # (private: without it, Ray's own caching)
        AuthenticationTokenLoader.instance().reset_cache()
    except Exception:   # noqa: BLE001
        pass


def _forget_token() -> None:
    """The token start_ray made for its local cluster leaves the environment with the cluster (it is
    not the token of a cluster this process joins next)."""
    if _TOKEN[0] is not None and os.environ.get("RAY_AUTH_TOKEN") == _TOKEN[0]:
        del os.environ["RAY_AUTH_TOKEN"]
    _TOKEN[0] = None


def _kill_cluster() -> None:
    """Kill the local cluster's processes at once: those below this one that block SIGTERM (they
    inherit the mask start_ray sets), and wait until they have ended (a process with much memory
    takes a moment to exit)."""
    import signal
    import time

    from flowar.io.memory import descendants, process_running
    killed = []
    for pid in descendants(os.getpid()):
        if _blocks_sigterm(pid):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    while any(process_running(p) for p in killed) and time.monotonic() < deadline:
        time.sleep(0.005)


def _blocks_sigterm(pid: int) -> bool:
    """Whether the process ``pid`` blocks SIGTERM (/proc/PID/status)."""
    import signal
    try:
        with open(f"/proc/{pid}/status") as f:
            blocked = next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return False
    return bool(blocked >> (signal.SIGTERM - 1) & 1)


_START = "start one (ray start --head) and pass the address it prints, or omit --ray-address for a local one"
_TOKEN_FIX = ("put the cluster's token in ~/.ray/auth_token or $RAY_AUTH_TOKEN (`ray get-auth-token` on its head prints "
              "it), or check the address, or omit --ray-address for a local cluster")


@contextmanager
def _few_tries():
    """Connecting to a cluster: a few tries, and Ray's warning of each held back (shown again where the
    connection is made). A cluster that refused this client's token was tried for 20 s, a warning line a
    second, before Ray gave up: the command's one line then came after twenty of Ray's."""
    import sys
    import tempfile
    set_here = "RAY_gcs_server_port_wait_time_s" not in os.environ    # (Ray's count of tries, a second apart)
    saved = held = None
    ok = False
    try:
        if set_here:
            os.environ["RAY_gcs_server_port_wait_time_s"] = "5"
        if sys.stderr is not None:
            sys.stderr.flush()
        held = tempfile.TemporaryFile()
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)           # (Ray's core writes to the process's stderr itself)
        yield
        ok = True
    finally:
        if saved is not None:               # (put back first: a stop that came meanwhile says so on the terminal)
            os.dup2(saved, 2)
            os.close(saved)
        if set_here:
            os.environ.pop("RAY_gcs_server_port_wait_time_s", None)
        if held is not None:
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            held.close()
            kept = "".join(ln for ln in lines if ok or "Failed to get cluster ID from GCS" not in ln)
            if kept and sys.stderr is not None:
                sys.stderr.write(kept)
                sys.stderr.flush()


def _answers(address: str) -> None:
    """Refuse at once a cluster address (HOST:PORT, ray://HOST:PORT) where nothing answers: Ray
    itself retried for minutes, printing warnings."""
    import socket
    if address in ("auto", "local") or ("://" in address and not address.startswith("ray://")):
        return                  # Ray finds or refuses it itself (other client schemes: Ray's module hook)
    where = address.removeprefix("ray://")
    host, _, port = where.rpartition(":")
    if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:    # (Ray's own ValueError, a traceback)
        raise FlowARError("--ray-address auto, HOST:PORT or ray://HOST:PORT", repr(address),
                          "pass the address `ray start --head` printed (e.g. 10.0.0.5:6379), or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise FlowARError(f"a running Ray cluster (--ray-address {address})",
                          f"no answer at {host}:{port} ({e.strerror or type(e).__name__})", _START) from None


def _not_token_enabled(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Token authentication is enabled")


def quiet_ray_data() -> None:
    """Ray Data's progress and failure tracebacks off the console (our own bar and one-line error
    say it); its warnings still show, and its session log file (ray-data-*.log) keeps everything."""
    log = logging.getLogger("ray.data")
    log.setLevel(logging.WARNING)
    for h in log.handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) \
                and _below_error not in h.filters:
            h.addFilter(_below_error)


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


def bounded_retries(map_batches, n: int) -> dict:
    """``max_restarts``/``max_task_retries`` = n for map_batches' actors, while Ray takes them: they
    pass through its **ray_remote_args, deprecated in Ray 2.60 (to go in 2.64) with no named
    replacement. Ray Data's default is to retry forever, so a worker that died on every shard (a node
    lost, a process killed) hung the command."""
    takes = inspect.signature(map_batches).parameters
    if "max_restarts" in takes or any(p.kind is p.VAR_KEYWORD for p in takes.values()):
        return {"max_restarts": n, "max_task_retries": n}
    return {}
