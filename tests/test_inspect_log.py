"""``assist eval run --out DIR`` writes inspect-ai eval logs beside ``results.json`` (issue 12,
"Eval logs that existing viewers open"): ``inspect view --log-dir DIR`` lists the run,
``inspect_ai.log.read_eval_log`` reads every file, and each log's accuracy is
``results.json``'s. A scripted model behind a real ``assist serve`` app; no checkpoint."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from assist.cli.eval import main as eval_main
from assist.testing import FakeChatModel, running_server
from evals.tasks import ArithTask

pytest.importorskip("inspect_ai")

from inspect_ai.log import list_eval_logs, read_eval_log  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARITH = ArithTask()
ITEMS = ARITH.split("test", 6)
GOLD = {s.question: s.answer for s in ITEMS}
WRONG = {ITEMS[1].question, ITEMS[4].question}  # answered wrong on every run


def answer(messages: Any, kwargs: dict[str, Any]) -> str:
    question = next(str(m["content"]) for m in messages if m["role"] == "user")
    gold = next(a for q, a in GOLD.items() if question.startswith(q))
    if any(question.startswith(q) for q in WRONG):
        return "#### 123456"
    if ITEMS[2].question in question and kwargs.get("seed") == 1:
        return "#### 99999"  # run 1 of item 2 is wrong: epochs differ
    return f"#### {gold}"


def cli(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = eval_main(["eval", *args])
    return code, err.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from assist.server import EngineBackend, create_app

    out = tmp_path_factory.mktemp("inspect") / "ev"
    model = FakeChatModel(respond=answer, name="scripted")
    app = create_app(EngineBackend(model), owns_backend=False, names=["assistant"])
    with running_server(app) as url:
        code, err = cli("run", "--task", "arith", "--strategies", "direct,sc@3", "--samples",
                        "2", "--limit", "6", "--base-url", f"{url}/v1", "--out", str(out))
    assert code == 0, err
    return out


def logs_of(out: Path) -> dict[str, Any]:
    """strategy -> its log, read back with inspect's own reader."""
    files = sorted(out.glob("*.eval"))
    logs = [read_eval_log(str(f)) for f in files]
    return {log.eval.solver: log for log in logs}


