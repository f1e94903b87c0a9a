"""``assist demo``: the main job's second half — evaluate a trained run and tell its story.

After ``assist train --preset tiny --out runs/tiny`` this evaluates every strategy on
held-out ``arith`` and ``facts``, samples a self-consistency curve, measures mode collapse
across base/SFT/RLHF, and writes ``RUN/REPORT.md``: the pipeline, the strategy tables
with confidence intervals and costs, the plots, and each claim of "State of GPT" next to
what this model shows. Every step is an ``assist eval`` run with ``--resume``, so an
interrupted demo continues where it stopped and a finished one is rebuilt in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DemoConfig", "add_demo_parser", "run", "write_report"]

ARITH = "direct,cot,sc@8:t=0.7,bon@8:t=0.7,reflect,tools,sc@4(tools)"
FACTS = "direct,cot,rag"
CURVE = "cot:t=0.7"


@dataclass
class DemoConfig:
    run: Path
    limit: int = 100
    samples: int = 16
    concurrency: int = 16


def _eval(*args: str) -> None:
    from assist.cli import main as cli

    code = cli(["eval", *args])
    if code != 0:
        raise SystemExit(code)


def _records(dirs: Sequence[Path]) -> list[dict[str, Any]]:
    from evals.report import read_samples

    return [r for d in dirs for r in read_samples(d / "samples.jsonl")]


def _per_item(records: Sequence[dict[str, Any]], strategy: str) -> dict[str, float]:
    """Each item's accuracy (mean over its runs; an errored run counts wrong)."""
    out = {}
    for r in records:
        if r["strategy"] == strategy and r["runs"]:
            out[r["item"]] = sum(bool(x["correct"]) and not x.get("error") for x in r["runs"]) / len(r["runs"])
    return out


def _claim_row(text: str, records: Sequence[dict[str, Any]], better: str, worse: str) -> str:
    """One claim: both accuracies and the paired difference on the items both answered,
    with a verdict that needs the 95% interval of the difference to exclude zero."""
    from evals.stats import paired_bootstrap

    b, w = _per_item(records, better), _per_item(records, worse)
    common = sorted(set(b) & set(w))
    if not common:
        return f"| {text} | `{better}` vs `{worse}`: not run | – |"
    res = paired_bootstrap([w[i] for i in common], [b[i] for i in common])
    acc = lambda d: 100 * sum(d[i] for i in common) / len(common)  # noqa: E731
    ours = (f"`{better}` {acc(b):.1f}% vs `{worse}` {acc(w):.1f}% on {len(common)} items: "
            f"Δ {100 * res.delta:+.1f} points [{100 * res.lo:+.1f}, {100 * res.hi:+.1f}]")
    if res.lo > 0:
        verdict = "shown"
    elif res.hi < 0:
        verdict = "reversed here"
    else:
        verdict = "not significant here"
    return f"| {text} | {ours} | {verdict} |"


def _claims(arith: Sequence[dict[str, Any]], facts: Sequence[dict[str, Any]],
            diversity: list[dict[str, Any]]) -> list[str]:
    """The talk's claims next to this model's own numbers, with a plain verdict."""
    rows = [
        _claim_row("Models need tokens to think: chain of thought beats answering at once", arith, "cot", "direct"),
        _claim_row("Ensembling: self-consistency over sampled chains beats one greedy chain", arith,
                   "sc@8:t=0.7", "cot"),
        _claim_row("A reward model picks the best of N samples", arith, "bon@8:t=0.7", "cot"),
        _claim_row("Asking the model to reflect on its answer can fix it", arith, "reflect", "cot"),
        _claim_row("Tools: offload arithmetic to a calculator", arith, "tools", "cot"),
        _claim_row("Composition: self-consistency over tool-using attempts", arith, "sc@4(tools)", "tools"),
        _claim_row("Retrieval: the context window is working memory", facts, "rag", "direct"),
    ]
    by_model = {r["model"]: r for r in diversity}
    if "sft" in by_model and "rlhf" in by_model:
        s, r = by_model["sft"], by_model["rlhf"]
        verdict = "shown" if r["entropy"] < s["entropy"] and r["distinct_2"] < s["distinct_2"] else "not shown here"
        rows.append(f"| RLHF models lose entropy (mode collapse) | per-token entropy {s['entropy']:.3f} (SFT) → "
                    f"{r['entropy']:.3f} (RLHF); EAD distinct-2 {s['distinct_2']:.3f} → {r['distinct_2']:.3f} "
                    f"(base: {by_model.get('base', s)['entropy']:.3f}, {by_model.get('base', s)['distinct_2']:.3f}) "
                    f"| {verdict} |")
    return ["| claim (State of GPT) | this model | verdict |", "|---|---|---|", *rows]


