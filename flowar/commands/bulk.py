"""Bulk sampling (``flowar-sample``): N images for an evaluation, spread over workers.

The request is cut into fixed shards of consecutive sample indices. Each worker holds one engine
set (an engine directory opened once) and takes shards: one worker on this machine runs in this
process; several, or a cluster (``--ray-address``), run as Ray Data actors that shards are mapped
onto. Sample i always has the label ``classes[i % len(classes)]`` (class-balanced) and the noise
of (seed, i), every actor computes with the same number of threads, and batches are cut at
multiples of the batch size, so the output does not depend on the number of workers, on which
worker took which shard, nor on the shard size (a multiple of the batch): the same bytes. Another
batch size changes the images by float rounding only (a pixel in ten thousand by one level).

Each finished shard is written atomically (its PNGs, then ``shards/NNNNN.npz`` last, which marks
it done), so a run killed at any point is completed by running the same command again: finished
shards are kept, the rest are sampled. At the end ``samples.npz`` holds the evaluators' format
(ADM / MAR: ``arr_0`` uint8 (N, H, W, 3), ``arr_1`` int64 labels).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from flowar.commands.cluster import bounded_retries, quiet_ray_data, start_ray
from flowar.commands.follow import follow_workers
from flowar.commands.shards import (begin_run, check_run, shard_batches, shard_is_done, shard_path, shard_ranges,
                                    images_done, images_sha256, write_run_json)
from flowar.config import MAX_BATCH
from flowar.errors import FlowARError, raise_if_set, stop_answered
from flowar.io.npz import Parts, write_npz


@dataclass(slots=True)
class BulkSpec:
    """What defines the images of a bulk run (stored as ``run.json``; a rerun must match it)."""
    engine_dir: str
    num_images: int
    classes: list[int]            # sample i gets classes[i % len(classes)]
    seed: int
    schedule: dict                # the sampling Settings given (schedule, steps, cfg, guidance, solver, stride)
    shard_size: int
    threads: int                  # per worker; the same for every worker count, so results are too
    backend: str = "auto"         # as flowar-run --backend: auto = the engines chosen for this machine
    batch: int | None = None      # images per batch (None: the call plan's best); changes pixels by rounding
    manifest_sha256: str | None = None   # what the engine directory's manifest says defines its images (set by
                                         # run_bulk: images_sha256): a re-export there with other engines or other
                                         # choices is another run, not a resumable one
    chosen: str | None = None     # what the backend picked where the run began (set by run_bulk): auto on a GPU
                                  # (TensorRT) resumed on a CPU (ONNX Runtime) is another run


@dataclass(slots=True)
class BulkReport:
    out: Path
    shards_total: int
    shards_done_before: int
    seconds: float
    images_per_s: float
    workers: int
    shard_seconds: list[float] = field(default_factory=list)
    engines: list[str] = field(default_factory=list)     # what the workers ran: "backend: detail"
    batch: int | None = None                             # the batch the workers sampled in
    sampling_images_per_s: float = 0.0                   # images / seconds in the shards (per the workers together)


WORKER_RETRIES = 3            # restarts of a Ray worker that died, and retries of its shard, before the command fails


class ShardSampler:
    """One worker (this process, or a Ray Data actor): the pipeline opened once (the engines flowar-run would
    choose; CUDA graphs captured at start on a GPU), shards sampled in batches of ``spec.batch`` (default: the
    best images/s by the call plan) and written; where the engines allow it (:meth:`Runtime.lane`), two batches
    at once in lanes of their own, sharing the cores. ``progress``, a queue (Ray's, or the standard library's
    in this process), gets ``("batch", B)`` once and ``("images", n)`` after every batch, for the driver's bar."""

    def __init__(self, spec: dict, out: str, progress=None):
        from concurrent.futures import ThreadPoolExecutor

        from flowar.sampling.schedule import Settings
        self.spec = BulkSpec(**spec)
        self.out = Path(out)
        self.progress, self.stopping = progress, threading.Event()      # (set: the batches computing stop)
        # opened and run on one thread of its own per lane, whatever threads Ray calls from: opened on
        # one thread and run on another, FlowAR-S took 20-25 % longer per image (see service.Service.open)
        self._computes = [ThreadPoolExecutor(1, thread_name_prefix="flowar-compute")]
        self.pipe = self._computes[0].submit(self._open, self.spec.batch).result()
        rt = self.pipe.runtime
        self._computes += [ThreadPoolExecutor(1, thread_name_prefix="flowar-compute") for _ in range(rt.lanes - 1)]
        self.lanes = [rt] + [c.submit(rt.lane).result() for c in self._computes[1:]]
        self.schedule = rt.schedule(Settings.of(self.spec.schedule))
        self._tell("batch", self.formed)

    def close(self, wait: bool = True) -> None:
        """End the compute threads (``wait``: after the batch each computes) and close the engines."""
        for c in self._computes:
            c.shutdown(wait=wait)
        self.pipe.close()

    def _open(self, batch: int | None):
        from flowar.pipeline.pipeline import FlowARPipeline
        pipe = FlowARPipeline.from_pretrained(self.spec.engine_dir, backend=self.spec.backend, threads=self.spec.threads)
        self.batch = batch or pipe.runtime.batch or self.spec.shard_size
        # the sizes the shards' batches come in (fewer than the batch where shards are smaller), warmed
        # (what pays): none set up in a shard; the largest is the batch reported
        sizes = {len(b) for _, a, e in shard_ranges(self.spec.num_images, self.spec.shard_size)
                 for b in shard_batches(a, e, self.batch)}
        pipe.runtime.warm_up(sorted(sizes))
        self.formed = max(sizes)
        return pipe

    def _tell(self, what: str, n: int) -> None:
        if self.progress is not None:
            self.progress.put_nowait((what, n))

    def sample_shard(self, j: int, start: int, end: int) -> float:
        import torch

        from flowar.io.images import save_images, to_uint8
        t0 = time.perf_counter()
        # this shard's own: a batch of a shard that failed, still computing, stops at its next scale even
        # once the next shard (Ray Data's retry of it, on this worker) has begun (a cleared one ran it to its end)
        stopping = self.stopping = threading.Event()
        batches = shard_batches(start, end, self.batch)
        jobs = [self._computes[i % len(self.lanes)].submit(self._sample, self.lanes[i % len(self.lanes)], idx, stopping)
                for i, idx in enumerate(batches)]
        parts = []
        try:
            for job, idx in zip(jobs, batches):
                parts.append(job.result())
                self._tell("images", len(idx))
        except BaseException:               # Ctrl-C, SIGTERM or a failed batch: the queued batches are not run, and
            stopping.set()                  # one computing stops at its next scale (it ran on 20 s after "interrupted")
            for job in jobs:
                job.cancel()
            raise
        images = torch.cat(parts)
        idx = list(range(start, end))
        save_images(images, self.out / "png" / f"{j:05d}", first=start)      # named by sample index
        write_npz(shard_path(self.out, j), {"images": to_uint8(images),
                                            "labels": np.asarray([self.spec.classes[i % len(self.spec.classes)]
                                                                  for i in idx], np.int64),
                                            "indices": np.asarray(idx, np.int64),
                                            "engines": np.asarray(self.engines())})
        return time.perf_counter() - t0

    def _sample(self, rt, idx: list[int], stopping: threading.Event):
        labels = [self.spec.classes[i % len(self.spec.classes)] for i in idx]
        return rt.sample(labels, self.schedule, seed=self.spec.seed, indices=idx, batch_size=len(idx),
                         on_scale=lambda _: raise_if_set(stopping)).images

    def __call__(self, batch: dict) -> dict:
        secs = [self.sample_shard(int(j), int(s), int(e))
                for j, s, e in zip(batch["shard"], batch["start"], batch["end"])]
        return {"shard": np.asarray(batch["shard"]), "seconds": np.asarray(secs),
                "batch": np.asarray([self.formed] * len(secs)),
                "engines": np.asarray([self.engines()] * len(secs))}

    def engines(self) -> str:
        """What computes this worker's images (recorded in run.json and in each shard)."""
        rt = self.pipe.runtime                  # (as flowar-run names them: it said "measured: auto: aoti-bf16")
        return rt.detail if rt.backend == "measured" else f"{rt.backend}: {rt.detail}"


