"""The OpenAI-compatible HTTP server (FastAPI + uvicorn): routes, auth, errors, and ``maskkv serve``.

Every error a client can cause is an OpenAI-style JSON body with a 4xx status, and the server goes
on serving everyone else: bodies are parsed by hand (size-capped, strict JSON) so no framework
default (422, HTML, a traceback) leaks out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from maskkv_engine.engine.async_llm_engine import AsyncLLMEngine, EngineDeadError, QueueFullError
from maskkv_engine.entrypoints.openai.cli_args import DEFAULT_MAX_BODY_BYTES
from maskkv_engine.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from maskkv_engine.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from maskkv_engine.entrypoints.openai.serving import OpenAIError, OpenAIServing, SSEStream

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1


class _SSEResponse(StreamingResponse):
    """A streamed completion whose requests are aborted however the response ends (done, error,
    client gone), even when the body iterator was never started."""

    def __init__(self, stream: SSEStream):
        super().__init__(stream.body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = stream.on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class _AuthMiddleware:
    """``Authorization: Bearer KEY`` on every /v1 route (pure ASGI: it must not buffer streams)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = error_response(401, "Incorrect API key provided.", code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, max_bytes: int) -> Any:
    """The body as JSON: 413 past ``max_bytes`` (checked while reading), 400 unless strict JSON."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise OpenAIError(413, f"the request body is {length} bytes; the limit is {max_bytes}")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            raise OpenAIError(413, f"the request body exceeds the limit of {max_bytes} bytes")
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise OpenAIError(400, f"the request body is not valid JSON: {e}") from e


def parse_body(model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise OpenAIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        details = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()[:5])
        raise OpenAIError(400, details, param=param) from e


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _cancel_on_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run a non-streamed handler, cancelling it (and so aborting its requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it


def build_app(
    engine: AsyncLLMEngine,
    served_model_names: list[str],
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI app for one engine (a plain server, or one Ray Serve replica)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await engine.shutdown()

    app = FastAPI(title="maskkv-engine OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None)
    serving = OpenAIServing(engine, served_model_names)
    metrics = ServerMetrics(engine, served_model_names[0])
    app.state.engine = engine
    app.state.serving = serving
    app.state.metrics = metrics

    if api_key is not None:
        app.add_middleware(_AuthMiddleware, api_key=api_key)

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, e: OpenAIError) -> JSONResponse:
        return JSONResponse(e.body.model_dump(), status_code=e.status)

    @app.exception_handler(QueueFullError)
    async def queue_full(_: Request, e: QueueFullError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        return error_response(503, str(e), type="server_overloaded", code="queue_full", headers=headers)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return error_response(503, str(e), type="server_error", code="engine_dead")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, f"internal server error: {type(e).__name__}", type="server_error")

    @app.get("/health")
    async def health() -> Response:
        engine.check_health()
        return Response(status_code=200)

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(serving.show_models().model_dump())

    async def respond(request: Request, model: type[BaseModel], create: Callable) -> Response:
        body = parse_body(model, await read_json(request, max_body_bytes))
        result = await _cancel_on_disconnect(request, create(body))
        if isinstance(result, SSEStream):
            return _SSEResponse(result)
        if isinstance(result, Response):
            return result
        return JSONResponse(result.model_dump(exclude_none=True))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await respond(request, CompletionRequest, serving.create_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await respond(request, ChatCompletionRequest, serving.create_chat_completion)

    return app


def run_server(args: argparse.Namespace) -> int:
    """``maskkv serve`` without --ray: one engine behind uvicorn."""
    import uvicorn

    from maskkv_engine.entrypoints.openai.cli_args import engine_kwargs_from_args, resolve_model

    path, name = resolve_model(args)
    engine = AsyncLLMEngine.from_engine_args(path, max_queue_len=args.max_queue_len, **engine_kwargs_from_args(args))
    app = build_app(engine, [name], api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    logger.info("serving %s (%s) on http://%s:%d", name, path, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
