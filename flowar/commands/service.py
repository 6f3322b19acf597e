"""The HTTP API of ``flowar-serve``: one replica's engine set behind a FastAPI app, with admission
control, batching by the engine directory's call plan, deadlines, metrics and a bearer token
(routes: README "Serving"; the app's routes, token and body limit: :mod:`flowar.commands.app`).
Nothing here needs Ray: Ray Serve hosts the app as a deployment's ingress
(:mod:`flowar.commands.serve`); tests host it with uvicorn.

Image j of a request is sample j of ``flowar-run --labels L,L,... --seed S``. A replica holds a
bounded queue of images: a request that does not fit, or whose images it would not finish within
the request's deadline (``timeout_s``, at most ``--deadline``) at the rate it drains its queue (an
image counted as what its settings cost: :meth:`Replica.cost`), is refused at once (503 with
Retry-After, spread up to half again so that clients refused together do not come back together;
none for a request that would not fit even alone); an image whose request has passed its deadline
(504) or whose client has gone is not computed, and a batch stops between two scales once none of
its images is waited for. Batches are formed only in the sizes that cost less per image than every
smaller one (the call plan), never waiting to fill, each of one settings (the oldest waiting
image's). Where the engines allow it (:meth:`flowar.runtime.runtime.Runtime.lane`) a replica
computes two batches at once, in lanes sharing the cores: on 2 cores, 16 FlowAR-S requests at once
were served at 1.19-1.26x the rate of one image at a time, 1.02-1.04x with one lane. An idle
replica starts once requests stop arriving (20 ms without one, at most 250 ms) with the largest
batch that takes at most twice one image on its share of the cores. Every error is
``{"error": one line}``.
"""

import asyncio
import math
import random
import time
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from flowar.commands.replica import Replica
from flowar.config import SEED_RANGE
from flowar.errors import FlowARError

GATHER_QUIET_S, GATHER_MAX_S = 0.02, 0.25     # an idle replica lets a burst arrive: until quiet this long, at most


class GenerateRequest(BaseModel):
    """What ``POST /v1/generate`` takes (strict JSON types: ``true`` or ``"5"`` is not a number)."""
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    label: int | None = Field(None, ge=0, description="class id (or give `class`)")
    class_: str | None = Field(None, alias="class", description="class name; ImageNet names and synonyms for "
                               "the official 1000-class models")
    seed: int = Field(0, ge=SEED_RANGE[0], le=SEED_RANGE[1],
                      description="names the images: image j has the noise of (seed, j), as with flowar-run --seed")
    n: int = Field(1, ge=1, description="images, at most the server's --max-n")
    schedule: Literal["official", "fast"] | None = None
    steps: int | None = Field(None, description="the official sampler's num_steps N (25: its 24 steps)")
    cfg: float | None = Field(None, description="guidance weight at the last scale, 1 = off")
    guidance: float | None = Field(None, description="guide only at t <= this")
    timeout_s: float | None = Field(None, gt=0, description="answer within this many seconds or not at all "
                                    "(at most the server's --deadline): refused at once (503) when the replica's "
                                    "queue would not make it")


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="base64 PNG, one per image, in order")
    labels: list[int]
    seeds: list[int]
    indices: list[int]
    seconds: dict[str, float] = Field(description="queue wait, and the seconds per stage of the first batch that made them")
    replica: str


class ServiceError(FlowARError):
    """A request refused: rendered as ``{"error": one line}`` with this HTTP status (and headers)."""

    def __init__(self, status: int, expected: str, got: str, fix: str, headers: dict | None = None):
        super().__init__(expected, got, fix)
        self.status, self.headers = status, headers or {}


@dataclass(slots=True)
class Limits:
    """What the server was started with."""
    max_n: int = 16                   # images per request
    queue: int = 16                   # images a replica holds (running and waiting) before it refuses
    deadline_s: float = 120.0         # the longest a request is kept
    token: str | None = None          # bearer token required (None: open)
    replica: str = "replica"          # this replica's name (metric label)


