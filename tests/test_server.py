"""The OpenAI-compatible endpoint, driven by the official ``openai`` client over real HTTP.

One torch engine over the trained ``test`` checkpoint serves the whole module; error and
overload cases that need a request to hang use a small blocking backend instead, so they
never depend on timing.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from typing import Any

import httpx
import openai
import pytest

import strategies
from assist.engine import TorchEngine
from assist.server import EngineBackend, create_app
from assist.testing import running_server
from strategies._base import with_fields

CALC = {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
                                        "parameters": {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 12}},
                                                       "required": ["expression"]}}}
QUESTION = "Mia has 5 apples and buys 3 more. How many apples does Mia have?"


@pytest.fixture(scope="module")
def engine(trained_run) -> TorchEngine:
    run, _ = trained_run
    eng = TorchEngine(run / "rlhf", max_batch=64, name="assistant")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def base_url(engine) -> str:
    app = create_app(EngineBackend(engine), owns_backend=False, names=["assistant"], strategy_aliases=["cot", "sc@4"])
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def _user(text: str = QUESTION) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# -- chat ---------------------------------------------------------------------------------------
def test_chat_n3_counts_usage(client, engine):
    resp = client.chat.completions.create(model="assistant", messages=_user(), n=3, temperature=1.0,
                                          seed=7, max_tokens=24, logprobs=True)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert resp.usage.prompt_tokens == len(engine.encode(_user()))  # prefilled once for all three
    # one logprob per generated token: usage counts exactly what the three choices generated
    assert resp.usage.completion_tokens == sum(len(c.logprobs.content) for c in resp.choices)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    again = client.chat.completions.create(model="assistant", messages=_user(), n=3, temperature=1.0,
                                           seed=7, max_tokens=24, logprobs=True)
    assert [c.message.content for c in again.choices] == [c.message.content for c in resp.choices]


def test_async_client_and_multi_turn(base_url):
    async def go() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
        turns = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "Hello."}, {"role": "user", "content": QUESTION}]
        results = await asyncio.gather(*(aclient.chat.completions.create(
            model="assistant", messages=turns, temperature=0, max_tokens=30) for _ in range(4)))
        await aclient.close()
        return [r.choices[0].message.content for r in results]

    texts = asyncio.run(go())
    assert len(set(texts)) == 1 and texts[0]  # greedy: the same answer four times


def test_stream_with_usage_equals_non_streamed_text(client):
    full = client.chat.completions.create(model="assistant", messages=_user(), temperature=0, max_tokens=40)
    chunks = list(client.chat.completions.create(model="assistant", messages=_user(), temperature=0,
                                                 max_tokens=40, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_forced_tool_call_returns_tool_calls(client):
    resp = client.chat.completions.create(
        model="assistant", messages=_user("What is 12+30?"), tools=[CALC], temperature=0, max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "calculator"}})
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "calculator"
    assert isinstance(json.loads(call.function.arguments)["expression"], str)


def test_json_schema_output_parses(client):
    # bounded, so even an untrained model must close the object within max_tokens
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["answer"],
              "additionalProperties": False}
    resp = client.chat.completions.create(
        model="assistant", messages=_user(), temperature=0, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}})
    value = json.loads(resp.choices[0].message.content)
    assert set(value) == {"answer"} and isinstance(value["answer"], int)


def test_completions_echo_logprobs(client, engine):
    prompt = "Mia has 5 apples."
    resp = client.completions.create(model="assistant", prompt=prompt, echo=True, logprobs=2, max_tokens=0,
                                     temperature=0)
    choice = resp.choices[0]
    assert choice.text == prompt
    n_prompt = len(engine.tokenize(prompt))
    assert len(choice.logprobs.tokens) == n_prompt == resp.usage.prompt_tokens
    assert choice.logprobs.token_logprobs[0] is None
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
    batch = client.completions.create(model="assistant", prompt=["a", "b"], max_tokens=3, temperature=0, n=2)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]


def test_unknown_fields_are_ignored(base_url):
    body = {"model": "assistant", "messages": _user(), "max_tokens": 4, "temperature": 0,
            "until": ["\n\n"], "do_sample": False, "some_harness_leftover": {"x": 1}}
    resp = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text


# -- strategies ---------------------------------------------------------------------------------
def test_strategy_in_model_name_counts_every_call(client, engine):
    spec = "sc@3:seed=5"
    resp = client.chat.completions.create(model=f"{spec}::assistant", messages=_user(), max_tokens=30)
    # the request's max_tokens caps every call the strategy makes
    local = with_fields(strategies.parse(spec), lambda node: {"max_tokens": 30}).run_sync(engine, _user())
    assert resp.choices[0].message.content == local.text
    assert resp.usage.prompt_tokens == local.usage.prompt_tokens
    assert resp.usage.completion_tokens == local.usage.completion_tokens
    assert resp.usage.model_extra["calls"] == local.usage.calls == 1  # sc@3 is one n=3 call
    via_field = client.chat.completions.create(model="assistant", messages=_user(), max_tokens=30,
                                               extra_body={"strategy": spec})
    assert via_field.choices[0].message.content == local.text


def test_models_health_tokenize_metrics(client, base_url, engine):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["assistant", "cot::assistant", "sc@4::assistant"]
    assert httpx.get(base_url + "/health").json()["status"] == "ok"
    tok = httpx.post(base_url + "/tokenize", json={"prompt": "Mia has 5"}).json()
    assert tok["tokens"] == engine.tokenize("Mia has 5") and tok["count"] == len(tok["tokens"])
    metrics = httpx.get(base_url + "/metrics").text
    assert 'assist_requests_total{route="/v1/chat/completions",status="200"}' in metrics
    assert "assist_request_latency_seconds_bucket" in metrics and "assist_queue_depth" in metrics


# -- errors -------------------------------------------------------------------------------------
def _error(exc_info) -> dict[str, Any]:
    return exc_info.value.body if isinstance(exc_info.value.body, dict) else {}


def test_validation_error_names_the_param(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="assistant", messages=_user(), temperature=5)
    assert e.value.status_code == 400 and _error(e)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="assistant", messages=[])
    assert _error(e)["param"] == "messages"


def test_unknown_model_and_strategy_are_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=_user())
    assert _error(e)["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope@3::assistant", messages=_user())
    assert "nope" in _error(e)["message"]


def test_context_length_exceeded(client, engine):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="assistant", messages=_user(), max_tokens=engine.context_length)
    assert _error(e)["code"] == "context_length_exceeded"


def test_oversized_body_is_413(engine):
    app = create_app(EngineBackend(engine), owns_backend=False, max_body_bytes=1000)
    with running_server(app) as url:
        big = {"model": "assistant", "messages": _user("x " * 2000)}
        resp = httpx.post(url + "/v1/chat/completions", json=big)
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"

        def chunked():
            yield json.dumps(big).encode()

        resp = httpx.post(url + "/v1/chat/completions", content=chunked())  # no Content-Length
        assert resp.status_code == 413


def test_api_key_on_every_v1_route(engine):
    app = create_app(EngineBackend(engine), owns_backend=False, api_key="sekrit")
    with running_server(app) as url:
        for key in (None, "wrong"):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                 ("POST", "/v1/completions")):
                resp = httpx.request(method, url + path, headers=headers, json={})
                assert resp.status_code == 401, (path, resp.text)
                assert resp.json()["error"]["type"] == "authentication_error"
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0)
        assert good.chat.completions.create(model="assistant", messages=_user(), max_tokens=2).choices
        assert httpx.get(url + "/health").status_code == 200


class _Blocking:
    """A backend whose chats wait for ``release``; it records cancellations."""

    context_length = 100

    def __init__(self) -> None:
        self.release = threading.Event()  # set from the test's thread, read in the server's loop
        self.started = 0
        self.cancelled = 0
        self.model = None

    async def chat(self, req: Any) -> dict[str, Any]:
        self.started += 1
        try:
            while not self.release.is_set():
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "done"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    def gauges(self) -> dict[str, float]:
        return {}

    async def aclose(self) -> None:
        pass


def _wait_for(predicate, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_overload_is_429_with_retry_after_and_accepted_requests_finish():
    backend = _Blocking()
    app = create_app(backend, max_in_flight=2)
    body = {"model": "assistant", "messages": _user()}

    async def go(url: str) -> tuple[list[int], httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            accepted = [asyncio.create_task(c.post("/v1/chat/completions", json=body)) for _ in range(2)]
            while backend.started < 2:
                await asyncio.sleep(0.01)
            rejected = await c.post("/v1/chat/completions", json=body)
            backend.release.set()
            return [(await t).status_code for t in accepted], rejected

    with running_server(app) as url:
        statuses, rejected = asyncio.run(go(url))
    assert statuses == [200, 200]
    assert rejected.status_code == 429 and int(rejected.headers["Retry-After"]) >= 1
    assert rejected.json()["error"]["type"] == "rate_limit_error"


def test_client_disconnect_cancels_generation():
    backend = _Blocking()
    app = create_app(backend)
    with running_server(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json={"messages": _user()}, timeout=httpx.Timeout(5, read=0.3))
        _wait_for(lambda: backend.cancelled == 1)
        metrics = httpx.get(url + "/metrics").text
    assert "assist_requests_cancelled_total 1" in metrics and "assist_requests_in_flight 0" in metrics


# -- load ---------------------------------------------------------------------------------------
def test_64_concurrent_requests_all_answered_correctly(base_url, engine):
    questions = [f"Tom has {i % 9 + 1} pens and buys {i % 7 + 2} more. How many pens does Tom have?"
                 for i in range(64)]
    expected = {q: asyncio.run(engine.chat(_user(q), temperature=0, max_tokens=48)).text for q in set(questions)}

    async def go() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        results = await asyncio.gather(*(aclient.chat.completions.create(
            model="assistant", messages=_user(q), temperature=0, max_tokens=48) for q in questions))
        await aclient.close()
        return [r.choices[0].message.content for r in results]

    answers = asyncio.run(go())
    assert answers == [expected[q] for q in questions]


def test_stream_disconnect_cancels_generation(base_url, engine):
    body = {"model": "assistant", "messages": _user(), "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}

    def cancelled() -> int:
        text = httpx.get(base_url + "/metrics").text
        return int(float(re.search(r"^assist_requests_cancelled_total (\S+)$", text, re.M).group(1)))

    cancelled_before = cancelled()
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        next(resp.iter_lines())  # the first event arrives, then the client hangs up
    _wait_for(lambda: engine.scheduler.running == 0)
    _wait_for(lambda: cancelled() == cancelled_before + 1)