def run_bulk(spec: BulkSpec, out: str | Path, workers: int = 1, ray_address: str | None = None,
             progress: bool = True) -> BulkReport:
    """Sample the shards not yet in ``out`` on ``workers`` actors, in batches of ``spec.batch``
    (default: the best images/s by the directory's call plan), then write ``samples.npz``. A bar
    shows images/s, the batch and the time left."""
    from flowar.export.manifest import read_manifest
    from flowar.engines.ort import cpu_threads
    from flowar.io.files import check_writable, used_alone
    out = Path(out)
    if spec.num_images < 1 or spec.shard_size < 1 or workers < 1 or spec.threads < 1:
        raise FlowARError("--num-images, --shard-size, --workers and --threads >= 1",
                          f"{spec.num_images} / {spec.shard_size} / {workers} / {spec.threads}", "use positive numbers")
    check_writable(out, True, "--out")
    m = read_manifest(spec.engine_dir)
    m.require_decoder()
    if spec.batch is not None and not 1 <= spec.batch <= m.max_batch:
        raise FlowARError(f"--batch in 1..{m.max_batch} (the engines' max batch)", str(spec.batch),
                          f"use --batch {m.max_batch} or less, or re-export with --max-batch {min(spec.batch, MAX_BATCH)}"
                          if spec.batch > m.max_batch else "use e.g. --batch 1")
    bad = [c for c in spec.classes if not 0 <= c < m.config.num_classes]
    if bad or not spec.classes:
        raise FlowARError(f"class ids in 0..{m.config.num_classes - 1}", f"{bad or 'none'}", "check --labels")
    from flowar.export.manifest import MANIFEST, sha256_file
    from flowar.runtime.directory import backend_named
    from flowar.runtime.directory import choose_backend
    from flowar.sampling.schedule import Settings
    spec.chosen = choose_backend(m, spec.backend)                               # refuse a backend that cannot run
    Settings.of(spec.schedule).resolve(m.config.n_scales, m.schedule_defaults)  # refuse bad settings now
    file_sha256 = sha256_file(m.root / MANIFEST)
    spec.manifest_sha256 = images_sha256(m.root / MANIFEST)
    # room for the images still to sample twice (their shards, their PNGs at most) and samples.npz of all:
    # a count the disk cannot hold is refused now (10^12 images filled 24 GB of memory listing their
    # shards, then was killed)
    from flowar.io.memory import require_free_space
    side = m.vae["image_size"]
    left = spec.num_images - images_done(out, spec)
    require_free_space(out, (2 * left + spec.num_images) * side * side * 3,
                       f"{left} images of {side}x{side} still to sample (shards, PNGs) and samples.npz")
    n_scales, recorded = m.config.n_scales, m.schedule_defaults

    def meaning(rec: dict) -> dict:
        """A record as its images are defined: the schedule its settings resolve to, the engines its
        backend picked where the run began, the batch they sampled at (`--cfg 4.3` spelled out, `--backend
        ort` where auto picked ONNX Runtime, or `--batch 8` where 8 was the default, resumes a run that left
        them to the defaults; a record from before the field: what its backend picks here)."""
        given = rec.get("schedule")
        try:
            schedule = Settings.of(given).resolve(n_scales, recorded) if isinstance(given, dict) else given
            picked = rec.get("chosen") or choose_backend(m, rec.get("backend", "auto"))
            # (no --batch: the batch its engines sample at by default, the runtime's, so that the same batch given resumes it)
            plan = (m.call_plan or {}).get("batches") if picked == "measured" else None
            # (the batch its shards are cut into: --batch 3 and the default 8 are one run in shards of 3)
            batch = rec.get("batch") or max(map(int, plan or [m.max_batch]))
            rec = rec | {"schedule": schedule, "backend": backend_named(m, picked), "chosen": None,
                         "batch": min(batch, rec.get("shard_size") or batch, rec.get("num_images") or batch)}
            # (a record from before: the digest of the manifest file itself, which these engines have; wherever
            # they were then)
            same = rec.get("manifest_sha256") in (file_sha256, spec.manifest_sha256)
            return rec | {"manifest_sha256": spec.manifest_sha256, "engine_dir": spec.engine_dir} if same else rec
        except FlowARError:                             # (what another version recorded: compared as it is)
            return rec
    with used_alone(out, "flowar-sample"):           # (two runs into one folder mixed their images)
        resumes = check_run(out, spec, meaning)
        if ray_address is not None or (workers > 1 and left > 0):
            # a cluster that is not there, or a local one Ray cannot start: refused before --out is written
            start_ray(ray_address, None if ray_address else workers * spec.threads)
        if not resumes:
            begin_run(out, spec)
        shards = shard_ranges(spec.num_images, spec.shard_size)
        todo = [s for s in shards if not shard_is_done(out, *s)]
        cores = cpu_threads()
        if progress and todo and ray_address is None and workers * spec.threads < cores:
            print(f"note: {workers} worker(s) x {spec.threads} thread(s) use {workers * spec.threads} of this machine's "
                  f"{cores} cores; --threads {cores // workers} is faster (the images then differ from other --threads "
                  "by float rounding)", file=sys.stderr)
        t0 = time.perf_counter()
        secs: list[float] = []
        engines: set[str] = set()
        batches: set[int] = set()
        done_now = sum(e - s for _, s, e in todo)
        if todo:
            # SIGTERM stops it as Ctrl-C does (ray.init sets a handler of its own, which left the local
            # cluster's processes running for a minute): the work unwinds, Ray shuts down, and the line
            # says how far it got.
            main = threading.current_thread() is threading.main_thread()
            previous = signal.getsignal(signal.SIGTERM) if main else None
            try:
                if ray_address is None and workers == 1:       # one worker here: this process, no Ray around it
                    if main and not callable(previous):     # (the command's own handler, which holds stops, stays)
                        signal.signal(signal.SIGTERM, signal.default_int_handler)
                    rows = _sample_here(spec, out, todo, progress, spec.num_images - done_now)
                else:
                    start_ray(ray_address, None if ray_address else workers * spec.threads)
                    if main:
                        signal.signal(signal.SIGTERM, signal.default_int_handler)
                    rows = _sample_on_ray(spec, out, todo, workers, progress, spec.num_images - done_now)
            except KeyboardInterrupt:
                if ray_address is not None or workers > 1:
                    from flowar.commands.cluster import stop_ray
                    stop_ray()                                  # its workers stop (a shard may end) before the count
                written = sum(e - s for j, s, e in shards if shard_is_done(out, j, s, e))
                if now := written - (spec.num_images - done_now):      # (its throughput too: a resume's alone was kept)
                    dt = time.perf_counter() - t0
                    with stop_answered():            # (the stop's own record: a stop asked refused its write)
                        write_run_json(out, spec, [], {"images": now, "seconds": round(dt, 3), "images_per_s": round(
                            now / dt, 4), "stopped": True, "workers": workers, "threads": spec.threads})
                raise KeyboardInterrupt(f"{written} of {spec.num_images} images written to {out}; the same command "
                                        "resumes") from None
            finally:
                if main and previous is not None:
                    signal.signal(signal.SIGTERM, previous)
            secs = [float(r["seconds"]) for r in rows]
            engines = {str(r["engines"]) for r in rows}
            batches = {int(r["batch"]) for r in rows}
            dt = time.perf_counter() - t0
            write_run_json(out, spec, sorted(engines), {
                "images": done_now, "seconds": round(dt, 3), "images_per_s": round(done_now / dt, 4),
                "sampling_images_per_s": round(done_now * min(workers, len(todo)) / sum(secs), 4),
                "batch": sorted(batches), "workers": workers, "threads": spec.threads})
        missing = [j for j, s, e in shards if not shard_is_done(out, j, s, e)]
        if missing:
            raise FlowARError("every shard written", f"shards {missing[:5]} missing", "run the same command again")
        labels, ran, first = [], {}, None
        for j, _, _ in shards:
            with np.load(shard_path(out, j), allow_pickle=False) as z:
                labels.append(z["labels"])
                first = z["images"][:1] if first is None else first
                if "engines" in z:                  # (shards written before the field: not known)
                    ran.setdefault(str(z["engines"].reshape(-1)[0]), []).append(j)
        if len(ran) > 1:        # (resumed on another CPU kind, or on mixed nodes: one run's images from other engines)
            raise FlowARError("one run's shards sampled by the same engines",
                              "; ".join(f"shards {js[:3]}{'...' if len(js) > 3 else ''} by {e}" for e, js in ran.items()),
                              "finish it where it began (or on nodes of that CPU kind), or sample it again in a new --out")
        labels = np.concatenate(labels)             # (the images shard by shard as written: not all held at once)
        write_npz(out / "samples.npz", {"arr_0": Parts((len(labels), *first.shape[1:]), first.dtype, [
            lambda j=j: np.load(shard_path(out, j), allow_pickle=False)["images"] for j, _, _ in shards]), "arr_1": labels})
        dt = time.perf_counter() - t0
        return BulkReport(out, len(shards), len(shards) - len(todo), dt, done_now / dt if done_now else 0.0,
                          workers, secs, sorted(engines), max(batches, default=None),
                          done_now * min(workers, len(todo)) / sum(secs) if secs else 0.0)


