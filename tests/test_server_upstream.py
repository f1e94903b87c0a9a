"""Proxy mode (`assist serve --upstream`): errors from a down or slow upstream, replicas.

The upstreams are small real HTTP servers (FastAPI on free ports): one that answers, one
that hangs, and a port where nothing listens.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import openai
import pytest
from fastapi import FastAPI, Request

from assist._remote import RemoteChatModel
from assist.server import UpstreamBackend, create_app
from assist.testing import running_server

MESSAGES = [{"role": "user", "content": "hi"}]


def _upstream(name: str, hang: threading.Event | None = None) -> FastAPI:
    app = FastAPI()
    app.state.seen = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        body = await request.json()
        app.state.seen.append(body)
        while hang is not None and not hang.is_set():
            await asyncio.sleep(0.01)
        n = body.get("n", 1)
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": i, "message": {"role": "assistant", "content": f"from {name}"},
                             "finish_reason": "stop"} for i in range(n)],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2 * n, "total_tokens": 3 + 2 * n}}

    return app


def _dead_url() -> str:
    with socket.socket() as s:  # bound and closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)


def test_proxy_forwards_and_renames_the_model():
    up = _upstream("a")
    with running_server(up) as a:
        backend = UpstreamBackend(RemoteChatModel(a + "/v1", "upstream-model"))
        with running_server(create_app(backend)) as url:
            resp = _client(url).chat.completions.create(model="assistant", messages=MESSAGES, n=2,
                                                        extra_body={"top_k": 5, "kv_transfer_params": {
                                                            "prompt_token_ids": [1, 2, 3]}})
    assert [c.message.content for c in resp.choices] == ["from a", "from a"]
    assert resp.model == "assistant" and up.state.seen[0]["model"] == "upstream-model"
    assert up.state.seen[0]["top_k"] == 5 and "strategy" not in up.state.seen[0]
    assert "kv_transfer_params" not in up.state.seen[0]  # vLLM would take client ids as the prompt


def test_upstream_down_is_502_in_openai_shape():
    backend = UpstreamBackend(RemoteChatModel(_dead_url(), "m", max_retries=1, backoff=0.01))
    with running_server(create_app(backend)) as url:
        with pytest.raises(openai.APIStatusError) as e:
            _client(url).chat.completions.create(model="assistant", messages=MESSAGES)
    assert e.value.status_code == 502 and e.value.body["type"] == "upstream_error"


def test_upstream_timeout_is_504():
    hang = threading.Event()
    with running_server(_upstream("slow", hang)) as slow:
        backend = UpstreamBackend(RemoteChatModel(slow + "/v1", "m", timeout=0.5, max_retries=0))
        try:
            with running_server(create_app(backend)) as url:
                with pytest.raises(openai.APIStatusError) as e:
                    _client(url).chat.completions.create(model="assistant", messages=MESSAGES)
        finally:
            hang.set()
    assert e.value.status_code == 504 and e.value.body["type"] == "upstream_timeout"


def test_replicas_spread_load_and_survive_a_dead_one():
    a_app, b_app = _upstream("a"), _upstream("b")
    with running_server(a_app) as a, running_server(b_app) as b:
        remote = RemoteChatModel([a + "/v1", _dead_url(), b + "/v1"], "m", max_retries=1, backoff=0.01)
        with running_server(create_app(UpstreamBackend(remote))) as url:

            async def burst() -> list[str]:
                client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
                out = await asyncio.gather(*(client.chat.completions.create(model="assistant", messages=MESSAGES)
                                             for _ in range(24)))
                await client.close()
                return [r.choices[0].message.content for r in out]

            answers = asyncio.run(burst())
    assert len(answers) == 24  # none lost to the dead replica
    assert answers.count("from a") > 0 and answers.count("from b") > 0
    assert len(a_app.state.seen) + len(b_app.state.seen) == 24
