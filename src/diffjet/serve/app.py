"""The HTTP app: OpenAI's and AUTOMATIC1111's image APIs, models, health, metrics and a one-page UI.

`build_app(settings)` makes one FastAPI app with its own batcher, worker thread and metrics; its
lifespan starts the worker (which loads and warms the pipeline) and, at shutdown, lets the worker
finish every accepted image before the process ends. uvicorn (`diffjet serve`) and Ray Serve
(`diffjet.serve.ray`) run the same app.

Every bad input is answered before anything is queued, in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`: 422 for malformed JSON, wrong types and unknown
fields (the field named); 400 for a size off the served list or above the pixel cap, too many steps or
images; 404 for an unknown LoRA or model; 413 for a body over the cap; 401 without the API key; 429
with Retry-After when the queue is full; 504 when no image came within `--timeout`; 503 while the
pipeline failed to load or the server is shutting down.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError
from ..bench.recipes import FLOW_MATCHING_SCHEDULERS, refused
from ..models.loading import DIT_PIPELINES, default_guidance, pipeline_class_name
from .batcher import Batcher, BatchKey, Item, Job, QueueFull
from .metrics import Metrics
from .schema import A1111_SAMPLERS, SCHEDULERS, A1111Request, Generation, OpenAIImageRequest
from .settings import ServeSettings, check_size
from .worker import BatchFailed, Image, PipelineWorker, load_served_pipeline

#: Routes whose requests /metrics counts by name; any other path counts as "other".
ROUTES = ("/", "/healthz", "/metrics", "/v1/models", "/v1/images/generations", "/sdapi/v1/txt2img")


class ApiError(Exception):
    """An answer other than 200: status, one-line message, the request field at fault, extra headers."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


