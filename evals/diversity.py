"""Mode-collapse measures: how varied a model's samples are.

RLHF'd models lose entropy (the talk's "mode collapse"). Two views of it, over ``K``
samples per prompt at temperature 1:

- mean per-token entropy of the model's next-token distribution along its own samples;
- EAD distinct-n (expectation-adjusted distinct n-grams, Liu et al. 2022): distinct
  n-grams divided by the number a uniform draw of the same size from the vocabulary would
  give, ``V * (1 - ((V - 1) / V) ** C)``, so long and short sample sets compare fairly.

:func:`measure` computes both for a loaded model, under one :class:`DiversityConfig`; the
training pipeline (its ``metrics.json``) and ``assist eval diversity`` (through
:func:`measure_checkpoints`, which loads checkpoints and writes ``diversity.json``) both
use it, so their figures are the same measure.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DiversityConfig", "distinct_n", "ead_distinct_n", "mean_entropy", "measure",
           "measure_checkpoint", "measure_checkpoints"]


def _f(default: Any, help: str) -> Any:  # metadata read by the CLI's flag generator
    return field(default=default, metadata={"help": help})


@dataclass
class DiversityConfig:
    """How many samples of how long, at what temperature: the one config of the measure."""

    prompts: int = _f(32, "arith test questions sampled (the last N, as training reports)")
    k: int = _f(8, "samples per prompt at --temperature")
    temperature: float = _f(1.0, "sampling temperature (1: the model's own distribution)")
    max_new_tokens: int = _f(96, "longest sample")
    seed: int = _f(0, "sampling seed")

    def check(self) -> None:
        from evals._config import EvalError

        if self.prompts < 1 or self.k < 1 or self.max_new_tokens < 1:
            raise EvalError("--prompts, --k and --max-new-tokens must be at least 1")


def _ngrams(seqs: Sequence[Sequence[int]], n: int) -> list[tuple[int, ...]]:
    return [tuple(s[i: i + n]) for s in seqs for i in range(len(s) - n + 1)]


def distinct_n(seqs: Sequence[Sequence[int]], n: int) -> float:
    grams = _ngrams(seqs, n)
    return len(set(grams)) / len(grams) if grams else 0.0


def ead_distinct_n(seqs: Sequence[Sequence[int]], n: int, vocab_size: int) -> float:
    if vocab_size < 2:
        raise ValueError("vocab_size must be at least 2")
    grams = _ngrams(seqs, n)
    if not grams:
        return 0.0
    v = float(vocab_size)
    expected = v * (1.0 - ((v - 1.0) / v) ** len(grams))
    return len(set(grams)) / expected


def mean_entropy(per_sequence: Sequence[Sequence[float]]) -> float:
    values = [x for s in per_sequence for x in s]
    return sum(values) / len(values) if values else 0.0


def measure(model: Any, tok: Any, questions: Sequence[str], cfg: DiversityConfig, *,
            stop_ids: Sequence[int] | None = None, batch_size: int = 64) -> dict[str, Any]:
    """Mode-collapse figures of a loaded causal LM: ``cfg.k`` samples per question (one user
    turn) at ``cfg.temperature``; mean per-token entropy of the model's next-token
    distribution along its own samples, EAD distinct-1/2/3 per prompt (averaged), the number
    of samples and their mean length in tokens. The model's train/eval mode is restored."""
    from assist import render
    from assist.sampling import sample

    if stop_ids is None:
        eos = model.generation_config.eos_token_id
        stop_ids = [eos] if isinstance(eos, int) else list(eos or [tok.eos_token_id])
    stops = list(stop_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    prompts = [tok.encode(render([{"role": "user", "content": q}], add_generation_prompt=True),
                          add_special_tokens=False) for q in questions]
    flat = [(i, p) for i, p in enumerate(prompts) for _ in range(cfg.k)]
    per_prompt: list[list[list[int]]] = [[] for _ in prompts]
    entropies: list[list[float]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(flat), batch_size):
            chunk = flat[start: start + batch_size]
            done = sample(model, [p for _, p in chunk], max_new_tokens=cfg.max_new_tokens,
                          stop_ids=stops, pad_id=pad, temperature=cfg.temperature,
                          seed=cfg.seed + start)
            for (i, _), completion in zip(chunk, done, strict=True):
                per_prompt[i].append(completion.tokens)
                entropies.append(completion.entropies)
    finally:
        model.train(was_training)
    row: dict[str, Any] = {"entropy": round(mean_entropy(entropies), 4)}
    for n in (1, 2, 3):
        values = [ead_distinct_n(seqs, n, len(tok)) for seqs in per_prompt]
        row[f"distinct_{n}"] = round(sum(values) / max(1, len(values)), 4)
    row["samples"] = len(flat)
    row["mean_length"] = round(sum(len(s) for g in per_prompt for s in g) / max(1, len(flat)), 2)
    return row


def measure_checkpoint(path: Path, questions: Sequence[str], cfg: DiversityConfig) -> dict[str, Any]:
    """:func:`measure` of a Hugging Face checkpoint folder (on the GPU when there is one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its weight-loading bar is noise beside ours
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model: Any = AutoModelForCausalLM.from_pretrained(path)
    model = model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return {"model": path.name, "path": str(path), **measure(model, tok, questions, cfg)}


def measure_checkpoints(paths: Sequence[Path], cfg: DiversityConfig,
                        out: Path | None = None) -> list[dict[str, Any]]:
    """One row per checkpoint, on the arith test prompts the first one's training run
    measured itself on (the same for every model); with ``out``, written to
    ``out/diversity.json`` and plotted in ``out/diversity.png``. A bad path or setting is an
    :class:`evals._config.EvalError`, raised before any model loads."""
    from evals._config import EvalError, generated_task, run_settings

    paths = [Path(p) for p in paths]
    if not paths:
        raise EvalError("--models is required (comma-separated checkpoint folders)")
    for path in paths:
        if not (path / "config.json").is_file():
            raise EvalError(f"--models {path}: no Hugging Face checkpoint there")
    cfg.check()
    arith = generated_task("arith", run_settings(paths[0].parent / "metrics.json"))
    questions = [s.question for s in arith.split("test")[-cfg.prompts:]]
    rows = [measure_checkpoint(path, questions, cfg) for path in paths]
    if len({r["model"] for r in rows}) < len(rows):  # same stage names: label by full path
        for r in rows:
            r["model"] = r["path"]
    if out is not None:
        from evals.report import plot_diversity

        out.mkdir(parents=True, exist_ok=True)
        (out / "diversity.json").write_text(json.dumps(
            {"config": {"models": ",".join(map(str, paths)), **dataclasses.asdict(cfg),
                        "out": str(out)}, "rows": rows},
            indent=2) + "\n")
        plot_diversity(rows, out / "diversity.png")
    return rows
