"""What the training loop's speed settings buy. Prints figures, writes bench/results/train_step.json.

    python bench/train_step.py [--preset tiny] [--steps 8] [--modes eager,bf16,compile,compile_bf16]

One pretraining-shaped step of the preset's model (``pretrain.batch_size`` x
``pretrain.seq_len`` random tokens: forward, backward, clipping, AdamW), timed in each mode:
float32 (``eager``), bfloat16 autocast (``bf16``: ``--set pretrain.autocast=bf16``),
``torch.compile`` (``compile``: ``--set pretrain.compile=true``) and both. Each mode gets a
fresh model; its first steps (the compile) are timed apart as ``warmup_s``, then the mean
of ``--steps`` steps. Also recorded: whether this CPU computes bfloat16 natively, without
which bf16 is an emulation that costs more than it saves.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import write  # noqa: E402
from training._loop import autocast_for, native_bf16  # noqa: E402
from training._model import llama_config  # noqa: E402
from training.config import preset  # noqa: E402

MODES = ("eager", "bf16", "compile", "compile_bf16")


class _Vocab:
    """What ``llama_config`` reads of a tokenizer, for a model of ``size`` tokens."""

    def __init__(self, size: int) -> None:
        self.size, self.pad_token_id = size, 0

    def __len__(self) -> int:
        return self.size

    def convert_tokens_to_ids(self, token: str) -> int:
        return {"<|endoftext|>": 1, "<|im_end|>": 2}.get(token, 3)


def step_ms(mode: str, config, steps: int) -> dict[str, float]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(config.model, _Vocab(config.model.vocab_size)))
    run = torch.compile(model) if mode.startswith("compile") else model
    cast = autocast_for(torch.device("cpu"), "bf16" if mode.endswith("bf16") else "off")  # as the loop does
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    p = config.pretrain
    x = torch.randint(0, config.model.vocab_size, (p.batch_size, p.seq_len))

    def step() -> None:
        with cast:
            loss = run(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step(), step()
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return {"ms_per_step": round((time.perf_counter() - t0) / steps * 1000, 1), "warmup_s": round(warmup, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        ap.error(f"--modes: unknown {', '.join(unknown)} (choose from {', '.join(MODES)})")
    config = preset(args.preset)
    figures: dict = {"preset": args.preset, "batch": [config.pretrain.batch_size, config.pretrain.seq_len],
                     "steps_timed": args.steps,
                     "native_bf16": native_bf16(torch.device("cpu")), "modes": {}}
    for mode in modes:
        figures["modes"][mode] = step_ms(mode, config, args.steps)
        print(mode, figures["modes"][mode], flush=True)
    eager = figures["modes"].get("eager", {}).get("ms_per_step")
    if eager:
        figures["speedup_over_eager"] = {m: round(eager / f["ms_per_step"], 2) for m, f in figures["modes"].items()}
    print("wrote", write("train_step", figures))


if __name__ == "__main__":
    main()
