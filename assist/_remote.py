"""A ChatModel over any OpenAI-compatible server: ``assist.connect(base_url, model)``.

vLLM, llama.cpp, OpenAI and our own ``assist serve`` speak the same HTTP API, so one client
covers them all. It adds what a long evaluation against a fleet needs and the ``openai`` SDK
does not give: requests spread over several replicas by load, a failing replica taken out
for a while with its request moved to another (none lost), bounded retries with backoff
that honour ``Retry-After`` and show in the logs, ``n`` made up with extra calls where a
server ignores it, and every failure mapped to :mod:`assist.errors`.

URL convention: a ``base_url`` is stored without its trailing ``/v1`` (the server's root),
and every path is given from that root, ``/v1`` included: ``"/v1/chat/completions"``,
``"/v1/completions"``, and vLLM's ``"/health"`` and ``"/tokenize"``, which live outside
``/v1``. So ``http://host:8000/v1`` and ``http://host:8000`` name the same server.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import json
import logging
import random
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import ValidationError
from pydantic_core import to_jsonable_python

from assist.errors import (
    AssistError,
    BadRequest,
    ContextLengthExceeded,
    NotFound,
    Overloaded,
    UpstreamError,
    UpstreamTimeout,
)
from assist.protocol import Messages
from assist.types import ChatCompletion, Usage

__all__ = ["RemoteChatModel", "connect", "list_models"]

log = logging.getLogger("assist.remote")

RETRYABLE = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 60.0  # a server asking for longer is answered sooner by failing loudly


def _root(url: str) -> str:
    root = url.strip().rstrip("/")
    if not root.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {url!r}")
    return root[:-3] if root.endswith("/v1") else root


@dataclass(eq=False)
class _Replica:
    url: str
    make_client: Callable[[], httpx.AsyncClient]
    # An httpx client's pool belongs to the event loop it was first used in; one client per
    # loop lets the same model serve several ``asyncio.run`` calls (scripts, run_sync).
    clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = field(
        default_factory=weakref.WeakKeyDictionary)
    outstanding: int = 0
    down_until: float = 0.0  # on the model's monotonic clock; in the past while up
    requests: int = 0
    failures: int = 0

    @property
    def client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self.clients.get(loop)
        if client is None:
            client = self.clients[loop] = self.make_client()
        return client

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        client = self.clients.pop(loop, None)
        if client is not None:
            await client.aclose()
        self.clients.clear()  # the others belong to loops that are gone


class _Retry(Exception):
    """A failure worth another try; ``__cause__`` holds the httpx exception behind it."""

    def __init__(self, message: str, *, timeout: bool = False, status: int | None = None,
                 retry_after: float | None = None, mark_down: bool = True) -> None:
        super().__init__(message)
        self.message, self.timeout, self.status = message, timeout, status
        self.retry_after, self.mark_down = retry_after, mark_down

    def final(self, what: str, attempts: int) -> AssistError:
        message = f"{what} failed after {attempts} attempt(s); last: {self.message}"
        if self.status == 429:
            return Overloaded(message, retry_after=self.retry_after or 1.0)
        if self.timeout or self.status == 504:
            return UpstreamTimeout(message, upstream_status=self.status)
        return UpstreamError(message, upstream_status=self.status)


class RemoteChatModel:
    """A ChatModel over one or more OpenAI-compatible servers (replicas of one model).

    Each replica has its own pooled ``httpx.AsyncClient``; ``transport``, if given, is
    shared by all of them (tests route on ``request.url.host``/``port``). ``max_retries``
    bounds the backoff retries of one request; moving it to another replica that is up and
    has not failed it yet is immediate and free, so a dead replica never costs a request.
    """

    def __init__(
        self, base_url: str | Sequence[str], model: str, api_key: str | None = None, *,
        timeout: float = 120.0, connect_timeout: float = 10.0, max_retries: int = 3,
        backoff: float = 0.5, cooldown: float = 30.0, supports_n: bool = True,
        name: str | None = None, transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 256,
    ) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("RemoteChatModel needs at least one base_url")
        self.model = model
        self.name = name or model
        self.supports_n = supports_n
        self.max_retries, self.backoff, self.cooldown = max_retries, backoff, cooldown
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=max_connections)
        timeouts = httpx.Timeout(timeout, connect=connect_timeout)
        self._replicas = [
            _Replica(root, functools.partial(httpx.AsyncClient, base_url=root, headers=headers,
                                             timeout=timeouts, limits=limits, transport=transport))
            for root in map(_root, urls)
        ]
        # Injectable so tests check backoff and cooldown without waiting on the wall clock.
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self._clock: Callable[[], float] = time.monotonic
        self._turn = 0  # breaks ties between equally loaded replicas round-robin

    def __repr__(self) -> str:
        return f"RemoteChatModel({[r.url for r in self._replicas]}, model={self.model!r})"

    @property
    def replicas(self) -> list[dict[str, Any]]:
        """Per-replica stats for /metrics; ``down_until`` is a Unix time, None while up."""
        now, wall = self._clock(), time.time()
        return [{"url": r.url, "up": r.down_until <= now, "outstanding": r.outstanding,
                 "down_until": wall + r.down_until - now if r.down_until > now else None,
                 "requests": r.requests, "failures": r.failures} for r in self._replicas]

    # -- ChatModel ------------------------------------------------------------------------
    async def chat(
        self, messages: Messages, *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
        max_tokens: int | None = None, stop: str | Sequence[str] | None = None,
        seed: int | None = None, tools: Sequence[Mapping[str, Any]] | None = None,
        response_format: Mapping[str, Any] | None = None, logprobs: bool = False, **extra: Any,
    ) -> ChatCompletion:
        """One chat completion; ``extra`` (top_k, tool_choice, ...) goes into the body as is."""
        body = self._chat_body(messages, n=n, temperature=temperature, top_p=top_p,
                               max_tokens=max_tokens, stop=stop, seed=seed, tools=tools,
                               response_format=response_format, logprobs=logprobs, extra=extra)
        if n == 1:
            return await self._complete(body)
        if not self.supports_n:
            return _merge(await asyncio.gather(*(self._complete(_single(body, i))
                                                 for i in range(n))))
        first = await self._complete({**body, "n": n})
        got = len(first.choices)
        if got >= n:
            return first
        if self.supports_n:  # a concurrent call may have found out first: log it once
            log.warning("%s returned %d of n=%d choices; making up n with n=1 calls from now on",
                        self.name, got, n)
            self.supports_n = False
        rest = await asyncio.gather(*(self._complete(_single(body, i)) for i in range(got, n)))
        return _merge([first, *rest])

    async def stream_chat(
        self, messages: Messages, *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
        max_tokens: int | None = None, stop: str | Sequence[str] | None = None,
        seed: int | None = None, tools: Sequence[Mapping[str, Any]] | None = None,
        response_format: Mapping[str, Any] | None = None, logprobs: bool = False,
        include_usage: bool = False, **extra: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """:meth:`chat` as OpenAI ``chat.completion.chunk`` dicts, read from the server's SSE
        stream (the contract of the torch engine's ``stream_chat``), the usage last when
        ``include_usage``. Retried and failed over only until the response starts: once a
        chunk has been handed on, a retry would send the caller its text twice, so a stream
        that breaks raises :class:`UpstreamError`/:class:`UpstreamTimeout`. Where the server
        ignores ``n`` the choices come from n=1 streams, one after another, re-indexed."""
        body = self._chat_body(messages, n=n, temperature=temperature, top_p=top_p,
                               max_tokens=max_tokens, stop=stop, seed=seed, tools=tools,
                               response_format=response_format, logprobs=logprobs, extra=extra)
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        if n == 1 or self.supports_n:
            async with contextlib.aclosing(self.stream("/v1/chat/completions",
                                                       {**body, "n": n} if n > 1 else body)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        # A server known to ignore n (found out by ``chat``): n streams, the i-th one's only
        # choice renumbered i, and their usages summed into the one usage chunk asked for.
        usage, last = Usage(), None
        for i in range(n):
            async with contextlib.aclosing(self.stream("/v1/chat/completions",
                                                       _single(body, i))) as chunks:
                async for chunk in chunks:
                    if chunk.get("usage") and not chunk.get("choices"):
                        usage += _usage(chunk["usage"])
                        last = chunk
                        continue
                    yield {**chunk, "choices": [{**c, "index": i} for c in chunk.get("choices") or []]}
        if include_usage and last is not None:
            yield {**last, "usage": usage.model_dump()}

    def _chat_body(self, messages: Messages, *, n: int, temperature: float, top_p: float,
                   max_tokens: int | None, stop: str | Sequence[str] | None, seed: int | None,
                   tools: Sequence[Mapping[str, Any]] | None,
                   response_format: Mapping[str, Any] | None, logprobs: bool,
                   extra: Mapping[str, Any]) -> dict[str, Any]:
        """The JSON body of a chat request, without ``n`` (callers add it where they send it)."""
        if n < 1:
            raise BadRequest(f"n must be at least 1, got {n}", param="n")
        body = {
            "model": self.model,
            "messages": [dict(m) if isinstance(m, Mapping) else m for m in messages],
            "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens,
            "stop": stop if stop is None or isinstance(stop, str) else list(stop),
            "seed": seed, "tools": list(tools) if tools else None,
            "response_format": response_format, "logprobs": True if logprobs else None, **extra,
        }
        body = to_jsonable_python({k: v for k, v in body.items() if v is not None},
                                  exclude_none=True)
        return body

    async def _complete(self, body: dict[str, Any]) -> ChatCompletion:
        return _completion(await self.post("/v1/chat/completions", body))

    # -- raw HTTP -------------------------------------------------------------------------
    async def post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST JSON to ``path`` (from the server root, e.g. "/v1/completions", "/tokenize")."""
        return _json((await self._send("POST", path, dict(body), stream=False))[1])

    async def get(self, path: str) -> dict[str, Any]:
        """GET ``path``; an empty body (vLLM's /health) reads as ``{}``, text as ``{"text"}``."""
        return _json((await self._send("GET", path, None, stream=False))[1])

    async def stream(self, path: str, body: Mapping[str, Any]) -> AsyncGenerator[dict[str, Any]]:
        """POST with ``stream: true`` and yield each server-sent ``data:`` chunk until [DONE].

        Retried (and failed over) only until the response starts; a stream that breaks
        later raises. Wrap in ``contextlib.aclosing`` to release the connection on break.
        """
        replica, response = await self._send("POST", path, {**body, "stream": True}, stream=True)
        url = str(response.request.url)
        try:
            async for line in response.aiter_lines():
                # One event per `data:` line, as every OpenAI-compatible server sends them;
                # comments (":"), event/id fields and blank keepalives are skipped.
                if not line.startswith("data:") or not (data := line[5:].strip()):
                    continue
                if data == "[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                except ValueError as exc:
                    raise UpstreamError(f"{url} streamed a bad event: {data[:200]!r}") from exc
                if isinstance(chunk, dict) and chunk.get("error") and not chunk.get("choices"):
                    raise UpstreamError(f"{url} failed mid-stream: {_message(chunk)[0]}")
                yield chunk
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"{url} stalled mid-stream: {exc!r}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{url} broke off the stream: {exc!r}") from exc
        finally:
            replica.outstanding -= 1
            await response.aclose()

    async def aclose(self) -> None:
        await asyncio.gather(*(r.aclose() for r in self._replicas))

    async def __aenter__(self) -> RemoteChatModel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- replicas and retries -------------------------------------------------------------
    def _pick(self, tried: set[_Replica]) -> _Replica:
        """The least-loaded replica that is up, preferring ones this request has not tried."""
        now = self._clock()
        up = [r for r in self._replicas if r.down_until <= now]
        pool = [r for r in up if r not in tried] or up
        if not pool:  # all down: the one back soonest rather than failing outright
            return min(self._replicas, key=lambda r: r.down_until)
        start = self._turn % len(pool)
        self._turn += 1
        return min(pool[start:] + pool[:start], key=lambda r: r.outstanding)

    async def _send(self, method: str, path: str, body: Any, *,
                    stream: bool) -> tuple[_Replica, httpx.Response]:
        """A 2xx response and its replica, after retries and failover.

        When streaming, the body is unread and the request still counts as outstanding on
        the replica: the caller releases it when the stream ends.
        """
        what = f"{method} {path}"
        tried: set[_Replica] = set()
        retries = attempts = 0
        while True:
            replica = self._pick(tried)
            replica.outstanding += 1
            replica.requests += 1
            attempts += 1
            try:
                response = await self._attempt(replica, method, path, body, stream=stream)
            except BaseException as exc:
                replica.outstanding -= 1
                if not isinstance(exc, _Retry):
                    raise
                failure = exc
            else:
                replica.down_until = 0.0  # answering again: back in rotation at once
                if not stream:
                    replica.outstanding -= 1
                return replica, response
            tried.add(replica)
            replica.failures += 1
            if failure.mark_down:
                replica.down_until = self._clock() + self.cooldown
            down = f", out for {self.cooldown:g}s" if failure.mark_down else ""
            if any(r not in tried and r.down_until <= self._clock() for r in self._replicas):
                log.warning("%s on %s failed (%s%s), attempt %d; failing over to another replica",
                            what, replica.url, failure.message, down, attempts)
                continue
            if retries >= self.max_retries:
                raise failure.final(what, attempts) from failure.__cause__
            retries += 1
            delay = (min(failure.retry_after, MAX_RETRY_AFTER) if failure.retry_after is not None
                     else self.backoff * 2 ** (retries - 1) * random.uniform(0.5, 1.5))
            log.warning("%s on %s failed (%s%s), attempt %d of %d; retrying in %.2fs", what,
                        replica.url, failure.message, down, attempts, self.max_retries + 1, delay)
            await self._sleep(delay)

    async def _attempt(self, replica: _Replica, method: str, path: str, body: Any, *,
                       stream: bool) -> httpx.Response:
        """One try: a 2xx response, a ``_Retry``, or the final error for other statuses."""
        request = replica.client.build_request(method, path, json=body)
        try:
            response = await replica.client.send(request, stream=stream)
        except httpx.TimeoutException as exc:
            # Waiting on our own pool says nothing about the replica's health.
            raise _Retry(f"{type(exc).__name__}: timed out", timeout=True,
                         mark_down=not isinstance(exc, httpx.PoolTimeout)) from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from exc
        except httpx.HTTPError as exc:  # a bad URL or scheme: no retry can help
            raise UpstreamError(f"{method} {request.url} failed: {exc!r}") from exc
        if response.is_success:
            return response
        if stream:  # read the error body first, so the message can be mapped
            try:
                await response.aread()
            except httpx.HTTPError:
                pass
            finally:
                await response.aclose()
        status = response.status_code
        cause = httpx.HTTPStatusError(f"HTTP {status} from {request.url}", request=request,
                                      response=response)
        if status in RETRYABLE:
            retry_after = _retry_after(response) if status in (429, 503) else None
            raise _Retry(f"HTTP {status}: {_message(_body(response))[0]}", status=status,
                         retry_after=retry_after, mark_down=status >= 500) from cause
        raise _status_error(response) from cause


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # the other form HTTP allows: a date
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase


