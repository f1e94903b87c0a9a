"""The server-side strategy policy: resources by name (never a client's path), the
strategies and tools allowed, limits checked from a spec's worst case before any work,
admission by engine work, and cancellation of every sub-call when a request fails or its
client leaves. Fast: FakeChatModel and small scripted models, no checkpoint."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import strategies
from assist.errors import BadRequest
from assist.server import create_app
from assist.testing import FakeChatModel, running_server
from assist.types import ChatCompletion, Choice, Message, Usage
from strategies import LimitError, Limits, Policy, PolicyError, SpecError, parse
from strategies._embed import HashingEmbedder
from strategies._store import DocumentStore

QUESTION = [{"role": "user", "content": "What is 2+2?"}]


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# -- test doubles ---------------------------------------------------------------------------
class _Backend:
    """A backend over a ChatModel: enough for the routes the tests drive."""

    context_length = 512

    def __init__(self, model: Any) -> None:
        self.model = model
        self.completions = 0

    async def chat(self, req: Any) -> dict[str, Any]:
        completion = await self.model.chat([m.to_dict() for m in req.messages], n=req.n)
        return completion.to_openai()

    async def stream_chat(self, req: Any):
        body = await self.chat(req)
        yield {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
               "choices": [{"index": 0, "delta": {"content": body["choices"][0]["message"]["content"]},
                            "finish_reason": "stop"}]}

    async def complete(self, req: Any) -> dict[str, Any]:
        self.completions += 1
        count = len(req.prompts()) * req.n
        return {"id": "c", "object": "text_completion", "created": 0, "model": "m",
                "choices": [{"index": i, "text": "4", "finish_reason": "stop", "logprobs": None}
                            for i in range(count)],
                "usage": {"prompt_tokens": count, "completion_tokens": count, "total_tokens": 2 * count}}

    def gauges(self) -> dict[str, float]:
        return {}

    async def aclose(self) -> None:
        pass


class _Slow:
    """A ChatModel whose calls wait until ``release`` is set; counts calls started and in
    flight. ``fail_on``: the call with that number (1-based) raises a 400 at once."""

    name = "slow"
    supports_n = False

    def __init__(self, fail_on: int | None = None) -> None:
        self.release = threading.Event()
        self.started = 0
        self.in_flight = 0
        self.fail_on = fail_on

    async def chat(self, messages: Any, **kwargs: Any) -> ChatCompletion:
        self.started += 1
        if self.started == self.fail_on:
            raise BadRequest("this call fails", param="messages")
        self.in_flight += 1
        try:
            while not self.release.is_set():
                await asyncio.sleep(0.005)
        finally:
            self.in_flight -= 1
        return ChatCompletion(model="slow", choices=[Choice(index=0, message=Message(role="assistant",
                              content="#### 4"), finish_reason="stop")], usage=Usage(prompt_tokens=1,
                              completion_tokens=1, total_tokens=2))


def _post(url: str, model: str, **body: Any) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"model": model, "messages": QUESTION, **body},
                      timeout=30)


@pytest.fixture()
def kb(tmp_path: Path) -> Path:
    path = tmp_path / "kb.sqlite"
    with DocumentStore(path, embedder=HashingEmbedder()) as store:
        store.add([("kb-1", "Paris is the capital of France."), ("kb-2", "Rome is the capital of Italy.")])
    return path


# -- 4: user errors in a spec name the option ------------------------------------------------
@pytest.mark.parametrize("spec, param", [
    ("sc:t=-1", "temperature"), ("sc@0", "k"), ("sc@2:p=abc", "top_p"), ("bon@2:t=abc", "temperature"),
    ("reflect:critic=x", "critic"), ("rag:search=x", "search"), ("bon:scorer=x", "scorer"),
    ("sc:t=nan", "temperature"), ("sc:t=3", "temperature"), ("sc:p=0", "top_p"), ("cot:max_tokens=0", "max_tokens"),
    ("sc:weighted=maybe", "weighted"), ("tools:max_turns=-1", "max_turns"), ("json:retries=x", "retries"),
    ("sc:seed=18446744073709551616", "seed"), ("sc@4:zz=1", "zz"), ("sc:x=nope", "extractor"),
    ("tools:use=nope", "use"), ("sc@99999999999999999999", "k"),
])
def test_spec_errors_name_the_option(spec, param):
    scorer = Policy(resources={"rm": {"default": lambda messages, candidates: [0.0] * len(candidates)}})
    for policy in (None, scorer):
        with pytest.raises(SpecError) as e:
            parse(spec, policy=policy)
        assert e.value.param == param, (spec, str(e.value))
        assert not e.value.unknown


def test_python_only_options_are_refused_with_a_clear_message():
    with pytest.raises(SpecError, match="Python object"):
        parse("reflect:critic=gpt")


def test_constructors_check_types_from_python_too():
    with pytest.raises(ValueError, match="top_p"):
        strategies.SelfConsistency(top_p="abc")
    with pytest.raises(ValueError, match="temperature"):
        strategies.BestOfN(temperature="abc")


# -- 3: limits, from the worst case, before any work ---------------------------------------------
@pytest.mark.parametrize("spec, calls", [
    ("cot", 1), ("sc@8", 8), ("bon@3", 3), ("reflect@2", 3), ("tools:max_turns=2", 3), ("json:retries=2", 3),
    ("sc@4(reflect@2(cot))", 12), ("bon@3(tools:max_turns=2)", 9), ("reflect@2(sc@4)", 6),
])
def test_each_strategy_reports_its_worst_case_calls(spec, calls):
    bound = parse(spec).bound(100)
    assert (bound.calls, bound.tokens) == (calls, 100 * calls)
    assert parse("sc@4:max_tokens=10").bound(100).tokens == 40  # a node's own cap counts


def test_the_worst_case_is_reached_not_exceeded():
    # every check proposes a revision, so every reflection round runs; no n=k batching
    fake = FakeChatModel(replies=["Corrected: 2+2 = 4\n#### 4"], supports_n=False)
    strategy = parse("sc@3(reflect@2(cot))")
    strategy.run_sync(fake, "What is 2+2?")
    assert len(fake.calls) == strategy.bound(64).calls == 9


def test_limits_are_named_and_checked_before_parsing_deep_specs():
    policy = Policy()
    for spec, limit in [("sc(sc(sc(sc(sc(cot)))))", "max_depth"), ("sc@64", "max_k"),
                        ("(" * 1100 + "cot" + ")" * 1100, "max_spec_chars")]:
        with pytest.raises(LimitError) as e:
            parse(spec, policy=policy)
        assert e.value.param == limit
    deep = "sc(" * 1100 + "cot" + ")" * 1100  # a trusted caller is still spared the RecursionError
    with pytest.raises(LimitError) as e:
        parse(deep)
    assert e.value.param == "max_depth"
    ok = parse("sc@32(reflect@7(cot))", policy=policy)
    assert policy.check_cost(ok, n=1, max_tokens=16).calls == 256
    with pytest.raises(LimitError) as e:
        policy.check_cost(ok, n=2, max_tokens=16)
    assert e.value.param == "max_calls"
    with pytest.raises(LimitError) as e:
        policy.check_cost(ok, n=1, max_tokens=512)
    assert e.value.param == "max_total_tokens"


def _bait(folder: Path) -> tuple[Path, Path, Path]:
    """Files a server must never open for a client: a fifo (reading hangs), a foreign SQLite
    database (a store would add its tables) and a Python file (a store would convert it)."""
    fifo = folder / "fifo"
    os.mkfifo(fifo)
    foreign = folder / "other.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE t (x)")
    plain = folder / "empty.py"
    plain.write_text("print(1)\n")
    return fifo, foreign, plain


# -- 1, 6, 7: resources by name, loaded once; no client string is a path ---------------------------------
def test_resource_options_are_names_never_paths(tmp_path: Path, kb: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(strategies.best_of_n, "_LOADED", {})
    fifo, foreign, plain = _bait(tmp_path)
    before = foreign.read_bytes()
    policy = Policy()
    messages = set()
    for spec in (f"json:schema={fifo}", "json:schema=/dev/zero", f"rag:store={foreign}", f"rag:store={plain}",
                 f"rag:store={kb}", f"bon:rm={tmp_path}/./", f"bon:rm={tmp_path}/nowhere"):
        with pytest.raises(SpecError) as e:
            parse(spec, policy=policy)  # a fifo would hang, /dev/zero would fill memory
        assert e.value.param in ("schema", "store", "rm")
        assert str(tmp_path) not in str(e.value) and "/dev" not in str(e.value)
        messages.add((e.value.param, str(e.value)))
    assert len(messages) == 3  # one message per option: whether a path exists is not told
    assert foreign.read_bytes() == before and not Path(f"{foreign}-wal").exists()
    assert plain.read_text() == "print(1)\n"
    assert strategies.best_of_n._LOADED == {}


def test_resources_are_loaded_at_start_and_named_by_clients(tmp_path: Path, kb: Path,
                                                            monkeypatch: pytest.MonkeyPatch):
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"answer": {"type": "string"}},
                                  "required": ["answer"]}))
    policy = Policy.load([f"schema:answer={schema}", f"store:kb={kb}", f"store={kb}"])
    try:
        store = policy.resources["store"]["kb"]
        assert store.read_only
        # nothing is read or opened per request: the loaders refuse, and it still runs
        def no_loading(*a: Any, **k: Any) -> None:
            raise AssertionError("a resource was loaded per request")

        monkeypatch.setattr(DocumentStore, "__init__", no_loading)
        monkeypatch.setattr(strategies.json_output, "read_schema", no_loading)
        monkeypatch.setenv("ASSIST_RAG_STORE", str(tmp_path / "ignored.db"))
        first, second = parse("rag:store=kb", policy=policy), parse("rag@1", policy=policy)
        assert first.store is store and second.store is policy.resources["store"]["default"]
        fake = FakeChatModel(replies=["It is Paris [kb-1].\n#### Paris"])
        result = first.run_sync(fake, "What is the capital of France?")
        assert result.trace[0]["passages"][0]["id"] == "kb-1" and result.answer.lower() == "paris"
        js = parse("json:schema=answer,field=answer", policy=policy)
        assert js.response_format()["json_schema"]["name"] == "answer"
        assert js.run_sync(FakeChatModel(replies=['{"answer": "4"}']), "2+2?").answer == "4"
    finally:
        policy.close()


def test_reward_models_come_from_the_policy_not_from_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    scores = []

    def scorer(messages, candidates):
        scores.append(len(candidates))
        return [float(c.endswith("4")) for c in candidates]

    def no_loading(*a: Any, **k: Any) -> None:
        raise AssertionError("a reward model was loaded per request")

    monkeypatch.setattr(strategies.best_of_n, "RewardModel", no_loading)
    monkeypatch.setenv("ASSIST_REWARD_MODEL", str(tmp_path))
    policy = Policy(resources={"rm": {"default": scorer, "strict": scorer}})
    for spec in ("bon@2", "bon@2:rm=strict"):
        bon = parse(spec, policy=policy)
        result = bon.run_sync(FakeChatModel(replies=["#### 3", "#### 4"]), "2+2?")
        assert result.answer == "4"
    assert scores == [2, 2]


def test_trusted_reward_model_paths_load_once_per_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    loads = []
    monkeypatch.setattr(strategies.best_of_n, "RewardModel", lambda path: loads.append(path) or object())
    monkeypatch.setattr(strategies.best_of_n, "_LOADED", {})
    for alias in (str(tmp_path), f"{tmp_path}/", f"{tmp_path}/./", f"{tmp_path}/././"):
        strategies.best_of_n._reward_model(alias)
    assert len(loads) == 1


def test_bad_resources_fail_at_start_and_stores_are_never_changed(tmp_path: Path):
    fifo, foreign, plain = _bait(tmp_path)
    before = foreign.read_bytes()
    for resource in (f"store={foreign}", f"store={plain}", f"store={tmp_path / 'none.db'}", f"schema={fifo}",
                     "schema=/dev/zero", "bogus=x", "store:a,b=x", "store:=", f"rm={tmp_path}"):
        with pytest.raises(PolicyError):
            Policy.load([resource])
    assert foreign.read_bytes() == before and plain.read_text() == "print(1)\n"
    with pytest.raises(PolicyError, match="twice"):
        Policy.load([f"schema:x={tmp_path}/a.json", f"schema:x={tmp_path}/b.json"])


# -- 2: strategies and the python tool -------------------------------------------------------------
def test_allowed_strategies_and_the_python_tool():
    narrow = Policy(strategies=["cot", "sc"])
    assert parse("sc@4(cot)", policy=narrow).k == 4
    with pytest.raises(SpecError) as e:
        parse("sc(tools)", policy=narrow)
    assert e.value.unknown and "tools" in str(e.value)
    with pytest.raises(PolicyError):
        Policy(strategies=["cot", "nope"])
    for spec in ("tools:use=python", "tools:use=calculator+python", "sc@2(tools:tools=python)"):
        with pytest.raises(SpecError) as e:
            parse(spec, policy=Policy())
        assert e.value.param == "use" and "--allow-python" in str(e.value)
        parse(spec, policy=Policy(allow_python=True))
    parse("tools:use=calculator", policy=Policy())
    assert "python" in parse("tools:use=python", policy=Policy(allow_python=True))._tools
    assert "python" in parse("tools:use=python")._tools  # Python callers are trusted


# -- over HTTP ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model, status, param", [
    ("sc:t=-1::assistant", 400, "temperature"), ("sc@0::assistant", 400, "k"),
    ("sc@2:p=abc::assistant", 400, "top_p"), ("bon@2:t=abc::assistant", 400, "temperature"),
    ("reflect:critic=x::assistant", 400, "critic"), ("rag:search=x::assistant", 400, "search"),
    ("json:schema=/dev/zero::assistant", 400, "schema"), ("rag:store=/tmp/other.db::assistant", 400, "store"),
    ("bon:rm=/tmp/./::assistant", 400, "rm"), ("tools:use=python::assistant", 400, "use"),
    ("sc(sc(sc(sc(sc(cot)))))::assistant", 400, "max_depth"), ("sc(" * 100 + "cot" + ")" * 100 + "::assistant",
                                                                 400, "max_depth"),
    ("sc@32(sc@32(cot))::assistant", 400, "max_calls"), ("sc@64::assistant", 400, "max_k"),
    ("nope@3::assistant", 404, "strategy"),
])
def test_http_spec_errors_are_4xx_before_any_call(model, status, param):
    fake = FakeChatModel(replies=["#### 4"])
    with running_server(create_app(_Backend(fake))) as url:
        resp = _post(url, model, max_tokens=16)
        deep = _post(url, "assistant", strategy="(" * 1100 + "cot" + ")" * 1100)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["code"] == ("strategy_not_found" if status == 404 else error["code"])
    assert "/tmp" not in error["message"] and "/dev" not in error["message"]
    assert deep.status_code == 400 and deep.json()["error"]["type"] == "invalid_request_error"
    assert fake.calls == []


def test_a_bad_option_is_named_as_typed_and_every_spec_error_is_an_assist_error():
    from assist.errors import AssistError

    with pytest.raises(SpecError) as e:
        parse("sc:t=-1")
    assert isinstance(e.value, BadRequest) and isinstance(e.value, ValueError)
    assert e.value.status == 400 and e.value.exit_status == 2
    assert e.value.param == "temperature" and "sc: t (temperature):" in e.value.message
    with pytest.raises(SpecError) as e:
        parse("nope@3")
    assert isinstance(e.value, AssistError) and e.value.status == 404 and e.value.unknown
    fake = FakeChatModel(replies=["#### 4"])
    with running_server(create_app(_Backend(fake))) as url:
        bad, unknown = _post(url, "sc:t=-1::assistant"), _post(url, "nope::assistant")
    assert bad.status_code == 400 and "t (temperature)" in bad.json()["error"]["message"]
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "strategy"
    assert fake.calls == []


def test_unknown_model_error_does_not_print_the_checkpoint_path():
    with running_server(create_app(_Backend(FakeChatModel(replies=["hi"])),
                                   names=["assistant", "/srv/secret/runs/tiny/rlhf"])) as url:
        missing = _post(url, "gpt-5")
        by_path = _post(url, "/srv/secret/runs/tiny/rlhf")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert "/srv" not in missing.text and "assistant" in missing.json()["error"]["message"]
    assert by_path.status_code == 200


def test_models_lists_only_strategies_the_policy_serves():
    app = create_app(_Backend(FakeChatModel(replies=["hi"])), strategy_aliases=["cot", "tools", "sc@4(tools)"],
                     policy=Policy(strategies=["cot", "sc"]))
    with running_server(app) as url:
        ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    assert ids == ["assistant", "cot::assistant"]


# -- 5: admission counts engine work; failure and departure cancel every sub-call -------------------
def test_admission_weighs_worst_case_calls():
    slow = _Slow()
    backend = _Backend(slow)
    app = create_app(backend, max_in_flight=8, policy=Policy(limits=Limits(max_calls=6)))

    async def go(url: str) -> tuple[int, int, int, int, int]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            body = {"model": "sc@6::assistant", "messages": QUESTION, "max_tokens": 8}
            held = asyncio.create_task(c.post("/v1/chat/completions", json=body))
            while slow.in_flight < 6:  # six n=1 calls: the request holds six units
                await asyncio.sleep(0.01)
            three = await c.post("/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 2})
            two = await c.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2})
            chat_n3 = await c.post("/v1/chat/completions", json={"messages": QUESTION, "n": 3})
            too_many = await c.post("/v1/completions", json={"prompt": ["p"] * 7, "max_tokens": 2})
            slow.release.set()
            return (await held).status_code, three.status_code, two.status_code, chat_n3.status_code, \
                too_many.status_code

    with running_server(app) as url:
        held, three, two, chat_n3, too_many = asyncio.run(go(url))
    assert (held, three, two, chat_n3) == (200, 429, 200, 429)
    assert too_many == 400  # 7 prompts x n=1 is over max_calls=6, whatever the load


def test_client_leaving_a_streamed_strategy_cancels_all_its_calls():
    slow = _Slow()
    app = create_app(_Backend(slow))

    async def leave(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            body = {"model": "sc@4(reflect@2(cot))::assistant", "messages": QUESTION, "stream": True,
                    "max_tokens": 8}

            async def stream() -> None:
                async with c.stream("POST", "/v1/chat/completions", json=body) as resp:
                    async for _ in resp.aiter_lines():
                        pass

            task = asyncio.create_task(stream())
            while slow.in_flight < 4:  # four attempts are generating
                await asyncio.sleep(0.01)
            task.cancel()  # the client hangs up
            with pytest.raises(asyncio.CancelledError):
                await task

    try:
        with running_server(app) as url:
            asyncio.run(leave(url))
            _wait_for(lambda: slow.in_flight == 0)
            _wait_for(lambda: "assist_requests_cancelled_total 1" in httpx.get(url + "/metrics").text)
            _wait_for(lambda: "assist_model_calls_in_flight 0.0" in httpx.get(url + "/metrics").text)
            assert slow.started == 4  # no reflection round started after the client left
    finally:
        slow.release.set()


@pytest.mark.parametrize("model, n", [("sc@4::assistant", 1), ("cot::assistant", 3),
                                      ("sc@2(reflect(cot))::assistant", 2)])
def test_a_failing_sub_call_cancels_its_siblings(model, n):
    calls = 4 if n == 1 else n * (2 if "sc@2" in model else 1)
    slow = _Slow(fail_on=calls)  # the last call to start fails; the others are generating
    try:
        with running_server(create_app(_Backend(slow))) as url:
            resp = _post(url, model, n=n, max_tokens=8)
            assert resp.status_code == 400 and resp.json()["error"]["message"] == "this call fails"
            _wait_for(lambda: slow.in_flight == 0)
            assert slow.started == calls
    finally:
        slow.release.set()


# -- the serve flags ------------------------------------------------------------------------------
def test_serve_flags_build_the_policy(tmp_path: Path, kb: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("ASSIST_REWARD_MODEL", raising=False)
    monkeypatch.delenv("ASSIST_RAG_STORE", raising=False)
    from assist.cli import build_parser
    from assist.cli.serve import config_from_args
    from assist.server._launch import build_policy

    (tmp_path / "config.json").write_text("{}")
    schema = tmp_path / "x.json"
    schema.write_text('{"type": "object"}')
    args = build_parser().parse_args(["serve", "--model", str(tmp_path), "--resource", f"store:kb={kb}",
                                      "--resource", f"schema:x={schema}", "--strategies", "cot,sc,rag,json",
                                      "--allow-python", "--max-calls", "64", "--max-k", "8", "--max-depth", "2",
                                      "--max-total-tokens", "1000"])
    cfg = config_from_args(args)
    policy = build_policy(cfg)
    try:
        assert policy.allow_python and policy.strategies == {"cot", "sc", "rag", "json"}
        assert policy.limits == Limits(max_depth=2, max_k=8, max_calls=64, max_total_tokens=1000)
        assert parse("rag:store=kb", policy=policy).store is policy.resources["store"]["kb"]
        assert parse("json:schema=x", policy=policy).json_schema == {"type": "object"}
    finally:
        policy.close()
    defaults = config_from_args(build_parser().parse_args(["serve", "--model", str(tmp_path)]))
    assert (defaults.resource, defaults.strategies, defaults.allow_python) == ([], None, False)
    assert (defaults.max_depth, defaults.max_k, defaults.max_calls, defaults.max_total_tokens) == (3, 32, 256, 65536)
    for bad in (["--resource", "disk=/"], ["--strategies", "cot,nope"], ["--max-calls", "0"]):
        with pytest.raises(BadRequest):
            config_from_args(build_parser().parse_args(["serve", "--model", str(tmp_path), *bad]))


def test_a_checkpoint_of_a_training_run_brings_the_runs_reward_model_and_store(
        tmp_path: Path, kb: Path, monkeypatch: pytest.MonkeyPatch):
    """`assist serve --model runs/tiny/rlhf` serves rag and bon as the demo evaluated them."""
    import shutil

    monkeypatch.delenv("ASSIST_REWARD_MODEL", raising=False)
    monkeypatch.delenv("ASSIST_RAG_STORE", raising=False)
    from assist.cli import build_parser
    from assist.cli.serve import config_from_args
    from assist.server._launch import build_policy, run_defaults

    run = tmp_path / "run"
    (run / "rlhf").mkdir(parents=True)
    (run / "rlhf" / "config.json").write_text("{}")
    assert run_defaults(str(run / "rlhf")) == {}  # no metrics.json: not a training run
    (run / "metrics.json").write_text("{}")
    assert run_defaults(str(run / "rlhf")) == {}  # a run without its rm or demo store
    store = run / "eval" / "facts" / "facts.sqlite"
    store.parent.mkdir(parents=True)
    shutil.copy(kb, store)
    (run / "rm").mkdir()
    (run / "rm" / "config.json").write_text("{}")
    assert run_defaults(str(run / "rlhf")) == {"rm": run / "rm", "store": store}
    shutil.rmtree(run / "rm")  # (an rm folder that loads would need a real checkpoint)

    def policy_of(*flags: str) -> Any:
        return build_policy(config_from_args(build_parser().parse_args(["serve", "--model", str(run / "rlhf"),
                                                                         *flags])))

    policy = policy_of()
    try:
        assert parse("rag", policy=policy).store is policy.resources["store"]["default"]
        assert str(policy.resources["store"]["default"].path) == str(store)
    finally:
        policy.close()
    other = tmp_path / "other.sqlite"
    shutil.copy(kb, other)
    policy = policy_of("--resource", f"store={other}")  # the operator's own wins
    try:
        assert str(policy.resources["store"]["default"].path) == str(other)
    finally:
        policy.close()


def test_rag_over_http_reads_the_loaded_store_and_a_missing_question_is_400(kb: Path):
    policy = Policy.load([f"store={kb}"])
    fake = FakeChatModel(replies=["It is Paris [kb-1].\n#### Paris"])
    try:
        with running_server(create_app(_Backend(fake), policy=policy)) as url:
            ok = _post(url, "rag@1::assistant", max_tokens=16)
            no_question = httpx.post(url + "/v1/chat/completions", timeout=30, json={
                "model": "rag::assistant", "messages": [{"role": "system", "content": "Be brief."}]})
    finally:
        policy.close()
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"].startswith("It is Paris")
    assert "kb-1" in fake.calls[0]["messages"][0]["content"]
    assert no_question.status_code == 400 and no_question.json()["error"]["param"] == "messages"


def test_any_64_bit_request_seed_runs_a_strategy():
    fake = FakeChatModel(replies=["#### 4"])
    with running_server(create_app(_Backend(fake))) as url:
        answers = [_post(url, "sc@2::assistant", seed=seed, max_tokens=8) for seed in (2**63 - 1, -(2**63), 7)]
    assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
    assert fake.calls[-1]["seed"] == 7  # ordinary seeds are passed on unchanged


def test_a_strategy_request_refuses_sampling_fields_it_would_not_apply():
    """sc@2 samples with its own options: a presence_penalty sent with it is a 400 naming the
    field, not dropped in silence; the neutral value changes nothing and is accepted."""
    with running_server(create_app(_Backend(FakeChatModel(replies=["#### 4"])))) as url:
        body = {"model": "sc@2::assistant", "messages": [{"role": "user", "content": "2+2?"}],
                "presence_penalty": 0.5}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "presence_penalty", r.text
        body["presence_penalty"] = 0.0
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
