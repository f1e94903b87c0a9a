"""Eval-harness benchmark (issue: eval harness). Prints figures, writes bench/results/evals.json.

    python bench/evals.py [--run runs/tiny] [--items 256] [--concurrency 128]

The same work two ways on the run's RLHF assistant: greedy chain of thought on ``--items``
held-out `arith` questions.
1. The engine saturated: every prompt submitted to the torch engine's scheduler at once.
2. The harness: ``evals.harness.evaluate`` with the ``cot`` strategy at ``--concurrency``
   (above the engine's 64 slots, so a freed slot always has a request waiting),
   scoring, accounting and writing ``samples.jsonl`` as it goes.
Items/s of (2) over (1); goal ≥ 0.9. The outputs are the same tokens (greedy).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from assist.engine import SamplingParams, TorchEngine  # noqa: E402
from assist.prompts import COT_SUFFIX  # noqa: E402
from bench._common import write  # noqa: E402
from evals._config import EvalConfig, build_task  # noqa: E402
from evals.harness import evaluate, parse_strategies  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/tiny")
    ap.add_argument("--items", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=128)
    args = ap.parse_args()
    run = Path(args.run)
    task = build_task(EvalConfig(task="arith", model=str(run / "rlhf")))
    items = task.split("test", args.items)
    engine = TorchEngine(run / "rlhf", max_batch=64)
    prompts = [engine.encode([{"role": "user", "content": f"{s.question} {COT_SUFFIX}"}]) for s in items]
    params = SamplingParams(max_tokens=engine.context_length - max(map(len, prompts)))
    engine.scheduler.submit(prompts[0], params).result()  # warm-up

    t0 = time.perf_counter()
    outs = [f.result() for f in [engine.scheduler.submit(p, params) for p in prompts]]
    engine_s = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)

    scratch = Path(tempfile.mkdtemp(prefix="bench-evals-"))
    try:
        t0 = time.perf_counter()
        records = asyncio.run(evaluate(engine, task, parse_strategies(["cot"]), items, out=scratch,
                                       concurrency=args.concurrency, progress=False))
        harness_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        engine.close()
    harness_tokens = sum(r["runs"][0]["completion_tokens"] for r in records)
    figures = {
        "items": len(items), "concurrency": args.concurrency,
        "engine_items_per_s": len(items) / engine_s, "engine_tok_s": generated / engine_s,
        "harness_items_per_s": len(items) / harness_s, "harness_tok_s": harness_tokens / harness_s,
        "same_completion_tokens": harness_tokens == generated,
    }
    figures["ratio"] = figures["harness_items_per_s"] / figures["engine_items_per_s"]
    figures["goals"] = {"harness >= 0.9x engine": figures["ratio"] >= 0.9}
    for k, v in figures.items():
        print(f"{k}: {v}")
    print("wrote", write("evals", figures))


if __name__ == "__main__":
    main()