class Service:
    """A serving process's state: settings, queue, worker, metrics."""

    def __init__(self, settings: ServeSettings, load: Callable[[ServeSettings], Any],
                 on_failure: Callable[[BaseException], None] | None = None):
        self.settings = settings
        self.metrics = Metrics(settings.max_batch)
        self.batcher = Batcher(settings.max_batch, settings.max_wait_ms / 1000, settings.queue)
        self.metrics.queue_images.set_function(lambda: self.batcher.waiting)
        self.worker = PipelineWorker(settings, self.batcher, self.metrics, load, on_failure)
        self.started = int(time.time())
        self._declared_pipeline = pipeline_class_name(settings.model)

    def pipeline(self) -> str | None:
        """The served pipeline's class name: the loaded one's, or until it is loaded what the preset or the
        folder's model_index.json says (None for a hub id)."""
        pipe = self.worker.pipe
        return type(pipe).__name__ if pipe is not None else self._declared_pipeline

    def key(self, g: Generation, fields: tuple[str, str, str, str]) -> BatchKey:
        """The batch key of a request, after every check that depends on the server's settings or model;
        `fields` names the request's image count, width, height and scheduler fields in errors. A guidance
        left out is the pipeline's own default (FLUX.1-dev's 3.5, SD 3.5's 7.0, SD's 7.5)."""
        s = self.settings
        n_field, width_field, height_field, scheduler_field = fields
        if g.n > s.max_images:
            raise ApiError(400, f"{n_field}: at most {s.max_images} images per request, got {g.n}", n_field)
        width, height = g.width or s.sizes[0][0], g.height or s.sizes[0][1]
        try:
            check_size(width, height, s.max_pixels, "size")
        except ConfigError as error:
            raise ApiError(400, str(error), height_field if width % 8 == 0 and width >= 8 else width_field) from None
        if (width, height) not in s.sizes and not s.allow_new_sizes:
            served = ", ".join(_sizes(s))
            raise ApiError(400, f"size {width}x{height} is not served (served: {served}; a server started with "
                           "--allow-new-sizes takes others)", width_field)
        steps = g.steps or s.default_steps
        if steps > s.max_steps:
            raise ApiError(400, f"steps: at most {s.max_steps} (--max-steps), got {steps}", "steps")
        for name in g.loras:
            if name not in self.worker.loras:
                raise ApiError(404, f"unknown LoRA {name!r}: GET /v1/models lists the LoRAs served", "lora")
        pipeline = self.pipeline()
        problem = refused(pipeline, g.scheduler, g.negative_prompt)
        if problem is not None:
            field = scheduler_field if problem[0] == "scheduler" else problem[0]
            raise ApiError(400, f"{field}: {problem[1]}", field)
        guidance = g.guidance if g.guidance is not None else default_guidance(pipeline)
        return BatchKey(width, height, steps, guidance, g.scheduler, bool(g.negative_prompt),
                        tuple(sorted(g.loras.items())))

    async def generate(self, request: Request, g: Generation, key: BatchKey) -> list[Image]:
        """Queue the request's images and wait for them, for a disconnect, or for the timeout."""
        if self.worker.failure is not None:
            raise ApiError(503, f"the pipeline failed to load: {self.worker.failure}")
        job = Job(g.n)
        items = [Item(key, g.prompt, g.negative_prompt, seed, job, i) for i, seed in enumerate(g.seeds)]
        try:
            self.batcher.submit(items)
        except QueueFull as full:
            raise ApiError(429, f"{full} (--queue {self.settings.queue} images)",
                           headers={"Retry-After": str(full.retry_after)}) from None
        except RuntimeError as closed:
            raise ApiError(503, str(closed)) from None
        result = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({result, gone}, timeout=self.settings.timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if result in done:
            try:
                return result.result()
            except BatchFailed as failed:
                raise ApiError(500, str(failed)) from None
            except Exception as failed:  # noqa: BLE001 - the worker failed to start after this was queued
                raise ApiError(503, f"the pipeline failed to load: {failed}") from None
        dropped = self.batcher.cancel(job)
        if gone in done:
            self.metrics.dropped.labels("disconnect").inc(dropped)
            raise ApiError(499, "the client disconnected")
        self.metrics.dropped.labels("timeout").inc(dropped)
        raise ApiError(504, f"no image within {self.settings.timeout_s:g} s (--timeout); the request was dropped")

    def png(self, image: Image, parameters: dict[str, Any]) -> str:
        """The image as base64 PNG, with its parameters (JSON) in a text chunk as `diffjet generate` writes."""
        from diffusers.image_processor import VaeImageProcessor
        from PIL.PngImagePlugin import PngInfo

        picture = VaeImageProcessor.numpy_to_pil(image.pixels[None])[0]
        info = PngInfo()
        info.add_text("parameters", json.dumps({**parameters, "seed": image.seed}, sort_keys=True))
        info.add_text("software", "diffjet")
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", pnginfo=info)
        self.metrics.images.inc()
        return base64.b64encode(buffer.getvalue()).decode()

    def parameters(self, g: Generation, key: BatchKey) -> dict[str, Any]:
        s = self.settings
        return {"model": s.model_name, "prompt": g.prompt, "negative_prompt": g.negative_prompt or None,
                "width": key.width, "height": key.height, "steps": key.steps, "guidance": key.guidance,
                "scheduler": key.scheduler, "lora": dict(key.loras), "compiler": s.compiler, "device": s.device}


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body was read already: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Guard:
    """ASGI middleware before every route: the body cap (413), and each answer's status and latency counted."""

    def __init__(self, app: Any, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), 500
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def send_counted(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            body = await self._body(scope, receive)
            if body is None:
                cap = self.service.settings.max_body_bytes
                await error_response(413, f"the request body is over {cap} bytes")(scope, receive, send_counted)
                return
            replayed = False

            async def replay() -> dict:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay, send_counted)
        finally:
            metrics = self.service.metrics
            metrics.requests.labels(route, str(status)).inc()
            metrics.request_seconds.labels(route).observe(time.monotonic() - start)

    async def _body(self, scope: dict, receive: Callable) -> bytes | None:
        """The whole body, or None when it is (or says it will be) over the cap."""
        cap = self.service.settings.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cap):
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b""
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > cap:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)


