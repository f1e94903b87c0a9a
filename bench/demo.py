"""The main job's figures, per training seed. Prints them, writes bench/results/demo.json.

    python bench/demo.py --seed 0            # runs/tiny (what `make demo` trains)
    python bench/demo.py --seed 1            # runs/tiny-seed1
    python bench/demo.py --seed 1 --run DIR  # any run folder
    python bench/demo.py --table             # README's claims table, from demo.json

A verdict is a result only if it holds for more than one training seed, so each seed is
recorded under ``figures.seeds[N]`` and the other seeds already in demo.json are kept.
When the run folder holds no finished demo, this trains it (``assist train --preset tiny
--seed N --resume``) and runs ``assist demo`` first; both resume. Recorded per seed: the
wall time of every training stage and evaluation step, every claim with its verdict and
goal, each strategy's accuracy with its interval, tokens and calls per item.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import RESULTS, write  # noqa: E402
from training.card import stage_wall_s, train_wall_s  # noqa: E402


def _ensure(run: Path, seed: int, preset: str) -> None:
    assist = [sys.executable, "-m", "assist.cli"]
    if not (run / "eval" / "claims.json").is_file():
        subprocess.run([*assist, "train", "--preset", preset, "--seed", str(seed), "--out", str(run), "--resume"],
                       check=True, cwd=REPO)
        subprocess.run([*assist, "demo", "--run", str(run)], check=True, cwd=REPO)


def figures_of(run: Path) -> dict:
    ledger = json.loads((run / "metrics.json").read_text())
    claims = json.loads((run / "eval" / "claims.json").read_text())
    timing = json.loads((run / "eval" / "demo_timing.json").read_text())
    stages = {s: stage_wall_s(m) for s, m in ledger["stages"].items()}
    train_s = train_wall_s(ledger)  # scratch may run beside rm and rl: not the stages' sum
    eval_s = timing["first_pass_wall_s"]
    strategies = {s: {"accuracy": row["accuracy"], "ci95": row["ci95"], "n": row["n"],
                      "tokens_per_item": row["tokens_per_item"]["total"], "calls_per_item": row["calls_per_item"],
                      "vs_cot": row.get("vs_baseline")}
                  for s, row in claims["summary"].items()}
    return {
        "run": str(run), "seed": ledger["config"]["seed"], "preset": ledger["config"]["preset"],
        "train_wall_s": round(train_s, 1), "train_stage_wall_s": stages,
        "eval_wall_s": eval_s, "eval_step_wall_s": timing.get("steps", {}),
        "total_minutes": round((train_s + eval_s) / 60, 2),
        "budgets": {"train <= 15 min": train_s <= 900, "eval <= 8 min": eval_s <= 480},
        "claims": [{k: r[k] for k in ("claim", "goal", "measured", "verdict", "goal_met")} for r in claims["rows"]],
        "arith": strategies, "facts": claims["facts"], "tool_copy": claims["tool_copy"],
        "maj_at_k": claims["maj_at_k"], "pass_at_k": claims["pass_at_k"],
        "rm_pair_accuracy": claims["rm_pair_accuracy"], "rl_reward": claims["rl_reward"],
        "rl_reward_heldout": claims.get("rl_reward_heldout"),
        "base_number_probe": ledger["stages"].get("pretrain", {}).get("number_probe"),
        "facts_probe": {stage: ledger["stages"].get(stage, {}).get("facts_probe") for stage in ("pretrain", "sft")},
        "entropy": claims["entropy"], "sft_cot": claims["sft_cot"], "scratch_cot": claims["scratch_cot"],
        "recommendation": claims["recommendation"],
    }


def table(doc: dict) -> str:
    """README's claims table: every seed recorded in demo.json, one row per claim."""
    seeds = [doc["seeds"][k] for k in sorted(doc["seeds"], key=int)]
    names = " / ".join(f"seed {s['seed']}" for s in seeds)
    lines = [f"| claim, on held-out items ({names}) | goal | measured | verdict |", "|---|---|---|---|"]
    for i, row in enumerate(seeds[0]["claims"]):
        rows = [s["claims"][i] for s in seeds]
        met = " / ".join({True: "met", False: "missed", None: "–"}[r["goal_met"]] for r in rows)
        measured = "<br>".join(f"seed {s['seed']}: {r['measured']}" for s, r in zip(seeds, rows, strict=True))
        verdict = " / ".join(r["verdict"] for r in rows)
        lines.append(f"| {row['claim'].split(':')[0]} | {row['goal']} | {measured} | {verdict}; goal {met} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", default=None, help="run folder (default: runs/tiny, or runs/tiny-seedN)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--table", action="store_true",
                    help="print README's claims table from bench/results/demo.json and stop")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads((RESULTS / "demo.json").read_text())["figures"]))
        return
    run = Path(args.run or ("runs/tiny" if args.seed == 0 else f"runs/tiny-seed{args.seed}"))
    _ensure(run, args.seed, args.preset)
    figures = figures_of(run)
    path = RESULTS / "demo.json"
    old = json.loads(path.read_text()).get("figures", {}) if path.is_file() else {}
    seeds = dict(old.get("seeds", {}))
    seeds[str(figures["seed"])] = figures
    held = {}
    for i, row in enumerate(figures["claims"]):
        verdicts = [s["claims"][i]["goal_met"] for s in seeds.values() if len(s["claims"]) > i]
        held[row["claim"]] = {"goal_met_every_seed": all(v is True for v in verdicts), "seeds": len(verdicts)}
    for row in figures["claims"]:
        print(f"- {row['claim']}: {row['measured']} -> {row['verdict']}, goal {row['goal_met']}")
    print(f"train {figures['train_wall_s']:.0f} s, eval {figures['eval_wall_s']:.0f} s")
    print("wrote", write("demo", {"seeds": seeds, "held_for_every_seed": held}))


if __name__ == "__main__":
    main()
