"""Training benchmarks (issue: foundation). Prints figures, writes bench/results/train.json.

    python bench/train.py [--run runs/tiny] [--train] [--steps 30] [--eval-items 500]
                          [--reward-variants checker,both]

1. Wall time of the `tiny` pipeline (read from the run's metrics.json; `--train` runs it
   first into the given folder if it is missing).
2. Tokens/s of our pretraining loop (checkpointing, schedule, clipping, progress) against a
   bare torch loop (forward, backward, AdamW) on the same model and batch shape. Goal >= 0.9.
3. Held-out greedy chain-of-thought accuracy of the run's SFT and RLHF models on `arith`
   (re-scored here on --eval-items items, 95% Wilson interval), and the entropy drop from
   SFT to RLHF; with --reward-variants, RL retrained from the same SFT and reward model
   with the exact checker (or both) as reward, scored the same way.
4. MFU of the `small` preset where a GPU is present (none on CPU-only machines: recorded as such).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import write  # noqa: E402
from evals.tasks import ArithTask  # noqa: E402
from training._loop import Dist, StepOutput, train  # noqa: E402
from training._model import new_model  # noqa: E402
from training.config import OptimConfig, preset  # noqa: E402
from training.pipeline import evaluate  # noqa: E402
from training.pipeline import run as pipeline_run  # noqa: E402
from training.progress import Reporter  # noqa: E402
from training.rollouts import accuracy, rollouts  # noqa: E402
from training.tokenizer import load_tokenizer  # noqa: E402


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(centre - half, 4), round(centre + half, 4))


def loop_throughput(run: Path, steps: int, preset_name: str, device: torch.device) -> dict:
    cfg = preset(preset_name)
    tok = load_tokenizer(run / "tokenizer")
    p = cfg.pretrain
    vocab = len(tok)
    rng = np.random.default_rng(0)
    stream = rng.integers(0, vocab, size=p.batch_size * p.seq_len * 8).astype(np.int64)

    def batch(step: int) -> torch.Tensor:
        g = np.random.default_rng([0, step])
        starts = g.integers(0, len(stream) - p.seq_len, size=p.batch_size)
        return torch.from_numpy(np.stack([stream[s: s + p.seq_len] for s in starts])).to(device)

    def bare() -> float:
        # Timed over the same steps + 2 as ours, first steps included, for a like-for-like rate.
        model = new_model(cfg.model, tok, 0).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=p.lr, betas=(0.9, 0.95))
        t0 = time.perf_counter()
        for step in range(steps + 2):
            x = batch(step)
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
        return (steps + 2) * p.batch_size * p.seq_len / (time.perf_counter() - t0)

    def ours() -> float:
        model = new_model(cfg.model, tok, 0).to(device)
        ocfg = OptimConfig(**{**vars(p), "steps": steps + 2, "checkpoint_every": max(1, (steps + 2) // 2)})

        def step_fn(m: torch.nn.Module, step: int) -> StepOutput:
            x = batch(step)
            return StepOutput(m(input_ids=x, labels=x).loss, x.numel())

        with tempfile.TemporaryDirectory() as tmp:
            result = train(model, ocfg, step_fn, checkpoint=Path(tmp) / "c.pt", dist=Dist(device=device),
                           reporter=Reporter(enabled=False), label="bench")
        return result.tokens / result.wall_s

    # Alternate to spread machine noise over both.
    rates = {"bare": [], "ours": []}
    for _ in range(2):
        rates["bare"].append(bare())
        rates["ours"].append(ours())
    b, o = max(rates["bare"]), max(rates["ours"])
    return {"bare_tokens_per_s": round(b, 1), "ours_tokens_per_s": round(o, 1),
            "ratio": round(o / b, 3), "goal": ">= 0.9", "steps": steps,
            "batch": [p.batch_size, p.seq_len]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/tiny", help="a finished tiny run folder")
    ap.add_argument("--train", action="store_true", help="train the run first if it is missing")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-items", type=int, default=500)
    ap.add_argument("--reward-variants", default="",
                    help="comma-separated RL rewards (checker,both) to retrain from the run's SFT and score too")
    args = ap.parse_args()
    run = Path(args.run)
    if not (run / "metrics.json").exists():
        if not args.train:
            sys.exit(f"bench/train.py: no finished run at {run}; pass --train or train it with make demo")
        from assist.cli import main as cli
        if cli(["train", "--preset", "tiny", "--out", str(run), "--resume"]) != 0:
            sys.exit("bench/train.py: training failed")
    ledger = json.loads((run / "metrics.json").read_text())
    stages = ledger["stages"]
    pipeline_s = sum(m.get("stage_wall_s", m.get("wall_s", 0)) for m in stages.values())
    figures: dict = {
        "preset": ledger["config"]["preset"],
        "pipeline_wall_s": round(pipeline_s, 1),
        "pipeline_goal_s": 900,
        "stage_wall_s": {k: m.get("stage_wall_s", m.get("wall_s")) for k, m in stages.items()},
        "params": stages["pretrain"]["params"],
        "pretrain_tokens": stages["pretrain"]["tokens"],
        "flops": {k: m.get("flops") for k, m in stages.items() if m.get("flops")},
        "knobs": {"arith": ledger["config"]["arith"], "model": ledger["config"]["model"]},
    }
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print("measuring loop throughput ...", flush=True)
    figures["loop_throughput"] = loop_throughput(run, args.steps, ledger["config"]["preset"], device)

    cfg = preset(ledger["config"]["preset"])
    tok = load_tokenizer(run / "tokenizer")
    arith = ArithTask(cfg.arith)
    items = arith.split("test", args.eval_items)
    def score(folder: Path) -> dict:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
        groups = rollouts(model, tok, items, max_new_tokens=cfg.rl.max_new_tokens)
        k = round(accuracy(arith, groups) * len(items))
        div = evaluate(model, run, cfg, 1)["diversity"]
        return {"arith_greedy_cot_accuracy": round(k / len(items), 4), "ci95": wilson(k, len(items)),
                "n": len(items), "mean_token_entropy": div["mean_token_entropy"],
                "ead_distinct_2": div["ead_distinct_2"]}

    acc = {}
    for name in ("sft", "rlhf"):
        print(f"scoring {name} on {len(items)} held-out arith items ...", flush=True)
        acc[name] = score(run / name)
    for variant in [v for v in args.reward_variants.split(",") if v]:
        print(f"retraining RL with reward={variant} ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "run"
            shutil.copytree(run, copy, ignore=shutil.ignore_patterns("rlhf", "data"))
            ledger_copy = json.loads((copy / "metrics.json").read_text())
            ledger_copy["stages"].pop("rl", None)
            ledger_copy["config"]["rl"]["reward"] = variant
            (copy / "metrics.json").write_text(json.dumps(ledger_copy))
            vcfg = preset(ledger["config"]["preset"])
            vcfg.rl.reward = variant
            pipeline_run(vcfg, copy, ["rl"], resume=True, reporter=Reporter(enabled=False))
            acc[f"rlhf_reward_{variant}"] = score(copy / "rlhf")
    figures["heldout"] = acc
    figures["heldout_goal"] = "SFT greedy accuracy between 0.40 and 0.75"
    figures["entropy_drop_sft_to_rlhf"] = round(acc["sft"]["mean_token_entropy"] - acc["rlhf"]["mean_token_entropy"], 4)
    figures["gpu_mfu_small"] = "not measured: no GPU on this machine" if device.type == "cpu" else "see bench/gpu.py"
    path = write("train", figures)
    print(json.dumps(figures, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
