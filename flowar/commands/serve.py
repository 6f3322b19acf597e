"""A served endpoint on Ray Serve (``flowar-serve``): dynamic batching over one engine set per replica.

    GET  /health        -> {"status": "ok", ...}
    GET  /v1/stats      -> {"batches": [sizes of the batches formed so far], ...}
    POST /v1/generate   {"label": int | "class": str, "seed": int = 0, "n": int = 1,
                         "schedule": "official" | "fast", "steps", "cfg", "guidance"}
                     -> {"images": [base64 PNG, ...], "labels": [...], "seeds": [...], "indices": [...]}

Image j of a request is sample j of ``flowar-run --labels L,L,... --seed S``: its noise is that of
(seed, j), whatever else shares the batch. Concurrent requests are split into single images and
batched (``serve.batch``) up to the engines' max batch; images with other sampling settings go
into their own sub-batch. Bad requests get a 4xx with the one-line error; the replica keeps serving.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass

from flowar.errors import FlowARError
from flowar.sampling.labels import label_ids
from flowar.sampling.schedule import Settings

MAX_BODY = 16 * 1024
SETTINGS = ("schedule", "steps", "cfg", "guidance")


@dataclass(frozen=True, slots=True)
class Item:
    """One image to make: a label, the (seed, index) that names its noise, and its sampling settings."""
    label: int
    seed: int
    index: int
    settings: Settings


class RequestError(FlowARError):
    """A bad request: rendered as JSON {"error": one line} with this HTTP status."""

    def __init__(self, status: int, expected: str, got: str, fix: str):
        super().__init__(expected, got, fix)
        self.status = status


def parse_generate(body: bytes, num_classes: int, class_names, max_n: int) -> list[Item]:
    """The images a /v1/generate body asks for, or a RequestError saying what is wrong."""
    if len(body) > MAX_BODY:
        raise RequestError(413, f"a JSON body of at most {MAX_BODY} bytes", f"{len(body)} bytes", "send less")
    try:
        req = json.loads(body or b"{}")
    except ValueError:
        raise RequestError(400, "a JSON object", repr(body[:40]), 'send e.g. {"label": 3, "seed": 0}') from None
    if not isinstance(req, dict):
        raise RequestError(400, "a JSON object", type(req).__name__, 'send e.g. {"label": 3, "seed": 0}')
    unknown = sorted(set(req) - {"label", "class", "seed", "n", *SETTINGS})
    if unknown:
        raise RequestError(422, "fields among label, class, seed, n, schedule, steps, cfg, guidance", f"{unknown}",
                           "drop the unknown fields")
    if ("label" in req) == ("class" in req):
        raise RequestError(422, "exactly one of label or class", "both" if "label" in req else "neither",
                           'send e.g. {"label": 3}')
    if "class" in req:
        if not isinstance(req["class"], str):
            raise RequestError(422, "class a name (a string)", repr(req["class"]), 'send e.g. {"class": "cat"}')
        try:
            label = label_ids([req["class"]], num_classes, class_names)[0]
        except FlowARError as e:
            raise RequestError(422, e.expected, e.got, e.fix) from None
    else:
        label = req["label"]
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < num_classes:
            raise RequestError(422, f"label an integer in 0..{num_classes - 1}", repr(label), "send a class id")
    seed, n = req.get("seed", 0), req.get("n", 1)
    for name, v, lo, hi in (("seed", seed, 0, 2 ** 63 - 1), ("n", n, 1, max_n)):
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise RequestError(422, f"{name} an integer in {lo}..{hi}", repr(v), f"send a valid {name}")
    try:
        settings = Settings(**{k: req[k] for k in SETTINGS if req.get(k) is not None})
    except FlowARError as e:                    # the command options' names are the request's fields here
        raise RequestError(422, e.expected.removeprefix("--"), e.got, e.fix.replace("--", "")) from None
    return [Item(label, seed, j, settings) for j in range(n)]


def png_b64(image_HW3) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image_HW3).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class Replica:
    """One engine set sampling batches of Items (a replica's state; usable without Ray too).

    The engines are the pipeline's choice for ``backend`` (``auto``: TensorRT and CUDA graphs on a
    GPU where the plans fit, the ``--precision auto`` choice on a CPU, else ONNX Runtime), as
    for flowar-run. On a GPU the CUDA graphs of every batch size are captured at start.
    """

    def __init__(self, engine_dir: str, threads: int | None = None, backend: str = "auto"):
        from flowar.pipeline.pipeline import FlowARPipeline
        self.pipe = FlowARPipeline.from_pretrained(engine_dir, backend=backend, threads=threads)
        try:
            self.pipe.runtime.require_decoder()
        except FlowARError:
            self.pipe.close()
            raise
        self.max_batch = self.pipe.runtime.max_batch
        self.batches: list[int] = []

    def generate(self, items: list[Item]) -> list[str]:
        """Base64 PNGs, one per item, in order; items of each settings group sampled together."""
        from flowar.io.images import to_uint8
        self.batches.append(len(items))
        out: list[str | None] = [None] * len(items)
        for settings in dict.fromkeys(it.settings for it in items):
            pos = [i for i, it in enumerate(items) if it.settings == settings]
            rt = self.pipe.runtime
            res = rt.sample([items[i].label for i in pos], rt.schedule(settings), seed=[items[i].seed for i in pos],
                            indices=[items[i].index for i in pos])
            for i, img in zip(pos, to_uint8(res.images)):
                out[i] = png_b64(img)
        return out


def build_app(engine_dir: str, threads: int | None = None, max_n: int = 16, replicas: int = 1,
              batch_wait_s: float = 0.02, backend: str = "auto"):
    """The Ray Serve application (imports Ray only here)."""
    import asyncio

    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from flowar.export.manifest import read_manifest
    max_batch = read_manifest(engine_dir).max_batch

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": threads or 1},
                      max_ongoing_requests=256)
    class FlowARService:
        def __init__(self):
            self.gen = Replica(engine_dir, threads, backend)

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=batch_wait_s)
        async def _images(self, items: list[Item]) -> list[str]:
            # sample off the event loop, so that requests keep arriving and form the next batch
            return await asyncio.get_running_loop().run_in_executor(None, self.gen.generate, items)

        async def __call__(self, request: Request):
            path, method = request.url.path.rstrip("/"), request.method
            rt = self.gen.pipe.runtime
            if method == "GET" and path == "/health":
                return JSONResponse({"status": "ok", "max_batch": self.gen.max_batch, "backend": rt.backend,
                                     "engines": rt.detail, "cuda_graphs": rt.runner is not None})
            if method == "GET" and path == "/v1/stats":
                return JSONResponse({"batches": self.gen.batches, "engines": rt.detail})
            if method != "POST" or path != "/v1/generate":
                return JSONResponse({"error": f"expected GET /health, GET /v1/stats or POST /v1/generate; got "
                                              f"{method} {path or '/'}. Fix: use one of those"}, status_code=404)
            length = int(request.headers.get("content-length") or 0)
            if length > MAX_BODY:
                return JSONResponse({"error": f"expected a JSON body of at most {MAX_BODY} bytes; got {length} bytes. "
                                              "Fix: send less"}, status_code=413)
            try:
                items = parse_generate(await request.body(), rt.config.num_classes, rt.class_names, max_n)
            except RequestError as e:
                return JSONResponse({"error": str(e)}, status_code=e.status)
            images = await asyncio.gather(*(self._images(it) for it in items))
            return JSONResponse({"images": list(images), "labels": [it.label for it in items],
                                 "seeds": [it.seed for it in items], "indices": [it.index for it in items]})

    return FlowARService.bind()


def serve_forever(engine_dir: str, host: str, port: int, threads: int | None, max_n: int, replicas: int,
                  ray_address: str | None, ready=None, block: bool = True, backend: str = "auto"):
    """Start Serve on host:port and the application; with ``block``, wait until interrupted."""
    from flowar.commands.bulk import start_ray
    start_ray(ray_address, None if ray_address else max(2, (threads or 1) * replicas))
    from ray import serve
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
    serve.run(build_app(engine_dir, threads, max_n, replicas, backend=backend), name="flowar", route_prefix="/")
    if ready is not None:
        ready()
    if block:
        import time
        try:
            while True:
                time.sleep(3600)
        finally:
            serve.shutdown()
