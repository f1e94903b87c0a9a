"""The FastAPI application: thin routes over :class:`Serving`, errors in OpenAI's shape.

Nothing here is global: ``create_app`` takes the backend (engine injected), so tests and
users can serve a fake, an engine or an upstream from the same code.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from assist.errors import AssistError, BadRequest, Unauthorized
from assist.server._backend import Backend
from assist.server._metrics import CONTENT_TYPE, Metrics, engine_metrics
from assist.server._protocol import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    check_text,
)
from assist.server._serving import ClientGone, Serving, StrategyResolver
from assist.server._web import PAGE_PATHS, add_playground, task_examples

__all__ = ["create_app"]

log = logging.getLogger("assist.server")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize",
                    "/tokenizer_info", "/version", "/health", "/metrics", "/v1/strategies/check",
                    "/v1/playground/examples", "/"})


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _error_response(exc: AssistError) -> JSONResponse:
    """Any of our errors in OpenAI's shape, with ``Retry-After`` when it carries one."""
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if hasattr(exc, "retry_after") else None
    return _error(exc.status, exc.message, exc.type, exc.param, exc.code, headers)


DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def _host_name(header: bytes | None) -> str | None:
    """The name in a ``Host`` header, lower-cased, without its port, brackets or final dot."""
    if header is None:
        return None
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):  # [::1]:8000
        end = host.find("]")
        return host[1:end] if end > 0 else None
    if host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host.removesuffix(".") or None


def host_allowed(header: bytes | None, allowed: Sequence[str]) -> bool:
    """Whether a ``Host`` header names one of ``allowed``: exact names or IPs, ``*.domain``
    for its subdomains, ``*`` for any."""
    if "*" in allowed:
        return True
    name = _host_name(header)
    if name is None:
        return False
    for entry in allowed:
        entry = entry.strip().lower().removesuffix(".")
        if entry.startswith("[") and entry.endswith("]"):
            entry = entry[1:-1]
        if name == entry or (entry.startswith("*.") and name.endswith(entry[1:])):
            return True
    return False


class Edge:
    """Pure ASGI middleware (it must not get between a route and the disconnect event):
    records status and latency for ``/metrics``; refuses a ``Host`` not in ``allowed_hosts``
    (DNS rebinding: a web page whose name resolves to this server) and, when ``api_key`` is
    set, a request without it to any path but ``open_paths``, both before the body is read;
    and answers 413 for bodies over ``limit`` bytes before any route parses them. The body is
    read here (bounded) and replayed, so chunked uploads without a Content-Length are caught
    as well.
    """

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics, api_key: str | None = None,
                 open_paths: frozenset[str] = frozenset({"/health"}),
                 allowed_hosts: Sequence[str] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.api_key = api_key
        self.open_paths = open_paths
        self.allowed_hosts = None if allowed_hosts is None else tuple(allowed_hosts)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        headers = dict(scope.get("headers") or [])
        if self.allowed_hosts is not None and not host_allowed(headers.get(b"host"), self.allowed_hosts):
            return _error_response(BadRequest("The Host header names a host this server does not serve "
                                              "(see --allowed-hosts).", param="Host", code="host_not_allowed"))
        if self.api_key is not None and scope["path"] not in self.open_paths:
            header = headers.get(b"authorization", b"")
            token = header[7:] if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.api_key.encode()):
                return _error_response(Unauthorized("Incorrect API key provided.", code="invalid_api_key"))
        return None

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, observed)
            else:
                await self._limited(scope, receive, observed)
        finally:
            path = scope["path"] if scope["path"] in ROUTES else "other"  # bounded label set
            self.metrics.observe(path, status, time.perf_counter() - t0)

    async def _limited(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks: list[bytes] = []
        size = 0
        more = not too_big
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left while uploading
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            too_big = size > self.limit
            if too_big:
                break
        if too_big:
            response = _error(413, f"request body exceeds {self.limit} bytes", "invalid_request_error",
                              code="request_too_large")
            await response(scope, receive, send)
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the disconnect, when it comes

        await self.app(scope, replay, send)


def create_app(
    backend: Backend, *, names: Sequence[str] = ("assistant",), api_key: str | None = None,
    max_body_bytes: int = 4 << 20, max_in_flight: int = 256, resolver: StrategyResolver | None = None,
    strategy_aliases: Sequence[str] = (), owns_backend: bool = True, policy: Any = None,
    public_metrics: bool = False, public_docs: bool = False, allowed_hosts: Sequence[str] | None = None,
    examples: Callable[[], list[dict[str, Any]]] | None = None,
) -> FastAPI:
    """An OpenAI-compatible app over ``backend``; closed at shutdown if ``owns_backend``.
    ``policy`` (a :class:`strategies.Policy`; default: every strategy, no resources, no
    python tool, default limits) is what strategy specs from clients are held to.

    With ``api_key`` every path but ``/health`` needs it as a bearer key, ``/metrics`` and
    the docs (``/docs``, ``/redoc``, ``/openapi.json``) included unless ``public_metrics`` /
    ``public_docs`` open them. ``allowed_hosts`` (None: any) lists the ``Host`` names served.
    The playground page (``/`` and its ``/static/`` files) is open too: it holds no data, and
    asks for the key. ``examples`` gives its example prompts (default: the task generators'
    default settings).
    """
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key must not be empty: pass None to serve without a key")
    serving = Serving(backend, names=names, max_in_flight=max_in_flight, resolver=resolver,
                      strategy_aliases=strategy_aliases, policy=policy)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if owns_backend:
            await backend.aclose()

    # The docs are served under the same Edge checks as every route (the key, the Host).
    app = FastAPI(title="assist", version="0.1.0", lifespan=lifespan)
    app.state.serving = serving
    open_paths = frozenset({"/health"} | PAGE_PATHS | ({"/metrics"} if public_metrics else set())
                           | (DOC_PATHS if public_docs else set()))
    app.add_middleware(Edge, limit=max_body_bytes, metrics=serving.metrics, api_key=api_key,
                       open_paths=open_paths, allowed_hosts=allowed_hosts)

    @app.exception_handler(AssistError)
    async def _assist_error(request: Request, exc: AssistError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return _error(400, f"{param}: {message}" if param else message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}", "server_error")

    def _respond(result: dict[str, Any] | AsyncIterator[bytes]) -> Response:
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        check_text(body)
        return _respond(await serving.chat(body, request))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_text(body)
        return _respond(await serving.complete(body, request))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return serving.models()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        """Counted in admission like a generation: tokenizing is work (in a worker thread)."""
        check_text(body)
        serving.route(body.model, None)
        async with serving.admitted():
            return await backend.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        """vLLM's: ``{"tokens": [...]}`` -> ``{"prompt": text}`` (lm-eval's remote tokenizer)."""
        serving.route(body.model, None)
        async with serving.admitted():
            return await backend.detokenize(body)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        """vLLM's: the tokenizer's configuration (special tokens, class, chat template)."""
        return await backend.tokenizer_info()

    @app.get("/version")
    async def version() -> dict[str, Any]:
        from assist import __version__

        return {"version": __version__}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "in_flight": serving.metrics.in_flight, **backend.gauges()}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        """This server's series; under ``--engine vllm`` the child's own after them, each
        name prefixed ``engine_`` (see :func:`engine_metrics`)."""
        gauges = {"requests_in_flight_limit": float(max_in_flight), "model_calls_in_flight": float(serving.units),
                  **backend.gauges()}
        text = serving.metrics.render(gauges) + await engine_metrics(backend)
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    add_playground(app, serving, examples or task_examples)
    return app
