"""The endpoint's edge: every bad value fails only its own request (a 400 in OpenAI's shape
that names the parameter), nothing a client sends stalls the event loop, and the key and
``Host`` checks guard every route but ``/health``.

"The event loop stays free" is measured, not assumed: a second client polls ``/health``
while the attack runs, and every answer must come within :data:`DEADLINE`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from assist.engine import TorchEngine
from assist.server import EngineBackend, ServeConfig, create_app
from assist.testing import running_server
from tests.conftest import run_assist

DEADLINE = 0.5  # seconds: the slowest /health answer allowed while an attack runs
BIG = "seven " * 650_000  # 3.9 MB of text, under the 4 MiB body limit


@pytest.fixture(scope="module")
def engine(trained_run) -> Iterator[TorchEngine]:
    run, _ = trained_run
    eng = TorchEngine(run / "rlhf", max_batch=64, name="assistant")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def url(engine) -> Iterator[str]:
    with running_server(create_app(EngineBackend(engine), owns_backend=False)) as base:
        yield base


def _user(text: str = "Mia has 5 apples and buys 3 more. How many?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "assistant", "messages": _user(), "max_tokens": 8, "temperature": 0, **fields}


def _error(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


class _Health:
    """Polls ``/health`` from its own thread and client; ``worst`` is the slowest answer (a
    timed-out or failed poll counts as infinitely slow)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self.polling = threading.Event()  # set once a first poll has come back
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    ok = client.get(self.url + "/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append(time.perf_counter() - t0 if ok else float("inf"))
                self.polling.set()
                self._stop.wait(0.02)

    @property
    def worst(self) -> float:
        return max(self.latencies, default=float("inf"))


@contextmanager
def health_watch(url: str) -> Iterator[_Health]:
    watch = _Health(url)
    watch._thread.start()
    # Watch from before the request: on a loaded machine a quick 400 could otherwise come
    # back before the poller's first answer, leaving nothing measured (read as a stall).
    assert watch.polling.wait(30), "/health never answered"
    try:
        yield watch
    finally:
        watch._stop.set()
        watch._thread.join(30)


# -- one client's input fails only its own request ---------------------------------------------
def test_huge_seed_fails_only_its_own_request(url):
    """seed 2**64 batched with 40 normal requests used to fail 17 of *them* with 500."""
    async def go() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            normal = [c.post("/v1/chat/completions", json=_chat(seed=i, temperature=1.0)) for i in range(40)]
            bad = [c.post("/v1/chat/completions", json=_chat(seed=s, temperature=1.0))
                   for s in (2**64, -(2**64), 2**63)]
            results = await asyncio.gather(*normal, *bad)
            return list(results[:40]), list(results[40:])

    normal, bad = asyncio.run(go())
    assert [r.status_code for r in normal] == [200] * 40, [r.text for r in normal if r.status_code != 200][:3]
    for r in bad:
        assert r.status_code == 400 and _error(r)["param"] == "seed", r.text


def test_every_signed_64_bit_seed_is_served(url):
    """OpenAI's range: any signed 64-bit integer (a negative one is used modulo 2**63)."""
    for seed in (-(2**63), -1, 0, 2**63 - 1):
        for path, body in (("/v1/chat/completions", _chat(seed=seed, temperature=1.0, n=2)),
                           ("/v1/completions", {"prompt": "Mia has", "max_tokens": 4, "seed": seed, "n": 2})):
            resp = httpx.post(url + path, json=body, timeout=60)
            assert resp.status_code == 200, (seed, path, resp.text)
    same = [httpx.post(url + "/v1/completions", json={"prompt": "Mia", "max_tokens": 6, "seed": s,
                                                      "temperature": 1.0}, timeout=60).json()
            for s in (-1, 2**63 - 1)]
    assert same[0]["choices"][0]["text"] == same[1]["choices"][0]["text"]  # -1 is 2**63 - 1


def test_lone_surrogate_is_a_400_naming_the_field(url):
    """JSON can spell a lone surrogate (\\ud800): no tokenizer or encoder takes it (was 500)."""
    cases = {
        '{"model":"assistant","messages":[{"role":"user","content":"a\\ud800b"}],"max_tokens":4}':
            "messages.0.content",
        '{"model":"assist\\ud800","messages":[{"role":"user","content":"hi"}],"max_tokens":4}': "model",
        '{"messages":[{"role":"user","content":[{"type":"text","text":"\\udfff"}]}],"max_tokens":4}':
            "messages.0.content",
        '{"messages":[{"role":"user","content":"hi"}],"stop":["\\ud800"],"max_tokens":4}': "stop.0",
        '{"messages":[{"role":"user","content":"hi"}],"user":{"\\ud800":1},"max_tokens":4}': "user.\\ud800",
    }
    for body, param in cases.items():
        resp = httpx.post(url + "/v1/chat/completions", content=body.encode(),
                          headers={"content-type": "application/json"}, timeout=30)
        assert resp.status_code == 400, (body, resp.text)
        error = _error(resp)
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_text"
        assert error["param"] == param, (body, error)
    for path, body in (("/v1/completions", '{"prompt":"x\\ud800","max_tokens":2}'),
                       ("/tokenize", '{"prompt":"\\ud800"}')):
        resp = httpx.post(url + path, content=body.encode(), headers={"content-type": "application/json"})
        assert resp.status_code == 400 and _error(resp)["param"] == "prompt", resp.text
    # a surrogate *pair* is an ordinary character; deep or wide leftovers are checked too
    deep = "[" * 900 + "]" * 900
    for body, status in ((b'{"messages":[{"role":"user","content":"\\ud83d\\ude00"}],"max_tokens":2}', 200),
                         (f'{{"messages":[{{"role":"user","content":"hi"}}],"max_tokens":2,"x":{deep}}}', 200),
                         ('{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"x":'
                          + "[" * 900 + '"\\udc00"' + "]" * 900 + "}", 400),
                         ('{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"x":['
                          + "0," * 500_000 + '"\\udc00"]}', 400)):
        resp = httpx.post(url + "/v1/chat/completions", timeout=60, headers={"content-type": "application/json"},
                          content=body.encode() if isinstance(body, str) else body)
        assert resp.status_code == status, resp.text[:300]
        if status == 400:
            assert _error(resp)["param"].startswith("x.0" if "[[" in body else "x.500000"), resp.text[:300]


def test_numbers_are_bounded_and_named(url):
    for path, body, param in (
        ("/v1/chat/completions", _chat(max_tokens=2**64), "max_tokens"),
        ("/v1/chat/completions", _chat(max_completion_tokens=2**63), "max_completion_tokens"),
        ("/v1/chat/completions", _chat(top_k=2**64), "top_k"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 2**70}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "top_k": 2**40}, "top_k"),
    ):
        resp = httpx.post(url + path, json=body, timeout=30)
        assert resp.status_code == 400 and _error(resp)["param"] == param, (body, resp.text)


