"""``/metrics``: vLLM's series names on ``prometheus_client``, moving as requests are served.

A scripted backend streams its answer word by word (so there is a first token and gaps
between tokens to time) and runs strategies over a :class:`FakeChatModel`; every scrape is
parsed with ``prometheus_client``'s own parser.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from assist.server import create_app
from assist.testing import FakeChatModel, running_server

WORDS = ["The", " answer", " is", " 4", "."]
USER = [{"role": "user", "content": "What is 2+2?"}]


class _Words:
    """Streams WORDS one chunk each (10 ms apart), with usage only when asked; answers
    whole and runs strategies through ``model``. A message ``hold`` waits for ``release``."""

    context_length = 512

    def __init__(self) -> None:
        self.model = FakeChatModel(replies=["The answer is 4. #### 4"])
        self.release = threading.Event()
        self.queued = 0.0

    async def _hold(self, req: Any) -> None:
        if any(getattr(m, "content", None) == "hold" for m in getattr(req, "messages", [])):
            while not self.release.is_set():
                await asyncio.sleep(0.005)

    async def chat(self, req: Any) -> dict[str, Any]:
        await self._hold(req)
        return (await self.model.chat([m.to_dict() for m in req.messages], n=req.n)).to_openai()

    async def _stream(self, req: Any, chat: bool) -> Any:
        base = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0,
                "model": "m"}
        extra = {"usage": None} if req.include_usage else {}

        def chunk(text: str | None, finish: str | None = None) -> dict[str, Any]:
            if chat:
                delta = {} if text is None else {"role": "assistant", "content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {**base, "choices": [choice], **extra}

        await self._hold(req)
        if chat:
            yield chunk("")  # the role, before any token
        for word in WORDS:
            await asyncio.sleep(0.01)
            yield chunk(word)
        yield chunk(None, "length")
        if req.include_usage:
            yield {**base, "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": len(WORDS),
                                                    "total_tokens": 7 + len(WORDS)}}

    def stream_chat(self, req: Any) -> Any:
        return self._stream(req, chat=True)

    async def complete(self, req: Any) -> dict[str, Any]:
        return {"id": "c", "object": "text_completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "text": "".join(WORDS), "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 3, "completion_tokens": len(WORDS), "total_tokens": 3 + len(WORDS)}}

    def stream_complete(self, req: Any) -> Any:
        return self._stream(req, chat=False)

    async def tokenize(self, req: Any) -> dict[str, Any]:
        return {"tokens": [1, 2], "count": 2, "max_model_len": 512}

    def gauges(self) -> dict[str, float]:
        return {"queue_depth": self.queued, "running_sequences": 0.0}

    async def aclose(self) -> None:
        pass


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics`` by (name, labels), through prometheus_client's parser;
    no family may appear twice (Prometheus refuses a scrape that repeats one)."""
    response = httpx.get(url + "/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(response.text))
    repeated = [n for n, k in collections.Counter(f.name for f in families).items() if k > 1]
    assert not repeated, repeated
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


M = (("model_name", "assistant"),)
TTFT = ("vllm:time_to_first_token_seconds_count", M)
ITL = ("vllm:inter_token_latency_seconds_count", M)
E2E = ("vllm:e2e_request_latency_seconds_count", M)
RUNNING = ("vllm:num_requests_running", M)
WAITING = ("vllm:num_requests_waiting", M)
PROMPT = ("vllm:prompt_tokens_total", M)
GENERATION = ("vllm:generation_tokens_total", M)


def success(reason: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return "vllm:request_success_total", (("finished_reason", reason), *M)


def strategy(name: str, calls: bool = False) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("assist_model_calls_total" if calls else "assist_strategy_requests_total"), (("strategy", name),)


def moved(before: dict[Any, float], after: dict[Any, float]) -> dict[Any, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()
            if v != before.get(k, 0.0) and not k[0].endswith("_created")}


def _events(response: httpx.Response) -> list[dict[str, Any]]:
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.fixture()
def served() -> Any:
    backend = _Words()
    with running_server(create_app(backend, names=["assistant"])) as url:
        yield url, backend


def test_a_plain_answer_moves_latency_tokens_finish_and_the_none_strategy(served):
    url, _ = served
    before = scrape(url)
    r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "n": 2}, timeout=30)
    assert r.status_code == 200
    d = moved(before, scrape(url))
    usage = r.json()["usage"]
    assert d[E2E] == 1 and d[success("stop")] == 2  # one request, two choices finished
    assert d[PROMPT] == usage["prompt_tokens"] and d[GENERATION] == usage["completion_tokens"]
    assert d[strategy("none")] == 1 and d[strategy("none", calls=True)] == 2
    assert TTFT not in d and ITL not in d  # a whole answer has no first token to time
    assert d[("assist_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))] == 1
    assert d[("assist_tokens_total", (("kind", "completion"),))] == usage["completion_tokens"]


def test_a_stream_times_its_first_token_and_the_gaps_and_counts_usage_it_hides(served):
    url, _ = served
    before = scrape(url)
    r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "stream": True}, timeout=30)
    events = _events(r)
    # the client did not ask for usage: the server counted it but sent none
    assert all("usage" not in e for e in events) and all(e["choices"] for e in events)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == "".join(WORDS)
    d = moved(before, scrape(url))
    assert d[TTFT] == 1 and d[ITL] == len(WORDS) - 1 and d[E2E] == 1
    assert d[("vllm:inter_token_latency_seconds_sum", M)] >= 0.005 * (len(WORDS) - 1)
    assert d[PROMPT] == 7 and d[GENERATION] == len(WORDS)
    assert d[success("length")] == 1 and d[strategy("none")] == 1 and d[strategy("none", calls=True)] == 1

    before = scrape(url)  # a completion stream that asked for usage still gets it
    body = {"prompt": "2+2=", "stream": True, "stream_options": {"include_usage": True}}
    events = _events(httpx.post(url + "/v1/completions", json=body, timeout=30))
    assert events[-1]["usage"]["completion_tokens"] == len(WORDS)
    d = moved(before, scrape(url))
    assert d[TTFT] == 1 and d[ITL] == len(WORDS) - 1 and d[GENERATION] == len(WORDS)