@dataclass(slots=True, eq=False)
class _Item:
    label: int
    seed: int
    index: int
    settings: object                  # flowar.sampling.schedule.Settings
    deadline: float                   # time.monotonic() after which it is not computed
    future: asyncio.Future
    cost: float = 1.0                 # what its settings cost, in images of the default settings (Replica.cost)
    enqueued: float = field(default_factory=time.monotonic)
    request: object = None            # the request it is an image of

    def gone(self) -> bool:
        """Whether no one waits for it any more (its request answered 504, or its client left)."""
        return self.future.done()


class Metrics:
    """This replica's Prometheus metrics (prometheus_client, a registry of its own)."""

    def __init__(self, replica: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        label = ["replica"]
        self.requests = Counter("flowar_requests", "Requests answered, by HTTP status", label + ["status"], registry=r)
        self.latency = Histogram("flowar_request_seconds", "Seconds from arrival to answer of /v1/generate", label,
                                 buckets=(0.1, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, float("inf")), registry=r)
        self.queue = Gauge("flowar_queue_images", "Images held (running and waiting)", label, registry=r)
        self.batch = Histogram("flowar_batch_size", "Images per batch run", label,
                               buckets=(1, 2, 4, 8, 16, 32, float("inf")), registry=r)
        self.images = Counter("flowar_images", "Images generated", label, registry=r)
        self.stage = Counter("flowar_stage_seconds", "Seconds spent per stage", label + ["stage"], registry=r)
        self.replica = replica

    def text(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


def spread(seconds: int) -> str:
    """A Retry-After of at least ``seconds``, spread up to half again at random (one second more at
    most for a wait of one or two): clients refused together come back over a window, not all at
    the same second (32 refused clients that obeyed one shared value were refused again 36 times)."""
    return str(seconds + random.randint(0, max(1, seconds // 2)))


class Service:
    """A replica behind a bounded queue, each of its lanes computing one batch at a time on a thread of its own."""

    def __init__(self, replica: Replica, limits: Limits, computes: list | None = None):
        self.replica, self.limits = replica, limits
        self.metrics = Metrics(limits.replica)
        self.pending: list[_Item] = []
        self.computing: list[list[_Item]] = []   # the batches being computed (running, running_work: theirs)
        self.answering = 0               # requests to /v1/generate whose answer is not yet out (the app counts)
        self.draining = False
        self.gave_up = 0                 # requests answered 503 once a stop's grace was spent (give_up)
        self._last_arrival, self._wake = 0.0, None     # (an asyncio.Event, made on the loop)
        self._worker: asyncio.Task | None = None
        self._batches: set[asyncio.Task] = set()
        # every batch of a lane on the same thread: one OpenMP team, reused (a new thread per batch
        # would leave the previous threads' teams spinning on the cores the next batch needs)
        from concurrent.futures import ThreadPoolExecutor
        self._computes = computes or [ThreadPoolExecutor(1, thread_name_prefix="flowar-compute")
                                      for _ in replica.lanes]
        self.free = list(range(len(replica.lanes)))             # lanes not computing (the first taken first)
        self.image_s: float | None = None   # the replica's seconds per image as measured here (moving average)
        self._computing, self._lane_s, self._counted = 0, 0.0, time.monotonic()   # lanes computing, lane-seconds, when

    @classmethod
    def open(cls, engine_dir: str, threads: int | None, backend: str, limits: Limits,
             lanes: int | None = None) -> "Service":
        """A service whose replica is opened on its first compute thread and each further lane made on its own, where
        their batches will run (opened on another thread and run on this one, FlowAR-S took 20 % longer per image
        than in a command's main thread). ``lanes``: at most this many (default: as many as the engines allow)."""
        from concurrent.futures import ThreadPoolExecutor
        first = ThreadPoolExecutor(1, thread_name_prefix="flowar-compute")
        replica = first.submit(Replica, engine_dir, threads, backend).result()
        n = min(lanes or replica.pipe.runtime.lanes, replica.pipe.runtime.lanes)
        computes = [first] + [ThreadPoolExecutor(1, thread_name_prefix="flowar-compute") for _ in range(n - 1)]
        replica.add_lanes(computes[1:])
        return cls(replica, limits, computes)

    def close(self) -> None:
        """End the compute threads (after the batch each computes) and close the replica's engines."""
        for c in self._computes:
            c.shutdown(wait=True)
        self.replica.pipe.close()

    # ---- admission and batching ---------------------------------------------------------------
    @property
    def running(self) -> int:            # images of the batches being computed
        return sum(len(b) for b in self.computing)

    @property
    def running_work(self) -> float:     # their cost (Replica.cost)
        return sum(it.cost for b in self.computing for it in b)

    def held(self) -> int:
        return len(self.pending) + self.running

    def _waited(self) -> list:
        """The images held that a request still waits for (not those of one answered 504, or whose client left)."""
        return [it for it in self.pending + [it for b in self.computing for it in b] if not it.future.done()]

    def busy(self) -> int:
        """What stopping waits for: the images still waited for, and the answers not yet out."""
        return len(self._waited()) + self.answering

    def give_up(self, grace_s: float) -> int:
        """A stop's grace is spent: the requests whose images are held answered 503 now (they were cut off with no
        answer), the batches computing stop at their next scale; how many requests (counted in :attr:`gave_up`)."""
        self.draining, held, self.pending = True, self._waited(), []
        for it in held:
            it.future.set_exception(ServiceError(
                503, f"images computed before the server stopped (its grace, --grace: {grace_s:g} s)",
                "the grace spent with these images not done", "send the request again: to another replica, or once "
                "the server is back", {"Retry-After": "5"}))
        n = len({id(it.request) for it in held})
        self.gave_up += n
        return n

    def held_work(self) -> float:      # what the images held cost, in images of the default settings (Replica.cost)
        return sum(it.cost for it in self.pending) + self.running_work

    def per_image(self) -> float:
        """Seconds the replica takes per image of the default settings, all its lanes together:
        measured here while serving (:meth:`measured`), until then the plan's for one image alone
        (larger batches and lanes computing at once drain faster: this errs late)."""
        return self.image_s if self.image_s is not None else self.replica.batch_s(1)

    def retry_after(self, extra: int = 0, budget: float | None = None, extra_work: float | None = None) -> int:
        """Seconds until ``extra`` more images (costing ``extra_work``, default one each) would be
        taken: until the queue has room for them (the images beyond its limit drained) and, with a
        ``budget``, until the work held and theirs would be computed within it (:meth:`per_image`);
        plus one image's time."""
        per = self.per_image()
        work = self.held_work() + (extra if extra_work is None else extra_work)
        wait = max((self.held() + extra - self.limits.queue) * per, work * per - budget if budget is not None else 0.0)
        return max(1, math.ceil(wait + per))

    def measured(self, work: float, seconds: float, sharing: float = 1.0) -> None:
        """A batch of ``work`` (images of the default settings) computed on one lane in ``seconds``
        while ``sharing`` lanes computed (this one included; they share the cores): the replica's
        seconds per image, averaged."""
        s = seconds / max(1e-9, work) / max(1.0, sharing)
        self.image_s = s if self.image_s is None else 0.7 * self.image_s + 0.3 * s

    async def submit(self, req: GenerateRequest, items: list[tuple]) -> GenerateResponse:
        if self.draining:
            raise ServiceError(503, "a server that is not stopping", "one that is shutting down",
                               "send the request to another replica, or again once it is back",
                               {"Retry-After": "5"})
        budget = min(req.timeout_s or self.limits.deadline_s, self.limits.deadline_s)
        if self.held() + len(items) > self.limits.queue:      # (before costing: a refusal costs nothing)
            raise ServiceError(503, f"room in this replica's queue ({self.limits.queue} images)",
                               f"{self.held()} held and {len(items)} asked for",
                               "retry after the seconds in Retry-After, or ask for fewer images",
                               {"Retry-After": spread(self.retry_after(len(items), budget))})
        costs = [self.replica.cost(settings) for _, _, settings in items]
        work = sum(costs)
        # would it expire even alone? Refused now, not 504 later: at the plan's seconds an image for the batch
        # these images form on an idle replica (the best batch's rate, 8 images at once, admitted a lone
        # 1000-step image at 34 s that took 73); not a measured rate (a stale, slow one must not keep an idle
        # replica refusing)
        each = work / len(items)

        def alone_s(n: int) -> float:
            size = max([s for s in self.replica.sizes if s <= n] or [1])
            return n * each * self.replica.batch_s(size) / size
        alone = alone_s(len(items))
        if alone > budget:                              # not even alone: no retry will help
            # (the most that would fit, each count at its own batch's rate: "at most 2" was refused in turn)
            fit = max((n for n in range(1, len(items)) if alone_s(n) <= budget), default=0)
            longer = ("send a longer timeout_s" if alone <= self.limits.deadline_s else   # (capped: it cannot help)
                      f"ask a server started with a longer --deadline (this one's: {self.limits.deadline_s:g} s)")
            if fit:
                fix = f"ask for at most {fit} images per request, or {longer}"
            elif each > 1 + 1e-9:                       # (at the default's cost fewer steps cannot help)
                fix = f"ask for fewer steps (these settings cost {each:.1f} images of the default's each), or {longer}"
            elif alone <= self.limits.deadline_s:       # (timeout_s is capped by the server's --deadline)
                fix = f"send a timeout_s of at least {math.ceil(alone)} s"
            else:
                fix = longer
            raise ServiceError(503, f"images this replica computes within the request's deadline ({budget:g} s)",
                               f"{len(items)} asked for, about {alone:.1f} s even alone", fix)
        wait = (self.held_work() + work) * self.per_image()
        if self.held() and wait > budget:
            raise ServiceError(503, f"images this replica computes within the request's deadline ({budget:g} s)",
                               f"about {wait:.0f} s for the {self.held()} images held and {len(items)} asked for",
                               "retry after the seconds in Retry-After, send a longer timeout_s, or ask for fewer images",
                               {"Retry-After": spread(self.retry_after(len(items), budget, work))})
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():     # (a worker that died is started again)
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._run())
        t0 = time.monotonic()
        batch = [_Item(label, req.seed, j, settings, t0 + budget, loop.create_future(), cost, request=req)
                 for (label, j, settings), cost in zip(items, costs)]
        self.pending += batch
        self._last_arrival = time.monotonic()
        self.metrics.queue.labels(self.limits.replica).set(self.held())
        self._wake.set()
        try:
            done = await asyncio.wait_for(asyncio.gather(*(it.future for it in batch)), timeout=budget)
        except BaseException as e:
            for it in batch:                          # the rest of the request: not computed if not yet started
                it.future.cancel()
            self.pending = [it for it in self.pending if not it.future.done()]
            self.metrics.queue.labels(self.limits.replica).set(self.held())
            if not isinstance(e, asyncio.TimeoutError):   # the client has gone, or a batch failed
                raise
            raise ServiceError(504, f"an answer within the deadline ({budget:g} s)", "its images took longer (queued "
                               "and computed; those not started are not computed, nor a batch of only such images)",
                               "retry later, or with a longer timeout_s") from None
        images = [d[0] for d in done]
        seconds = {"queue": max(d[2] for d in done)} | done[0][1]
        return GenerateResponse(images=images, labels=[it.label for it in batch], seeds=[it.seed for it in batch],
                                indices=[it.index for it in batch], seconds=seconds, replica=self.limits.replica)

    async def _run(self) -> None:
        """The worker: drop what has expired or been abandoned; while a lane is free, take the
        largest paying batch size that the lane's share of the waiting images of the oldest one's
        settings fills (shared among
        all the lanes; never waiting for a batch to fill; on an idle replica, the largest that takes
        at most twice one image on its share of the cores), and compute it on that lane."""
        loop, idle = asyncio.get_running_loop(), True
        while True:
            self.pending = [it for it in self.pending if not it.future.done() and it.deadline > time.monotonic()]
            if not self.pending or not self.free:
                idle = idle or (not self.pending and self.running == 0)     # nothing held: the next is a new burst
                self._wake.clear()
                self.metrics.queue.labels(self.limits.replica).set(self.held())
                await self._wake.wait()
                continue
            if idle and len(self.pending) < max(self.replica.sizes):
                await self._gather()
                self.pending = [it for it in self.pending if not it.future.done()]
                if not self.pending:
                    continue
            # the waiting images shared among all the lanes, not only the free ones: a lane busy now
            # is free again soon, and a large batch given to a later lane (never more than its share
            # of the cores) would leave the first lane idle while it computes on half of them
            # a batch of one settings, the oldest waiting image's: a lane samples each settings in a
            # call of its own, so a mixed batch would only keep a cheap request waiting for an
            # expensive one (a default image batched with a 1000-step one took 5.9 s instead of 0.2)
            alike = [it for it in self.pending if it.settings == self.pending[0].settings]
            fits = [s for s in self.replica.sizes if s <= len(alike) // len(self.replica.lanes)] or [1]
            if idle:        # a burst's first answers as soon as a lone request's: at most 2x one image's time
                lanes = len(self.replica.lanes)
                fits = [s for s in fits if self.replica.batch_s(s) * lanes <= 2 * self.replica.batch_s(1)] or [1]
            size, idle = max(fits), False
            batch = alike[:size]
            self.pending = [it for it in self.pending if it not in batch]
            self.computing.append(batch)
            self.metrics.queue.labels(self.limits.replica).set(self.held())
            self.free.remove(lane := min(self.free))    # the first: alone on every core; a later lane on its share
            task = loop.create_task(self._compute(lane, batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _lanes_busy(self, change: int) -> float:
        """Lane-seconds computed so far (lanes computing, integrated over time); ``change`` more from now."""
        now = time.monotonic()
        self._lane_s += self._computing * (now - self._counted)
        self._computing, self._counted = self._computing + change, now
        return self._lane_s

    async def _compute(self, lane: int, batch: list) -> None:
        """One batch on one lane; its images (or its error) handed to the requests that wait."""
        started, lane_s = time.monotonic(), self._lanes_busy(+1)
        try:
            images, seconds = await asyncio.get_running_loop().run_in_executor(
                self._computes[lane], self.replica.generate, batch, lane)
        except Exception as e:     # noqa: BLE001 - handed to the requests of this batch
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        finally:
            # the lanes computing beside it, on average over its time (this one included)
            lane_s, took = self._lanes_busy(-1) - lane_s, time.monotonic() - started
            self.computing.remove(batch)
            self.free.append(lane)
            self._wake.set()
        self.measured(sum(it.cost for it in batch), took, lane_s / max(1e-9, took))
        self.replica.measured_batch(len(batch), sum(it.cost for it in batch), took * took / max(1e-9, lane_s))
        m = self.metrics
        m.batch.labels(self.limits.replica).observe(len(batch))
        m.images.labels(self.limits.replica).inc(len(batch))
        for stage, s in seconds.items():
            if stage != "total":
                m.stage.labels(self.limits.replica, stage).inc(s)
        for it, img in zip(batch, images):
            if not it.future.done():
                it.future.set_result((img, seconds, started - it.enqueued))

    async def _gather(self) -> None:
        """Let a burst arrive before an idle replica starts (16 requests at once through Serve's proxy
        formed batches of 1, 8, 4, 2, 1 without it): until quiet, at most GATHER_MAX_S, or full."""
        until = time.monotonic() + GATHER_MAX_S
        while len(self.pending) < max(self.replica.sizes):
            now = time.monotonic()
            wake = min(self._last_arrival + GATHER_QUIET_S, until)
            if now >= wake:
                return
            await asyncio.sleep(wake - now)

    def health(self) -> dict:
        rt = self.replica.pipe.runtime
        return {"status": "draining" if self.draining else "ok", "replica": self.limits.replica,
                "max_batch": rt.max_batch, "batch_sizes": self.replica.sizes, "backend": rt.backend,
                "engines": rt.detail, "cuda_graphs": rt.runner is not None, "queue": self.held(),
                "queue_limit": self.limits.queue, "lanes": len(self.replica.lanes),
                "start_seconds": round(self.replica.start_s, 3),
                "shapes_warmed": rt.opened.get("shapes warmed", self.replica.warmed), "opened": rt.opened}