def write_report(cfg: DemoConfig, arith_dirs: Sequence[Path], facts_dir: Path, diversity_dir: Path) -> Path:
    from evals.report import markdown_table, plot_cost_frontier, plot_diversity, plot_maj_at_k
    from training.card import summary_rows

    out = cfg.run / "report"
    out.mkdir(parents=True, exist_ok=True)
    from evals.report import summarize

    arith_records, facts_records = _records(arith_dirs), _records([facts_dir])
    arith, facts = summarize(arith_records), summarize(facts_records)
    diversity = json.loads((diversity_dir / "diversity.json").read_text())["rows"]
    ledger = json.loads((cfg.run / "metrics.json").read_text())
    plot_cost_frontier({**arith, **facts}, out / "cost_frontier.png")
    curve = plot_maj_at_k(arith, out / "maj_at_k.png")
    plot_diversity(diversity, out / "diversity.png")
    stages = ledger.get("stages", {})
    total_s = sum(m.get("stage_wall_s", m.get("wall_s", 0)) or 0 for m in stages.values())
    lines = [
        f"# `{cfg.run.name}`: a small assistant, end to end",
        "",
        f"Generated by `make demo` on {time.strftime('%Y-%m-%d %H:%M')}. Held-out items only; "
        "95% confidence intervals; Δ is paired against the task's first strategy on the same items.",
        "",
        "## 1. The pipeline (pretraining → SFT → reward model → RL)",
        "",
        "| stage | steps | tokens | wall s | FLOPs (6ND) | last loss | held-out |",
        "|---|---|---|---|---|---|---|",
        *["| " + " | ".join(r) + " |" for r in summary_rows(ledger)],
        "",
        f"Training took {total_s / 60:.1f} minutes in all. Held-out: greedy CoT accuracy on `arith` "
        "(base, sft, rl), pairwise accuracy on held-out prompts (rm). Details: `README.md` (the model card).",
        "",
        "## 2. Strategies on `arith`",
        "",
        markdown_table(arith),
        "",
        "![cost frontier](report/cost_frontier.png)",
        "",
    ]
    if curve is not None:
        lines += [f"Self-consistency curve from one run of `{CURVE}` with K={cfg.samples} samples per item "
                  "(maj@k and pass@k for every k ≤ K, no extra model calls):", "",
                  "![maj@k](report/maj_at_k.png)", ""]
    lines += ["## 3. Retrieval on `facts`", "", markdown_table(facts), "",
              "## 4. Mode collapse across the stages", "",
              "| model | per-token entropy | EAD distinct-1 | distinct-2 | distinct-3 |", "|---|---|---|---|---|",
              *[f"| {r['model']} | {r['entropy']:.3f} | {r['distinct_1']:.3f} | {r['distinct_2']:.3f} | "
                f"{r['distinct_3']:.3f} |" for r in diversity],
              "", "![diversity](report/diversity.png)", "",
              "## 5. The talk's claims, in miniature", "", *_claims(arith_records, facts_records, diversity), ""]
    path = cfg.run / "REPORT.md"
    path.write_text("\n".join(lines))
    return path


def run(cfg: DemoConfig) -> int:
    from rich.console import Console

    console = Console()
    model = cfg.run / "rlhf"
    if not (model / "config.json").is_file() or not (cfg.run / "metrics.json").is_file():
        print(f"assist demo: no trained run in {cfg.run} (run `assist train --preset tiny --out {cfg.run}`)",
              file=sys.stderr)
        return 2
    ev = cfg.run / "eval"
    t0 = time.perf_counter()
    common = ["--model", str(model), "--limit", str(cfg.limit), "--concurrency", str(cfg.concurrency), "--resume"]
    console.rule("[bold]1/4 strategies on arith")
    _eval("run", "--task", "arith", "--strategies", ARITH, "--out", str(ev / "arith"), *common)
    console.rule(f"[bold]2/4 self-consistency curve ({CURVE}, K={cfg.samples})")
    _eval("run", "--task", "arith", "--strategies", CURVE, "--samples", str(cfg.samples),
          "--out", str(ev / "arith-curve"), *common)
    console.rule("[bold]3/4 closed book vs retrieval on facts")
    _eval("run", "--task", "facts", "--strategies", FACTS, "--out", str(ev / "facts"), *common)
    console.rule("[bold]4/4 mode collapse: base, sft, rlhf")
    if not (ev / "diversity" / "diversity.json").is_file():
        _eval("diversity", "--models", ",".join(str(cfg.run / s) for s in ("base", "sft", "rlhf")),
              "--out", str(ev / "diversity"))
    path = write_report(cfg, [ev / "arith", ev / "arith-curve"], ev / "facts", ev / "diversity")
    timing = ev / "demo_timing.json"  # the last full pass (a resumed pass that did nothing is quick)
    (ev / "demo_last_pass.json").write_text(json.dumps({"wall_s": time.perf_counter() - t0}) + "\n")
    if not timing.is_file():
        timing.write_text(json.dumps({"first_pass_wall_s": time.perf_counter() - t0}) + "\n")
    console.print(f"[bold green]wrote {path}[/bold green]")
    return 0


def add_demo_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="evaluate a trained run and write RUN/REPORT.md (the main job's second half)")
    p.add_argument("--run", default="runs/tiny", help="a run folder from `assist train` (default: runs/tiny)")
    p.add_argument("--limit", type=int, default=DemoConfig.limit, help="held-out items per task")
    p.add_argument("--samples", type=int, default=DemoConfig.samples, help="K of the self-consistency curve")
    p.add_argument("--concurrency", type=int, default=DemoConfig.concurrency, help="runs in flight")
    p.set_defaults(func=lambda a: run(DemoConfig(Path(a.run), a.limit, a.samples, a.concurrency)))
    return p