def test_every_strategy_is_a_task_run_with_results_json_accuracy(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    summary = results["summary"]["arith"]
    logs = logs_of(run_dir)
    assert set(logs) == {"direct", "sc@3"}
    assert len(list_eval_logs(str(run_dir))) == 2
    for strategy, log in logs.items():
        assert log.status == "success" and log.eval.task == "arith"
        assert log.eval.config.epochs == 2 and log.eval.dataset.samples == 6
        (score,) = log.results.scores
        assert score.metrics["accuracy"].value == pytest.approx(summary[strategy]["accuracy"])
        # the number follows from the samples themselves, not only from results.json
        values = [s.scores["match"].value for s in log.samples]
        assert len(values) == 12 and set(values) <= {"C", "I"}
        assert values.count("C") / 12 == pytest.approx(summary[strategy]["accuracy"])
        assert sorted({s.epoch for s in log.samples}) == [1, 2]
    assert summary["direct"]["accuracy"] == pytest.approx(7 / 12)  # items 1, 4 wrong; 2 half


def test_samples_carry_the_trace_and_the_usage(run_dir):
    logs = logs_of(run_dir)
    records = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    for strategy, log in logs.items():
        mine = {r["item"]: r for r in records if r["strategy"] == strategy}
        tokens = 0
        for sample in log.samples:
            run = mine[sample.id]["runs"][sample.epoch - 1]
            assert sample.metadata["trace"] == run["trace"]
            assert sample.metadata["seed"] == run["seed"] == sample.epoch - 1
            assert sample.scores["match"].answer == run["answer"]
            (usage,) = sample.model_usage.values()
            assert (usage.input_tokens, usage.output_tokens) == (run["prompt_tokens"],
                                                                 run["completion_tokens"])
            tokens += usage.total_tokens
            assert sample.output.completion == run["text"]
        (total,) = log.stats.model_usage.values()
        assert total.total_tokens == tokens > 0
    votes = [s.metadata["trace"] for s in logs["sc@3"].samples]
    assert all(votes) and "vote" in json.dumps(votes).lower()


def test_results_json_records_provenance(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    identity = json.loads((run_dir / "identity.json").read_text())
    assert results["schema_version"] == 2
    assert results["dataset"]["hash"] == identity["dataset"]
    assert {"assist", "torch", "transformers"} <= set(results["packages"])
    assert results["started"] <= results["ended"]
    assert results["commit"] != "unknown"  # a source checkout: git describe
    log = next(iter(logs_of(run_dir).values()))
    assert log.eval.metadata["dataset_hash"] == identity["dataset"]
    assert log.eval.packages["assist"] == results["packages"]["assist"]


def test_compare_still_reads_the_folder(run_dir):
    code, err = cli("compare", str(run_dir), str(run_dir))
    assert code == 0, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_inspect_view_lists_the_run(run_dir, tmp_path):
    port = _free_port()
    inspect = Path(sys.executable).with_name("inspect")
    env = {k: v for k, v in os.environ.items() if k != "INSPECT_VIEW_AUTHORIZATION_TOKEN"}
    env.update(HOME=str(tmp_path), XDG_DATA_HOME=str(tmp_path / "data"))  # its own state
    proc = subprocess.Popen([str(inspect), "view", "--log-dir", str(run_dir), "--host",
                             "127.0.0.1", "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        listing, deadline = None, time.monotonic() + 90
        while listing is None:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "inspect view did not answer"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/logs", timeout=5) as r:
                    listing = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        names = sorted(Path(f["name"]).name for f in listing["files"])
        assert names == sorted(f.name for f in run_dir.glob("*.eval"))
        assert {f["task"] for f in listing["files"]} == {"arith-direct", "arith-sc@3"}
        name = listing["files"][0]["name"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/log-info/"
                                    f"{urllib.request.quote(name, safe='')}", timeout=30) as r:
            assert r.status == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)
        proc.stdout.close()


@pytest.mark.slow
def test_an_installed_package_knows_its_commit(tmp_path):
    """``pip install .`` builds a wheel in the checkout; ``setup.py`` writes the commit into
    it (``evals/_build_info.py``), and ``results.json``'s commit reads it back where there
    is no ``.git`` to ask."""
    import zipfile

    described = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"],
                               capture_output=True, text=True, cwd=REPO)
    if described.returncode:
        pytest.skip("not a git checkout")
    wheels = tmp_path / "wheels"
    had_build = (REPO / "build").exists()  # setuptools builds in the checkout, as pip install . does
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    if not had_build:
        shutil.rmtree(REPO / "build", ignore_errors=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("assist-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    assert not (REPO / "evals" / "_build_info.py").exists()  # the checkout is left alone
    # the commit at build time; the tree may change while the test runs (other work in it)
    recorded = (site / "evals" / "_build_info.py").read_text()
    assert described.stdout.strip().removesuffix("-dirty") in recorded
    probe = subprocess.run([sys.executable, "-c", "import evals.report as r; "
                            "print(r.__file__); print(r._commit())"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(site)})
    assert probe.returncode == 0, probe.stderr[-3000:]
    where, commit = probe.stdout.split()
    assert Path(where).is_relative_to(site)
    assert commit != "unknown" and commit in recorded


def test_errored_runs_score_wrong_and_a_rewrite_replaces_the_logs(run_dir, tmp_path):
    from evals.inspect_log import write_inspect_logs
    from evals.report import summarize

    records = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["strategy"] == "direct" and r["runs"][0]["correct"])
    first["runs"][0].update(error="UpstreamError: the upstream failed", text="", trace=[])
    summary = summarize(records)
    for _ in range(2):  # a resumed run writes its logs again: the old ones go
        paths = write_inspect_logs(tmp_path, records, summary, model="assist/x", epochs=2,
                                   started="2026-01-01T00:00:00+00:00",
                                   completed="2026-01-01T00:01:00+00:00")
    assert sorted(tmp_path.glob("*.eval")) == sorted(paths) and len(paths) == 2
    log = next(read_eval_log(str(p)) for p in paths if "direct" in p.name)
    sample = next(s for s in log.samples if s.id == first["item"] and s.epoch == 1)
    assert sample.scores["match"].value == "I" and "upstream" in sample.metadata["error"]
    accuracy = log.results.scores[0].metrics["accuracy"].value
    assert accuracy == pytest.approx(summary["arith"]["direct"]["accuracy"])
    assert accuracy == pytest.approx([s.scores["match"].value for s in log.samples].count("C") / 12)
