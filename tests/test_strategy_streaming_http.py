"""Streamed strategies on the trained ``test`` checkpoint: from Python and over real HTTP.

Greedy decoding makes ``run`` and ``stream`` comparable call for call: the streamed text,
usage and trace must be ``run``'s. Over HTTP the official ``openai`` client reads the
streamed answer (and ignores our ``stream_progress`` chunks), and a client that hangs up
mid-answer leaves no request running in the engine.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import assist
import strategies
from assist.engine import TorchEngine
from assist.server import EngineBackend, create_app
from assist.testing import running_server
from strategies import Delta, Done, Progress, Retrieve

REPO = Path(__file__).resolve().parents[1]
QUESTION = "Mia has 5 apples and buys 3 more. How many apples does Mia have?"
PASSAGES = [("kb-1", "The kingdom of Oster has 12 towers.", 1.0), ("kb-2", "Pears are green.", 0.5)]


@pytest.fixture(scope="module")
def checkpoint(request: pytest.FixtureRequest) -> Path:
    """The repository's ``runs/test`` assistant when it is there, else the session's own."""
    local = REPO / "runs" / "test" / "rlhf"
    if (local / "config.json").is_file():
        return local
    run, _ = request.getfixturevalue("trained_run")
    return Path(run) / "rlhf"


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> TorchEngine:
    eng = TorchEngine(checkpoint, max_batch=32, name="assistant")
    yield eng
    eng.close()


def _strategy(spec: str) -> Any:
    if spec == "rag":
        return Retrieve(search=lambda q, k: PASSAGES[:k], max_tokens=48)
    return strategies.parse(spec)


SPECS = ["plain:max_tokens=48", "cot:max_tokens=64", "reflect:max_tokens=64", "reflect@2:max_tokens=48",
         "tools:max_tokens=48", "tools:max_turns=1,max_tokens=48", "rag", "sc@4:seed=3,max_tokens=48"]


@pytest.mark.parametrize("spec", SPECS)
def test_streamed_answer_is_what_run_answers_on_the_real_model(engine, spec):
    async def go() -> tuple[Any, list[Any]]:
        ran = await _strategy(spec).run(engine, QUESTION)
        events = [e async for e in _strategy(spec).stream(engine, QUESTION, progress=True)]
        return ran, events

    ran, events = asyncio.run(go())
    done = events[-1]
    assert isinstance(done, Done)
    assert "".join(e.text for e in events if isinstance(e, Delta)) == ran.text == done.result.text
    assert done.result.answer == ran.answer
    assert (done.result.usage.total_tokens, done.result.calls) == (ran.usage.total_tokens, ran.calls)
    assert _comparable(done.result.trace) == _comparable(ran.trace)
    if spec.startswith("sc"):
        assert [e.data["samples"] for e in events if isinstance(e, Progress)] == [1, 2, 3, 4]


def _comparable(trace: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A trace without what differs from run to run: wall times, and the prompt tokens a
    prefix cache happened to hold (the second run of a prompt finds the first's)."""
    out = []
    for entry in trace:
        entry = {k: v for k, v in entry.items() if k != "seconds"}
        if isinstance(entry.get("usage"), dict):
            entry["usage"] = {k: v for k, v in entry["usage"].items() if k != "prompt_tokens_details"}
        out.append(entry)
    return out


