"""The eval harness: its records, concurrency, resume, errors and seeds against scripted
models (fast), then ``assist eval`` end to end on the trained ``test`` checkpoint, in-process
and over HTTP, and one strategy giving the same answers through all three front doors."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
from rich.console import Console

import strategies
from assist.testing import FakeChatModel, running_server
from assist.types import ChatCompletion, Choice, Message, Usage
from evals._config import EvalConfig, EvalError, build_task, check, split_specs
from evals.harness import SAMPLES, evaluate, prepare_strategies, read_records, seeded
from evals.tasks import ArithTask, FactsTask

REPO = Path(__file__).resolve().parents[1]
EVAL = [sys.executable, "-m", "assist.cli", "eval"]
ARITH = ArithTask()


def eval_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EVAL, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@dataclass
class Scripted:
    """An async ChatModel: ``answer(question, kwargs) -> (text, finish_reason)``; it sleeps
    ``delay`` per call and records the peak number of calls in flight."""

    answer: Callable[[str, dict[str, Any]], tuple[str, str]]
    delay: float = 0.0
    name: str = "scripted"
    supports_n: bool = True
    calls: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    peak: int = 0

    async def chat(self, messages: Any, **kwargs: Any) -> ChatCompletion:
        question = str(messages[-1]["content"])
        self.calls.append({"question": question, **kwargs})
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        choices = []
        for i in range(int(kwargs.get("n", 1))):
            text, reason = self.answer(question, {**kwargs, "index": i})
            choices.append(Choice(index=i, message=Message(role="assistant", content=text),
                                  finish_reason=reason))
        return ChatCompletion(model=self.name, choices=choices,
                              usage=Usage(prompt_tokens=10, completion_tokens=3 * len(choices),
                                          total_tokens=10 + 3 * len(choices)))


def gold(question: str) -> str:
    return next(s.answer for s in ARITH.split("test", 50) if question.startswith(s.question))


def run_eval(model: Any, specs: list[str], out: Path, n: int = 4, **kw: Any) -> list[dict]:
    kw.setdefault("progress", False)
    return asyncio.run(evaluate(model, ARITH, {s: strategies.parse(s) for s in specs},
                                ARITH.split("test", n), out=out, **kw))


# -- records, concurrency, resume, errors, seeds ------------------------------------------------
def test_records_follow_the_contract(tmp_path):
    # Even items right, odd items wrong, scored by the task (not the strategy's extraction).
    def answer(q: str, kw: dict) -> tuple[str, str]:
        idx = next(i for i, s in enumerate(ARITH.split("test", 4)) if q.startswith(s.question))
        return (f"work\n#### {gold(q)}" if idx % 2 == 0 else "#### 999"), "stop"

    records = run_eval(Scripted(answer), ["direct", "sc@3"], tmp_path, samples=2)
    lines = [json.loads(x) for x in (tmp_path / SAMPLES).read_text().splitlines()]
    assert len(records) == len(lines) == 8 and {r["item"] for r in lines} == {r["item"] for r in records}
    rec = records[0]
    assert set(rec) == {"task", "strategy", "item", "question", "reference", "runs"}
    assert (rec["task"], rec["strategy"], rec["item"]) == ("arith", "direct", "arith-test-0")
    assert len(rec["runs"]) == 2
    run = rec["runs"][0]
    assert {"text", "answer", "correct", "finish_reason", "prompt_tokens", "completion_tokens",
            "calls", "latency_s", "error", "trace"} <= set(run)
    assert run["correct"] is True and run["answer"] == rec["reference"] and run["error"] is None
    assert run["finish_reason"] == "stop" and run["calls"] == 1 and run["prompt_tokens"] == 10
    assert run["trace"][0]["step"] == "call"
    assert [r["runs"][0]["correct"] for r in records if r["strategy"] == "sc@3"] == [True, False] * 2
    assert records[3]["runs"][0]["completion_tokens"] == 9  # sc@3: one n=3 call


def test_concurrency_is_bounded(tmp_path):
    model = Scripted(lambda q, kw: ("#### 1", "stop"), delay=0.02)
    run_eval(model, ["direct", "cot"], tmp_path, n=6, samples=2, concurrency=3)
    assert len(model.calls) == 24 and model.peak == 3


def test_resume_after_a_kill_skips_finished_items(tmp_path):
    model = Scripted(lambda q, kw: (f"#### {gold(q)}", "stop"))
    run_eval(model, ["direct"], tmp_path, n=5)
    lines = (tmp_path / SAMPLES).read_text().splitlines()
    # Killed mid-write: two whole records, then half of the third with no newline.
    (tmp_path / SAMPLES).write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:40])
    with pytest.raises(EvalError, match="--resume"):
        run_eval(model, ["direct"], tmp_path, n=5)
    again = Scripted(model.answer)
    records = run_eval(again, ["direct"], tmp_path, n=5, resume=True)
    assert len(again.calls) == 3  # items 2..4 only
    on_disk = [json.loads(x) for x in (tmp_path / SAMPLES).read_text().splitlines()]
    assert sorted(r["item"] for r in on_disk) == [f"arith-test-{i}" for i in range(5)]
    assert [r["item"] for r in records] == [f"arith-test-{i}" for i in range(5)]
    assert all(r["runs"][0]["correct"] for r in records)


def test_a_bad_line_before_the_end_is_an_error_naming_it(tmp_path):
    path = tmp_path / SAMPLES
    path.write_text('{"task": "a", "strategy": "b", "item": "c", "runs": []}\nnot json\n{}\n')
    with pytest.raises(EvalError, match=r"samples.jsonl:2"):
        read_records(path)


def test_strategy_errors_are_recorded_not_raised(tmp_path):
    def answer(q: str, kw: dict) -> tuple[str, str]:
        if q.startswith(ARITH.split("test", 2)[1].question):
            raise ConnectionError("upstream went away")
        return f"#### {gold(q)}", "stop"

    records = run_eval(Scripted(answer), ["cot"], tmp_path, n=3)
    bad = records[1]["runs"][0]
    assert bad["error"] == "ConnectionError: upstream went away" and bad["correct"] is False
    assert bad["finish_reason"] == "error" and bad["answer"] is None
    assert records[0]["runs"][0]["correct"] and records[2]["runs"][0]["correct"]


def test_many_runs_cut_at_max_tokens_warn(tmp_path):
    def cut(q: str, kw: dict) -> tuple[str, str]:  # 1 run in 4 stopped at the limit: 25%
        return ("First Mia buys", "length") if q.startswith(ARITH.split("test")[0].question) \
            else ("#### 1", "stop")

    loud, quiet = (Console(file=io.StringIO(), width=200) for _ in range(2))
    records = run_eval(Scripted(cut), ["cot"], tmp_path / "a", console=loud)
    assert records[0]["runs"][0]["finish_reason"] == "length"
    assert "1/4 runs (25%) stopped at their token limit (cot)" in loud.file.getvalue()
    run_eval(Scripted(cut), ["cot"], tmp_path / "b", n=24, console=quiet)  # 1/24 is under 5%
    assert "token limit" not in quiet.file.getvalue()


def test_runs_are_seeded_apart_and_reproducible(tmp_path):
    def answer(q: str, kw: dict) -> tuple[str, str]:  # a "sampler" that depends only on the seed
        return f"#### {(kw['seed'] + kw['index']) % 4}", "stop"

    def texts(out: Path) -> list[list[str]]:
        model = Scripted(answer)
        records = run_eval(model, ["sc@2"], out, n=2, samples=3, seed=5)
        assert sorted(c["seed"] for c in model.calls) == [5, 5, 6, 6, 7, 7]
        assert [r["seed"] for r in records[0]["runs"]] == [5, 6, 7]
        return [[r["text"] for r in rec["runs"]] for rec in records]

    first = texts(tmp_path / "a")
    assert len(set(first[0])) == 3  # the three runs differ
    assert texts(tmp_path / "b") == first  # and come back the same
    s = seeded(strategies.parse("sc@4:t=0.5(cot)"), 9)
    assert s.seed == 9 and s.spec == "sc@4:t=0.5(cot)" and s.inner.temperature == 0.5


# -- configuration and setup ---------------------------------------------------------------------
def test_strategy_lists_split_between_specs_not_options():
    assert split_specs("direct,sc@8:t=0.7,seed=1,cot, bon@4(sc@2:t=1,seed=3)") == [
        "direct", "sc@8:t=0.7,seed=1", "cot", "bon@4(sc@2:t=1,seed=3)"]


def test_setup_fills_stores_reward_models_and_max_tokens(tmp_path, monkeypatch):
    monkeypatch.delenv("ASSIST_RAG_STORE", raising=False)
    monkeypatch.delenv("ASSIST_REWARD_MODEL", raising=False)
    for stage in ("rlhf", "rm"):
        (tmp_path / "run" / stage).mkdir(parents=True)
        (tmp_path / "run" / stage / "config.json").write_text("{}")
    parsed = {s: strategies.parse(s) for s in ("bon@2", "sc@2(rag)", "direct")}
    facts = FactsTask()
    with contextlib.ExitStack() as stack:
        ready = prepare_strategies(parsed, facts, out=tmp_path, stack=stack, max_tokens=77,
                                   model_path=tmp_path / "run" / "rlhf", embedder="hashing")
        assert ready["bon@2"].rm == str(tmp_path / "run" / "rm") and parsed["bon@2"].rm is None
        assert ready["sc@2(rag)"].inner.max_tokens == 77 and ready["direct"].max_tokens == 77
        assert (tmp_path / "facts.sqlite").is_file()
        sample = next(s for s in facts.split("test", 40) if not s.metadata["seen"])
        model = FakeChatModel(replies=["#### x"])
        result = ready["sc@2(rag)"].run_sync(model, sample.question)
        retrieved = next(e for e in result.trace if e.get("step") == "retrieve")
        assert sample.metadata["entity"] in [p["id"] for p in retrieved["passages"]]
        with pytest.raises(EvalError, match="rag needs a document store"):
            prepare_strategies({"rag": strategies.parse("rag")}, ARITH, out=tmp_path, stack=stack)
        with pytest.raises(EvalError, match="bon needs a reward model"):
            prepare_strategies({"bon": strategies.parse("bon")}, ARITH, out=tmp_path, stack=stack)


def test_generated_tasks_use_the_settings_the_model_was_trained_on(tmp_path):
    (tmp_path / "run" / "rlhf").mkdir(parents=True)
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"config": {
        "facts": {"n_entities": 60}, "arith": {"max_operand": 20, "max_value": 100,
                                               "ops": ["+", "-", "*"], "future_knob": 1}}}))
    model = str(tmp_path / "run" / "rlhf")
    assert len(build_task(EvalConfig(task="facts", model=model)).entities) == 60
    arith = build_task(EvalConfig(task="arith", model=model))
    assert arith.config.max_operand == 20 and arith.config.ops == ("+", "-", "*")
    assert build_task(EvalConfig(task="arith", base_url="http://h")).config == ARITH.config
    with pytest.raises(EvalError, match="metrics.json"):
        build_task(EvalConfig(task="arith", task_config=str(tmp_path / "none.json")))


def test_custom_jsonl_tasks_take_any_extractor(tmp_path):
    path = tmp_path / "quiz.jsonl"
    path.write_text('{"question": "Pick one", "answer": "B"}\n{"question": oops\n'
                    '{"question": "Again", "answer": "C"}\n')
    with pytest.raises(EvalError, match=r"quiz.jsonl:2"):
        build_task(EvalConfig(task=str(path)))
    task = build_task(EvalConfig(task=str(path), extractor="letter", on_bad_line="skip"))
    assert [s.answer for s in task.split("test")] == ["B", "C"] and len(task.problems) == 1
    assert task.score(task.split("test")[0], "The answer is (B).").correct


# -- the CLI on the trained checkpoint -------------------------------------------------------------
def test_cli_run_then_resume_does_no_new_work(trained_run, tmp_path):
    run, _ = trained_run
    out = tmp_path / "ev"
    args = ["run", "--task", "arith", "--strategies", "direct,cot,sc@2", "--model",
            str(run / "rlhf"), "--limit", "6", "--out", str(out)]
    proc = eval_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in (SAMPLES, "results.json", "report.md", "cost_frontier.png", "maj_at_k.png"):
        assert (out / name).is_file() or name == "maj_at_k.png"
    results = json.loads((out / "results.json").read_text())
    assert list(results["summary"]["arith"]) == ["direct", "cot", "sc@2"]
    assert results["summary"]["arith"]["cot"]["n"] == 6 and results["config"]["samples"] == 1
    before = (out / SAMPLES).read_bytes()
    assert len(before.splitlines()) == 18
    proc = eval_cli(*args, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / SAMPLES).read_bytes() == before


@pytest.mark.parametrize("args, needle", [
    (["--strategies", "direct,bogus@3"], "unknown strategy 'bogus'"),
    (["--task", "missing.jsonl"], "missing.jsonl: no such task file"),
    (["--base-url", "http://127.0.0.1:9/v1"], "cannot list the server's models"),
])
def test_cli_user_errors_are_one_line(args, needle, tmp_path):
    model = ["--model", str(tmp_path)] if "--base-url" not in args else []
    (tmp_path / "config.json").write_text("{}")  # passes the flag check; never loaded
    proc = eval_cli("run", *model, *args, "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / SAMPLES).exists()


def test_one_strategy_answers_alike_from_python_http_and_the_harness(trained_run, tmp_path):
    from assist.engine import TorchEngine
    from assist.server import EngineBackend, create_app

    run, _ = trained_run
    items = ARITH.split("test", 3)
    specs = ["cot", "sc@3:seed=1"]
    engine = TorchEngine(run / "rlhf", max_batch=8, name="assistant")
    try:

        async def python_side() -> dict[str, list[str]]:  # one request at a time, like HTTP
            out: dict[str, list[str]] = {}
            for spec in specs:
                strategy = strategies.parse(spec)
                out[spec] = [(await strategy.run(engine, s.question)).text for s in items]
            return out

        direct = asyncio.run(python_side())
        app = create_app(EngineBackend(engine), owns_backend=False, names=["assistant"])
        with running_server(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            http = {spec: [client.chat.completions.create(
                model=f"{spec}::assistant", messages=[{"role": "user", "content": s.question}],
            ).choices[0].message.content for s in items] for spec in specs}
            out = tmp_path / "remote"
            proc = eval_cli("run", "--task", "arith", "--strategies", "cot,sc@3", "--seed", "1",
                            "--base-url", url + "/v1", "--limit", "3", "--concurrency", "1",
                            "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-2000:]
    finally:
        engine.close()
    records = sorted(map(json.loads, (out / SAMPLES).read_text().splitlines()),
                     key=lambda r: int(r["item"].rsplit("-", 1)[1]))
    harness = {spec: [r["runs"][0]["text"] for r in records if r["strategy"] == spec.split(":")[0]]
               for spec in specs}
    assert direct == http == harness
    assert json.loads((out / "results.json").read_text())["config"]["base_url"] == url + "/v1"


def test_compile_is_refused_where_there_is_no_torch_engine_to_compile(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    for cfg in (EvalConfig(base_url="http://h/v1", compile=True),
                EvalConfig(model=str(tmp_path), engine="vllm", compile=True)):
        with pytest.raises(EvalError, match="--compile is for the torch engine"):
            check(cfg)
    assert check(EvalConfig(model=str(tmp_path), compile=True)) == ["direct", "cot"]


def test_shorthand_flags_mean_run():
    from assist.cli._flags import Parser, from_args
    from assist.cli.eval import _run, add_parser

    parser = Parser(prog="assist")
    add_parser(parser.add_subparsers(dest="command", parser_class=Parser))
    for argv in (["eval", "--task", "facts", "--limit", "3"],
                 ["eval", "run", "--task", "facts", "--limit", "3"]):
        args = parser.parse_args(argv)
        assert args.func is _run
        assert from_args(EvalConfig, args) == EvalConfig(task="facts", limit=3)


def test_diversity_matches_the_training_pipeline(trained_run, tmp_path, capsys):
    from assist.cli.eval import main

    run, _ = trained_run
    metrics = json.loads((run / "metrics.json").read_text())
    cfg = metrics["config"]["diversity"]  # what the pipeline sampled for its own figures
    assert main(["eval", "diversity", "--models", str(run / "rlhf"), "--prompts",
                 str(cfg["prompts"]), "--k", str(cfg["k"]), "--max-new-tokens",
                 str(cfg["max_new_tokens"]), "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "diversity.json").read_text())["rows"][0]
    expected = metrics["stages"]["rl"]["diversity"]
    assert row["model"] == "rlhf" and row["samples"] == expected["samples"]
    assert row["entropy"] == pytest.approx(expected["mean_token_entropy"], abs=1e-3)
    for n in (1, 2, 3):
        assert row[f"distinct_{n}"] == pytest.approx(expected[f"ead_distinct_{n}"], abs=1e-3)
    assert (tmp_path / "diversity.png").is_file() and "rlhf" in capsys.readouterr().out
