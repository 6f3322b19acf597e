"""The FastAPI app of ``flowar-serve`` over one :class:`~flowar.commands.service.Service`: its
routes, the bearer token and body limit checked before anything is parsed, and every error as
``{"error": one line}`` (routes: README "Serving")."""

import hmac
import json
import re
import time
from pathlib import Path

import flowar.commands.service as service_module
from flowar.commands.service import GenerateRequest, GenerateResponse, Service, ServiceError
from flowar.errors import FlowARError

MAX_BODY = 16 * 1024
OPEN_PATHS = ("/health", "/", "/openapi.json", "/docs")     # no token needed (probes, the page asks for it)


def make_app(service: Service):
    """The FastAPI app over ``service``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException

    # (FastAPI's Swagger UI and ReDoc load their scripts from a CDN: blank on a host offline; /docs is a page of our own)
    app = FastAPI(title="FlowAR", description=service_module.__doc__.split("\n\n")[0], version="1", docs_url=None,
                  redoc_url=None, redirect_slashes=False)   # (/v1/generate/ was a 307 with an empty body: now the 404 line)

    def error(status: int, text: str, headers: dict | None = None) -> JSONResponse:
        service.metrics.requests.labels(service.limits.replica, str(status)).inc()
        return JSONResponse({"error": text}, status_code=status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Bearer token (except for probes and the page), and the body size before any parsing."""
        token = service.limits.token
        if token is not None and request.url.path not in OPEN_PATHS:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            # (the scheme's case is free, RFC 9110: "bearer" was refused)
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
                return error(401, "expected a bearer token (Authorization: Bearer ...); got none or another. "
                             "Fix: send the server's token", {"WWW-Authenticate": "Bearer"})
        if request.method == "POST":
            # a body is JSON whatever it is labelled (curl -d says form-urlencoded): parsed as such
            request.scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"] + [
                (b"content-type", b"application/json")]
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
                return error(413, f"expected a JSON body of at most {MAX_BODY} bytes; got {length} bytes. Fix: send less")
            body = b""
            async for chunk in request.stream():    # chunked bodies: counted as they come, refused at the limit
                body += chunk
                if len(body) > MAX_BODY:
                    return error(413, f"expected a JSON body of at most {MAX_BODY} bytes; got more. Fix: send less")
            request._body = body                     # (read once: what the route parses)
        return await call_next(request)

    class Answering:
        """Counts the requests to /v1/generate until their answer's last byte is handed to the
        server (:attr:`Service.answering`): a draining replica's images are all computed before their
        answers are out, and stopping then would cut those answers off. Plain ASGI around the whole
        stack, Starlette's error middleware included (a failed batch's 500 is sent from there)."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http" or scope.get("path") != "/v1/generate":
                return await self.inner(scope, receive, send)
            service.answering += 1
            try:
                await self.inner(scope, receive, send)
            finally:
                service.answering -= 1
    stack = app.build_middleware_stack                 # (what Starlette builds on the first request)
    app.build_middleware_stack = lambda: Answering(stack())

    @app.exception_handler(ServiceError)
    async def refused(request: Request, e: ServiceError):
        return error(e.status, str(e), e.headers)

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):       # a batch that failed (NaN, out of memory): one line
        text = str(e) if isinstance(e, FlowARError) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return error(500, text[:500])

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid" or (first.get("loc") == ("body",) and first.get("type") in (
                "model_attributes_type", "missing")):        # (an empty body was 422 "the body: Field required")
            got = "an empty body" if first.get("type") == "missing" else "something else"
            return error(400, f"expected a JSON object; got {got}. Fix: send e.g. {{\"label\": 3, \"seed\": 0}}")
        def where(err: dict) -> str:
            return (".".join(str(p) for p in err.get("loc", ())[1:]) or "the body")[:60]   # (a key of 15,000 characters)
        got = json.dumps(first.get("input"), default=str)[:60]          # as sent ('5' and True were Python's)
        extra = [where(x) for x in errs if x.get("type") == "extra_forbidden"]
        wrong = list(dict.fromkeys(where(x) for x in errs if x.get("type") != "extra_forbidden"))
        sized = [w for w in extra if w in ("size", "height", "width", "resolution")]
        others = ", ".join([w for w in extra if w not in sized] + [f"a wrong {w}" for w in wrong])[:120]
        if sized:                                                   # (the model's one size: it said "not permitted")
            side, got = service.replica.pipe.runtime.image_size, json.dumps(next(
                x.get("input") for x in errs if where(x) == sized[0]), default=str)[:60]
            return error(422, f"expected no {sized[0]}: this model makes {side}x{side} images; got {got}"
                              f"{f' (and {others})' if others else ''}. Fix: leave \"{sized[0]}\" out")
        if extra:                                                   # (every one named: it said the first alone)
            fields = ", ".join(f.alias or k for k, f in GenerateRequest.model_fields.items())
            also = ", ".join(f"a wrong {w}" for w in wrong)[:120]
            return error(422, f"expected only the fields {fields}; got {', '.join(extra)[:120]}"
                              f"{f' (and {also})' if also else ''}. Fix: leave {'it' if len(extra) == 1 else 'them'} "
                              "out (see /docs)")
        also = ", ".join(wrong[1:])[:120]
        said = first.get("msg", "Input should be a valid value").replace("Input should be ", "", 1)   # pydantic's
        return error(422, f"expected {where(first)} {said}; got {got}"
                          f"{f' (and a wrong {also})' if also else ''}. Fix: see /docs for the fields and their types")

    @app.exception_handler(HTTPException)
    async def not_found(request: Request, e: HTTPException):
        if e.status_code == 400:           # a body FastAPI could not decode (not UTF-8, nested too deep)
            return error(400, "expected a JSON object in UTF-8, nested a few levels; got a body that could not be "
                              "decoded. Fix: send e.g. "
                              "{\"label\": 3, \"seed\": 0}")
        return error(e.status_code, f"expected GET /, /health, /metrics, /v1/classes, /docs, /openapi.json or POST "
                                    f"/v1/generate; got {request.method} {request.url.path[:80]}. Fix: use one of those",
                     getattr(e, "headers", None))     # (405's Allow)

    from pydantic import BaseModel

    class ErrorLine(BaseModel):
        error: str          # what was expected; what came; the fix: one line

    said = {code: {"model": ErrorLine, "description": what} for code, what in (
        (400, "not a JSON object"), (401, "no or another bearer token"), (413, "a body above 16 KiB"),
        (422, "a field out of its range or type"), (503, "the replica's queue full, draining, or the deadline too short"),
        (504, "not computed within timeout_s"), (500, "the batch failed"))}

    @app.post("/v1/generate", response_model=GenerateResponse, responses=said)   # (its 422 was FastAPI's {"detail"})
    async def generate(req: GenerateRequest, request: Request):
        t0 = time.perf_counter()
        answer = await service.submit(req, request_items(service, req))
        service.metrics.latency.labels(service.limits.replica).observe(time.perf_counter() - t0)
        service.metrics.requests.labels(service.limits.replica, "200").inc()
        return answer

    @app.get("/v1/classes")
    async def classes():
        rt = service.replica.pipe.runtime
        names = rt.class_names
        return {"num_classes": rt.config.num_classes, "names": list(names) if names is not None else None}

    @app.get("/health")
    async def health():            # (draining: 503, so that a load balancer's check stops sending it requests)
        return JSONResponse(service.health(), status_code=503 if service.draining else 200)

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs():
        return HTMLResponse(api_page(app.openapi()))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse((Path(__file__).with_name("playground.html")).read_text())

    for path, route in (("/health", health), ("/", page)):     # (probes that send HEAD got 405; not in the schema
        app.head(path, include_in_schema=False)(route)         # twice: FastAPI warned of duplicate operation ids)

    return app


def request_items(service: Service, req: GenerateRequest) -> list[tuple]:
    """(label, index, settings) per image of a request, or a ServiceError saying what is wrong."""
    from flowar.sampling.labels import label_ids
    from flowar.sampling.schedule import Settings
    rt = service.replica.pipe.runtime
    nc = rt.config.num_classes
    if (req.label is None) == (req.class_ is None):
        raise ServiceError(422, "exactly one of label or class", "both" if req.label is not None else "neither",
                           'send e.g. {"label": 3} or {"class": "cat"}')
    try:
        label = label_ids([req.class_ if req.class_ is not None else req.label], nc, rt.class_names)[0]
    except FlowARError as e:
        raise ServiceError(422, e.expected, e.got, e.fix) from None
    if req.n > service.limits.max_n:
        raise ServiceError(422, f"n an integer in 1..{service.limits.max_n}", repr(req.n), "ask for fewer images")
    try:
        settings = Settings(schedule=req.schedule, steps=req.steps, cfg=req.cfg, guidance=req.guidance)
    except FlowARError as e:             # the command options' names are the request's fields here, and their
        fix = re.sub(r"--(\w+) ([\w.-]+)", lambda m: f'"{m[1]}": ' + (m[2] if re.fullmatch(r"-?[\d.]+", m[2])  # values
                     else f'"{m[2]}"'), e.fix).replace("use ", "send ", 1)           # JSON's ("use e.g. steps 25")
        raise ServiceError(422, e.expected.removeprefix("--"), e.got, fix) from None
    return [(label, j, settings) for j in range(req.n)]


def api_page(spec: dict) -> str:
    """The API as one self-contained HTML page (``GET /docs``; nothing fetched): each route, and the fields of what
    it takes and answers, with their types, defaults and descriptions, from the OpenAPI schema."""
    from html import escape
    schemas = spec.get("components", {}).get("schemas", {})

    def kind(p: dict) -> str:
        alts = p.get("anyOf") or [p]
        return " or ".join(a.get("$ref", "").rsplit("/", 1)[-1] or (" | ".join(map(repr, a["enum"])) if "enum" in a
                           else a.get("type", "any") + (f" of {kind(a['items'])}" if "items" in a else "")) for a in alts)

    def table(name: str) -> str:
        props = schemas.get(name, {}).get("properties", {})
        rows = "".join(f"<tr><td><code>{escape(f)}</code></td><td>{escape(kind(p))}</td><td>{escape(repr(p['default']) if 'default' in p else '')}"
                       f"</td><td>{escape(p.get('description', ''))}</td></tr>" for f, p in props.items())
        return f"<table><tr><th>{escape(name)}</th><th>type</th><th>default</th><th></th></tr>{rows}</table>"
    out = [f"<h1>{escape(spec['info']['title'])} API</h1><p>{escape(spec['info'].get('description', ''))}</p>"]
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            out.append(f"<h2><code>{method.upper()} {escape(path)}</code></h2>")
            for ref in ([op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})]
                        + [op.get("responses", {}).get("200", {}).get("content", {}).get("application/json", {})
                           .get("schema", {})]):         # (not FastAPI's 422 model: every error is {"error": one line})
                if ref.get("$ref"):
                    out.append(table(ref["$ref"].rsplit("/", 1)[-1]))
    out.append('<p>Every error is <code>{"error": one line}</code>.</p>')
    style = "body{font:14px sans-serif;max-width:60em;margin:2em auto}td,th{padding:2px 8px;text-align:left;vertical-align:top}"
    return f"<!doctype html><meta charset=utf-8><title>FlowAR API</title><style>{style}</style>{''.join(out)}"
