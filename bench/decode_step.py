"""Where a decode step of the torch engine spends its time, by batch rows. Prints figures,
writes bench/results/decode_step.json.

    python bench/decode_step.py [--model runs/tiny/rlhf] [--context 100] [--rows 1,4,16,64]

Why: one ``n=16`` request costs about twice one ``n=1`` request (bench/engines.py), where
the issue expected little more on a 1.1M-parameter model. This splits a step into the
model's forward (``LlamaRunner.forward`` with one new token per row, ``--context`` tokens
cached) and the scheduler's per-step work around it: the batch's greedy pick, sampling
every row from its own seeded generator, detokenising an answer. The forward is timed on
the engine's thread count (all cores but one, the HTTP server's) and on every core. Each
figure is the best of ``--repeats`` runs of ``--steps`` calls (the machine is shared; the
best run is the least disturbed one). The forward is timed again with the decode step
compiled (``TorchEngine(compile=True)``, :mod:`assist.engine._compiled`), on the engine's
thread count.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from assist.engine import TorchEngine  # noqa: E402
from assist.sampling import draw, filter_logits  # noqa: E402
from bench._common import write  # noqa: E402


def _ms(fn: Callable[[], Any], steps: int, repeats: int) -> float:
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - t0) / steps * 1000)
    return round(best, 4)


def _forward_ms(runner: Any, vocab: int, rows: list[int], context: int, steps: int, repeats: int) -> dict[str, float]:
    """The runner's decode forward (one new token per row, ``context`` cached) by rows."""
    out: dict[str, float] = {}
    for b in rows:
        tokens = torch.randint(0, vocab, (b, 1))
        positions = torch.full((b, 1), context)
        out[str(b)] = _ms(lambda t=tokens, p=positions: runner.forward(t, p, 0), steps, repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/tiny/rlhf")
    ap.add_argument("--context", type=int, default=100, help="tokens already cached per row")
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    engine = TorchEngine(args.model, device="cpu", max_batch=max(rows))
    runner, vocab = engine.runner, engine.vocab_size
    engine_threads = torch.get_num_threads()
    figures: dict[str, Any] = {"model": args.model, "context": args.context, "engine_threads": engine_threads}
    try:
        forward: dict[str, dict[str, float]] = {}
        for threads in sorted({engine_threads, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            forward[f"{threads}_threads"] = _forward_ms(runner, vocab, rows, args.context, args.steps, args.repeats)
        torch.set_num_threads(engine_threads)
        figures["forward_ms"] = forward
        per_step: dict[str, dict[str, float]] = {}
        for b in rows:
            logits = torch.randn(b, vocab)
            generators = [torch.Generator().manual_seed(i) for i in range(b)]
            per_step[str(b)] = {
                "greedy_pick_ms": _ms(lambda x=logits: x.argmax(-1).tolist(), args.steps, args.repeats),
                "seeded_sampling_ms": _ms(lambda x=logits, g=generators: draw(
                    torch.softmax(filter_logits(x / 0.7, 0, 1.0), -1), g).tolist(), args.steps, args.repeats),
            }
        figures["scheduler_ms"] = per_step
        ids = list(range(100, 164))
        figures["detokenise_64_ids_ms"] = _ms(lambda: engine.tokenizer.decode(ids), args.steps, args.repeats)
        one = forward[f"{engine_threads}_threads"]
        if "1" in one and "16" in one:
            figures["forward_16_over_1"] = round(one["16"] / one["1"], 3)
    finally:
        engine.close()
    compiled = TorchEngine(args.model, device="cpu", max_batch=max(rows), compile=True)
    try:
        if compiled.compiled:
            figures["compiled_forward_ms"] = _forward_ms(compiled.runner, vocab, rows, args.context,
                                                         args.steps, args.repeats)
            figures["compiled_speedup"] = {b: round(one[b] / ms, 3) for b, ms in figures["compiled_forward_ms"].items()}
        else:
            figures["compiled_forward_ms"] = "torch.compile failed here"
    finally:
        compiled.close()
    print(figures, flush=True)
    print("wrote", write("decode_step", figures))


if __name__ == "__main__":
    main()
