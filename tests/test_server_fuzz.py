"""Fuzzing the endpoint with hypothesis: whatever the body, never a 5xx, and every error
comes in OpenAI's nested shape."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from assist.engine import TorchEngine
from assist.server import EngineBackend, create_app
from assist.testing import running_server

pytestmark = pytest.mark.slow

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 5), st.integers(-(2**40), 2**40),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                        max_leaves=6)
roles = st.sampled_from(["system", "user", "assistant", "tool", "developer", "robot", ""])
message = st.fixed_dictionaries({"role": roles}, optional={
    "content": st.one_of(st.text(max_size=40), st.none(), st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=10)}), max_size=2)),
    "name": st.one_of(st.text(max_size=5), st.integers()),
    "tool_calls": anything,
})
small = st.one_of(st.integers(-2, 6), st.integers(7, 600), anything)
tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["calculator", "", "x" * 70])},
    optional={"parameters": st.one_of(st.just({"type": "object", "properties": {"a": {"type": "integer"}}}),
                                      anything)})})
chat_body = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.sampled_from(["assistant", "cot::assistant", "sc@2::assistant", "zz::assistant",
                                        "nope", "sc@0::assistant", "::"]), anything),
    "messages": st.one_of(st.lists(message, max_size=3), anything),
    "n": st.one_of(st.integers(-1, 3), st.integers(60, 200), anything),
    "temperature": st.one_of(st.floats(-1, 3), anything),
    "top_p": st.one_of(st.floats(-0.5, 1.5), anything),
    "top_k": small,
    "max_tokens": small,
    "max_completion_tokens": small,
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=20), anything),
    "seed": st.one_of(st.integers(), anything),
    "logprobs": anything,
    "top_logprobs": small,
    "stream": st.booleans(),
    "stream_options": anything,
    "tools": st.one_of(st.lists(tool, max_size=2), anything),
    "tool_choice": st.one_of(st.sampled_from(["none", "auto", "required", "bogus"]), anything,
                             st.just({"type": "function", "function": {"name": "calculator"}})),
    "response_format": st.one_of(st.sampled_from([{"type": "json_object"}, {"type": "text"}, {"type": "xml"},
                                                  {"type": "json_schema", "json_schema": {"schema": {
                                                      "type": "object", "properties": {"a": {"type": "integer"}},
                                                      "required": ["a"]}}},
                                                  {"type": "json_schema", "json_schema": {"schema": {
                                                      "type": "nonsense"}}}]), anything),
    "strategy": st.one_of(st.sampled_from(["cot", "sc@2", "bad(", ""]), anything),
    "leftover": anything,
})
completion_body = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.just("assistant"), anything),
    "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 5000), max_size=6),
                        st.lists(st.text(max_size=5), max_size=3), anything),
    "echo": anything, "logprobs": small, "max_tokens": small, "n": st.one_of(st.integers(-1, 3), anything),
    "temperature": st.one_of(st.floats(-1, 3), anything), "stream": st.booleans(), "stop": anything,
})


@pytest.fixture(scope="module")
def url(trained_run) -> str:
    run, _ = trained_run
    engine = TorchEngine(run / "rlhf", max_batch=64, name="assistant")
    with running_server(create_app(EngineBackend(engine))) as base:  # the app closes the engine
        yield base


def _check(resp: httpx.Response) -> None:
    assert resp.status_code < 500, resp.text[:500]
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert isinstance(err["message"], str) and err["message"]
        assert set(err) == {"message", "type", "param", "code"}
    elif resp.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        for e in events[:-1]:
            assert "error" not in json.loads(e) or json.loads(e)["error"]["message"]


def _post(url: str, path: str, body: Any) -> httpx.Response:
    try:
        content = json.dumps(body, allow_nan=True)
    except (TypeError, ValueError):
        content = "{not json"
    return httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=120)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(body=chat_body)
def test_chat_bodies_never_5xx(url, body):
    _check(_post(url, "/v1/chat/completions", body))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(body=completion_body)
def test_completion_bodies_never_5xx(url, body):
    _check(_post(url, "/v1/completions", body))


def test_raw_garbage_never_5xx(url):
    for content in (b"", b"null", b"[]", b"\xff\xfe", b'{"messages": "hi"}', b"1e999"):
        resp = httpx.post(url + "/v1/chat/completions", content=content, headers={"content-type": "application/json"})
        _check(resp)
        assert resp.status_code == 400
