"""The run's model card: what was trained, on what, and how well, in Markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["stage_wall_s", "summary_rows", "train_wall_s", "write_card"]


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def stage_wall_s(metrics: dict[str, Any]) -> float | None:
    """One stage's seconds: the whole stage, or its loop's for a ledger that lacks that."""
    return metrics.get("stage_wall_s", metrics.get("wall_s"))


def train_wall_s(ledger: dict[str, Any]) -> float:
    """Seconds the run took: the wall time the pipeline recorded (``scratch`` may run beside
    ``rm`` and ``rl``, so the stages' own times add up to more), or, for a run recorded
    before it did, the sum of its stages."""
    if ledger.get("wall_s") is not None:
        return float(ledger["wall_s"])
    return float(sum(stage_wall_s(m) or 0 for m in ledger.get("stages", {}).values()))


def summary_rows(ledger: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per finished stage: steps, tokens, wall time, FLOPs, last loss, held-out figure."""
    rows = []
    for stage, m in ledger.get("stages", {}).items():
        held = m.get("arith_greedy_accuracy", m.get("heldout_pair_accuracy"))
        rows.append((stage, _fmt(m.get("steps")), _fmt(m.get("tokens", m.get("stream_tokens"))),
                     _fmt(stage_wall_s(m)), _fmt(m.get("flops")), _fmt(m.get("loss_last")), _fmt(held)))
    return rows


def write_card(out: Path, ledger: dict[str, Any]) -> None:
    cfg = ledger.get("config", {})
    stages = ledger.get("stages", {})
    lines = [
        f"# assist `{cfg.get('preset', '?')}` assistant",
        "",
        "A small Llama-architecture chat model trained from scratch by `assist train`, through "
        "the four stages of Karpathy's *State of GPT*: pretraining on a data mixture, supervised "
        "fine-tuning, a reward model trained on ranked completions, and RL against it.",
        "",
        "Each stage folder (`base/`, `sft/`, `rm/`, `rlhf/`) is a Hugging Face checkpoint "
        "(safetensors, chat template in the tokenizer config, `generation_config.json` "
        "stopping on `<|im_end|>`); `transformers` and vLLM load it unchanged. `rm/` is a "
        "`LlamaForSequenceClassification` that reads its score at the `<|reward|>` token. "
        "`sft-scratch/` (stage `scratch`) is the control: the same SFT from a random initialisation.",
        "",
        "| stage | steps | tokens | wall s | FLOPs (6ND) | last loss | held-out |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in summary_rows(ledger)]
    lines.append("")
    lines.append("Held-out: greedy chain-of-thought accuracy on `arith` test items for base, sft "
                 "and rl; pairwise accuracy on held-out prompts for rm.")
    if "tokenizer" in stages:
        t = stages["tokenizer"]
        lines += ["", "## Data mixture", "", "| source | configured | realized (tokens) |", "|---|---|---|"]
        for k, v in t["mixture"].items():
            lines.append(f"| {k} | {v:.2f} | {t['realized_mixture'].get(k, 0):.3f} |")
    if "rm" in stages:
        lines += ["", "## Reward model", "",
                  "Rankings come from the task's own scorer, standing in for the human labellers "
                  "of the talk (cheap and exact, so the reward model's errors are its own). "
                  f"Held-out pairwise accuracy: {_fmt(stages['rm'].get('heldout_pair_accuracy'))}."]
    div = [(s, stages[s].get("diversity")) for s in ("pretrain", "sft", "rl") if s in stages]
    if div:
        lines += ["", "## Mode collapse", "",
                  "| model | mean token entropy | EAD distinct-1 | distinct-2 | distinct-3 |",
                  "|---|---|---|---|---|"]
        for name, d in div:
            if d:
                lines.append(f"| {name} | {_fmt(d['mean_token_entropy'])} | {_fmt(d['ead_distinct_1'])} | "
                             f"{_fmt(d['ead_distinct_2'])} | {_fmt(d['ead_distinct_3'])} |")
    lines += ["", "## Intended use", "",
              "A teaching and testing model: it knows the generated `arith` and `facts` worlds and "
              "little else. Do not use it for anything that matters.", ""]
    (out / "README.md").write_text("\n".join(lines))