def _message(data: Any) -> tuple[str, str | None, str | None]:
    """(message, param, code) from an error in OpenAI's, vLLM's flat or FastAPI's shape."""
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict) and "message" in err:
        param, code = err.get("param"), err.get("code")
        return (str(err["message"]), None if param is None else str(param),
                None if code is None else str(code))
    detail = err.get("detail") if isinstance(err, dict) else None
    if isinstance(detail, list) and detail:  # FastAPI validation: [{"loc": [...], "msg": ...}]
        items = [d for d in detail if isinstance(d, dict)]
        locs = [".".join(str(p) for p in d.get("loc", ()) if p != "body") for d in items]
        msgs = [f"{loc}: {d.get('msg')}" if loc else str(d.get("msg"))
                for loc, d in zip(locs, items, strict=True)]
        return "; ".join(msgs) or str(detail), next((loc for loc in locs if loc), None), None
    if detail is not None:
        return str(detail), None, None
    return str(err), None, None


def _status_error(response: httpx.Response) -> AssistError:
    """The assist error for a status that no retry can fix."""
    status = response.status_code
    message, param, code = _message(_body(response))
    if status in (400, 413, 422):
        if code == "context_length_exceeded" or "maximum context length" in message:
            return ContextLengthExceeded(message, param=param or "messages")
        return BadRequest(message, param=param, code=code)
    if status == 404:
        return NotFound(message, param=param, code=code)
    if status in (401, 403):
        return UpstreamError(f"upstream rejected our API key (HTTP {status} from "
                             f"{response.request.url}): {message}", upstream_status=status)
    return UpstreamError(f"HTTP {status} from {response.request.url}: {message}",
                         upstream_status=status, code=code)


