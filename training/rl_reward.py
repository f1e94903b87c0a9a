"""Did RL raise the reward? The SFT and RLHF policies, sampled on the same held-out prompts.

RL logs the mean reward of each step's batch (``reward_first``/``reward_last`` in
``metrics.json``), but each step draws other prompts (8 on ``tiny``), and an easy batch
reads high whatever the policy: the first step against the last three says as much about
the draw as about RL. Here both policies answer the same ``prompts`` held-out arith
questions (validation split), ``k`` samples each at RL's temperature and length, and every
sample is scored as RL scores it (:func:`training.rl.rewards`, ``rl.reward``: the reward model's scalar at
``<|reward|>``, the task's checker, or their sum). The claim compares per-prompt means,
paired, with a bootstrap interval (:func:`evals.stats.paired_bootstrap`).

``assist demo`` runs it as a step and writes ``RUN/eval/rl_reward.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["measure", "measure_run"]


def measure(policies: dict[str, Any], rm: Any, tok: Any, task: Any, *, reward: str, prompts: int = 128,
            k: int = 4, temperature: float = 1.0, max_new_tokens: int = 160, seed: int = 0,
            share: float = 1.0) -> dict[str, Any]:
    """Per-prompt mean reward of each policy (the same prompts and sampling seeds for all),
    and the paired difference of the last policy over the first; ``share``: the reward
    model's weight under ``both`` (:func:`training.rl.rm_share`)."""
    from evals.stats import paired_bootstrap
    from training.rl import rewards
    from training.rollouts import rollouts

    items = task.split("validation", prompts)
    per_prompt: dict[str, list[float]] = {}
    for name, model in policies.items():
        groups = rollouts(model, tok, items, k=k, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
        scores = rewards([x for g in groups for x in g], task, rm, tok, reward, share=share)[2].float().cpu()
        per_prompt[name] = [round(float(v), 4) for v in scores.reshape(len(items), k).mean(dim=1)]
    first, last = list(per_prompt)[0], list(per_prompt)[-1]
    p = paired_bootstrap(per_prompt[first], per_prompt[last])
    return {
        "reward": reward if rm is not None or reward == "checker" else "checker",
        **({"rm_share": share} if reward == "both" and rm is not None else {}),
        "prompts": len(items), "k": k, "temperature": temperature,
        "mean": {name: round(sum(v) / len(v), 4) for name, v in per_prompt.items()},
        "delta": round(p.delta, 4), "lo": round(p.lo, 4), "hi": round(p.hi, 4), "p": p.p,
        "per_prompt": per_prompt,
    }


def measure_run(run: Path, out: Path, *, prompts: int = 128, k: int = 4) -> dict[str, Any]:
    """:func:`measure` for a trained run's ``sft`` and ``rlhf`` (and ``rm`` where RL used it),
    with RL's own settings from its ``metrics.json``; written to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from evals.run import generated_task, run_settings
    from training.rl import run_rm_share
    from training.tokenizer import load_tokenizer

    settings = run_settings(run / "metrics.json", required=True)
    rl = settings.get("rl") or {}
    reward = rl.get("reward", "both")
    tok = load_tokenizer(run / "tokenizer")
    policies = {name: AutoModelForCausalLM.from_pretrained(run / name, dtype=torch.float32)
                for name in ("sft", "rlhf")}
    rm = None
    if reward in ("rm", "both") and (run / "rm" / "config.json").is_file():
        rm = AutoModelForSequenceClassification.from_pretrained(run / "rm", dtype=torch.float32).eval()
    result = measure(policies, rm, tok, generated_task("arith", settings), reward=reward, prompts=prompts, k=k,
                     temperature=float(rl.get("temperature", 1.0)),
                     max_new_tokens=int(rl.get("max_new_tokens", 160)), seed=int(settings.get("seed", 0)),
                     share=run_rm_share(rl.get("rm_trust", "full"), run))
    result["prompts_asked"] = prompts  # the split may hold fewer; a demo asking again reuses this
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result