def build_app(settings: ServeSettings, *, load: Callable[[ServeSettings], Any] = load_served_pipeline,
              wait_until_warm: bool = False, on_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The app, with its own worker: started by the app's lifespan, which waits for it to be warm when
    `wait_until_warm` (Ray Serve routes to a replica once its start-up returns) and lets it finish every
    accepted image at shutdown. `load` makes the pipeline from the settings (tests pass one loaded once)."""
    service = Service(settings, load, on_failure)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.worker.start()
        if wait_until_warm:
            await run_in_threadpool(_wait_warm, service.worker)
        yield
        await run_in_threadpool(service.worker.stop)

    # FastAPI's /docs pages load their scripts from a CDN; the schema stays at /openapi.json.
    app = FastAPI(title="diffjet", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service

    def authorized(request: Request) -> None:
        key = settings.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header Authorization: Bearer <key>",
                           headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> Response:
        return error_response(error.status, error.message, error.param, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> Response:
        kind = request.headers.get("content-type", "")
        if kind and "json" not in kind:  # curl -d sends a form's type; FastAPI then reads no JSON at all
            return error_response(415, f"the body must be JSON sent as Content-Type: application/json, not {kind}")
        message, param = describe_validation(error.errors())
        return error_response(422, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        return error_response(error.status_code, str(error.detail), headers=getattr(error, "headers", None))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8"))

    @app.get("/healthz")
    async def healthz() -> Response:
        worker = service.worker
        if worker.failure is not None:
            return JSONResponse({"status": "failed", "error": str(worker.failure)}, status_code=503)
        if not worker.ready.is_set():
            return JSONResponse({"status": "warming", "sizes": _sizes(settings)}, status_code=503)
        return JSONResponse({"status": "ready", "model": settings.model_name, "pid": os.getpid()})

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        flow_matching = service.pipeline() in DIT_PIPELINES  # their own Euler only
        schedulers = [n for n in SCHEDULERS if not flow_matching or n in FLOW_MATCHING_SCHEDULERS]
        return {"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": service.started, "owned_by": "diffjet",
            "diffjet": {"sizes": _sizes(settings), "allow_new_sizes": settings.allow_new_sizes,
                        "max_pixels": settings.max_pixels, "default_steps": settings.default_steps,
                        "default_guidance": default_guidance(service.pipeline()),
                        "max_steps": settings.max_steps, "max_images": settings.max_images,
                        "batch_sizes": settings.warm_batches, "schedulers": schedulers,
                        "samplers": [n for n, s in A1111_SAMPLERS.items() if s in schedulers],
                        "loras": sorted(service.worker.loras)},
        }]}

    @app.post("/v1/images/generations", dependencies=[Depends(authorized)])
    async def openai_images(body: OpenAIImageRequest, request: Request) -> dict:
        start = time.monotonic()
        if body.model is not None and body.model != settings.model_name:
            raise ApiError(404, f"model {body.model!r} is not served here (GET /v1/models)", "model")
        g = body.generation()
        key = service.key(g, ("n", "size", "size", "scheduler"))
        images = await service.generate(request, g, key)
        parameters = service.parameters(g, key)
        encoded = await run_in_threadpool(lambda: [service.png(i, parameters) for i in images])
        return {
            "created": int(time.time()),
            "data": [{"b64_json": data, "seed": image.seed, "batch_images": image.batch_images}
                     for data, image in zip(encoded, images)],
            "diffjet": {**parameters, "pid": os.getpid(), "seconds": round(time.monotonic() - start, 4),
                        "run_s": round(max(i.run_s for i in images), 4)},
        }

    @app.post("/sdapi/v1/txt2img", dependencies=[Depends(authorized)])
    async def a1111_txt2img(body: A1111Request, request: Request) -> dict:
        g = body.generation()
        key = service.key(g, ("batch_size", "width", "height", "sampler_name"))
        images = await service.generate(request, g, key)
        parameters = service.parameters(g, key)
        encoded = await run_in_threadpool(lambda: [service.png(i, parameters) for i in images])
        sampler = next((name for name, s in A1111_SAMPLERS.items() if s == key.scheduler), key.scheduler)
        given = body.model_dump()
        info = {"prompt": g.prompt, "all_prompts": [g.prompt] * g.n, "negative_prompt": g.negative_prompt,
                "seed": g.seed, "all_seeds": g.seeds, "width": key.width, "height": key.height,
                "steps": key.steps, "cfg_scale": key.guidance, "sampler_name": sampler, "batch_size": g.n,
                "sd_model_name": settings.model_name}
        return {"images": encoded, "parameters": {**given, "width": key.width, "height": key.height,
                                                  "steps": key.steps, "seed": g.seed},
                "info": json.dumps(info)}

    app.add_middleware(Guard, service=service)
    return app


def describe_validation(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's errors as one line that names each field, and the first field (OpenAI's `param`)."""
    parts, fields = [], []
    for e in errors:
        if e.get("type") == "json_invalid":
            return f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})", None
        field = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        fields.append(field)
        parts.append(f"{field}: {e.get('msg')}")
    return "; ".join(parts), next((f for f in fields if f != "body"), None)


def _sizes(settings: ServeSettings) -> list[str]:
    return [f"{w}x{h}" for w, h in settings.sizes]


def _wait_warm(worker: PipelineWorker) -> None:
    while not worker.ready.wait(0.5):
        if worker.failure is not None:
            raise worker.failure
