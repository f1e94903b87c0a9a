"""The playground and the results viewer in a real browser (headless Chromium, Playwright).

Against the trained ``test`` checkpoint: the playground runs two strategies side by side
(both columns stream in, the self-consistency column shows its samples and tally while it
votes and its votes add up to its k samples, a bad spec shows
the parser's error naming the token, another seed adds to each column's history), asks for
the API key when the server has one, and the viewer filters a real eval run's items and
draws one item's trace. Each test saves screenshots at 1280 and 400 px (tests/browser.py).
Without Chromium or Playwright they skip, saying which is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from assist.engine import TorchEngine
from assist.server import EngineBackend, create_app, load_run, viewer_app
from assist.testing import running_server
from tests.browser import browser_or_skip, screenshot, watch_errors
from tests.conftest import REPO

pytestmark = pytest.mark.slow

TIMEOUT = 120_000  # ms: a strategy on the CPU, with other tests sharing it


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with browser_or_skip() as b:
        yield b


@pytest.fixture(scope="module")
def engine(trained_run) -> Iterator[TorchEngine]:
    run, _ = trained_run
    eng = TorchEngine(run / "rlhf", max_batch=16, name="assistant")
    yield eng
    eng.close()


def _page(browser: Any, url: str) -> tuple[Any, list[str]]:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT)
    errors = watch_errors(page)
    page.goto(url + "/")
    return page, errors


def test_playground_runs_two_strategies_side_by_side(browser, engine):
    app = create_app(EngineBackend(engine), owns_backend=False, strategy_aliases=["cot", "sc@8", "tools"])
    with running_server(app) as url:
        page, errors = _page(browser, url)
        page.wait_for_selector("#aliases .alias")
        assert page.locator("#aliases .alias").count() == 4  # the plain model and three aliases
        page.uncheck("#aliases input[data-spec='sc@8']")  # cot and sc@8 come chosen; keep cot

        # A typed spec is checked by the server's parser: the error names the bad token.
        page.fill("#spec", "sc@x")
        page.wait_for_selector("#spec-status.spec-error")
        assert "@x" in page.inner_text("#spec-status")
        assert page.is_disabled("#add-spec")
        page.fill("#spec", "sc@3:t=0.9")
        page.wait_for_selector("#spec-status.good")
        assert "up to 3 model calls" in page.inner_text("#spec-status")
        page.click("#add-spec")

        page.click("#examples .example >> nth=0")  # an arith question from the task world
        assert page.input_value("#prompt").endswith("have now?")
        assert "arith-test-0 · gold answer" in page.inner_text("#gold")
        page.fill("#max-tokens", "96")
        page.fill("#seed", "3")
        page.click("#run")
        page.wait_for_selector("#run-status:text-is('done')")

        columns = page.locator("#columns .column")
        assert [columns.nth(i).get_attribute("data-spec") for i in range(columns.count())] == ["cot", "sc@3:t=0.9"]
        for i in range(2):
            col = columns.nth(i)
            assert col.locator(".col-status").inner_text().startswith("done"), col.inner_text()
            assert col.locator(".answer").inner_text().strip()
            assert col.locator(".stat-tokens").inner_text() != "—"
            assert float(col.locator(".stat-latency").inner_text().removesuffix(" s")) > 0
        assert columns.nth(0).locator(".stat-calls").inner_text() == "1"
        # Both strategies streamed: cot's answer came in pieces, and sc showed its samples
        # and tally while it voted (one progress event per sample), before its answer.
        assert int(columns.nth(0).get_attribute("data-updates")) > 1
        assert columns.nth(1).get_attribute("data-progress") == "3"
        assert columns.nth(1).get_attribute("data-last-progress").startswith("sc: samples 3 of 3 · tally ")
        assert int(columns.nth(1).get_attribute("data-updates")) >= 1
        votes = columns.nth(1).locator(".votes")
        assert votes.get_attribute("data-samples") == "3"
        bars = votes.locator(".vote-row")
        assert sum(int(bars.nth(i).get_attribute("data-votes")) for i in range(bars.count())) == 3

        page.click("#again")  # another seed: each column's history grows to two runs
        page.wait_for_selector("#run-status:text-is('done')")
        assert page.input_value("#seed") == "4"
        for i in range(2):
            assert columns.nth(i).locator(".history .tag").count() == 2
            assert columns.nth(i).locator(".stability").get_attribute("data-runs") == "2"
        screenshot(page, "playground")
        assert all("status of 400" in e for e in errors), errors  # the bad spec's check, nothing else


def test_playground_asks_for_the_api_key(browser, engine):
    app = create_app(EngineBackend(engine), owns_backend=False, api_key="sekrit", strategy_aliases=["cot"])
    with running_server(app) as url:
        page, errors = _page(browser, url)  # the page itself is served without the key
        page.wait_for_selector("#key-box:not([hidden])")
        assert page.locator("#aliases .alias").count() == 0
        page.fill("#key", "wrong")
        page.press("#key", "Enter")
        page.wait_for_selector("#key-status:has-text('refused')")
        page.fill("#key", "sekrit")
        page.press("#key", "Enter")
        page.wait_for_selector("#aliases .alias")
        assert page.is_hidden("#key-box")
        assert page.locator("#aliases .alias").count() == 2
        assert page.evaluate("localStorage.length + sessionStorage.length") == 0 and page.context.cookies() == []

        # The plain model streams into its column, with the key (cot, chosen by default, beside it).
        page.check("#aliases input[data-spec='']")
        page.fill("#prompt", "Mia has 5 apples and buys 3 more. How many apples does Mia have?")
        page.fill("#max-tokens", "24")
        page.click("#run")
        page.wait_for_selector("#run-status:text-is('done')")
        plain = page.locator("#columns .column[data-spec='']")
        assert plain.locator(".col-status").inner_text().startswith("done · first token")
        assert plain.locator(".answer").inner_text().strip()
        prompt_tokens, completion_tokens = map(int, plain.locator(".stat-tokens").inner_text().split(" / "))
        assert prompt_tokens > 0 and 0 < completion_tokens <= 24  # the stream's usage, under max tokens
        assert plain.locator(".stat-calls").inner_text() == "1"
        assert all("401" in e for e in errors), errors  # the refused calls, nothing else


def _eval_run(model: Path, out: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "assist.cli", "eval", "run", "--task", "arith", "--strategies",
                           "cot,sc@2", "--model", str(model), "--limit", "4", "--max-tokens", "96",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_viewer_filters_items_and_draws_a_trace(browser, trained_run, tmp_path):
    run, _ = trained_run
    out = _eval_run(run / "rlhf", tmp_path / "arith")
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    wrong = {r["item"] for r in records if not all(x["correct"] for x in r["runs"])}
    with running_server(viewer_app([load_run(out)])) as url:
        page, errors = _page(browser, url)
        page.wait_for_selector("#items .item")
        assert page.inner_text("#count") == "4 of 4 items"
        assert page.locator("table.results tr[data-strategy]").count() == 2
        assert page.locator("#frontier svg .point").count() == 2  # one hoverable point per strategy
        # The last point is drawn on top: two strategies of a tiny eval may sit nearly at one place.
        top = page.locator("#frontier svg .point").last
        top.hover()
        assert page.is_visible(".tooltip") and page.inner_text(".tooltip") == top.get_attribute("data-tip")
        assert page.locator("#majk svg polyline[data-strategy='sc@2']").count() == 2  # maj@k and pass@k from the votes

        page.check("#f-wrong")
        assert page.inner_text("#count") == f"{len(wrong)} of 4 items"
        page.uncheck("#f-wrong")
        page.fill("#f-id", "arith-test-2")
        assert page.inner_text("#count") == "1 of 4 items"
        page.fill("#f-id", "")
        question = next(r["question"] for r in records if r["item"] == "arith-test-1")
        page.fill("#f-text", question.split(".")[1].strip())  # "X first finds 49 more", say
        assert page.locator("#items .item[data-id='arith-test-1']").count() == 1
        page.fill("#f-text", "")

        page.click("#items .item[data-id='arith-test-1']")
        detail = page.wait_for_selector(".item-detail[data-id='arith-test-1']")
        assert detail.query_selector(".question").inner_text() == question
        gold = next(r["reference"] for r in records if r["item"] == "arith-test-1")
        assert page.inner_text(".item-detail .gold") == str(gold)
        assert page.locator(".item-detail .strategy").count() == 2
        votes = page.locator(".item-detail .strategy[data-strategy='sc@2'] .votes")
        assert votes.get_attribute("data-samples") == "2"
        screenshot(page, "viewer")
        assert not errors, errors


# Every step kind a strategy records, as the strategies write them (strategies/*.py).
EVERY_STEP = [
    {"step": "call", "n": 1, "temperature": 0.0, "usage": {"prompt_tokens": 9, "completion_tokens": 4},
     "texts": ["first try <b>not bold</b>\n#### 6"]},
    {"step": "call", "n": 1, "temperature": 0.0, "usage": {"prompt_tokens": 20, "completion_tokens": 6},
     "texts": ["Corrected: 7"]},
    {"step": "reflect", "round": 1, "check": "Corrected: 7", "stands": False, "answer_before": "6", "answer_after": "7"},
    {"step": "tool", "turn": 0, "id": "c1", "name": "calculator", "arguments": {"expression": "3+4"},
     "result": "7", "error": None, "seconds": 0.001},
    {"step": "tool", "turn": 1, "id": "c2", "name": "calculator", "arguments": {"expression": "3/0"},
     "result": None, "error": "division by zero", "seconds": 0.001},
    {"step": "retrieve", "query": "kites", "mode": "hybrid",
     "passages": [{"id": "kb-1", "score": 0.9}, {"id": "kb-2", "score": 0.4}]},
    {"step": "citations", "cited": ["kb-1", "kb-9"], "valid": ["kb-1"], "invalid": ["kb-9"]},
    {"step": "score", "scores": [0.1, 0.8, -0.2], "answers": ["6", "7", None], "chosen": 1},
    {"step": "validate", "attempt": 1, "ok": False, "problem": "is not JSON"},
    {"step": "novel", "detail": 1},
]


def _hand_written_run(folder: Path) -> Path:
    from evals.report import summarize, write_results

    records = [{"task": "arith", "strategy": "reflect", "item": "arith-test-0", "question": "3 + 4?",
                "reference": "7", "runs": [{"text": "#### 7", "answer": "7", "correct": True, "prompt_tokens": 29,
                                            "completion_tokens": 10, "calls": 2, "latency_s": 0.2, "error": None,
                                            "seed": 0, "trace": EVERY_STEP}]}]
    folder.mkdir()
    (folder / "samples.jsonl").write_text(json.dumps(records[0]) + "\n")
    write_results(folder, summarize(records), {"task": "arith"}, commit="test")
    return folder


def test_trace_drawing_shows_every_step_kind(browser, tmp_path):
    run = _hand_written_run(tmp_path / "steps")
    with running_server(viewer_app([load_run(run)])) as url:
        page, errors = _page(browser, url)
        page.click("#items .item[data-id='arith-test-0']")
        trace = page.wait_for_selector(".item-detail .trace")
        kinds = [el.get_attribute("data-step") for el in trace.query_selector_all(":scope > .step")]
        assert kinds == [s["step"] if s["step"] in {"call", "reflect", "tool", "retrieve", "citations", "score",
                                                    "validate"} else "other" for s in EVERY_STEP]
        # Model text is text: the <b> in a reply is shown, not rendered.
        assert trace.query_selector(".step-call pre").text_content().startswith("first try <b>not bold</b>")
        assert not trace.query_selector(".step-call b")
        flow = trace.query_selector(".step-reflect .flow").inner_text()
        assert flow.index("attempt → 6") < flow.index("critique") < flow.index("revision → 7")
        assert "first try" in trace.query_selector(".step-reflect .box").inner_text()  # the attempt it read
        tools = trace.query_selector_all(".step-tool")
        assert 'calculator({"expression":"3+4"})' in tools[0].inner_text() and "→ 7" in tools[0].inner_text()
        assert "error: division by zero" in tools[1].inner_text()
        passages = trace.query_selector_all(".passage-row")
        assert [p.get_attribute("data-passage") for p in passages] == ["kb-1", "kb-2"]
        assert "0.9000" in passages[0].inner_text()
        cites = {c.inner_text().split()[0]: c.get_attribute("data-valid")
                 for c in trace.query_selector_all(".step-citations .tag")}
        assert cites == {"kb-1": "true", "kb-9": "false"}
        rows = trace.query_selector_all(".score-row")
        assert [r.get_attribute("data-candidate") for r in rows] == ["0", "1", "2"]
        assert "chosen" in rows[1].inner_text() and "winner" in rows[1].get_attribute("class")
        assert "is not JSON" in trace.query_selector(".step-validate").inner_text()
        assert '"detail":1' in trace.query_selector(".step-other").inner_text()  # an unknown step is not hidden
        assert not errors, errors
