"""``flowar-serve`` on Ray Serve: the API of :mod:`flowar.commands.service` as a deployment's
FastAPI ingress, one :class:`~flowar.commands.service.Service` (an engine set behind a bounded
queue) per replica; starting, draining and stopping it.

Two bounds keep overload from queueing without end: each replica's queue of images (beyond it, or
beyond what it computes within a request's deadline, the replica answers 503 itself, at once, with
one line and the seconds the queue needs) and Ray Serve's own ``max_queued_requests`` (the requests
its router holds while it assigns them; beyond them Serve answers 503 with plain text of its own).
The router's bound is set 256 requests above the replica's queue so that the replica is the one
that refuses: at the replica's queue size a burst of 160 requests got 17-54 of Serve's answers.

Stopping (SIGTERM, as Kubernetes and systemd send it, or Ctrl-C): each replica is told to drain
through the deployment's handle, and the application is redeployed with ``draining`` on (which
Serve applies in place, ``reconfigure``, to the running replicas and to any it starts later): new
requests get 503 while those in flight finish, for at most the grace period; then Ray is shut down
(a shared cluster: the application is deleted) and the command exits 0 with one line. A signal
that comes while the application deploys stops it as soon as it is up, the same way.

``app`` is the application builder that Serve configs name (deploy/serve-config.yaml).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import signal
import time

from flowar.errors import FlowARError

APP = "flowar"
TOKEN_ENV = "FLOWAR_SERVE_TOKEN"


def read_token(path: str | None) -> str | None:
    """The bearer token clients must send: the first line of the file ``path``, else
    ``$FLOWAR_SERVE_TOKEN``; None when neither is given (never taken from the command line, where
    every user of the machine could read it)."""
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise FlowARError("a readable token file (--token-file)", f"{path}: {getattr(e, 'strerror', e)}",
                              "check the path and its permissions") from None
        if not token:
            raise FlowARError("a token on the first line of --token-file", f"{path} has none",
                              "write the token into it, e.g. openssl rand -hex 24 > FILE")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


@functools.cache
def _service_class():
    """The deployment class (defined once, Ray and FastAPI imported only when serving)."""
    from ray import serve

    from flowar.commands.app import make_app
    from flowar.commands.service import Limits, Service

    @serve.ingress()
    class FlowARService:
        """One replica: its Service and the FastAPI app over it (built when the replica starts,
        since the app needs the opened engines)."""

        def __init__(self, engine_dir: str, threads: int | None, backend: str, max_n: int, queue: int,
                     deadline_s: float, token: str | None, lanes: int | None = None):
            ctx = serve.get_replica_context()
            name = getattr(ctx, "replica_tag", None) or str(ctx.replica_id.unique_id)
            self.service = Service.open(engine_dir, threads, backend, Limits(max_n=max_n, queue=queue,
                                        deadline_s=deadline_s, token=token, replica=name), lanes)

        def __serve_build_asgi_app__(self):
            return make_app(self.service)

        def reconfigure(self, config: dict) -> None:
            """user_config: ``draining`` refuses new images (503) and lets those held finish."""
            self.service.draining = bool((config or {}).get("draining"))

        async def held(self, drain: bool = False, give_up: float | None = None) -> tuple[str, int, int]:
            """(this replica, the images it holds and the answers not yet out: Service.busy, the
            requests it has answered 503 so far): what stopping waits on; ``drain``: refuse new images
            from now on (what ``reconfigure`` does once Serve gets to it); ``give_up``: the stop's
            grace (seconds) is spent: answer what is held 503 (:meth:`Service.give_up`). On the
            event loop that admits requests (async), so that none is admitted between the drain
            and the count."""
            if drain:
                self.service.draining = True
            if give_up is not None:
                self.service.give_up(give_up)
            return self.service.limits.replica, self.service.busy(), self.service.gave_up

    return serve.deployment(name="FlowARService")(FlowARService)


def build_app(engine_dir: str, *, threads: int | None = None, max_n: int = 16, replicas: int = 1, backend: str = "auto",
              lanes: int | None = None, queue: int | None = None, deadline_s: float = 120.0, token: str | None = None,
              grace_s: float = 60.0, draining: bool = False):
    """The Ray Serve application. ``draining``: the replicas refuse new images; deployed over a
    running application with the same settings, Serve reconfigures its replicas in place."""
    from ray.serve.config import BackpressureConfig

    from flowar.export.manifest import read_manifest
    max_batch = read_manifest(engine_dir).max_batch
    limit = queue or max(2 * max_batch, max_n)       # images a replica holds: a batch running, one waiting
    args = (engine_dir, threads, backend, max_n, limit, deadline_s, token, lanes)
    options = dict(num_replicas=replicas, ray_actor_options={"num_cpus": threads or 1},
                   max_ongoing_requests=limit + 256, max_queued_requests=limit + 256,  # the replica refuses first, at once
                   backpressure_config=BackpressureConfig(status_code=503, retry_after_s=5),
                   graceful_shutdown_timeout_s=grace_s, graceful_shutdown_wait_loop_s=0.5,
                   user_config={"draining": draining})
    # The same version for the same settings: deployed again with only user_config changed, Serve
    # reconfigures the running replicas; under a new version it would start new ones (opening the
    # engines again, twice the memory) before stopping the old. Serve keeps this option internal.
    version = hashlib.sha256(repr((args, replicas)).encode()).hexdigest()[:16]
    cls = _service_class()
    try:
        deployment = cls.options(_internal=True, version=version, **options)
    except (TypeError, ValueError):                  # a Ray without it: draining starts new replicas
        deployment = cls.options(**options)
    return deployment.bind(*args)


def check_limits(replicas, max_n, threads, lanes, queue, deadline_s, grace_s, name=lambda key: key) -> None:
    """Refuse, before Ray starts, a count below 1 or a time not above 0 (``name``: how the caller
    calls each setting: flowar-serve's options, or the application builder's keys)."""
    import math
    for key, v in (("replicas", replicas), ("max_n", max_n), ("threads", threads), ("lanes", lanes), ("queue", queue)):
        if v is not None and not (type(v) is int and v >= 1):
            raise FlowARError(f"{name(key)} an integer >= 1", repr(v), f"pass a positive {name(key)}")
    for key, v in (("deadline_s", deadline_s), ("grace_s", grace_s)):
        if not (type(v) in (int, float) and v > 0 and math.isfinite(v)):
            raise FlowARError(f"{name(key)} > 0 seconds", repr(v), f"pass e.g. {name(key)} 60")
    if queue is not None and queue < max_n:
        raise FlowARError(f"{name('queue')} at least {name('max_n')} ({max_n}): a request of {name('max_n')} images must "
                          "fit", str(queue), f"use {name('queue')} {max_n} or more, or a smaller {name('max_n')}")


def app(args: dict):
    """Application builder for ``serve run`` / ``serve deploy`` (deploy/serve-config.yaml):
    ``args`` are :func:`build_app`'s keywords; ``token_file`` instead of ``token``, required
    unless ``open: true`` (a cluster's address is not loopback). Checked as flowar-serve checks
    its options, before any replica starts."""
    args, params = dict(args), inspect.signature(build_app).parameters
    keys = set(params) - {"token", "draining"} | {"token_file", "open"}
    if unknown := sorted(map(str, set(args) - keys)) or ([] if "engine_dir" in args else ["engine_dir missing"]):
        raise FlowARError(f"args of {', '.join(sorted(keys))} (engine_dir required)", ", ".join(map(str, unknown)),
                          "see deploy/serve-config.yaml")
    if type(args.get("open", False)) is not bool:          # ("false" quoted in the YAML served without a token)
        raise FlowARError("open: true or false (unquoted)", repr(args["open"]), "write open: true, or leave it out")
    token = read_token(args.pop("token_file", None))
    if token is None and not args.pop("open", False):
        raise FlowARError("a bearer token for a served cluster (args: token_file)", "none",
                          "mount a token file and name it, or set open: true to serve without one")
    args.pop("open", None)
    given = {k: args.get(k, v.default) for k, v in params.items() if k != "engine_dir"}
    check_limits(*(given[k] for k in ("replicas", "max_n", "threads", "lanes", "queue", "deadline_s", "grace_s")))
    from flowar.export.manifest import read_manifest
    from flowar.runtime.directory import choose_backend
    choose_backend(read_manifest(args["engine_dir"]), given["backend"])      # (a backend this directory cannot run)
    return build_app(args.pop("engine_dir"), token=token, **args)


class _Stop(Exception):
    pass


def serve_forever(engine_dir: str, host: str, port: int, threads: int | None, max_n: int, replicas: int,
                  ray_address: str | None, ready=None, block: bool = True, backend: str = "auto",
                  lanes: int | None = None, queue: int | None = None, deadline_s: float = 120.0,
                  token: str | None = None, grace_s: float = 60.0, say=print) -> None:
    """Start Serve on host:port and the application; with ``block``, serve until SIGTERM or
    SIGINT, then stop gracefully (:func:`stop`)."""
    from flowar.commands.cluster import start_ray
    # A local Serve's controller checks its deployments and its replicas export metrics every 0.1 s:
    # with every core computing, that background work preempts the compute threads (whose OpenMP
    # barriers then wait on the preempted one). 16 concurrent FlowAR-S requests on 2 cores took
    # 49.7 s with those defaults and 43.7 s at once a second, enough for one command's deployment.
    os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "1")
    os.environ.setdefault("RAY_SERVE_METRICS_EXPORT_INTERVAL_MS", "1000")
    start_ray(ray_address, None if ray_address else max(2, (threads or 1) * replicas))
    say(f"starting Ray Serve and {replicas} replica{'s' * (replicas > 1)} of {engine_dir} ...")   # (the longest wait)
    # SIGTERM and SIGINT are this command's from here on (ray.init has just set a SIGTERM handler of
    # its own: a SIGTERM while Serve started exited 15 with a native stack dump, or was lost). One
    # that comes while the application deploys is kept: the service stops as soon as it is up; a
    # second one stops the start itself (one that cannot finish: replicas that find no CPUs).
    asked: list[str] = []                   # the signal that asked to stop
    waiting = [False]                       # in the serving wait, which a signal interrupts

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if waiting[0]:
            asked[:] = asked or [name]
            waiting[0] = False
            for sig in previous:                      # (here: a second one at once went to the start's branch)
                signal.signal(sig, signal.SIG_IGN)
            raise _Stop()
        if asked:
            raise KeyboardInterrupt(f"a second {name} while Ray Serve started; nothing was served")
        asked.append(name)
        say(f"{name}: stopping once Ray Serve is up (again to stop at once)")
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if block else {}
    try:
        import logging

        from ray import serve
        logging.getLogger("ray.serve").setLevel(logging.WARNING)      # the command says what matters itself
        t0 = time.perf_counter()
        settings = dict(threads=threads, max_n=max_n, replicas=replicas, backend=backend, lanes=lanes, queue=queue,
                        deadline_s=deadline_s, token=token, grace_s=grace_s)
        try:
            serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
            serve.run(build_app(engine_dir, **settings), name=APP, route_prefix="/")
        except FlowARError:
            raise
        except Exception as e:   # noqa: BLE001 - a replica that failed to start (Serve's whole report), or Serve
            raise start_failure(e, serve, engine_dir) from None
        if ready is not None:
            ready(time.perf_counter() - t0)
        if not block:
            return
        try:
            waiting[0] = True
            while not asked:
                time.sleep(3600)
        except _Stop:
            pass
        waiting[0] = False
        for sig in previous:                          # a second signal does not interrupt the stopping
            signal.signal(sig, signal.SIG_IGN)
        say(f"stopped on {asked[0]}: {stop(engine_dir, settings, shared=ray_address is not None)}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop(engine_dir: str, settings: dict, shared: bool = False) -> str:
    """Drain, then shut the local cluster this process started down with Ray, Serve with it
    (``shared``: a cluster that was running before, whose Serve other applications may use: only
    ours is deleted and this process disconnects); says what happened in one line."""
    from ray import serve

    from flowar.commands.cluster import stop_ray
    t0 = time.perf_counter()
    grace = settings["grace_s"]
    # The replicas are told to drain through the handle (at once) and by the application's config,
    # which a replica Serve starts from now on gets too; Serve applies a config on its controller's
    # 1 s loop, 3 s of every stop when the stop waited for it, so it is not waited for where Serve
    # allows that.
    draining = build_app(engine_dir, draining=True, **settings)
    run = getattr(serve, "_run", None)
    if run is not None and "_blocking" in inspect.signature(run).parameters:
        run(draining, _blocking=False, name=APP, route_prefix="/")
    else:                                           # a Ray without it: deployed and waited for
        serve.run(draining, name=APP, route_prefix="/")
    busy, answered = _wait_idle(serve.get_app_handle(APP), settings["replicas"], t0 + grace, grace)
    if busy != 0:       # answers still not out: the replicas stop without waiting again (reconfigured in place)
        serve.run(build_app(engine_dir, draining=True, **(settings | {"grace_s": 0.0})), name=APP, route_prefix="/")
    if shared:
        serve.delete(APP)
    # (no serve.shutdown() before Ray's: it waited ~4 s for replicas that hold nothing after the
    # drain, or whose images past the grace are dropped either way: 7.9 -> 4.6 s to stop)
    stop_ray()
    said = [f"{answered} request{'s' * (answered > 1)} still held after the {grace:g} s grace answered 503"
            ] * (answered > 0)
    said += (["every request in flight answered"] if busy == 0 and not answered else [] if busy == 0 else
             ["the replicas did not say what they held"] if busy is None else
             [f"the replicas still held {busy} image(s) or answer(s), dropped"])
    return f"drained and stopped in {time.perf_counter() - t0:.1f} s" + "".join("; " + x for x in said)


def _wait_idle(handle, replicas: int, until: float, grace: float, late_s: float = 5.0) -> tuple[int | None, int]:
    """Drain every replica and wait until each holds no image and has no answer still to send
    (asked through the handle, which routes each call to some replica: asked until each has
    answered), or ``until``: then each answers what it holds 503, and the answers are waited for
    ``late_s`` more. (What the replicas' latest answers say is still busy (None: not every replica
    answered), the requests answered 503: each replica's own count, so that a lost answer loses none.)"""
    latest: dict[str, int] = {}
    gave_up: dict[str, int] = {}
    failed = 0
    while True:
        late = time.perf_counter() >= until
        try:
            for _ in range(2 * replicas):
                name, busy, answered = handle.held.remote(True, grace if late else None).result(timeout_s=5)
                latest[name] = busy
                if late:
                    gave_up[name] = answered
            failed = 0
        except Exception:   # noqa: BLE001 - a replica gone or not answering: asked again (Serve routes to the others)
            failed += 1
            if failed >= 3:
                return None, sum(gave_up.values())
        if len(latest) >= replicas and not any(latest.values()):
            return 0, sum(gave_up.values())
        if late and time.perf_counter() >= until + late_s:      # (each replica reached by then, but not surely)
            return (sum(latest.values()) if len(latest) >= replicas else None), sum(gave_up.values())
        time.sleep(0.2)


def start_failure(e: Exception, serve, engine_dir: str) -> FlowARError:
    """What ``flowar-serve`` says when Ray Serve or a replica failed to start: a replica's own one-line error where
    one is in Serve's report or its deployments' status (Ray 2.60 raises "Deploying application flowar failed:
    Failed to update the deployments [...]", the cause in the status only), else the report's last line."""
    from flowar.errors import said_in
    said = str(e)
    try:
        said += "\n" + "\n".join(d.message for a in serve.status().applications.values() for d in a.deployments.values())
    except Exception:   # noqa: BLE001 - (no status to read: the report alone)
        pass
    if ours := said_in(said):                   # (a FlowARError's line, in a traceback)
        return ours
    first = next((ln for ln in reversed(said.splitlines()) if ln.strip()), type(e).__name__)
    return FlowARError("Ray Serve and its replicas to start", f"{type(e).__name__}: {first.strip()[:300]}",
                       f"run flowar-run --engine-dir {engine_dir} --labels 0 to see the engines open")
