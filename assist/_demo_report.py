"""``RUN/REPORT.md``: the demo's claims table and the figures behind it.

Reads what ``assist demo`` left in ``RUN/eval`` and what ``assist train`` left in
``RUN/metrics.json``; computes every claim with :mod:`evals.claims`; writes the report and
``RUN/eval/claims.json`` (the same figures, for ``bench/demo.py``). Returns the claims as a
rich table so the demo prints them too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["claims", "write_report"]


def _records(folder: Path) -> list[dict[str, Any]]:
    from evals.report import read_samples

    path = folder / "samples.jsonl"
    return read_samples(path) if path.is_file() else []


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _row(claim: str, goal: str, measured: str, verdict: str, met: bool | None) -> dict[str, Any]:
    return {"claim": claim, "goal": goal, "measured": measured, "verdict": verdict,
            "goal_met": met}


def claims(run_dir: Path) -> dict[str, Any]:
    """Every claim of the report, with its goal, this run's figure and a verdict."""
    from evals._config import generated_task, run_settings
    from evals.claims import maj_at_k_from_votes, paired, per_item, recommend, tool_copy_accuracy
    from evals.report import summarize

    ev = run_dir / "eval"
    settings = run_settings(run_dir / "metrics.json")
    ledger = json.loads((run_dir / "metrics.json").read_text())
    stages = ledger.get("stages", {})
    arith = _records(ev / "arith")
    sft, scratch, facts = _records(ev / "arith-sft"), _records(ev / "arith-scratch"), _records(ev / "facts")
    from assist._demo_cli import BON, SC

    summary = summarize(arith, baseline="cot").get("arith", {})
    curve = maj_at_k_from_votes(arith, SC)
    if SC in summary and curve["maj_at_k"]:
        summary[SC]["maj_at_k"], summary[SC]["pass_at_k"] = curve["maj_at_k"], curve["pass_at_k"]
    acc = {s: per_item(arith, s) for s in summary}

    def pair(a: str, b: str, better: dict[str, float] | None = None,
             worse: dict[str, float] | None = None) -> Any:
        return paired(acc.get(a, {}) if better is None else better, acc.get(b, {}) if worse is None else worse,
                      (a, b))

    rows: list[dict[str, Any]] = []
    cot = summary.get("cot", {}).get("accuracy")
    cot_ci = summary.get("cot", {}).get("ci95", [None, None])
    rows.append(_row("Room to improve: greedy chain of thought is far from perfect", "cot between 35% and 70%",
                     f"cot {_pct(cot)} [{_pct(cot_ci[0])}, {_pct(cot_ci[1])}] on {summary.get('cot', {}).get('n', 0)} items",
                     "–", None if cot is None else 0.35 <= cot <= 0.70))
    p = pair("cot", "direct")
    rows.append(_row("Models need tokens to think: chain of thought beats answering at once", "shown",
                     p.text(), p.verdict, p.verdict == "shown"))
    arith_task = generated_task("arith", settings)
    samples = {s.id: s for s in arith_task.split("test")}
    copy = tool_copy_accuracy(arith, samples)
    p = pair("tools", "cot")
    tools_acc = summary.get("tools", {}).get("accuracy")
    rows.append(_row("Tools: offload arithmetic to a calculator", "tools ≥ 95% and ≥ cot + 20 points",
                     f"{p.text()}; operands copied into calls: {_pct(copy['call_accuracy'])} of "
                     f"{copy['calls']} calls, every call right on {_pct(copy['item_accuracy'])} of items",
                     p.verdict, None if tools_acc is None else tools_acc >= 0.95 and p.delta >= 0.20))
    p = pair(SC, "cot")
    maj = curve["maj_at_k"]
    rising = bool(maj) and all(maj[b] >= maj[a] for a, b in zip((1, 2, 4, 8), (2, 4, 8, 16), strict=True)
                               if a in maj and b in maj) and maj[max(maj)] > maj[1]
    curve_text = ", ".join(f"maj@{k} {_pct(maj[k])}" for k in (1, 2, 4, 8, 16) if k in maj)
    pass_k = curve["pass_at_k"]
    rows.append(_row("Ensembling: self-consistency over sampled chains beats one greedy chain",
                     "sc@16 ≥ cot + 8 points; maj@k rises over k = 1..16",
                     f"{p.text()}; {curve_text}; pass@16 {_pct(pass_k.get(16))}", p.verdict,
                     bool(p.n) and p.delta >= 0.08 and rising))
    rm = stages.get("rm", {})
    p = pair(BON, SC)
    rm_acc = rm.get("heldout_pair_accuracy")
    rows.append(_row("A reward model (verifier) picks the best of N samples, beating the vote",
                     "RM held-out pairwise accuracy ≥ 0.75 and bon@16 ≥ sc@16",
                     f"RM pairwise accuracy {rm_acc} on {rm.get('heldout_pairs')} held-out pairs; {p.text()}",
                     p.verdict, rm_acc is not None and rm_acc >= 0.75 and bool(p.n) and p.delta >= 0))
    p = pair("reflect", "cot")
    rows.append(_row("Asking the model to check its work fixes some answers", "reflect > cot shown",
                     p.text(), p.verdict, p.verdict == "shown"))
    facts_task = generated_task("facts", settings)
    seen_ids = {f"facts-{e.id}-{a}" for e in facts_task.entities if e.seen for a in ("capital", "language", "currency", "founded")}
    seen, unseen = (lambda i: i in seen_ids), (lambda i: i not in seen_ids)
    closed_seen, closed_unseen = per_item(facts, "plain", seen), per_item(facts, "plain", unseen)
    rag_seen, rag_unseen = per_item(facts, "rag", seen), per_item(facts, "rag", unseen)
    mean = lambda d: sum(d.values()) / len(d) if d else None  # noqa: E731
    p = paired(rag_unseen, closed_unseen, ("rag", "plain"))
    cs, cu, ru = mean(closed_seen), mean(closed_unseen), mean(rag_unseen)
    rows.append(_row("Retrieval: the context window is working memory, the weights are long-term memory",
                     "unseen kingdoms: rag ≥ 90%, closed book ≤ 10%; seen kingdoms: closed book ≥ 60%",
                     f"unseen ({len(rag_unseen)} items): rag {_pct(ru)}, closed book {_pct(cu)}, paired Δ "
                     f"{100 * p.delta:+.1f} [{100 * p.lo:+.1f}, {100 * p.hi:+.1f}]; seen ({len(closed_seen)} items): "
                     f"closed book {_pct(cs)}, rag {_pct(mean(rag_seen))}", p.verdict,
                     None if None in (cs, cu, ru) else ru >= 0.9 and cu <= 0.1 and cs >= 0.6))
    rl = stages.get("rl", {})
    p = paired(acc.get("cot", {}), per_item(sft, "cot"), ("cot (rlhf)", "cot (sft)"))
    div = {r["model"]: r for r in json.loads((ev / "diversity" / "diversity.json").read_text())["rows"]} \
        if (ev / "diversity" / "diversity.json").is_file() else {}
    ent = (div.get("sft", {}).get("entropy"), div.get("rlhf", {}).get("entropy"))
    reward = (rl.get("reward_first"), rl.get("reward_last"))
    collapse = None not in ent and ent[1] < ent[0]
    rows.append(_row("RLHF: RL against the reward model keeps (or improves) what SFT could do, and "
                     "the RLHF model loses entropy (mode collapse)",
                     "RLHF greedy accuracy ≥ SFT's (paired lower end ≥ 0); the reward rises; entropy drops",
                     f"{p.text()}; reward ({rl.get('reward', '?')}) {reward[0]} → {reward[1]}; per-token entropy "
                     f"SFT {ent[0]} → RLHF {ent[1]}", p.verdict,
                     bool(p.n) and p.lo >= 0 and None not in reward and reward[1] > reward[0] and collapse))
    p = paired(per_item(sft, "cot"), per_item(scratch, "cot"), ("cot (sft from base)", "cot (sft from random init)"))
    rows.append(_row("Pretraining learns general representations: SFT from the base model beats SFT "
                     "from a random initialisation (same SFT data and steps)", "shown", p.text(), p.verdict,
                     p.verdict == "shown"))
    rec = recommend(summary)
    if rec is not None:
        rows.append(_row("First get the best performance, then optimise cost",
                         "name the best strategy and the cheapest within 2 points of it",
                         f"best: `{rec['best']}` {_pct(rec['best_accuracy'])} at {rec['best_tokens']:.0f} tokens/item; "
                         f"cheapest within 2 points: `{rec['cheapest']}` {_pct(rec['cheapest_accuracy'])} at "
                         f"{rec['cheapest_tokens']:.0f} tokens/item", "–", True))
    return {"rows": rows, "summary": summary, "tool_copy": copy, "recommendation": rec,
            "facts": {"closed_seen": cs, "closed_unseen": cu, "rag_seen": mean(rag_seen), "rag_unseen": ru,
                      "n_seen": len(closed_seen), "n_unseen": len(closed_unseen)},
            "sft_cot": mean(per_item(sft, "cot")), "scratch_cot": mean(per_item(scratch, "cot")),
            "maj_at_k": curve["maj_at_k"], "pass_at_k": curve["pass_at_k"], "rm_pair_accuracy": rm_acc,
            "rl_reward": list(reward), "entropy": {"sft": ent[0], "rlhf": ent[1]}}