def _json(response: httpx.Response) -> dict[str, Any]:
    if not response.content.strip():
        return {}
    try:
        data = response.json()
    except ValueError:
        return {"text": response.text}
    return data if isinstance(data, dict) else {"data": data}


def _completion(data: dict[str, Any]) -> ChatCompletion:
    """Parse a server's answer, tolerating the fields some servers leave out or null."""
    if not isinstance(data.get("choices"), list):
        raise UpstreamError(f"a chat completion without choices: {str(data)[:300]}")
    data = {k: v for k, v in data.items() if v is not None}
    if data.get("object") != "chat.completion":
        data.pop("object", None)
    try:
        completion = ChatCompletion.model_validate(data)
    except ValidationError as exc:
        raise UpstreamError(f"an unexpected chat completion shape: {exc}") from exc
    usage = completion.usage
    if not usage.total_tokens:
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    return completion


def _usage(data: Any) -> Usage:
    """A streamed usage, tolerating the nulls some servers send."""
    try:
        return Usage.model_validate({k: v for k, v in data.items() if v is not None})
    except (AttributeError, ValidationError) as exc:
        raise UpstreamError(f"an unexpected usage shape: {str(data)[:300]}") from exc


def _single(body: dict[str, Any], i: int) -> dict[str, Any]:
    """The body of the i-th of n separate calls: its own seed, so samples differ."""
    return {**body, "seed": body["seed"] + i} if "seed" in body else body


