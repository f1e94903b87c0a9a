"""Strategy benchmarks (issue: strategies). Prints figures, writes bench/results/strategies.json.

    python bench/strategies.py [--run runs/tiny] [--items 200] [--validation 50]

On the run's RLHF assistant, held-out items only:
1. The sampling temperature of self-consistency and best-of-N, chosen on the *validation*
   split (sc@8 at each candidate temperature), never on test.
2. Accuracy and tokens per item on `arith` test for direct, cot, sc@4/8/16, bon@8/16,
   reflect, tools and one composition (sc@4(tools)); on `facts` test for closed-book
   direct and rag, split by entities seen in training and unseen ones.
3. Wall time of sc@16 (one n=16 call) against one cot call, item by item.
Goals (the talk's claims in miniature): sc@16 ≥ cot + 10 points; tools ≥ 98% on arith;
rag ≥ 90% on unseen facts while closed-book ≤ 30%; bon@16 ≥ sc@16; reflect > cot;
sc@16 wall ≤ 1.5× cot.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import assist  # noqa: E402
from bench._common import write  # noqa: E402
from evals._config import EvalConfig, build_task  # noqa: E402
from evals.harness import evaluate, parse_strategies, prepare_strategies  # noqa: E402
from evals.report import summarize  # noqa: E402

TEMPERATURES = (0.3, 0.5, 0.7, 1.0)


async def _run(model: Any, task: Any, specs: list[str], items: list, out: Path, run: Path,
               concurrency: int = 16) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        ready = prepare_strategies(parse_strategies(specs), task, out=out, stack=stack,
                                   model_path=run / "rlhf", embedder="auto")
        return await evaluate(model, task, ready, items, out=out, concurrency=concurrency, progress=True)


def _acc(summary: dict[str, Any], task: str, spec: str) -> float:
    return float(summary[task][spec]["accuracy"])


async def choose_temperature(model: Any, arith: Any, n: int, out: Path, run: Path) -> tuple[float, dict[float, float]]:
    """(the sampling temperature, sc@8's accuracy at each candidate): chosen on ``n``
    *validation* items, never on test; ties go to the lower temperature."""
    val = arith.split("validation", n)
    sweep = [f"sc@8:t={t}" for t in TEMPERATURES]
    val_summary = summarize(await _run(model, arith, sweep, val, out, run))
    by_t = {t: _acc(val_summary, "arith", f"sc@8:t={t}") for t in TEMPERATURES}
    best = max(TEMPERATURES, key=lambda t: (by_t[t], -t))
    print("validation sc@8 accuracy by temperature:", by_t, "→ t =", best, flush=True)
    return best, by_t


async def _wall(model: Any, items: list, spec: str) -> float:
    """Mean wall seconds per item of ``spec`` run alone, item after item."""
    import strategies

    strategy = strategies.parse(spec)
    t0 = time.perf_counter()
    for item in items:
        await strategy.run(model, item.question)
    return (time.perf_counter() - t0) / len(items)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    run = Path(args.run)
    model = assist.load(run / "rlhf")
    scratch = Path(tempfile.mkdtemp(prefix="bench-strategies-"))
    # The run's own task settings (metrics.json), as `assist eval --model` builds them.
    arith = build_task(EvalConfig(task="arith", model=str(run / "rlhf")))
    facts = build_task(EvalConfig(task="facts", model=str(run / "rlhf")))
    figures: dict[str, Any] = {"run": str(run), "items": args.items, "validation_items": args.validation}
    try:
        # 1. temperature on validation
        t_best, by_t = await choose_temperature(model, arith, args.validation, scratch / "val", run)
        figures["validation_sc8_accuracy_by_temperature"] = by_t
        figures["chosen_temperature"] = t_best

        # 2. test
        specs = ["direct", "cot", f"sc@4:t={t_best}", f"sc@8:t={t_best}", f"sc@16:t={t_best}",
                 f"bon@8:t={t_best}", f"bon@16:t={t_best}", "reflect", "tools", f"sc@4:t={t_best}(tools)"]
        test = arith.split("test", args.items)
        summary = summarize(await _run(model, arith, specs, test, scratch / "arith", run))
        figures["arith"] = {s: {"accuracy": _acc(summary, "arith", s),
                                "ci95": summary["arith"][s]["ci95"],
                                "tokens_per_item": summary["arith"][s]["tokens_per_item"]["total"],
                                "calls_per_item": summary["arith"][s]["calls_per_item"]} for s in specs}
        facts_items = facts.split("test", args.items)
        records = await _run(model, facts, ["direct", "rag"], facts_items, scratch / "facts", run)
        seen = {s.id: bool(s.metadata.get("seen")) for s in facts_items}
        figures["facts"] = {}
        for spec in ("direct", "rag"):
            for group, want in (("seen", True), ("unseen", False)):
                rows = [r for r in records if r["strategy"] == spec and seen.get(r["item"]) is want]
                if rows:
                    acc = sum(r["runs"][0]["correct"] for r in rows) / len(rows)
                    figures["facts"][f"{spec}/{group}"] = {"accuracy": acc, "n": len(rows)}
        print("arith:", {s: round(v["accuracy"], 3) for s, v in figures["arith"].items()}, flush=True)
        print("facts:", figures["facts"], flush=True)

        # 3. wall time
        few = test[:20]
        cot_s = await _wall(model, few, "cot")
        sc_s = await _wall(model, few, f"sc@16:t={t_best}")
        figures["wall_per_item_s"] = {"cot": cot_s, "sc@16": sc_s, "ratio": sc_s / cot_s}
        print("wall per item:", figures["wall_per_item_s"], flush=True)
    finally:
        model.close()
        shutil.rmtree(scratch, ignore_errors=True)

    a = figures["arith"]
    sc16, bon16 = f"sc@16:t={t_best}", f"bon@16:t={t_best}"
    unseen_rag = figures["facts"].get("rag/unseen", {}).get("accuracy", 0.0)
    closed = figures["facts"].get("direct/unseen", {}).get("accuracy", 1.0)
    figures["goals"] = {
        "sc@16 >= cot + 10 points": a[sc16]["accuracy"] >= a["cot"]["accuracy"] + 0.10,
        "tools >= 98% on arith": a["tools"]["accuracy"] >= 0.98,
        "rag >= 90% on unseen facts and closed-book <= 30%": unseen_rag >= 0.90 and closed <= 0.30,
        "bon@16 >= sc@16": a[bon16]["accuracy"] >= a[sc16]["accuracy"],
        "reflect > cot": a["reflect"]["accuracy"] > a["cot"]["accuracy"],
        "sc@16 wall <= 1.5x cot": figures["wall_per_item_s"]["ratio"] <= 1.5,
    }
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/tiny")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--validation", type=int, default=50)
    figures = asyncio.run(main_async(ap.parse_args()))
    for goal, ok in figures["goals"].items():
        print(f"{'met   ' if ok else 'MISSED'} {goal}")
    print("wrote", write("strategies", figures))


if __name__ == "__main__":
    main()
