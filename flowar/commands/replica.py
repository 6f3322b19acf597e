"""One replica's engine set, sampling batches of served images (usable without Ray or HTTP too):
its lanes, the batch sizes that pay by the call plan and their seconds, and the images as base64
PNGs. The queue, admission and batching around it: :mod:`flowar.commands.service`."""

import base64
import io
import threading
import time
from collections import OrderedDict


KNOWN = 64          # settings whose schedule and cost a replica keeps (the latest asked for)


class Replica:
    """One engine set, sampling batches (usable without Ray or HTTP too): ``lanes``, the runtime
    and its lanes (:meth:`add_lanes`), each sampling on a thread of its own."""

    def __init__(self, engine_dir: str, threads: int | None = None, backend: str = "auto"):
        from flowar.pipeline.pipeline import FlowARPipeline
        t0 = time.perf_counter()
        self.pipe = FlowARPipeline.from_pretrained(engine_dir, backend=backend, threads=threads)
        try:                                          # (a replica that cannot start closes what it opened)
            rt = self.pipe.runtime
            rt.require_decoder()
            self.sizes = rt.batch_sizes or [1]          # those that cost less per image than every smaller one
            per = rt.call_plan.get("per_image") or {}
            self.per_image_s = min(per.values()) if per else None
            self._batch_s = {int(b): s * int(b) for b, s in per.items()}       # seconds of a batch by the plan
            self.planned = bool(per)                    # (without a plan: as measured, measured_batch)
            self.warmed = rt.warm_up(self.sizes)       # at the shapes of the sizes it will form (what pays)
            rt.opened["shapes warmed"] = rt.opened.get("shapes warmed", 0) + self.warmed   # (/health said 0 there)
            self.lanes = [rt]
            self._known: OrderedDict = OrderedDict()    # settings -> (schedule, planned cost, head work), the latest KNOWN
            self._known_lock = threading.Lock()          # (the event loop costs requests; lanes sample)
            default = rt.schedule(None)                  # what every cost is counted against (once, here)
            self._default_work = head_work(default, rt.config.scales)
            self._default_s = self._planned_s(default)
            # without a call plan: an image's seconds outside the head (AR, decoder) and per unit of the
            # head's work, as measured on the batches served (None: none yet)
            self.split: tuple[float, float] | None = None
            if self.per_image_s is None:
                self.per_image_s = self._time_one(default)
        except BaseException:
            self.pipe.close()
            raise
        self.start_s = time.perf_counter() - t0

    def _time_one(self, schedule) -> float:
        """Seconds of one image under ``schedule``, sampled now, for a directory without a call plan (a
        TensorRT or a plain ONNX Runtime export): admission and Retry-After counted one second per image
        until the first batch was measured: FlowAR-S's ONNX Runtime engines take 10.2 s on 2 cores (AMD
        EPYC Zen 5; requests admitted at start then expired, 504), a GPU a fraction of one (refused). The stages'
        seconds teach :attr:`split` too, so that other settings are costed with the AR and the decoder.
        Where CUDA graphs are captured the first image's time is mostly the capture: the second is timed."""
        rt = self.lanes[0]
        for _ in range(2 if rt.runner is not None else 1):
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            rt.sample([0], schedule, seed=0, timings=timings)
            seconds = time.perf_counter() - t0
        self._measured(timings, 1, self._default_work)
        return seconds

    def cost(self, settings) -> float:
        """An image under ``settings`` in images of the directory's default settings: what admission
        and the measured rate count, so that a request of 1000 steps counts as the ~30 images it costs
        (it was admitted as one, held a lane past its deadline, and its batch, measured as one image,
        made the replica refuse ordinary requests after it). By the call plan's measured seconds per
        call where the export measured one (the AR and the decoder included: a fast image costs half a
        default one at full size, not the third its head work is); without one, by the seconds outside
        the head and per unit of its work measured on the batches served (:attr:`split`), until then
        by the head's work alone (which errs low for cheap settings: the tiny model's fast schedule
        counted 0.37 of a default image and took 0.71)."""
        _, planned, work = self._settings(settings)
        if planned is not None:
            return planned
        if self.split is None:
            return work / self._default_work
        fixed, per_work = self.split
        return (fixed + per_work * work) / (fixed + per_work * self._default_work)

    def schedule(self, settings):
        """The schedule of ``settings`` over the directory's defaults (kept for the latest :data:`KNOWN`)."""
        return self._settings(settings)[0]

    def _settings(self, settings) -> tuple:
        with self._known_lock:
            if settings in self._known:
                self._known.move_to_end(settings)
                return self._known[settings]
        rt = self.pipe.runtime
        ours = rt.schedule(settings)
        planned = self._planned_s(ours) / self._default_s if rt.call_plan.get("stages") and self._default_s else None
        known = (ours, planned, head_work(ours, rt.config.scales))
        with self._known_lock:
            self._known[settings] = known
            while len(self._known) > KNOWN:          # (requests may name any cfg: not kept for ever)
                self._known.popitem(last=False)
        return known

    def _planned_s(self, schedule) -> float | None:
        """Seconds of one image under ``schedule`` by the call plan (the AR and the decoder included);
        None without a plan."""
        rt = self.pipe.runtime
        if not rt.call_plan.get("stages"):
            return None
        from flowar.commands.plan import image_seconds
        return image_seconds(rt.call_plan, {"decode": None} if rt.decodes else {}, rt.config, schedule, 1)

    def _measured(self, timings: dict, images: int, work: int) -> None:
        """Learn :attr:`split` from one sampling call's seconds per stage (CPU clocks; a call whose
        stages were not timed apart, a replayed CUDA graph, teaches nothing)."""
        if "head" not in timings or images < 1 or work < 1:
            return
        fixed = (timings.get("ar", 0.0) + timings.get("decode", 0.0)) / images
        per_work = timings["head"] / (images * work)
        old = self.split
        self.split = (fixed, per_work) if old is None else (0.7 * old[0] + 0.3 * fixed, 0.7 * old[1] + 0.3 * per_work)

    def add_lanes(self, computes: list) -> None:
        """One more lane over the same engines on each of ``computes`` (executors of one thread: a lane is made on
        the thread it samples on); where one cannot be made, the replica's engines are closed (a host that opens a
        service again in one process kept them)."""
        try:
            for c in computes:
                c.submit(lambda: self.lanes.append(self.pipe.runtime.lane())).result()
        except BaseException:
            self.pipe.close()
            raise

    def batch_s(self, size: int) -> float:
        """Seconds a batch of ``size`` takes: by the call plan, or without one as measured on the batches
        served (:meth:`measured_batch`); a size not known at the seconds per image of the largest smaller
        one known, else of one image alone (without a plan, 16 FlowAR-S images were refused as 91 s even
        alone, one image's 5.7 s each, where batches of 8 took 55)."""
        if size in self._batch_s:
            return self._batch_s[size]
        below = max((b for b in self._batch_s if b < size), default=None)
        return size * (self._batch_s[below] / below if below else (self.per_image_s or 1.0))

    def measured_batch(self, size: int, work: float, seconds: float) -> None:
        """Without a call plan: a batch of ``size`` images costing ``work`` (images of the default settings)
        took ``seconds`` on the cores alone: its size's seconds for default images, averaged."""
        if self.planned or work <= 0 or size < 1:
            return
        s, old = seconds * size / work, self._batch_s.get(size)
        self._batch_s[size] = s if old is None else 0.7 * old + 0.3 * s

    def generate(self, items: list, lane: int = 0) -> tuple[list[str], dict]:
        """Base64 PNGs, one per item, in order (items of each settings group sampled together), and
        the seconds per stage; sampled on ``lane``."""
        from flowar.io.images import to_uint8
        rt = self.lanes[lane]
        out: list[str | None] = [None] * len(items)
        seconds: dict[str, float] = {}
        for settings in dict.fromkeys(it.settings for it in items):
            pos = [i for i, it in enumerate(items) if it.settings == settings]
            timings: dict[str, float] = {}
            res = rt.sample([items[i].label for i in pos], self.schedule(settings), seed=[items[i].seed for i in pos],
                            indices=[items[i].index for i in pos], timings=timings, on_scale=lambda _: _unless_gone(items))
            for k, v in timings.items():
                seconds[k] = seconds.get(k, 0.0) + v
            if not rt.call_plan.get("stages"):
                self._measured(timings, len(pos), self._settings(settings)[2])
            for i, img in zip(pos, to_uint8(res.images)):
                out[i] = png_b64(img)
        return out, seconds


class Abandoned(Exception):
    """A batch stopped between two scales: no one waits for any of its images."""


def _unless_gone(items: list) -> None:
    """Stop a batch whose every image is no longer waited for (items with ``gone()``: the service's):
    a request answered 504 at its deadline, or whose client left, was computed to the end for no one
    (a 1000-step image held a lane 5.5 minutes after its client had gone)."""
    if items and all(getattr(it, "gone", lambda: False)() for it in items):
        raise Abandoned(f"{len(items)} images no one waits for")


def head_work(schedule, scales) -> int:
    """The head's work per image under ``schedule``: token rows x head evaluations, summed over the
    scales (a guided evaluation computes the null rows too). The AR and the decoder, the same for any
    settings, are left out: a schedule's cost relative to another's errs high for more steps."""
    return sum(s * s * sum(2 if e.guided and schedule.cfg != 1.0 else 1 for e in plan)
               for s, plan in zip(scales, schedule.plan))


def png_b64(image_HW3) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image_HW3).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
