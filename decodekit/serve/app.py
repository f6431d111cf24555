"""The FastAPI app: OpenAI's completions, chat completions and models endpoints, health and Prometheus metrics.

`create_app(engine, settings)` builds the app around one `EngineWorker` (started and stopped with the app's
lifespan). A generation handler turns the body into engine work (schemas.py), submits it, waits for the engine
thread to accept it (validation errors are 400s before any byte of a stream is sent), then returns the whole
response or streams server-sent events. A watcher per request notices a client that hangs up and cancels its
sequences. Every error, ours or FastAPI's, is OpenAI's error object.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import ServerMetrics
from .responses import ChatFormat, CompletionFormat, _Format
from .schemas import APIError, ChatCompletionRequest, CompletionRequest, Defaults, Work, chat_work, completion_work
from .worker import Delta, Done, EngineWorker, Job, QueueFull

log = logging.getLogger("decodekit.serve")


@dataclass
class ServeSettings:
    model: str  # the name clients ask for (`model` in the body)
    method: str = "plain"  # the default decoding method
    method_options: dict[str, Any] = field(default_factory=dict)
    verifier: str | None = None  # the default verifier (None: by sampling mode)
    api_key: str | None = None
    max_queue: int = 256  # requests that may wait beyond the running batch; then 429
    request_timeout: float = 600.0  # seconds from arrival to the last token
    retry_after: int = 1  # seconds, in 429 responses


class _Disconnected:
    """The client hung up (sent by the watcher to the handler's queue)."""


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ())]
    where = loc[1:] if loc[:1] == ["body"] else loc
    if e.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}")
    if e.get("type") == "extra_forbidden":
        return APIError(400, f"unknown field {'.'.join(where)!r}", param=where[0] if where else None)
    if e.get("type") == "missing":
        return APIError(400, f"missing field {'.'.join(where)!r}", param=where[0] if where else None)
    if not where and isinstance(e.get("input"), (bytes, str)):  # FastAPI passes a non-JSON body through as is
        return APIError(400, "the request body must be a JSON object (Content-Type: application/json)")
    name = ".".join(where)
    return APIError(400, f"{name}: {e.get('msg')}" if name else f"request body: {e.get('msg')}",
                    param=where[0] if where else None)


def create_app(engine, settings: ServeSettings, metrics: ServerMetrics | None = None) -> FastAPI:
    metrics = metrics or ServerMetrics()
    max_running = engine.core.scheduler.config.max_running
    worker = EngineWorker(engine, metrics, max_in_flight=max_running + settings.max_queue)
    defaults = Defaults(settings.model, settings.method, dict(settings.method_options), settings.verifier,
                        engine.model.config.vocab_size, engine.max_context)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            # Requests still in flight after uvicorn's graceful period get their error; the thread ends.
            await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    app = FastAPI(title="decodekit", version="0.1.0", lifespan=lifespan)
    app.state.worker, app.state.metrics = worker, metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error_response(APIError(exc.status_code, str(exc.detail), type=kind,
                                        headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")

    @app.get("/health")
    async def health() -> JSONResponse:
        if not worker.alive:
            return JSONResponse({"status": "engine thread stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    def model_card() -> dict[str, Any]:
        return {"id": settings.model, "object": "model", "created": started, "owned_by": "decodekit"}

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != settings.model:
            raise APIError(404, f"unknown model {model_id!r}", param="model", code="model_not_found")
        return model_card()

    async def watch(request: Request, job: Job) -> None:
        """Wait for the client to hang up; then cancel the job and wake its handler."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        worker.cancel(job)
        job.events.put_nowait([_Disconnected()])

    async def generate(request: Request, work: Work, fmt: _Format, stream: bool) -> Response:
        job = Job(work, asyncio.get_running_loop(), settings.request_timeout)
        try:
            worker.submit(job)
        except QueueFull:
            metrics.requests.labels("rejected").inc()
            raise APIError(429, "the server's queue is full; retry later", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(settings.retry_after)}) from None
        watcher = asyncio.create_task(watch(request, job))

        def close() -> None:  # a finished job ignores the cancel
            watcher.cancel()
            worker.cancel(job)

        streaming = False
        try:
            first = (await job.events.get())[0]  # Accepted, or why not
            if isinstance(first, APIError):
                raise first
            if isinstance(first, _Disconnected):
                return Response(status_code=499)
            if stream:
                streaming = True  # the stream closes the job when it ends
                return StreamingResponse(sse(job, fmt, close), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            return await collect(job, fmt, len(work.prompts) * work.n)
        finally:
            if not streaming:
                close()

    async def collect(job: Job, fmt: _Format, n_choices: int) -> Response:
        while True:
            for event in await job.events.get():
                if isinstance(event, Delta):
                    fmt.add(event)
                elif isinstance(event, Done):
                    return JSONResponse(fmt.response(event, n_choices))
                elif isinstance(event, APIError):
                    raise event
                elif isinstance(event, _Disconnected):
                    return Response(status_code=499)

    async def sse(job: Job, fmt: _Format, close) -> AsyncIterator[str]:
        try:
            while True:
                for event in await job.events.get():
                    if isinstance(event, Delta):
                        yield _sse(fmt.chunk(event))
                    elif isinstance(event, _Disconnected):
                        return
                    elif isinstance(event, (Done, APIError)):  # errors mid-stream: an event with the error object
                        if isinstance(event, APIError):
                            yield _sse(event.body())
                        elif fmt.include_usage:
                            yield _sse(fmt.usage_chunk(event))
                        yield "data: [DONE]\n\n"
                        return
        finally:
            close()

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await generate(request, completion_work(body, defaults), CompletionFormat(settings.model,
                                                                                         include_usage), body.stream)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await generate(request, chat_work(body, defaults), ChatFormat(settings.model, include_usage),
                              body.stream)

    app.include_router(v1)
    return app
