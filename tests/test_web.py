"""The playground's and the viewer's server side, without a browser (fast, scripted model):
the page and its files, the key rules around them, the spec check, the ``return_trace``
extension, the example prompts, the viewer's data and ``assist eval view``'s errors.
The pages themselves are driven in Chromium by tests/test_browser.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from assist.server import create_app, load_run, viewer_app
from assist.testing import FakeChatModel, running_server
from assist.web import FILES
from evals.report import summarize, write_results
from tests.conftest import REPO


class _FakeBackend:
    """Just what strategy requests use: a scripted model and a context length."""

    context_length = 512

    def __init__(self, model: FakeChatModel) -> None:
        self.model = model

    def gauges(self) -> dict[str, float]:
        return {}

    async def aclose(self) -> None:
        pass


def _votes(messages: Any, kwargs: dict[str, Any]) -> str:
    return "2 + 2 = 4\n#### 4"


EXAMPLES = [{"task": "arith", "id": "arith-test-0", "question": "Q?", "answer": "1"}]


@pytest.fixture(scope="module")
def url() -> Any:
    app = create_app(_FakeBackend(FakeChatModel(respond=_votes)), api_key="sekrit", examples=lambda: EXAMPLES)
    with running_server(app) as base:
        yield base


KEY = {"Authorization": "Bearer sekrit"}


def _chat(url: str, **fields: Any) -> httpx.Response:
    body = {"model": "sc@3::assistant", "messages": [{"role": "user", "content": "2+2?"}], **fields}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=KEY, timeout=30)


def test_the_page_and_its_files_need_no_key_and_load_nothing_else(url):
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    for name in FILES:
        resp = httpx.get(f"{url}/static/{name}")
        assert resp.status_code == 200, name
        text = resp.text.replace("http://www.w3.org/2000/svg", "")  # SVG's namespace name, never fetched
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name
    # Any other path under /static is not a page file: it needs the key, and then is a 404.
    for path in ("/static/nope.js", "/static/..%2f_static.py", "/static/%2e%2e/__init__.py"):
        assert httpx.get(url + path).status_code == 401, path
        assert httpx.get(url + path, headers=KEY).status_code == 404, path


def test_the_api_routes_the_page_calls_need_the_key(url):
    assert httpx.post(url + "/v1/strategies/check", json={"spec": "cot"}).status_code == 401
    assert httpx.get(url + "/v1/playground/examples").status_code == 401
    assert _chat(url, return_trace=True).status_code == 200
    assert httpx.post(url + "/v1/chat/completions", json={"model": "sc@3::assistant", "return_trace": True,
                                                          "messages": [{"role": "user", "content": "x"}]}).status_code == 401
    assert httpx.get(url + "/v1/playground/examples", headers=KEY).json()["data"] == EXAMPLES


@pytest.mark.parametrize("spec, status, needle, param", [
    ("sc@x", 400, "'@x'", "strategy"),
    ("cot:zz=1", 400, "unknown option 'zz'", "zz"),
    ("sc@8:t=-1", 400, "t (temperature): must be in [0, 2], not -1", "temperature"),
    ("sc@64", 400, "k up to 32", "max_k"),
    ("bogus", 404, "unknown strategy 'bogus'", "strategy"),
    ("rag", 400, "no default one", "store"),
])
def test_spec_check_answers_as_a_chat_request_would(url, spec, status, needle, param):
    check = httpx.post(url + "/v1/strategies/check", json={"spec": spec}, headers=KEY)
    chat = _chat(url, model=f"{spec}::assistant")
    assert check.status_code == chat.status_code == status
    assert check.json() == chat.json()
    error = check.json()["error"]
    assert needle in error["message"] and error["param"] == param


def test_spec_check_gives_the_canonical_spec_and_worst_case_calls(url):
    ok = httpx.post(url + "/v1/strategies/check", json={"spec": " sc@4:t=0.5(cot) "}, headers=KEY).json()
    assert ok == {"ok": True, "spec": "sc@4:t=0.5(cot)", "calls": 4, "temperature": True}
    assert httpx.post(url + "/v1/strategies/check", json={"spec": "tools", "n": 2}, headers=KEY).json()["calls"] == 10
    assert httpx.post(url + "/v1/strategies/check", json={"spec": ""}, headers=KEY).status_code == 400


def test_return_trace_only_when_asked(url):
    plain = _chat(url).json()["choices"][0]
    assert not {"trace", "answer", "cost"} & set(plain)
    choice = _chat(url, return_trace=True, seed=1).json()["choices"][0]
    assert choice["answer"] == "4" and choice["cost"]["calls"] >= 1 and choice["cost"]["latency_s"] >= 0
    vote = next(step for step in choice["trace"] if step["step"] == "vote")
    assert vote["samples"] == 3 and vote["tally"] == {"4": 3} and vote["winner"] == "4"
    assert [s["step"] for s in choice["trace"]].count("call") >= 1


def test_a_streamed_trace_comes_on_each_choices_last_chunk(url):
    """``return_trace`` with ``stream``: the official client still reads the answer, and
    each choice's finishing chunk carries what a whole answer's choice would."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0)
    messages = [{"role": "user", "content": "2+2?"}]
    whole = client.chat.completions.create(model="sc@3::assistant", messages=messages, n=2, seed=1,
                                           extra_body={"return_trace": True})
    stream = client.chat.completions.create(model="sc@3::assistant", messages=messages, n=2, seed=1, stream=True,
                                            extra_body={"return_trace": True, "stream_progress": True})
    texts, extras = {0: "", 1: ""}, {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            extra = choice.model_extra or {}
            assert bool(extra) == bool(choice.finish_reason)  # only the last chunk, and every last one
            if extra:
                extras[choice.index] = extra
    for i, choice in enumerate(whole.choices):
        assert texts[i] == choice.message.content
        want = choice.model_extra
        assert extras[i]["answer"] == want["answer"] == "4"
        assert [s["step"] for s in extras[i]["trace"]] == [s["step"] for s in want["trace"]]
        assert extras[i]["cost"]["calls"] == want["cost"]["calls"]
    # Not asked, not sent.
    plain = httpx.post(url + "/v1/chat/completions", headers=KEY, timeout=30, json={
        "model": "sc@3::assistant", "messages": messages, "stream": True})
    assert plain.status_code == 200 and '"trace"' not in plain.text and '"answer"' not in plain.text


def test_default_examples_come_from_the_task_world():
    from assist.server._web import task_examples

    examples = task_examples(None)
    assert {e["task"] for e in examples} == {"arith", "facts"}
    assert all(e["question"] and e["answer"] and e["id"].startswith(e["task"]) for e in examples)


# -- the viewer ----------------------------------------------------------------------------------
def _run(folder: Path, rows: dict[str, list[tuple[str | None, bool]]]) -> Path:
    """An eval folder as `assist eval run` writes it: records and results.json, by hand."""
    records = []
    for strategy, answers in rows.items():
        for i, (answer, correct) in enumerate(answers):
            trace = [{"step": "vote", "answers": [answer, answer], "tally": {str(answer): 2}, "winner": answer,
                      "samples": 2}] if strategy.startswith("sc") else []
            records.append({"task": "arith", "strategy": strategy, "item": f"arith-test-{i}",
                            "question": f"question {i} about kites", "reference": "7",
                            "runs": [{"text": f"#### {answer}", "answer": answer, "correct": correct,
                                      "prompt_tokens": 5, "completion_tokens": 9, "calls": 1, "latency_s": 0.1,
                                      "error": None, "seed": 0, "trace": trace}]})
    folder.mkdir(parents=True)
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_results(folder, summarize(records), {"task": "arith", "seed": 0, "samples": 1}, commit="test")
    return folder


def test_viewer_payload_items_flags_and_traces(tmp_path):
    a = _run(tmp_path / "a", {"cot": [("7", True), ("3", False), ("7", True)],
                              "sc@2": [("7", True), ("7", True), ("7", True)]})
    b = _run(tmp_path / "b", {"cot": [("7", True), ("7", True)]})
    with running_server(viewer_app([load_run(a), load_run(b)])) as base:
        page = httpx.get(base + "/")
        assert page.status_code == 200 and "viewer.js" in page.text
        data = httpx.get(base + "/api/runs").json()
        assert [r["name"] for r in data["runs"]] == ["a", "b"]
        assert data["compare"]["labels"] == ["a", "b"]
        cot = next(row for row in data["compare"]["rows"] if row["strategy"] == "cot")
        assert cot["cells"][0]["n"] == 3 and cot["cells"][1]["n"] == 2
        assert next(row for row in data["compare"]["rows"] if row["strategy"] == "sc@2")["cells"][1] is None
        assert set(data["runs"][0]["curves"]["arith"]) == {"sc@2"}  # maj@k from the votes
        items = {item["id"]: item for item in data["items"]}
        assert len(items) == 3 and set(items["arith-test-0"]["answers"]) == {"0:cot", "0:sc@2", "1:cot"}
        assert [items[f"arith-test-{i}"]["wrong"] for i in range(3)] == [False, True, False]
        assert [items[f"arith-test-{i}"]["disagree"] for i in range(3)] == [False, True, False]
        one = httpx.get(f"{base}/api/items/{items['arith-test-1']['index']}").json()
        assert one["id"] == "arith-test-1" and one["reference"] == "7"
        assert {(r["run"], r["strategy"]) for r in one["records"]} == {(0, "cot"), (0, "sc@2"), (1, "cot")}
        sc = next(r for r in one["records"] if r["strategy"] == "sc@2")
        assert sc["runs"][0]["trace"][0]["step"] == "vote"
        assert httpx.get(f"{base}/api/items/99").status_code == 404
        assert httpx.get(f"{base}/api/items/x").status_code in (400, 422)


@pytest.mark.parametrize("make, needle", [
    (lambda p: p / "missing", "no such folder"),
    (lambda p: p, "no results.json"),
])
def test_eval_view_refuses_a_folder_that_is_not_a_run_in_one_line(tmp_path, make, needle):
    folder = make(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "assist.cli", "eval", "view", str(folder), "--no-open"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and needle in proc.stderr and str(folder) in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