class _Endless:
    """The served engine, its calls never stopping at end of text: a stream is sure to be
    mid-answer when its client leaves."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    async def chat(self, messages: Any, **kw: Any) -> Any:
        return await self.model.chat(messages, ignore_eos=True, **kw)

    async def stream_chat(self, messages: Any, **kw: Any) -> AsyncIterator[dict[str, Any]]:
        return await self.model.stream_chat(messages, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def served(engine) -> tuple[str, EngineBackend]:
    backend = EngineBackend(engine)
    app = create_app(backend, owns_backend=False, names=["assistant"])
    with running_server(app) as url:
        yield url, backend


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("spec", ["cot", "reflect", "tools", "sc@4:seed=2"])
def test_openai_client_reads_the_streamed_answer(client, spec):
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model=f"{spec}::assistant", messages=messages, max_tokens=48, seed=9)
    stream = client.chat.completions.create(model=f"{spec}::assistant", messages=messages, max_tokens=48, seed=9,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"stream_progress": True})
    text, progress, usage, finish = "", [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        extra = chunk.model_extra or {}
        if "progress" in extra:
            assert chunk.choices == []
            progress.append(extra["progress"])
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
    assert usage.total_tokens == whole.usage.total_tokens
    assert bool(progress) == spec.startswith("sc")
    if progress:
        assert [p["samples"] for p in progress] == [1, 2, 3, 4] and progress[-1]["of"] == 4


def test_choices_stream_side_by_side(client):
    messages = [{"role": "user", "content": QUESTION}]
    kw = {"model": "reflect::assistant", "messages": messages, "max_tokens": 48, "n": 2, "seed": 4}
    whole = client.chat.completions.create(**kw)
    texts = {0: "", 1: ""}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]


# cot and plain sample (seeded): a greedy answer of the `test` model can be one word, which
# arrives in one piece however it is streamed.
@pytest.mark.parametrize("spec", ["cot:temperature=1,seed=1,max_tokens=48",
                                  "plain:temperature=1,seed=1,max_tokens=48", "tools:max_tokens=48",
                                  "reflect:max_tokens=48", "sc@2:seed=3,max_tokens=48"])
def test_strategies_over_a_remote_model_stream_its_answer(served, spec):
    """A strategy over ``assist.connect`` streams its final stage through the remote
    ``stream_chat``: the same text as the whole answer, arriving in pieces."""
    async def go() -> tuple[Any, list[Any]]:
        async with assist.connect(served[0], "assistant") as remote:
            ran = await strategies.parse(spec).run(remote, QUESTION)
            events = [e async for e in strategies.parse(spec).stream(remote, QUESTION)]
        return ran, events

    ran, events = asyncio.run(go())
    deltas = [e.text for e in events if isinstance(e, Delta)]
    assert "".join(deltas) == ran.text == events[-1].result.text and ran.text
    assert events[-1].result.usage.total_tokens == ran.usage.total_tokens
    # What a strategy holds back (a vote's winner, a checked attempt, a turn that might
    # call a tool) it sends whole; the others stream as the remote server writes them.
    if spec.startswith(("cot", "plain")):
        assert ran.usage.completion_tokens > 2 and len(deltas) > 1


def test_stream_progress_must_be_a_boolean(served):
    body = {"model": "sc@2::assistant", "messages": [{"role": "user", "content": QUESTION}], "stream": True,
            "stream_progress": "yes"}
    resp = httpx.post(served[0] + "/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "stream_progress"


def _cancelled(url: str) -> int:
    text = httpx.get(url + "/metrics").text
    return int(float(re.search(r"^assist_requests_cancelled_total (\S+)$", text, re.M).group(1)))


def _wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.mark.parametrize("spec", ["cot", "tools:max_turns=0"])
def test_a_client_that_leaves_mid_stream_leaves_nothing_running(served, engine, spec):
    url, backend = served
    served_model = backend.model
    backend.model = _Endless(served_model)
    try:
        before = _cancelled(url)
        body = {"model": f"{spec}::assistant", "messages": [{"role": "user", "content": QUESTION}],
                "max_tokens": 400, "stream": True, "stream_progress": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            first = next(line for line in resp.iter_lines() if line.startswith("data:"))
            assert "[DONE]" not in first  # hang up on the first event, mid-answer
        _wait_for(lambda: engine.scheduler.running == 0 and engine.scheduler.queue_depth == 0)
        _wait_for(lambda: _cancelled(url) == before + 1)
    finally:
        backend.model = served_model


def test_a_client_that_leaves_before_the_vote_leaves_nothing_running(served, engine):
    url, backend = served
    served_model = backend.model
    backend.model = _Endless(served_model)
    body = {"model": "sc@4::assistant", "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 400, "stream": True}

    async def leave_while_sampling() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            request = asyncio.ensure_future(c.post(url + "/v1/chat/completions", json=body))
            while engine.scheduler.running == 0:  # the samples are being drawn: nothing sent yet
                assert not request.done()
                await asyncio.sleep(0.005)
            request.cancel()  # hang up
            with pytest.raises(asyncio.CancelledError):
                await request

    try:
        before = _cancelled(url)
        asyncio.run(leave_while_sampling())
        _wait_for(lambda: engine.scheduler.running == 0 and engine.scheduler.queue_depth == 0)
        _wait_for(lambda: _cancelled(url) == before + 1)
    finally:
        backend.model = served_model
