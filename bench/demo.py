"""The main job's figures (issue: eval harness). Prints them, writes bench/results/demo.json.

    python bench/demo.py [--run runs/tiny]

Reads what `make demo` left in the run folder: training wall time per stage
(metrics.json), the demo's evaluation wall time (eval/demo_timing.json), every strategy's
accuracy with its interval, tokens and calls per item on arith and facts, and the
diversity figures. Goal: the whole job within 20 minutes on 2 CPU cores (plus the install).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import write  # noqa: E402
from evals.report import read_samples, summarize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/tiny")
    run = Path(ap.parse_args().run)
    ledger = json.loads((run / "metrics.json").read_text())
    train_s = sum(m.get("stage_wall_s", m.get("wall_s", 0)) or 0 for m in ledger["stages"].values())
    timing = json.loads((run / "eval" / "demo_timing.json").read_text())
    figures = {"run": str(run), "train_wall_s": train_s, "eval_wall_s": timing["first_pass_wall_s"]}
    figures["total_minutes"] = (train_s + timing["first_pass_wall_s"]) / 60
    for name, dirs in (("arith", ["arith", "arith-curve"]), ("facts", ["facts"])):
        records = [r for d in dirs for r in read_samples(run / "eval" / d / "samples.jsonl")]
        summary = summarize(records)[name]
        figures[name] = {s: {"accuracy": row["accuracy"], "ci95": row["ci95"], "n": row["n"],
                             "tokens_per_item": row["tokens_per_item"]["total"],
                             "calls_per_item": row["calls_per_item"]} for s, row in summary.items()}
    figures["diversity"] = json.loads((run / "eval" / "diversity" / "diversity.json").read_text())["rows"]
    figures["goals"] = {"train + eval <= 20 minutes": figures["total_minutes"] <= 20}
    print(json.dumps(figures, indent=1)[:3000])
    print("wrote", write("demo", figures))


if __name__ == "__main__":
    main()
