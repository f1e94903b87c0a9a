"""assist.connect: retries, error mapping, n fallback and replicas, over mocks and a real server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

import assist
from assist._remote import RemoteChatModel
from assist.errors import (
    BadRequest,
    ContextLengthExceeded,
    NotFound,
    Overloaded,
    UpstreamError,
    UpstreamTimeout,
)

MSGS = [{"role": "user", "content": "hello"}]


def completion(*texts: str, usage: dict[str, int] | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": i, "message": {"role": "assistant", "content": t},
                         "finish_reason": "stop"} for i, t in enumerate(texts or ("ok",))],
            "usage": usage or {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            "system_fingerprint": "fp"}


def make(handler: Callable[[httpx.Request], Any], urls: Any = "http://a/v1",
         **options: Any) -> tuple[RemoteChatModel, list[float]]:
    """A model over a MockTransport, its sleeps recorded instead of slept."""
    model = RemoteChatModel(urls, "m", transport=httpx.MockTransport(handler), **options)
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    model._sleep = sleep
    return model, sleeps


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- retries and error mapping ---------------------------------------------------------------
def test_retries_503_then_succeeds_with_backoff_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            return httpx.Response(503, json={"error": {"message": "warming up"}})
        return httpx.Response(200, json=completion("fine"))

    model, sleeps = make(handler)
    with caplog.at_level(logging.WARNING, logger="assist.remote"):
        out = run(model.chat(MSGS))
    assert out.text == "fine" and len(calls) == 3
    assert 0.25 <= sleeps[0] <= 0.75 and 0.5 <= sleeps[1] <= 1.5  # 0.5 * 2**k, +-50% jitter
    warnings = [r.getMessage() for r in caplog.records if r.name == "assist.remote"]
    assert len(warnings) == 2
    assert all("http://a" in w and "HTTP 503" in w and "warming up" in w for w in warnings)
    assert "attempt 1 of 4" in warnings[0] and "attempt 2 of 4" in warnings[1]


def test_retry_after_is_honoured_and_capped() -> None:
    answers = iter([httpx.Response(429, headers={"Retry-After": "7"}, json={}),
                    httpx.Response(503, headers={"Retry-After": "100000"}, json={}),
                    httpx.Response(200, json=completion())])
    model, sleeps = make(lambda request: next(answers))
    assert run(model.chat(MSGS)).text == "ok"
    assert sleeps == [7.0, 60.0]


@pytest.mark.parametrize(("status", "body", "error", "message", "param"), [
    (400, {"error": {"message": "temperature must be <= 2", "type": "invalid_request_error",
                     "param": "temperature", "code": "bad_value"}},
     BadRequest, "temperature must be <= 2", "temperature"),
    (422, {"detail": [{"loc": ["body", "messages", 0, "content"], "msg": "Field required",
                       "type": "missing"}]},
     BadRequest, "messages.0.content: Field required", "messages.0.content"),
    (400, {"object": "error", "message": "This model's maximum context length is 2048 tokens",
           "type": "BadRequestError", "param": None, "code": 400},  # vLLM's flat shape
     ContextLengthExceeded, "maximum context length is 2048", "messages"),
    (413, "request entity too large", BadRequest, "too large", None),
    (404, {"detail": "Not Found"}, NotFound, "Not Found", None),
    (401, {"error": {"message": "Incorrect API key"}}, UpstreamError, "rejected our API key", None),
])
def test_client_errors_map_without_retry(status: int, body: Any, error: type, message: str,
                                         param: str | None) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    model, sleeps = make(handler)
    with pytest.raises(error) as info:
        run(model.chat(MSGS))
    assert type(info.value) is error and message in info.value.message
    assert info.value.param == param
    assert isinstance(info.value.__cause__, httpx.HTTPStatusError)
    assert len(calls) == 1 and sleeps == []
    if status == 400 and param == "temperature":
        assert info.value.code == "bad_value"
    if status == 401:
        assert info.value.upstream_status == 401 and info.value.status == 502


@pytest.mark.parametrize(("failure", "error", "cause"), [
    (lambda r: httpx.Response(503, json={"error": {"message": "down"}}), UpstreamError,
     httpx.HTTPStatusError),
    (lambda r: httpx.Response(500, text="boom"), UpstreamError, httpx.HTTPStatusError),
    (httpx.ConnectError("refused"), UpstreamError, httpx.ConnectError),
    (httpx.ReadTimeout("slow"), UpstreamTimeout, httpx.ReadTimeout),
    (lambda r: httpx.Response(429, headers={"Retry-After": "2"}, json={}), Overloaded,
     httpx.HTTPStatusError),
])
def test_exhausted_retries_map_to_upstream_errors(failure: Any, error: type, cause: type) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if isinstance(failure, Exception):
            raise failure
        return failure(request)

    model, sleeps = make(handler, max_retries=2)
    with pytest.raises(error) as info:
        run(model.chat(MSGS))
    assert type(info.value) is error and "after 3 attempt(s)" in info.value.message
    assert isinstance(info.value.__cause__, cause)
    assert len(calls) == 3 and len(sleeps) == 2
    if error is Overloaded:
        assert info.value.retry_after == 2.0 and info.value.status == 429
    if error is UpstreamTimeout:
        assert info.value.status == 504


# -- request shape ----------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["http://a:8000/v1/", "http://a:8000"])
def test_body_headers_and_url_convention(base: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/health":
            return httpx.Response(200)
        return httpx.Response(200, json=completion())

    model = RemoteChatModel(base, "tiny", api_key="sk-test",
                            transport=httpx.MockTransport(handler))
    out = run(model.chat(MSGS, stop=("\n", "END"), top_k=5, tool_choice="auto",
                         max_completion_tokens=None, temperature=0.7, logprobs=True))
    assert out.usage.total_tokens == 5 and out.system_fingerprint == "fp"  # extras kept
    request = seen[0]
    assert str(request.url) == "http://a:8000/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    body = json.loads(request.content)
    assert body == {"model": "tiny", "messages": MSGS, "temperature": 0.7, "top_p": 1.0,
                    "stop": ["\n", "END"], "logprobs": True, "top_k": 5, "tool_choice": "auto"}
    assert run(model.get("/health")) == {}
    assert str(seen[1].url) == "http://a:8000/health"


def test_missing_usage_reads_as_zeros() -> None:
    data = completion()
    data.pop("usage")
    model, _ = make(lambda request: httpx.Response(200, json=data))
    assert run(model.chat(MSGS)).usage.total_tokens == 0


# -- n -----------------------------------------------------------------------------------------
def test_n_made_up_when_server_ignores_it() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:  # like llama.cpp: always one choice
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=completion(f"s{bodies[-1].get('seed')}"))

    model, _ = make(handler)
    out = run(model.chat(MSGS, n=3, seed=10, temperature=1.0))
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert sorted(out.texts()) == ["s10", "s11", "s12"]
    assert out.usage.prompt_tokens == 9 and out.usage.total_tokens == 15
    assert bodies[0]["n"] == 3 and all("n" not in b for b in bodies[1:])
    assert model.supports_n is False
    bodies.clear()  # remembered: straight to n separate calls
    assert len(run(model.chat(MSGS, n=2)).choices) == 2
    assert len(bodies) == 2 and all("n" not in b and "seed" not in b for b in bodies)


def test_n_in_one_call_when_supported_and_separate_when_told_not() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=completion(*["x"] * bodies[-1].get("n", 1)))

    model, _ = make(handler)
    assert len(run(model.chat(MSGS, n=4)).choices) == 4 and len(bodies) == 1
    assert model.supports_n is True
    bodies.clear()
    model, _ = make(handler, supports_n=False)
    assert len(run(model.chat(MSGS, n=4, seed=0)).choices) == 4
    assert sorted(b["seed"] for b in bodies) == [0, 1, 2, 3]


# -- replicas ----------------------------------------------------------------------------------
def test_least_outstanding_spreads_load() -> None:
    async def main() -> None:
        arrived: list[str] = []
        gate = asyncio.Event()

        async def handler(request: httpx.Request) -> httpx.Response:
            arrived.append(request.url.host)
            await gate.wait()
            return httpx.Response(200, json=completion())

        model, _ = make(handler, urls=["http://a/v1", "http://b/v1"])
        tasks = [asyncio.create_task(model.chat(MSGS)) for _ in range(4)]
        while len(arrived) < 4:
            await asyncio.sleep(0)
        assert Counter(arrived) == {"a": 2, "b": 2}
        assert [r["outstanding"] for r in model.replicas] == [2, 2]
        gate.set()
        await asyncio.gather(*tasks)
        assert [r["outstanding"] for r in model.replicas] == [0, 0]

        arrived.clear()  # equal load: ties go round-robin
        for _ in range(4):
            await model.chat(MSGS)
        assert arrived in (["a", "b", "a", "b"], ["b", "a", "b", "a"])
        await model.aclose()

    run(main())


def test_busy_replica_is_avoided() -> None:
    async def main() -> None:
        arrived: list[str] = []
        release = asyncio.Event()

        async def handler(request: httpx.Request) -> httpx.Response:
            arrived.append(request.url.host)
            if len(arrived) == 1:  # the first request stays in flight
                await release.wait()
            return httpx.Response(200, json=completion())

        model, _ = make(handler, urls=["http://a/v1", "http://b/v1"])
        held = asyncio.create_task(model.chat(MSGS))
        while not arrived:
            await asyncio.sleep(0)
        for _ in range(3):
            await model.chat(MSGS)
        busy = arrived[0]
        assert arrived[1:] == ["b" if busy == "a" else "a"] * 3
        release.set()
        await held

    run(main())


def test_failing_replica_is_taken_out_and_no_request_lost(caplog: pytest.LogCaptureFixture) -> None:
    hits: Counter[str] = Counter()

    def handler(request: httpx.Request) -> httpx.Response:
        hits[request.url.host] += 1
        if request.url.host == "a":
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200, json=completion())

    async def main() -> None:
        model, sleeps = make(handler, urls=["http://a/v1", "http://b/v1"], max_retries=0)
        now = [1000.0]
        model._clock = lambda: now[0]
        with caplog.at_level(logging.WARNING, logger="assist.remote"):
            outs = await asyncio.gather(*(model.chat(MSGS) for _ in range(6)))
        assert all(o.text == "ok" for o in outs) and sleeps == []  # failover is immediate
        assert hits["b"] == 6 and hits["a"] >= 1
        a, b = model.replicas
        assert not a["up"] and a["down_until"] is not None and a["failures"] == hits["a"]
        assert b["up"] and b["failures"] == 0 and b["requests"] == 6
        assert any("http://a" in r.getMessage() and "failing over" in r.getMessage()
                   for r in caplog.records)
        before = hits["a"]
        for _ in range(4):
            await model.chat(MSGS)
        assert hits["a"] == before  # out of rotation
        now[0] += 31  # cooldown over: a is tried again, and its request still lands on b
        await model.chat(MSGS)
        await model.chat(MSGS)
        assert hits["a"] == before + 1 and hits["b"] == 12

    run(main())


def test_all_down_tries_the_one_back_soonest() -> None:
    dead = {"a"}
    hits: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hits.append(request.url.host)
        if request.url.host in dead:
            raise httpx.ConnectError("refused")
        return httpx.Response(200, json=completion())

    async def main() -> None:
        model, sleeps = make(handler, urls=["http://a/v1", "http://b/v1"], max_retries=1)
        now = [0.0]
        model._clock = lambda: now[0]
        await model.chat(MSGS)  # a fails (down until 30), b serves
        assert hits == ["a", "b"]
        now[0] = 10.0
        dead.clear()
        dead.add("b")  # now b dies and a has recovered, though still in its cooldown
        hits.clear()
        assert (await model.chat(MSGS)).text == "ok"
        assert hits == ["b", "a"] and len(sleeps) == 1  # b down till 40: a (till 30) first
        assert model.replicas[0]["up"] and not model.replicas[1]["up"]

    run(main())


# -- streaming ---------------------------------------------------------------------------------
def sse(*chunks: Any) -> bytes:
    lines = [": keepalive\n\n", "event: ping\n\n", "\n"]
    lines += [f"data: {json.dumps(c)}\r\n\r\n" for c in chunks]
    return ("".join(lines) + "data: [DONE]\n\n" + 'data: {"after": true}\n\n').encode()


def test_stream_parses_sse_and_retries_before_first_byte() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        if len(bodies) == 1:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        return httpx.Response(200, content=sse({"i": 0}, {"i": 1}),
                              headers={"content-type": "text/event-stream"})

    async def main() -> list[dict[str, Any]]:
        model, sleeps = make(handler)
        chunks = [c async for c in model.stream("/v1/chat/completions", {"model": "m"})]
        assert len(sleeps) == 1 and model.replicas[0]["outstanding"] == 0
        return chunks

    assert run(main()) == [{"i": 0}, {"i": 1}]
    assert all(b["stream"] is True for b in bodies)


def test_stream_error_status_maps_after_reading_body() -> None:
    body = {"error": {"message": "bad max_tokens", "param": "max_tokens"}}
    model, _ = make(lambda request: httpx.Response(400, json=body))

    async def main() -> None:
        with pytest.raises(BadRequest) as info:
            async for _ in model.stream("/v1/chat/completions", {}):
                pass
        assert info.value.param == "max_tokens" and info.value.message == "bad max_tokens"
        assert model.replicas[0]["outstanding"] == 0

    run(main())


def chunk(index: int, content: str | None = None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}


def test_stream_chat_sends_the_chat_body_and_makes_up_n_in_order() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:  # like llama.cpp: one choice a call
        body = json.loads(request.content)
        bodies.append(body)
        word = f"s{body['seed']}"
        usage = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
        return httpx.Response(200, content=sse(chunk(0, word), chunk(0, "!"), chunk(0, None, "stop"), usage))

    async def main() -> list[dict[str, Any]]:
        model, _ = make(handler, supports_n=False)
        return [c async for c in model.stream_chat(MSGS, n=2, seed=7, max_tokens=5, include_usage=True)]

    chunks = run(main())
    assert [b["seed"] for b in bodies] == [7, 8] and all("n" not in b for b in bodies)
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True} and b["max_tokens"] == 5
               for b in bodies)
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        for part in c["choices"]:
            texts[part["index"]] += part["delta"].get("content") or ""
    assert texts == {0: "s7!", 1: "s8!"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 10


class _Broken(httpx.AsyncByteStream):
    """A body that sends one event and then loses the connection."""

    async def __aiter__(self) -> Any:
        yield f"data: {json.dumps(chunk(0, 'Hel'))}\n\n".encode()
        raise httpx.ReadError("connection reset")


def test_stream_chat_is_not_retried_after_its_first_chunk() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, stream=_Broken(), headers={"content-type": "text/event-stream"})

    async def main() -> list[dict[str, Any]]:
        model, sleeps = make(handler)
        got: list[dict[str, Any]] = []
        with pytest.raises(UpstreamError, match="broke off the stream"):
            async for c in model.stream_chat(MSGS):
                got.append(c)
        assert sleeps == [] and model.replicas[0]["outstanding"] == 0
        return got

    got = run(main())
    assert len(calls) == 1 and [c["choices"][0]["delta"]["content"] for c in got] == ["Hel"]


def test_stream_chat_maps_errors_like_chat() -> None:
    body = {"error": {"message": "This model's maximum context length is 64 tokens",
                      "code": "context_length_exceeded"}}
    model, _ = make(lambda request: httpx.Response(400, json=body))

    async def main() -> None:
        with pytest.raises(ContextLengthExceeded):
            async for _ in model.stream_chat(MSGS):
                pass
        with pytest.raises(BadRequest, match="n must be at least 1"):
            async for _ in model.stream_chat(MSGS, n=0):
                pass

    run(main())


# -- a real server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live_server() -> Iterator[str]:
    """A tiny OpenAI-shaped FastAPI app under uvicorn, in a thread, on a free port."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> Any:
        if body.get("stream"):
            async def events() -> Any:
                for piece in ("Hel", "lo"):
                    chunk = {"object": "chat.completion.chunk", "choices": [
                        {"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return completion(*[f"reply {i}" for i in range(body.get("n", 1))])

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    server.should_exit = True
    thread.join(5)
    sock.close()


def test_connect_against_a_real_server(live_server: str) -> None:
    async def main() -> None:
        async with assist.connect(live_server, "m", api_key="k") as model:
            assert isinstance(model, assist.ChatModel)
            out = await model.chat(MSGS, n=2)
            assert out.texts() == ["reply 0", "reply 1"] and model.supports_n
            async with contextlib.aclosing(
                    model.stream("/v1/chat/completions", {"model": "m", "messages": MSGS})) as s:
                pieces = [c["choices"][0]["delta"]["content"] async for c in s]
            assert "".join(pieces) == "Hello"

    run(main())


def test_dead_replica_is_taken_out_while_all_requests_succeed(live_server: str) -> None:
    dead = socket.socket()  # bound but not listening: connections are refused
    dead.bind(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}/v1"

    async def main() -> None:
        async with assist.connect([dead_url, live_server], "m", max_retries=0) as model:
            outs = await asyncio.gather(*(model.chat(MSGS) for _ in range(8)))
            assert [o.text for o in outs] == ["reply 0"] * 8
            down, live = model.replicas
            assert not down["up"] and down["failures"] >= 1 and down["outstanding"] == 0
            assert live["up"] and live["requests"] == 8 and live["failures"] == 0

    try:
        run(main())
    finally:
        dead.close()


def test_import_stays_light() -> None:
    code = "import sys, assist, assist._remote; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
