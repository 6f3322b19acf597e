"""The commands that run on Ray: ``flowar-sample`` (bulk sampling on Ray Data) and ``flowar-serve``
(Ray Serve); a thin click layer like :mod:`flowar.commands.cli`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from flowar.commands.options import STARTED, command, joined, schedule_options
from flowar.config import check_seed
from flowar.errors import FlowARError


@command("flowar-sample", imports_torch=False)    # (on Ray its process runs no model)
@click.option("--engine-dir", required=True, type=click.Path(), help="Engine directory (with a VAE).")
@click.option("--num-images", required=True, type=int, help="How many images, e.g. 50000 for an FID evaluation.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder: png/, shards/, samples.npz.")
@click.option("--labels", multiple=True, callback=joined, help="Comma-separated class ids to cycle through [default: every class, balanced].")
@click.option("--classes", multiple=True, help="Or class names (ImageNet names for the official models; ';' or the "
              "option repeated for names that contain commas).")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "ort", "trt", "torch"]),
              help="Engines, chosen as flowar-run chooses: auto = TensorRT (and CUDA graphs) on a GPU where the "
                   "plans fit, else the directory's --precision auto choice, else ONNX Runtime.")
@click.option("--seed", default=0, show_default=True, type=int, help="Sample i gets the noise of (seed, i).")
@schedule_options("the engine directory's")
@click.option("--workers", default=1, show_default=True, type=int, help="Ray actors, one engine set each.")
@click.option("--threads", default=1, show_default=True, type=int, help="Cores per worker. 1 by default so that "
              "the images are the same bytes for any --workers; --threads N (all cores for one worker) is faster, the "
              "images then differ from other thread counts by float rounding.")
@click.option("--batch", type=int, help="Images per batch (changes speed; images only by float rounding) [default: the "
              "best images/s by the call plan measured at export, else the engines' max batch].")
@click.option("--shard-size", default=64, show_default=True, type=int, help="Images per shard (the unit of resume).")
@click.option("--ray-address", help="A running Ray cluster (ray://HOST:PORT, HOST:PORT as ray start --head prints it, "
              "or auto) [default: a local one].")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def sample_cmd(engine_dir, num_images, out, labels, classes, backend, seed, schedule, solver, stride, steps, cfg,
               guidance, workers, threads, batch, shard_size, ray_address, debug):
    """Bulk sampling: PNG shards and samples.npz (ADM format); rerun to resume. One worker runs here; several on Ray."""
    from flowar.commands.bulk import BulkSpec, run_bulk
    from flowar.export.manifest import read_manifest
    from flowar.io.files import check_outputs, check_writable
    from flowar.sampling.labels import class_names_for, parse_labels
    check_outputs([("--out", out)], [engine_dir])
    check_writable(out, True, "--out")
    m = read_manifest(engine_dir)
    ids = parse_labels(m.config.num_classes, class_names_for(m.config.num_classes, m.class_names), labels, classes)
    if not labels and not classes:
        ids = list(range(m.config.num_classes))
    from flowar.sampling.schedule import Settings
    settings = Settings(schedule=schedule, steps=steps, cfg=cfg, guidance=guidance, solver=solver, stride=stride)
    check_seed(seed)
    if threads >= 1 and not ray_address:      # (what computes, recorded: a resume on fewer cores is another run)
        from flowar.engines.ort import cpu_threads
        asked, threads, cores = threads, cpu_threads(threads), cpu_threads()
        if threads < asked:                   # (said: it became 2 without a word, and run.json recorded 2)
            click.echo(f"note: --threads {asked} is more than this machine's {os.cpu_count()} cores: {threads} a worker",
                       err=True)
        if workers * threads > cores:         # (5 workers on 2 cores: 13 images/s against 17.4 with 2, no word)
            click.echo(f"note: {workers} worker(s) x {threads} thread(s) ask for {workers * threads} of the {cores} cores "
                       f"this command may use: they share them, slower than --workers {max(1, cores // threads)} (the "
                       "images are the same bytes for any --workers)", err=True)
    spec = BulkSpec(str(Path(engine_dir).resolve()), num_images, ids, seed, settings.given(), shard_size, threads,
                    backend, batch)
    rep = run_bulk(spec, out, workers, ray_address)             # (it notes cores left idle, once the request is checked)
    kept = f" ({rep.shards_done_before} of them kept from before)" if rep.shards_done_before else ""
    rate = (f"{rep.images_per_s:.3g} images/s ({rep.sampling_images_per_s:.3g} while sampling) at batch {rep.batch} "
            if rep.batch else "")
    click.echo(f"{num_images} images in {rep.shards_total} shard{'s' * (rep.shards_total != 1)}{kept} -> {rep.out / 'samples.npz'} "
               f"({rep.seconds:.1f} s, {rate}on {workers} worker(s) x {threads} thread(s)"
               + (f"; engines {'; '.join(rep.engines)}" if rep.engines else "") + ")")


@command("flowar-serve", imports_torch=False)      # (the service's process runs no model)
@click.option("--engine-dir", required=True, type=click.Path(), help="Engine directory (with a VAE).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default; any "
              "other requires a token).")
@click.option("--port", default=8000, show_default=True, type=int, help="The port it listens on, at --host.")
@click.option("--replicas", default=1, show_default=True, type=int, help="Replicas, one engine set each.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "ort", "trt", "torch"]),
              help="Engines, chosen as flowar-run chooses (auto: TensorRT and CUDA graphs on a GPU where the plans fit, "
                   "else the directory's --precision auto choice, else ONNX Runtime); GET /health says which run.")
@click.option("--threads", type=int, help="Cores per replica [default: the machine's cores shared out among the replicas].")
@click.option("--lanes", type=int, help="Batches a replica computes at once, sharing its cores (a lone batch gets "
              "them all): at most what the engines allow, 2 for compiled or PyTorch stages on a CPU with 2 or more "
              "threads, else 1 (a larger --lanes takes that; GET /health says how many) [default: that].")
@click.option("--max-n", default=16, show_default=True, type=int, help="Most images one request may ask for.")
@click.option("--queue", type=int, help="Images a replica holds (running and waiting) before it answers 503, at "
              "least --max-n [default: twice the engines' max batch, or --max-n if more].")
@click.option("--deadline", default=120.0, show_default=True, type=float, help="Seconds a request is kept at most "
              "(a request may ask for less with timeout_s); one the queue would not make in time is refused at once "
              "(503), and what has not started by then is not computed.")
@click.option("--grace", default=60.0, show_default=True, type=float, help="On SIGTERM/Ctrl-C: seconds the requests in "
              "flight have to finish (those still computing then are answered 503).")
@click.option("--token-file", type=click.Path(dir_okay=False), help="File holding the bearer token clients must send "
              "(or $FLOWAR_SERVE_TOKEN; never on the command line). Required when --host is not loopback.")
@click.option("--require-token", is_flag=True, help="Refuse to start without a token on loopback too (a token given "
              "is always required of clients, on any address).")
@click.option("--ray-address", help="A running Ray cluster [default: a local one].")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def serve_cmd(engine_dir, host, port, replicas, backend, threads, lanes, max_n, queue, deadline, grace, token_file,
              require_token, ray_address, debug):
    """Serve POST /v1/generate on Ray Serve: bounded queues, deadlines, batching by the engine
    directory's call plan; GET / (a page to try it), /health, /metrics, /openapi.json."""
    import ipaddress

    from flowar.commands.serve import check_limits, read_token, serve_forever
    from flowar.export.manifest import read_manifest
    from flowar.runtime.directory import backend_named, choose_backend   # (not through the runtime: no PyTorch here)
    m = read_manifest(engine_dir)
    chosen = choose_backend(m, backend)                 # refuse a backend that cannot run, before starting Ray
    m.require_decoder()
    check_limits(replicas, max_n, threads, lanes, queue, deadline, grace,
                 lambda key: {"deadline_s": "--deadline", "grace_s": "--grace"}.get(key, "--" + key.replace("_", "-")))
    if not 0 < port < 65536:
        raise FlowARError("--port in 1..65535", str(port), "use e.g. --port 8000")
    if ray_address is None:          # a local Serve listens here: refuse an address it cannot take before Ray starts
        _can_listen(host, port)      # (and before the token: --host 999.1.1.1 was told to bring a token)
    token = read_token(token_file)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if (require_token or not loopback) and token is None:
        raise FlowARError("a bearer token to serve beyond loopback (or with --require-token)", "none",
                          "put one in a file for --token-file, or in $FLOWAR_SERVE_TOKEN")
    if ray_address is not None and token is None:     # (a cluster's Serve keeps the host it was started with)
        raise FlowARError("a bearer token to serve on an existing cluster (its Serve may listen beyond loopback "
                          "whatever --host says)", "none", "put one in a file for --token-file, or in "
                          "$FLOWAR_SERVE_TOKEN")
    from flowar.engines.ort import cpu_threads
    threads = threads or max(1, cpu_threads() // replicas)           # the cores this process may use (taskset, cpuset)
    where = f"http://{host}:{port}"

    engines = backend_named(m, chosen)          # (as flowar-run and /health name them: it said "measured")

    def ready(seconds: float) -> None:     # (from the command's start: it said 7.0 s of the 12.7 s before /health)
        since = time.perf_counter() - STARTED[0]
        click.echo(f"serving {engine_dir} on {where} with {engines} engines, ready {since:.1f} s after the command "
                   f"started (Ray Serve and the replicas {seconds:.1f} s) "
                   f"(GET / to try it; POST /v1/generate; GET /health, /metrics, /docs); "
                   f"{'bearer token required' if token else 'no token required (loopback)'}; Ctrl-C or SIGTERM stops",
                   err=True)
    serve_forever(str(Path(engine_dir).resolve()), host, port, threads, max_n, replicas, ray_address, ready=ready,
                  backend=backend, lanes=lanes, queue=queue, deadline_s=deadline,
                  token=token,
                  grace_s=grace, say=lambda line: click.echo(line, err=True))


def _can_listen(host: str, port: int) -> None:
    """Refuse an address this machine cannot listen on (a port in use, a host not its own) in one
    line, before Ray starts (it failed 14 s later, with a fix that pointed at the engines)."""
    import errno
    import socket
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as the server will: TIME_WAIT is no obstacle
            s.bind(addr)
    except OSError as e:
        in_use = e.errno == errno.EADDRINUSE
        raise FlowARError(f"an address to listen on ({host}:{port})", str(e.strerror or e),
                          "choose another --port, or stop what listens there" if in_use
                          else "use --host 127.0.0.1 (loopback), 0.0.0.0 (every interface) or an address of this machine") from None