# -- nothing slow on the event loop --------------------------------------------------------------
def test_prompt_lists_are_capped_before_any_work(url):
    """20,000 prompts froze the server; n x prompts is capped too."""
    with health_watch(url) as health:
        resp = httpx.post(url + "/v1/completions", json={"prompt": ["hi"] * 20_000, "max_tokens": 4}, timeout=60)
        assert resp.status_code == 400 and _error(resp)["param"] == "prompt", resp.text
        assert "256 prompts" in _error(resp)["message"]
        resp = httpx.post(url + "/v1/completions", json={"prompt": ["hi"] * 8, "n": 128, "max_tokens": 1},
                          timeout=60)
        assert resp.status_code == 400 and _error(resp)["param"] == "prompt", resp.text
        assert "n x prompts" in _error(resp)["message"]
        resp = httpx.post(url + "/v1/completions", json={"prompt": [[1, 2, 3]] * 300, "max_tokens": 1}, timeout=60)
        assert resp.status_code == 400 and _error(resp)["param"] == "prompt", resp.text
    assert health.worst < DEADLINE, health.latencies
    ok = httpx.post(url + "/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 2, "n": 2}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 6


def test_long_stop_strings_are_refused(url):
    """16 stop strings of 3,000 characters with n=32 streamed took 33 s and stalled /health."""
    for stop in (["x" * 3000] * 16, "y" * 257):
        resp = httpx.post(url + "/v1/chat/completions", timeout=30,
                          json=_chat(stop=stop, n=32, stream=True, temperature=1.0, max_tokens=64))
        assert resp.status_code == 400 and _error(resp)["param"] == "stop", resp.text
        assert "256 characters" in _error(resp)["message"]


def test_the_longest_stop_strings_allowed_keep_health_answering(url):
    body = _chat(stop=[chr(ord("a") + i) * 256 for i in range(16)], n=32, stream=True, temperature=1.0,
                 max_tokens=64)
    with health_watch(url) as health:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as resp:
            assert resp.status_code == 200
            events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert health.worst < DEADLINE, sorted(health.latencies)[-5:]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": _user(BIG), "max_tokens": 4}, "messages"),
    ("/v1/chat/completions", {"model": "cot::assistant", "messages": _user(BIG), "max_tokens": 4}, "messages"),
    ("/v1/chat/completions", {"messages": _user(BIG), "max_tokens": 4, "stream": True}, "messages"),
    ("/v1/completions", {"prompt": BIG, "max_tokens": 4}, "prompt"),
    ("/tokenize", {"prompt": BIG}, "prompt"),
    ("/tokenize", {"messages": _user(BIG)}, "messages"),
])
def test_text_that_cannot_fit_is_refused_before_tokenizing(url, path, body, param):
    """A 3.9 MB chat message took 14 s before its 400, /tokenize of it 19 s, both stalling
    every other client."""
    with health_watch(url) as health:
        t0 = time.perf_counter()
        resp = httpx.post(url + path, json=body, timeout=120)
        took = time.perf_counter() - t0
    assert resp.status_code == 400, resp.text
    error = _error(resp)
    assert error["param"] == param and error["code"] == "context_length_exceeded", error
    assert took < 5, took  # tokenizing it took 14-19 s
    assert health.worst < DEADLINE, sorted(health.latencies)[-5:]