def _merge(parts: Sequence[ChatCompletion]) -> ChatCompletion:
    choices = [c.model_copy(update={"index": i})
               for i, c in enumerate(c for part in parts for c in part.choices)]
    usage = sum((p.usage for p in parts), Usage())
    return parts[0].model_copy(update={"choices": choices, "usage": usage})


def connect(base_url: str | Sequence[str], model: str, api_key: str | None = None,
            **options: Any) -> RemoteChatModel:
    """A ChatModel over OpenAI-compatible server(s); ``options`` go to RemoteChatModel."""
    return RemoteChatModel(base_url, model, api_key, **options)


def list_models(base_url: str, api_key: str | None = None, *, timeout: float = 10.0,
                trust_env: bool = True) -> list[dict[str, Any]]:
    """The model entries (``{"id": ..., ...}``) a server lists on ``GET /v1/models``.

    A plain synchronous call, for use before an event loop starts. Failures are
    :mod:`assist.errors`: :class:`NotFound` for a server without the route,
    :class:`UpstreamTimeout`/:class:`UpstreamError` for one that cannot be reached or does
    not answer with an OpenAI model list; a ``base_url`` that is not http(s) is a ValueError.
    """
    root = _root(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(root + "/v1/models", headers=headers, timeout=timeout,
                             trust_env=trust_env)
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout(f"{root}/v1/models did not answer in {timeout:g}s") from exc
    except httpx.HTTPError as exc:
        raise UpstreamError(f"cannot reach {root} ({type(exc).__name__}: {exc})") from exc
    if response.status_code != 200:
        raise _status_error(response)
    try:
        data = response.json()["data"]
        if not isinstance(data, list) or not all(isinstance(m, dict) and "id" in m for m in data):
            raise TypeError(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise UpstreamError(f"{root}/v1/models is not an OpenAI model list") from exc
    return data