def _sample_here(spec: BulkSpec, out: Path, todo: list, progress: bool, done_before: int) -> list[dict]:
    """The shards on one ShardSampler in this process (one worker and no cluster): what Ray would
    add is its start and its background processes (Ray Data's actors, the dashboard's agent) on
    the cores the engines use."""
    import queue
    told: queue.Queue | None = queue.Queue() if progress else None

    def consume(rows: list[dict]) -> None:
        sampler = ShardSampler(asdict(spec), str(out.resolve()), told)
        try:
            for j, s, e in todo:
                r = sampler({"shard": [j], "start": [s], "end": [e]})
                rows.append({k: v[0] for k, v in r.items()})
        finally:
            sampler.close()          # (after the batches computing, told to stop at their next scale)
    return follow_workers(consume, told, spec, done_before, lambda: None, out)


def _sample_on_ray(spec: BulkSpec, out: Path, todo: list, workers: int, progress: bool,
                   done_before: int) -> list[dict]:
    """Map the shards onto ``workers`` ShardSampler actors of Ray Data."""
    import warnings

    import ray.data
    from ray.util.queue import Queue
    quiet_ray_data()
    told = Queue(actor_options={"num_cpus": 0}) if progress else None
    ds = ray.data.from_items([{"shard": j, "start": s, "end": e} for j, s, e in todo], override_num_blocks=len(todo))
    # a worker that dies is restarted and its shard retried a few times (Ray Data's default: forever);
    # one shard at a time per worker: with Ray Data's default the first worker up took two shards
    # and left another idle (2 shards on 2 workers: 3 of 3 runs on one worker, 44-45 s against 28-29)
    bounded = bounded_retries(ds.map_batches, WORKER_RETRIES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        mapped = ds.map_batches(ShardSampler, fn_constructor_args=(asdict(spec), str(out.resolve()), told),
                                batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(workers, len(todo)),
                                                                                 max_tasks_in_flight_per_actor=1),
                                num_cpus=spec.threads, **bounded)
    return follow_workers(lambda rows: rows.extend(mapped.iter_rows()), told, spec, done_before,
                     told.shutdown if told is not None else lambda: None, out)