def test_many_short_messages_are_refused_before_rendering(url, engine):
    with health_watch(url) as health:
        flood = {"messages": [{"role": "user", "content": "a"}] * 120_000, "max_tokens": 2}  # 3.6 MB
        resp = httpx.post(url + "/v1/chat/completions", timeout=60, headers={"content-type": "application/json"},
                          content=json.dumps(flood, separators=(",", ":")).encode())
        assert resp.status_code == 400 and _error(resp)["param"] == "messages", resp.text
        assert "4096" in _error(resp)["message"]
        # more messages than the context has tokens: refused before the template renders them
        many = {"messages": [{"role": "user", "content": "a"}] * (engine.context_length + 1), "max_tokens": 2}
        resp = httpx.post(url + "/v1/chat/completions", json=many, timeout=60)
        assert resp.status_code == 400 and _error(resp)["code"] == "context_length_exceeded", resp.text
    assert health.worst < DEADLINE, sorted(health.latencies)[-5:]


@contextmanager
def _blocking(engine: TorchEngine, monkeypatch: pytest.MonkeyPatch, name: str) -> Iterator[threading.Event]:
    """Make ``engine.<name>`` (encode or tokenize) wait for the test; yields 'entered'."""
    entered, release = threading.Event(), threading.Event()
    original = getattr(engine, name)

    def slow(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(30)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, name, slow)
    try:
        yield entered
    finally:
        release.set()


