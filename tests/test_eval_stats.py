"""evals.stats against known values, and evals.report on hand-made samples.jsonl records."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from evals.report import (
    compare,
    load_results,
    markdown_table,
    plot_cost_frontier,
    plot_diversity,
    plot_maj_at_k,
    read_samples,
    rich_table,
    summarize,
    write_report,
    write_results,
)
from evals.stats import (
    bootstrap_ci,
    majority_at_k,
    majority_index,
    mcnemar,
    mean_pass_at_k,
    paired_bootstrap,
    pass_at_k,
    percentile,
    wilson,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# --- stats ---


@pytest.mark.parametrize(("s", "n", "lo", "hi"), [
    (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (1, 10, 0.0179, 0.4042),
])
def test_wilson_published_values(s: int, n: int, lo: float, hi: float) -> None:
    assert wilson(s, n) == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_edges() -> None:
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_mcnemar_exact_and_chi_square() -> None:
    a = [True] * 9 + [False] * 1 + [True] * 5
    b = [False] * 9 + [True] * 1 + [True] * 5
    assert mcnemar(a, b) == (1, 9, pytest.approx(0.021484375))  # 2 * 11 / 1024
    assert mcnemar(b, a)[2] == pytest.approx(0.021484375)
    assert mcnemar([True, False], [True, False]) == (0, 0, 1.0)
    # 25 discordant: still exact.
    _, _, p25 = mcnemar([False] * 5 + [True] * 20, [True] * 5 + [False] * 20)
    assert p25 == pytest.approx(2 * sum(math.comb(25, i) for i in range(6)) / 2**25)
    # 40 discordant: chi2 = (|10 - 30| - 1)^2 / 40 = 9.025, 1 df -> p = 0.002663.
    b01, b10, p = mcnemar([False] * 10 + [True] * 30, [True] * 10 + [False] * 30)
    assert (b01, b10) == (10, 30)
    assert p == pytest.approx(0.002663, abs=2e-6)


def test_pass_at_k_known_values() -> None:
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 4, 2) == 1.0  # fewer than k wrong: every draw of k has a right one
    assert pass_at_k(5, 0, 3) == 0.0
    assert mean_pass_at_k([[True, False, False, True, False], [False] * 5], 2) == pytest.approx(0.35)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_majority_ties_and_none() -> None:
    assert majority_index(["a", "b", "b"]) == 1
    assert majority_index(["b", "a", "a", "b"]) == 0  # tie: first seen wins
    assert majority_index(["b", "a", "a", "b"], tie="none") is None
    assert majority_index([None, None, "x"]) == 2  # None does not vote
    assert majority_index([None, None]) is None
    answers = [["1", "2", "2"], [None, "3", "4"], [None, None, None], ["7", None, "7"]]
    refs = ["2", "3", "0", "7"]
    assert majority_at_k(answers, refs, 1) == pytest.approx(0.25)  # only "7"
    assert majority_at_k(answers, refs, 2) == pytest.approx(0.5)  # "1"/"2" tie -> "1"; "3"; "7"
    assert majority_at_k(answers, refs, 3) == pytest.approx(0.75)  # "2"; "3" first of tie; "7"
    with pytest.raises(ValueError):
        majority_at_k(answers, refs, 4)


def test_bootstrap_reproducible_and_paired() -> None:
    vals = [0.0, 1.0, 1.0, 0.5, 0.0, 1.0, 1.0, 1.0]
    assert bootstrap_ci(vals, seed=3) == bootstrap_ci(vals, seed=3)
    lo, hi = bootstrap_ci(vals, seed=3)
    assert lo < sum(vals) / len(vals) < hi
    assert bootstrap_ci([0.5] * 4) == (0.5, 0.5)
    a = [0, 0, 1, 0, 1, 0, 0, 1, 0, 0]
    b = [1, 1, 1, 0, 1, 1, 0, 1, 1, 0]
    res = paired_bootstrap(a, b, seed=1)
    assert res.delta == pytest.approx(0.4)
    assert res.lo <= res.delta <= res.hi
    assert 0.0 <= res.p < 0.05
    assert paired_bootstrap(b, a, seed=1).delta == pytest.approx(-0.4)
    assert paired_bootstrap(a, a).p == 1.0
    with pytest.raises(ValueError):
        paired_bootstrap([1, 0], [1])


def test_percentile_linear() -> None:
    xs = [0.1 * i for i in range(1, 10)]
    assert percentile(xs, 50) == pytest.approx(0.5)
    assert percentile(xs, 95) == pytest.approx(0.86)
    assert percentile([3.0, 1.0], 25) == pytest.approx(1.5)


# --- report on hand-made records ---


def _run(correct: bool, answer: str | None, *, j: int = 0, error: str | None = None,
         finish: str = "stop", latency: float = 0.1) -> dict[str, Any]:
    return {"text": "...", "answer": answer, "correct": correct, "finish_reason": finish,
            "prompt_tokens": 100, "completion_tokens": 10 * (j + 1), "calls": 1,
            "latency_s": latency, "error": error}


def _rec(task: str, strategy: str, item: str, ref: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"task": task, "strategy": strategy, "item": item, "question": "q", "reference": ref,
            "runs": runs}


def _records() -> list[dict[str, Any]]:
    """arith: direct (2/4, one unparsable+truncated) and cot (4/4), K=1. gsm: sc, K=3."""
    recs = [_rec("arith", "direct", f"a{i}", "1",
                 [_run(c, None if i == 2 else "x", finish="length" if i == 2 else "stop",
                       latency=0.1 * (i + 1))])
            for i, c in enumerate([True, False, False, True])]
    recs += [_rec("arith", "cot", f"a{i}", "1", [_run(True, "1")]) for i in range(4)]
    lat = iter(0.1 * i for i in range(1, 10))
    gsm = [  # (reference, [(answer, correct, error)])
        ("1", [("1", True, None), (None, False, None), ("1", True, None)]),
        ("3", [("2", False, None), ("3", True, None), ("3", True, None)]),
        # The errored run claims correct=True: it must count as wrong and not vote.
        ("5", [("5", True, None), ("5", True, "timeout"), ("6", False, None)]),
    ]
    for i, (ref, runs) in enumerate(gsm):
        recs.append(_rec("gsm", "sc", f"g{i}", ref, [
            _run(c, a, j=j, error=e, latency=next(lat)) for j, (a, c, e) in enumerate(runs)]))
    return recs


@pytest.fixture(scope="module")
def summary() -> dict[str, Any]:
    return summarize(_records())


def test_summarize_k1(summary: dict[str, Any]) -> None:
    direct, cot = summary["arith"]["direct"], summary["arith"]["cot"]
    assert list(summary) == ["arith", "gsm"] and list(summary["arith"]) == ["direct", "cot"]
    assert direct["n"] == 4 and direct["runs_per_item"] == 1
    assert direct["accuracy"] == pytest.approx(0.5)
    assert direct["ci95"] == pytest.approx(list(wilson(2, 4)))
    assert direct["tokens_per_item"] == {"prompt": 100, "completion": 10, "total": 110}
    assert direct["calls_per_item"] == 1
    assert direct["latency_s"]["p50"] == pytest.approx(0.25)
    assert direct["unparsable_rate"] == direct["truncation_rate"] == pytest.approx(0.25)
    assert direct["error_rate"] == 0
    assert direct["maj_at_k"] is None and direct["pass_at_k"] is None
    assert direct["vs_baseline"] is None  # first strategy seen is the baseline
    vs = cot["vs_baseline"]
    assert vs["baseline"] == "direct" and vs["n"] == 4
    assert vs["delta"] == pytest.approx(0.5)
    assert vs["lo"] <= 0.5 <= vs["hi"]
    assert vs["mcnemar_p"] == pytest.approx(0.5)  # b01=2, b10=0: 2 * 1/4


def test_summarize_k3_and_errors(summary: dict[str, Any]) -> None:
    sc = summary["gsm"]["sc"]
    assert sc["runs_per_item"] == 3
    assert sc["accuracy"] == pytest.approx(5 / 9)  # 2/3, 2/3, 1/3 (errored run is wrong)
    assert sc["ci95"] == pytest.approx(list(bootstrap_ci([2 / 3, 2 / 3, 1 / 3])))
    assert sc["tokens_per_item"] == pytest.approx({"prompt": 100, "completion": 20, "total": 120})
    assert sc["latency_s"] == pytest.approx({"p50": 0.5, "p95": 0.86})
    assert sc["unparsable_rate"] == pytest.approx(1 / 9)  # the errored run is not unparsable
    assert sc["error_rate"] == pytest.approx(1 / 9)
    assert sc["maj_at_k"] == pytest.approx({1: 2 / 3, 2: 2 / 3, 3: 1.0})
    assert sc["pass_at_k"] == pytest.approx({1: 5 / 9, 2: 8 / 9, 3: 1.0})


def test_summarize_baseline_duplicates_and_empty_runs() -> None:
    recs = _records()
    s = summarize(recs, baseline="cot")
    assert s["arith"]["cot"]["vs_baseline"] is None
    assert s["arith"]["direct"]["vs_baseline"]["delta"] == pytest.approx(-0.5)
    assert s["gsm"]["sc"]["vs_baseline"] is None  # gsm has no cot: its first strategy is base
    # A re-run record replaces the earlier one; a record with no runs is one errored run.
    recs += [_rec("arith", "direct", "a1", "1", [_run(True, "1")]),
             _rec("arith", "direct", "a9", "1", [])]
    d = summarize(recs)["arith"]["direct"]
    assert d["n"] == 5 and d["accuracy"] == pytest.approx(3 / 5)
    assert d["error_rate"] == pytest.approx(1 / 5)
    assert d["vs_baseline"] is None and summarize(recs)["arith"]["cot"]["vs_baseline"]["n"] == 4


def test_read_samples(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _records()) + "\n\n")
    assert summarize(read_samples(path)) == summarize(_records())


def test_plots_write_png(tmp_path: Path, summary: dict[str, Any]) -> None:
    paths = [plot_maj_at_k(summary, tmp_path / "maj.png"),
             plot_cost_frontier(summary, tmp_path / "cost.png"),
             plot_diversity([{"model": m, "entropy": e, "distinct_1": 0.5, "distinct_2": 0.7,
                              "distinct_3": 0.8} for m, e in [("base", 3.0), ("sft", 2.0),
                                                              ("rlhf", 1.0)]],
                            tmp_path / "div.png")]
    for p in paths:
        assert p is not None and p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 1000
    assert plot_maj_at_k({"arith": summary["arith"]}, tmp_path / "none.png") is None


def test_markdown_and_report(tmp_path: Path, summary: dict[str, Any]) -> None:
    md = markdown_table(summary)
    assert "### arith (n=4 items, K=1 runs/item)" in md
    assert "| `direct` | 50.0% [15.0, 85.0] | (baseline) | 110 | 1.00 |" in md
    assert "| `cot` | 100.0% [51.0, 100.0] | +50.0 pp [" in md
    assert "| `sc` | 55.6% [" in md
    path = write_report(tmp_path / "out", summary, title="Evals", extra_sections=["## More\n\nx"])
    text = path.read_text()
    assert text.startswith("# Evals\n") and "## More" in text
    assert "![cost frontier](cost_frontier.png)" in text and "![maj@k](maj_at_k.png)" in text
    assert (tmp_path / "out" / "maj_at_k.png").read_bytes()[:8] == PNG_MAGIC


def test_rich_results_and_compare(tmp_path: Path, summary: dict[str, Any]) -> None:
    console = Console(record=True, width=250)
    console.print(rich_table(summary))
    text = console.export_text()
    assert "direct" in text and "55.6% [33.3, 66.7]" in text and "(baseline)" in text
    write_results(tmp_path / "run1", summary, {"seed": 0}, commit="abc")
    other = summarize(_records()[4:])  # arith cot + gsm only
    write_results(tmp_path / "run2", other, {"seed": 1})
    doc = load_results(tmp_path / "run1")
    assert doc["commit"] == "abc" and doc["config"] == {"seed": 0}
    assert doc["summary"] == summary  # int k keys restored
    assert json.loads((tmp_path / "run2" / "results.json").read_text())["commit"]
    table = compare([tmp_path / "run1", tmp_path / "run2"])
    assert [c.header for c in table.columns] == ["task", "strategy", "run1", "run2"]
    assert table.row_count == 3
    console = Console(record=True, width=200)
    console.print(table)
    out = console.export_text()
    assert "—" in out and "100.0% [51.0, 100.0]" in out
