"""Prefix caching benchmark (issue: strategies at engine speed). Writes bench/results/prefix_cache.json.

    python bench/prefix_cache.py [--run runs/tiny] [--model CHECKPOINT] [--items 20] [--repeats 3] [--compile]

On the run's RLHF assistant (``runs/test`` when the run has none yet: the figures say
which), held-out ``arith`` test items, the torch engine with the prefix cache on and off:
1. Prompt tokens submitted and actually computed (prefilled) by ``tools`` and ``reflect``,
   items one after another from a cold cache (items share their system prompt, as an eval
   does), and the same with the cache emptied before every item (each item's own calls
   only). Goal: computed ≤ 0.5 × submitted with the cache on.
2. Wall time per item of ``sc@4(tools)`` (seeded, so both engines make the same calls),
   item after item, cache on against off: interleaved repetitions, the cache emptied before
   each, the best repetition of each. Goal: on ≤ 0.7 × off.
3. Non-repeating traffic (prompts that share no block): generated tokens/s at 1 and 64
   concurrent requests, on against off, interleaved, best of ``--repeats``: what a cache
   that never hits costs (hashing and storing blocks).
Every answer is compared between the two engines: greedy ones must be identical.
``--compile``: both engines decode through torch.compile (``TorchEngine(compile=True)``);
the figures go to bench/results/prefix_cache_compiled.json.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import strategies  # noqa: E402
from assist.engine import SamplingParams, TorchEngine  # noqa: E402
from assist.errors import AssistError  # noqa: E402
from bench._common import write  # noqa: E402
from evals._config import EvalConfig, build_task  # noqa: E402

CACHE_MB = 64.0  # the engine's default


def _clear(engine: TorchEngine) -> None:
    if engine.scheduler.prefix_cache is not None:
        engine.scheduler.prefix_cache.clear()


async def _answers(engine: TorchEngine, spec: str, questions: list[str], *, cold_each: bool = False,
                   ) -> tuple[list[str], dict[str, float]]:
    """Every item's answer and the engine's prompt tokens submitted / computed meanwhile."""
    strategy = strategies.parse(spec)
    sched = engine.scheduler
    submitted, computed, calls = sched.prompt_tokens, sched.prefilled_tokens, 0
    texts: list[str] = []
    t0 = time.perf_counter()
    for q in questions:
        if cold_each:
            _clear(engine)
        try:
            result = await strategy.run(engine, q)
        except AssistError as exc:  # a rambling checkpoint can outgrow the context: same on both
            texts.append(f"error: {exc}")
            continue
        texts.append(result.message.content or "")
        calls += result.usage.calls
    wall = time.perf_counter() - t0
    submitted, computed = sched.prompt_tokens - submitted, sched.prefilled_tokens - computed
    return texts, {"submitted": submitted, "computed": computed, "computed_over_submitted": computed / submitted,
                   "calls_per_item": calls / len(questions), "wall_per_item_s": wall / len(questions)}


def tokens_computed(on: TorchEngine, off: TorchEngine, questions: list[str], max_tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("tools", "reflect"):
        spec = f"{name}:max_tokens={max_tokens}"
        _clear(on)
        want, cache_off = asyncio.run(_answers(off, spec, questions))
        got, cache_on = asyncio.run(_answers(on, spec, questions))
        _, per_item = asyncio.run(_answers(on, spec, questions, cold_each=True))
        out[name] = {"spec": spec, "cache_off": cache_off, "cache_on": cache_on,
                     "cache_on_emptied_before_each_item": per_item, "answers_identical": got == want,
                     "errors": sum(t.startswith("error: ") for t in want)}
        ratios = {k: round(v["computed_over_submitted"], 3) for k, v in
                  (("cache_off", cache_off), ("cache_on", cache_on), ("emptied_each_item", per_item))}
        print(spec, ratios, "identical:", got == want, flush=True)
    return out


def sc_tools_wall(on: TorchEngine, off: TorchEngine, questions: list[str], repeats: int,
                  max_tokens: int) -> dict[str, Any]:
    spec = f"sc@4:t=0.7,seed=0(tools:max_tokens={max_tokens})"
    walls: dict[str, list[float]] = {"off": [], "on": []}
    texts: dict[str, list[str]] = {}
    for _ in range(repeats):  # interleaved, so drift and other processes hit both alike
        for name, engine in (("off", off), ("on", on)):
            _clear(engine)
            texts[name], figures = asyncio.run(_answers(engine, spec, questions))
            walls[name].append(figures["wall_per_item_s"])
    best = {k: min(v) for k, v in walls.items()}
    out: dict[str, Any] = {"spec": spec, "wall_per_item_s": best, "all_repetitions_s": walls, "ratio_on_over_off": best["on"] / best["off"],
           "answers_identical": texts["on"] == texts["off"]}
    print("sc@4(tools) wall per item:", out["wall_per_item_s"], "ratio", round(out["ratio_on_over_off"], 3), flush=True)
    return out


def non_repeating(on: TorchEngine, off: TorchEngine, repeats: int, tokens: int = 64) -> dict[str, Any]:
    """tok/s on prompts that share no block with each other or with earlier ones."""
    rng = random.Random(0)
    vocab = on.vocab_size
    out: dict[str, Any] = {}
    for c in (1, 64):
        best = {"off": 0.0, "on": 0.0}
        for _ in range(repeats):
            for name, engine in (("off", off), ("on", on)):
                prompts = [[rng.randrange(4, vocab) for _ in range(40)] for _ in range(c)]  # fresh each time
                params = SamplingParams(max_tokens=tokens, ignore_eos=True)
                t0 = time.perf_counter()
                futures = [engine.scheduler.submit(p, params) for p in prompts]
                generated = sum(len(f.result().outputs[0].token_ids) for f in futures)
                best[name] = max(best[name], generated / (time.perf_counter() - t0))
        out[str(c)] = {"tok_s": best, "ratio_on_over_off": best["on"] / best["off"]}
    print("non-repeating traffic:", out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/tiny")
    ap.add_argument("--model", help="a checkpoint folder other than the run's rlhf (e.g. runs/tiny/sft)")
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=192, help="each call's completion cap (a strategy option)")
    ap.add_argument("--compile", action="store_true", help="both engines with compiled decode steps")
    args = ap.parse_args()
    run = Path(args.run)
    note = ""
    model = Path(args.model) if args.model else run / "rlhf"
    if not (model / "config.json").is_file():
        note = f"{model} is not there (yet): measured on runs/test/rlhf, the test preset's checkpoint"
        model = REPO / "runs" / "test" / "rlhf"
    task = build_task(EvalConfig(task="arith", model=str(model)))
    questions = [s.question for s in task.split("test", args.items)]
    figures: dict[str, Any] = {"model": str(model), "items": len(questions), "prefix_cache_mb": CACHE_MB,
                               "compiled": args.compile,
                               "note": note or None,
                               "contention": "2 CPU cores shared with other processes; figures are best-of-N "
                                             "of interleaved repetitions"}
    off = TorchEngine(model, prefix_cache_mb=0, compile=args.compile)
    on = TorchEngine(model, prefix_cache_mb=CACHE_MB, compile=args.compile)
    if args.compile and not (on.compiled and off.compiled):
        raise SystemExit("torch.compile failed here (see the warning above): no compiled figures")
    try:
        warm = [{"role": "user", "content": "warm up"}]
        for engine in (off, on):
            asyncio.run(engine.chat(warm, max_tokens=8))
        figures["tokens"] = tokens_computed(on, off, questions, args.max_tokens)
        figures["sc4_tools"] = sc_tools_wall(on, off, questions, args.repeats, args.max_tokens)
        figures["non_repeating"] = non_repeating(on, off, args.repeats)
    finally:
        on.close()
        off.close()
    t, sc, nr = figures["tokens"], figures["sc4_tools"], figures["non_repeating"]
    figures["goals"] = {
        "tools: computed <= 0.5 x submitted": t["tools"]["cache_on"]["computed_over_submitted"] <= 0.5,
        "reflect: computed <= 0.5 x submitted": t["reflect"]["cache_on"]["computed_over_submitted"] <= 0.5,
        "sc@4(tools) wall per item <= 0.7 x cache off": sc["ratio_on_over_off"] <= 0.7,
        "greedy answers identical with the cache on and off": all(
            t[s]["answers_identical"] for s in ("tools", "reflect")),
        "non-repeating traffic not slower (on >= 0.95 x off, noise allowed)": all(
            v["ratio_on_over_off"] >= 0.95 for v in nr.values()),
    }
    for goal, ok in figures["goals"].items():
        print(f"{'met   ' if ok else 'MISSED'} {goal}")
    print("wrote", write("prefix_cache_compiled" if args.compile else "prefix_cache", figures))


if __name__ == "__main__":
    main()