@pytest.mark.parametrize("path, body, method", [
    ("/v1/chat/completions", _chat(), "encode"),
    ("/v1/chat/completions", _chat(stream=True), "encode"),
    ("/v1/chat/completions", {**_chat(), "model": "cot::assistant"}, "encode"),
    ("/v1/completions", {"prompt": "Mia has", "max_tokens": 2}, "tokenize"),
    ("/v1/completions", {"prompt": "Mia has", "max_tokens": 2, "stream": True}, "tokenize"),
    ("/tokenize", {"prompt": "Mia has"}, "tokenize"),
    ("/tokenize", {"messages": _user()}, "encode"),
])
def test_prompts_are_tokenized_off_the_event_loop(url, engine, monkeypatch, path, body, method):
    """While a prompt is being tokenized (held here until /health has answered), the
    server answers other clients: the tokenizing runs in a worker thread."""
    with _blocking(engine, monkeypatch, method) as entered:
        result: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: result.update(
            resp=httpx.post(url + path, json=body, timeout=60)), daemon=True)
        worker.start()
        assert entered.wait(30), "the request never reached the tokenizer"
        t0 = time.perf_counter()
        try:
            health = httpx.get(url + "/health", timeout=DEADLINE)
        except httpx.TimeoutException:
            pytest.fail("/health did not answer while a prompt was tokenized: the loop is blocked")
        assert health.status_code == 200 and time.perf_counter() - t0 < DEADLINE
    worker.join(60)
    assert result["resp"].status_code == 200, result["resp"].text