def _claims_md(rows: Sequence[dict[str, Any]]) -> list[str]:
    out = ["| claim (State of GPT) | goal | this model | paired verdict | goal |", "|---|---|---|---|---|"]
    for r in rows:
        met = {True: "met", False: "missed", None: "–"}[r["goal_met"]]
        out.append(f"| {r['claim']} | {r['goal']} | {r['measured']} | {r['verdict']} | {met} |")
    return out


def _rich(rows: Sequence[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="The talk's claims, on this model", show_lines=True)
    for col in ("claim", "this model", "verdict", "goal"):
        table.add_column(col, overflow="fold")
    for r in rows:
        met = {True: "[green]met", False: "[red]missed", None: "–"}[r["goal_met"]]
        table.add_row(r["claim"], r["measured"], r["verdict"], met)
    return table


def write_report(run_dir: Path, limit: int) -> tuple[Path, Any]:
    from evals.report import (
        markdown_table,
        plot_cost_frontier,
        plot_diversity,
        plot_maj_at_k,
        summarize,
    )
    from training.card import summary_rows

    ev, out = run_dir / "eval", run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    found = claims(run_dir)
    (ev / "claims.json").write_text(json.dumps(found, indent=2, default=str) + "\n")
    summary = {"arith": found["summary"]}
    facts = summarize(_records(ev / "facts"))
    ledger = json.loads((run_dir / "metrics.json").read_text())
    stages = ledger.get("stages", {})
    train_s = sum(m.get("stage_wall_s", m.get("wall_s", 0)) or 0 for m in stages.values())
    timing = json.loads((ev / "demo_timing.json").read_text()) if (ev / "demo_timing.json").is_file() else {}
    diversity_path = ev / "diversity" / "diversity.json"
    diversity = json.loads(diversity_path.read_text())["rows"] if diversity_path.is_file() else []
    plot_cost_frontier({**summary, **facts}, out / "cost_frontier.png")
    curve = plot_maj_at_k(summary, out / "maj_at_k.png")
    if diversity:
        plot_diversity(diversity, out / "diversity.png")
    f = found["facts"]
    seed = ledger.get("config", {}).get("seed", "?")
    lines = [
        f"# `{run_dir.name}`: a small assistant, end to end",
        "",
        f"Generated by `make demo` on {time.strftime('%Y-%m-%d %H:%M')} (training seed {seed}). Held-out "
        f"items only: {limit} `arith` items per claim, every held-out `facts` item. A claim that one "
        "strategy beats another is **shown** when the paired 95% interval of the difference excludes 0; "
        "the goal column checks the figure the project set for it.",
        "",
        "## The talk's claims, in miniature",
        "",
        *_claims_md(found["rows"]),
        "",
        "## Wall time",
        "",
        "| part | seconds |", "|---|---|",
        *[f"| train: {stage} | {m.get('stage_wall_s', m.get('wall_s', 0))} |" for stage, m in stages.items()],
        f"| **training, all stages** | **{train_s:.0f}** ({train_s / 60:.1f} min) |",
        *[f"| eval: {name} | {s} |" for name, s in timing.get("steps", {}).items()],
        f"| **evaluation, first pass** | **{timing.get('first_pass_wall_s', 0):.0f}** "
        f"({timing.get('first_pass_wall_s', 0) / 60:.1f} min) |",
        "",
        "## 1. The pipeline (pretraining → SFT → reward model → RL)",
        "",
        "| stage | steps | tokens | wall s | FLOPs (6ND) | last loss | held-out |",
        "|---|---|---|---|---|---|---|",
        *["| " + " | ".join(r) + " |" for r in summary_rows(ledger)],
        "",
        "Held-out: greedy CoT accuracy on `arith` (base, sft, rl; 200 items during training), pairwise "
        "accuracy on held-out prompts (rm). `scratch` is SFT from a random initialisation on the same "
        "conversations and steps. Details: `README.md` (the model card).",
        "",
        "## 2. Strategies on `arith` (the RLHF model)",
        "",
        markdown_table(summary),
        "",
        f"Calculator calls: the operands were copied right in {_pct(found['tool_copy']['call_accuracy'])} of "
        f"{found['tool_copy']['calls']} calls; every call of an item right in "
        f"{_pct(found['tool_copy']['item_accuracy'])} of items. So what the model gets wrong without the "
        "tool is the arithmetic, not reading the question.",
        "",
        "![cost frontier](report/cost_frontier.png)",
        "",
    ]
    if curve is not None:
        lines += ["Self-consistency curve read from the votes of `sc@16` (its 16 samples in the order drawn, "
                  "so no extra model calls): maj@k and pass@k for k = 1..16.", "",
                  "![maj@k](report/maj_at_k.png)", ""]
    lines += ["## 3. Retrieval on `facts`", "",
              "| kingdoms | items | closed book (`plain`) | `rag` |", "|---|---|---|---|",
              f"| seen in pretraining | {f['n_seen']} | {_pct(f['closed_seen'])} | {_pct(f['rag_seen'])} |",
              f"| unseen (only in the store) | {f['n_unseen']} | {_pct(f['closed_unseen'])} | {_pct(f['rag_unseen'])} |",
              "", markdown_table(facts), "",
              "## 4. Mode collapse across the stages", "",
              "| model | per-token entropy | EAD distinct-1 | distinct-2 | distinct-3 |", "|---|---|---|---|---|",
              *[f"| {r['model']} | {r['entropy']:.3f} | {r['distinct_1']:.3f} | {r['distinct_2']:.3f} | "
                f"{r['distinct_3']:.3f} |" for r in diversity],
              "", "![diversity](report/diversity.png)", ""]
    path = run_dir / "REPORT.md"
    path.write_text("\n".join(lines))
    return path, _rich(found["rows"])
