"""The OpenAI-compatible HTTP server (FastAPI + uvicorn): routes, auth, errors, and ``maskkv serve``.

Every error a client can cause is an OpenAI-style JSON body with a 4xx status, and the server goes
on serving everyone else: bodies are parsed by hand (size-capped, strict JSON) so no framework
default (422, HTML, a traceback) leaks out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from maskkv_engine import __version__
from maskkv_engine.engine.async_llm_engine import AsyncLLMEngine, EngineDeadError, QueueFullError
from maskkv_engine.entrypoints.openai.cli_args import DEFAULT_MAX_BODY_BYTES
from maskkv_engine.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from maskkv_engine.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
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


PROTECTED_ROUTES = ("/v1", "/tokenize", "/detokenize")


class _AuthMiddleware:
    """``Authorization: Bearer KEY`` on every /v1 route and the tokenizer routes (pure ASGI: it must not
    buffer streams)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_ROUTES):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = error_response(401, "Incorrect API key provided.", code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")
JSON_CONTENT_TYPE = "application/json"


def _host_name(header: bytes) -> str:
    """``b"[::1]:8000"`` -> ``"::1"``; ``b"Example.com.:80"`` -> ``"example.com"``."""
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, _, port = host.rpartition(":")
    if name and port.isdigit():
        host = name
    return host.rstrip(".")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _HostMiddleware:
    """Only Host headers that name this server (against DNS rebinding: a web page in the user's browser
    whose own name resolves to 127.0.0.1 would otherwise reach the local server with its own Host).

    Allowed: localhost / 127.0.0.1 / [::1], the bound address, the names in ``allowed`` (``*``: all);
    when bound to a wildcard address (0.0.0.0, ::), any IP address too, since a client that names the
    server by IP is not a rebound page.
    """

    def __init__(self, app, bound_host: str, allowed: list[str]):
        self.app = app
        self.any = "*" in allowed
        self.allowed = {h.strip("[]").lower().rstrip(".") for h in (*LOOPBACK_HOSTS, bound_host, *allowed)}
        self.any_ip = bound_host.strip("[]") in WILDCARD_ADDRESSES

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not self.any:
            host = _host_name(dict(scope["headers"]).get(b"host", b""))
            if host not in self.allowed and not (self.any_ip and _is_ip(host)):
                message = (f"Host header {host!r} is not allowed: start the server with --allowed-hosts {host or 'NAME'} "
                           "if clients reach it by that name")  # fmt: skip
                await error_response(400, message, param="Host", code="host_not_allowed")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _non_finite(data: Any) -> tuple[str, float] | None:
    """The first float that is not finite (``1e999`` parses to inf), with its field path. Iterative: a
    body nested as deep as the JSON parser allows must not exhaust the stack here."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return path or "body", value
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        stack.extend(reversed([(f"{path}.{key}" if path else str(key), item) for key, item in items]))
    return None


def check_json_content_type(request: Request) -> None:
    """POST bodies must say they are JSON: a web page can send text/plain or a form to localhost without
    a CORS preflight, but not application/json."""
    given = request.headers.get("content-type", "")
    if given.split(";")[0].strip().lower() != JSON_CONTENT_TYPE:
        raise OpenAIError(415, f"Content-Type must be {JSON_CONTENT_TYPE}, got {given or 'none'!r}",
                          param="Content-Type", code="unsupported_media_type")  # fmt: skip


async def read_json(request: Request, max_bytes: int) -> Any:
    """The body as JSON: 415 unless sent as JSON, 413 past ``max_bytes`` (checked while reading), 400
    unless strict JSON (no NaN, no number that overflows to infinity)."""
    check_json_content_type(request)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise OpenAIError(413, f"the request body is {length} bytes; the limit is {max_bytes}")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            raise OpenAIError(413, f"the request body exceeds the limit of {max_bytes} bytes")
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise OpenAIError(400, f"the request body is not valid JSON: {e}") from e
    bad = _non_finite(data)
    if bad is not None:
        raise OpenAIError(400, f"{bad[0]}={bad[1]} is not a finite number", param=bad[0])
    return data


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
    max_tokens_limit: int | None = None,
    allowed_hosts: list[str] | None = None,
    bound_host: str = "127.0.0.1",
    model_aliases: list[str] | tuple[str, ...] = (),
) -> FastAPI:
    """The FastAPI app for one engine (a plain server, or one Ray Serve replica).

    max_tokens_limit: response tokens one request may ask for (default: max_model_len).
    allowed_hosts: None = no Host check (a proxy in front does it, e.g. Ray Serve); else the Host names
    accepted besides localhost and ``bound_host`` (``["*"]``: all). model_aliases: other ids clients may
    send for the served model, never shown (``maskkv serve`` accepts the --model path).
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await engine.shutdown()

    app = FastAPI(title="maskkv-engine OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None)
    serving = OpenAIServing(engine, served_model_names, max_tokens_limit, model_aliases)
    metrics = ServerMetrics(engine, served_model_names[0])
    serving.abort_listeners.append(metrics.observe_abort)
    serving.start_listeners.append(metrics.observe_start)
    app.state.engine = engine
    app.state.serving = serving
    app.state.metrics = metrics

    if api_key is not None:
        app.add_middleware(_AuthMiddleware, api_key=api_key)
    if allowed_hosts is not None:  # added last: it runs first
        app.add_middleware(_HostMiddleware, bound_host=bound_host, allowed=allowed_hosts)

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

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(serving.show_models().model_dump(mode="json"))

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> JSONResponse:
        return JSONResponse(serving.show_model(model_id).model_dump(mode="json"))

    async def respond(request: Request, model: type[BaseModel], create: Callable) -> Response:
        body = parse_body(model, await read_json(request, max_body_bytes))
        result = await _cancel_on_disconnect(request, create(body))
        if isinstance(result, SSEStream):
            return _SSEResponse(result)
        if isinstance(result, Response):
            return result
        return JSONResponse(result.model_dump(mode="json"))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await respond(request, TokenizeRequest, serving.tokenize)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await respond(request, DetokenizeRequest, serving.detokenize)

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
    app = build_app(
        engine,
        [name],
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        max_tokens_limit=args.max_tokens_limit,
        allowed_hosts=args.allowed_hosts,
        bound_host=args.host,
        model_aliases=[args.model] if args.model is not None and args.model != name else [],
    )
    logger.info("serving %s (%s) on http://%s:%d", name, path, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