class _Hanging:
    """A backend whose chats wait until ``release`` is set."""

    context_length = 100

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = 0
        self.model = None

    async def chat(self, req: Any) -> dict[str, Any]:
        self.started += 1
        while not self.release.is_set():
            await asyncio.sleep(0.005)
        return {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "done"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    async def tokenize(self, req: Any) -> dict[str, Any]:
        return {"tokens": [1], "count": 1, "max_model_len": self.context_length}

    def gauges(self) -> dict[str, float]:
        return {}

    async def aclose(self) -> None:
        pass


def test_tokenize_counts_in_admission():
    """/tokenize ran outside the in-flight limit: at capacity it is a 429 like the rest."""
    backend = _Hanging()
    app = create_app(backend, max_in_flight=1)

    async def go(base: str) -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            busy = asyncio.create_task(c.post("/v1/chat/completions", json={"messages": _user()}))
            while backend.started < 1:
                await asyncio.sleep(0.01)
            refused = await c.post("/tokenize", json={"prompt": "hi"})
            backend.release.set()
            await busy
            return await busy, refused, await c.post("/tokenize", json={"prompt": "hi"})

    with running_server(app) as base:
        busy, refused, later = asyncio.run(go(base))
    assert busy.status_code == 200
    assert refused.status_code == 429 and _error(refused)["type"] == "rate_limit_error"
    assert later.status_code == 200


# -- auth ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["", "  "])
def test_empty_api_key_is_refused_at_start(tmp_path, key):
    (tmp_path / "config.json").write_text("{}")  # gets past the --model check
    proc = run_assist("serve", "--model", str(tmp_path), "--api-key", key, "--port", "1", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--api-key" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="api_key"):
        create_app(_Hanging(), api_key=key)


PROTECTED = ("/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models")


@pytest.mark.parametrize("public_metrics, public_docs", [(False, False), (True, False), (False, True)])
def test_metrics_and_docs_need_the_key(public_metrics, public_docs):
    app = create_app(_Hanging(), api_key="sekrit", public_metrics=public_metrics, public_docs=public_docs)
    opened = ({"/metrics"} if public_metrics else set()) | (
        {"/docs", "/redoc", "/openapi.json"} if public_docs else set())
    with running_server(app) as base:
        for path in PROTECTED:
            anonymous = httpx.get(base + path)
            wrong = httpx.get(base + path, headers={"Authorization": "Bearer nope"})
            keyed = httpx.get(base + path, headers={"Authorization": "Bearer sekrit"})
            assert keyed.status_code == 200, (path, keyed.text)
            if path in opened:
                assert anonymous.status_code == 200, path
            else:
                for resp in (anonymous, wrong):
                    assert resp.status_code == 401, (path, resp.text)
                    assert _error(resp)["type"] == "authentication_error"
        assert httpx.get(base + "/health").status_code == 200
        body = {"messages": _user()}
        assert httpx.post(base + "/tokenize", json={"prompt": "x"}).status_code == 401
        assert httpx.post(base + "/v1/chat/completions", json=body).status_code == 401


def test_allowed_hosts_refuse_a_foreign_host_header():
    """Any Host was accepted, so a web page whose name rebinds to 127.0.0.1 reached the server."""
    app = create_app(_Hanging(), allowed_hosts=["localhost", "127.0.0.1", "::1", "*.example.org"])
    with running_server(app) as base:
        port = base.rsplit(":", 1)[1]
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "example.org", ""):
            for path in ("/v1/models", "/health", "/metrics"):
                resp = httpx.get(base + path, headers={"Host": host})
                assert resp.status_code == 400, (host, path, resp.text)
                error = _error(resp)
                assert error["code"] == "host_not_allowed" and error["param"] == "Host"
        for host in (f"127.0.0.1:{port}", f"LOCALHOST:{port}", "localhost.", f"[::1]:{port}", "api.example.org"):
            assert httpx.get(base + "/v1/models", headers={"Host": host}).status_code == 200, host
    with running_server(create_app(_Hanging())) as base:  # the Python API's default: any Host
        assert httpx.get(base + "/v1/models", headers={"Host": "evil.example"}).status_code == 200


def test_serve_defaults_to_loopback_hosts_on_a_loopback_interface():
    import argparse

    from assist.cli._flags import add_flags
    from assist.cli.serve import config_from_args
    from assist.server._launch import allowed_hosts

    assert set(allowed_hosts(ServeConfig())) == {"localhost", "127.0.0.1", "::1"}
    assert set(allowed_hosts(ServeConfig(host="::1"))) == {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts(ServeConfig(host="0.0.0.0")) is None  # a public interface: names unknown
    parser = argparse.ArgumentParser()
    add_flags(parser, ServeConfig)
    args = parser.parse_args(["--upstream", "http://h/v1", "--allowed-hosts", "a.example, b.example",
                              "--allowed-hosts", "c.example", "--host", "0.0.0.0"])
    cfg = config_from_args(args)
    assert cfg.allowed_hosts == ["a.example", "b.example", "c.example"]
    assert allowed_hosts(cfg) == ["a.example", "b.example", "c.example"]
    args = parser.parse_args(["--upstream", "http://h/v1", "--public-metrics", "--public-docs"])
    cfg = config_from_args(args)
    assert cfg.public_metrics and cfg.public_docs and not cfg.allowed_hosts


def test_errors_name_no_filesystem_path(engine, tmp_path):
    secret = str(tmp_path / "checkpoints" / "rlhf")
    app = create_app(EngineBackend(engine), owns_backend=False, names=["assistant", secret])
    with running_server(app) as base:
        bodies = [
            ("/v1/chat/completions", {"model": "nope", "messages": _user()}),
            ("/v1/completions", {"model": "nope", "prompt": "x"}),
            ("/tokenize", {"model": "nope", "prompt": "x"}),
            ("/v1/chat/completions", {"model": secret + "x", "messages": _user()}),
        ]
        for path, body in bodies:
            resp = httpx.post(base + path, json=body, timeout=30)
            assert resp.status_code == 404, resp.text
            assert str(tmp_path) not in json.dumps(resp.json()).replace(secret + "x", ""), resp.text
        # the path is still accepted as a name, just never printed
        ok = httpx.post(base + "/v1/chat/completions", json=_chat(model=secret), timeout=60)
        assert ok.status_code == 200 and ok.json()["model"] == secret