def test_strategies_count_requests_and_model_calls_by_name(served):
    url, _ = served
    before = scrape(url)
    r = httpx.post(url + "/v1/chat/completions", json={"model": "sc@3::assistant", "messages": USER}, timeout=30)
    assert r.status_code == 200
    d = moved(before, scrape(url))
    assert d[strategy("sc")] == 1 and d[strategy("sc", calls=True)] == r.json()["usage"]["calls"] >= 1
    assert d[E2E] == 1 and d[success("stop")] == 1 and TTFT not in d
    assert d[GENERATION] == r.json()["usage"]["completion_tokens"]

    before = scrape(url)  # streamed, the spec in the body, nested: labelled by its outer name only
    body = {"model": "assistant", "strategy": "sc@2(cot)", "messages": USER, "stream": True}
    events = _events(httpx.post(url + "/v1/chat/completions", json=body, timeout=30))
    assert all("usage" not in e for e in events)
    after = scrape(url)
    d = moved(before, after)
    assert d[strategy("sc")] == 1 and d[strategy("sc", calls=True)] == 2 and d[TTFT] == 1 and d[E2E] == 1
    assert d[GENERATION] > 0
    assert not [k for k in after if ("strategy", "sc@2(cot)") in k[1] or ("strategy", "cot") in k[1]]


def test_running_waiting_and_aborted_requests(served):
    url, backend = served
    backend.queued = 3.0
    hold = {"messages": [{"role": "user", "content": "hold"}]}

    async def go() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            task = asyncio.create_task(c.post("/v1/chat/completions", json=hold))
            streamed = asyncio.create_task(c.post("/v1/chat/completions", json={**hold, "stream": True}))
            for _ in range(1000):
                if scrape(url)[RUNNING] == 2:
                    break
                await asyncio.sleep(0.01)
            now = scrape(url)
            assert now[RUNNING] == 2 and now[WAITING] == 3 and now[("assist_requests_in_flight", ())] == 2
            backend.release.set()
            assert (await task).status_code == 200 and (await streamed).status_code == 200

    asyncio.run(go())
    backend.queued = 0.0
    after = scrape(url)
    assert after[RUNNING] == 0 and after[WAITING] == 0

    backend.release.clear()  # a client that leaves is counted as an abort
    before = scrape(url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=hold, timeout=httpx.Timeout(5, read=0.3))
    for _ in range(500):
        if scrape(url)[RUNNING] == 0:
            break
        threading.Event().wait(0.01)
    d = moved(before, scrape(url))
    assert d[success("abort")] == 1 and d[("assist_requests_cancelled_total", ())] == 1 and E2E not in d


def test_each_app_has_its_own_registry():
    one, two = _Words(), _Words()
    with running_server(create_app(one)) as a, running_server(create_app(two)) as b:
        httpx.post(a + "/v1/chat/completions", json={"messages": USER}, timeout=30)
        assert scrape(a)[E2E] == 1 and scrape(b)[E2E] == 0


def _vllm_like() -> str:
    """A scrape shaped like vLLM's own: its series (the names this server uses too) and the
    process series prometheus_client adds."""
    registry = CollectorRegistry()
    labels = ["model_name", "engine"]
    Gauge("vllm:num_requests_running", "Running.", labels, registry=registry).labels("m", "0").set(1)
    Counter("vllm:prompt_tokens", "Prompt tokens.", labels, registry=registry).labels("m", "0").inc(5)
    Histogram("vllm:time_to_first_token_seconds", "TTFT.", labels, registry=registry).labels("m", "0").observe(0.2)
    ProcessCollector(registry=registry)
    return generate_latest(registry).decode()


class _Child:
    def __init__(self, root_url: str) -> None:
        self.root_url = root_url


def test_an_engine_childs_metrics_follow_ours_prefixed():
    child = FastAPI()

    @child.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_vllm_like())

    backend = _Words()
    with running_server(child) as child_url:
        backend.owned = _Child(child_url)  # type: ignore[attr-defined]  # as UpstreamBackend owns a VLLMServer
        with running_server(create_app(backend)) as url:
            httpx.post(url + "/v1/chat/completions", json={"messages": USER}, timeout=30)
            samples = scrape(url)
    engine = (("engine", "0"), ("model_name", "m"))
    assert samples[("engine_vllm:num_requests_running", engine)] == 1
    assert samples[("engine_vllm:prompt_tokens_total", engine)] == 5
    assert samples[("engine_vllm:time_to_first_token_seconds_count", engine)] == 1
    assert samples[RUNNING] == 0 and samples[E2E] == 1  # ours, beside the child's
    assert samples[("assist_engine_metrics_up", ())] == 1

    backend.owned = _Child(child_url)  # the child is gone now: ours still parse, and say so
    with running_server(create_app(backend)) as url:
        samples = scrape(url)
    assert samples[("assist_engine_metrics_up", ())] == 0 and RUNNING in samples
    assert not [k for k in samples if k[0].startswith("engine_")]
