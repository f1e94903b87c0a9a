"""The whole run: tokenizer -> pretrain -> sft (-> scratch) -> rm -> rl, resumable stage by stage.

``runs/<name>/metrics.json`` is the ledger: a stage listed there, with its folder on disk,
is finished and is never redone by ``--resume``; a stage cut short resumes from its last
checkpoint. Under ``torchrun`` pretraining and SFT run data-parallel; the tokenizer, the
reward model and RL run on rank 0 while the other ranks wait. In one process on a CPU,
``scratch`` trains in a second process beside ``rm`` and ``rl`` (``overlap``), each on half
the threads; ``metrics.json`` then records the run's wall time apart from the stages' own.

Every stage seeds torch, numpy and ``random`` from (config seed, stage name) as it starts, so
a stage run in a fresh process after ``--resume`` gives the same weights, bit for bit, as the
same stage run straight after the earlier ones in one process, on the same number of
threads (a stage beside another runs on fewer: ``--sequential`` keeps them all).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from assist.errors import BadRequest
from evals import diversity
from evals.tasks import ArithTask, FactsTask
from training import _ledger as ledger_file
from training import data, pretrain, reward_model, rl, sft
from training._loop import CheckpointError, Dist, LoopResult, seed_stage, setup_distributed
from training._model import n_params, save_stage, stop_ids
from training.card import write_card
from training.config import STAGES, RunConfig
from training.probes import arith_probe, facts_probe
from training.progress import Reporter
from training.rollouts import accuracy, rollouts
from training.tokenizer import load_tokenizer, train_tokenizer

__all__ = ["RunError", "run"]

_NEEDS = {"pretrain": "tokenizer", "sft": "pretrain", "scratch": "tokenizer", "rm": "sft", "rl": "sft"}


class RunError(BadRequest, RuntimeError):
    """A run that cannot go on as asked; the message says what to do."""


def _loop_metrics(result: LoopResult, n: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    losses = result.losses
    stride = max(1, len(losses) // 50)
    m: dict[str, Any] = {
        "steps": result.steps, "tokens": result.tokens, "wall_s": round(result.wall_s, 2),
        "params": n, "flops": float(6 * n * result.tokens),  # 6ND: forward + backward
        "tokens_per_s": round(result.tokens / max(result.wall_s, 1e-9), 1),
        "loss_first": round(losses[0], 4) if losses else None,
        "loss_last": round(sum(losses[-5:]) / len(losses[-5:]), 4) if losses else None,
        "loss_curve": [round(x, 4) for x in losses[::stride]],
        "resumed_from_step": result.resumed_from,
    }
    for key, values in result.metrics.items():
        if values:
            m[f"{key}_first"] = round(values[0], 4)
            m[f"{key}_last"] = round(sum(values[-3:]) / len(values[-3:]), 4)
    m.update(extra or {})
    return m


def evaluate(model: torch.nn.Module, out: Path, cfg: RunConfig, n: int) -> dict[str, Any]:
    """Greedy chain-of-thought accuracy on held-out arith, and mode-collapse figures."""
    tok = load_tokenizer(out / "tokenizer")
    arith = ArithTask(cfg.arith)
    test = arith.split("test", n)
    greedy = rollouts(model, tok, test, max_new_tokens=cfg.rl.max_new_tokens)
    questions = [s.question for s in arith.split("test")[-cfg.diversity.prompts:]]
    measured = diversity.measure(model, tok, questions, dataclasses.replace(cfg.diversity, seed=cfg.seed),
                                 stop_ids=stop_ids(tok))
    return {
        "arith_greedy_accuracy": round(accuracy(arith, greedy), 4),
        "arith_eval_items": len(test),
        "truncated_rate": round(sum(r.finish_reason == "length" for g in greedy for r in g) / len(test), 4),
        "diversity": {
            "mean_token_entropy": measured["entropy"],
            **{f"ead_distinct_{k}": measured[f"distinct_{k}"] for k in (1, 2, 3)},
            "samples": measured["samples"],
        },
    }


def _tokenizer_stage(cfg: RunConfig, out: Path, dist: Dist, reporter: Reporter) -> dict[str, Any]:
    t0 = time.perf_counter()
    arith, facts = ArithTask(cfg.arith), FactsTask(cfg.facts)
    ratios = cfg.data.mixture

    def sources(seed: int) -> dict[str, Iterator[str]]:
        return data.sources(arith, facts, cfg.sft.mixture, seed, cfg.data.lookups, cfg.data.restate)

    docs = data.documents(ratios, sources(cfg.seed), cfg.seed)
    texts, chars = [], 0
    while chars < cfg.data.tokenizer_chars:
        _, text = next(docs)
        texts.append(text)
        chars += len(text)
    reporter.log(f"tokenizer: training a {cfg.model.vocab_size}-token BPE on {chars:,} characters")
    tok = train_tokenizer(texts, cfg.model.vocab_size)
    p = cfg.pretrain
    target = int(p.steps * p.batch_size * p.seq_len * dist.world_size * cfg.data.stream_margin)
    # Fresh draws for the stream, so the realized shares describe what pretraining reads.
    docs = data.documents(ratios, sources(cfg.seed + 1), cfg.seed + 1)
    reporter.log(f"data: tokenizing a {target:,}-token mixture")
    mix = data.build_stream(docs, lambda t: tok.encode(t, add_special_tokens=False),
                            tok.convert_tokens_to_ids("<|endoftext|>"), target,
                            out / "data" / "pretrain.npy", ratios)
    warm = cfg.data.copy_warmup_steps
    warmup_tokens = 0
    if warm > 0:  # the copy curriculum's own stream (training/pretrain.py reads it first)
        wdocs = data.documents({"copy": 1.0}, sources(cfg.seed + 2), cfg.seed + 2)
        wtarget = int(min(warm, p.steps) * p.batch_size * p.seq_len * dist.world_size * cfg.data.stream_margin)
        reporter.log(f"data: tokenizing a {wtarget:,}-token copy warm-up")
        warmup_tokens = data.build_stream(wdocs, lambda t: tok.encode(t, add_special_tokens=False),
                                          tok.convert_tokens_to_ids("<|endoftext|>"), wtarget,
                                          out / "data" / "warmup.npy", {"copy": 1.0}).tokens
    tmp = out / "tokenizer.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    tmp.replace(out / "tokenizer")
    return {"vocab_size": len(tok), "tokenizer_chars": chars, "stream_tokens": mix.tokens,
            "documents": mix.documents, "mixture": mix.ratios, "realized_mixture": mix.realized,
            "copy_warmup_tokens": warmup_tokens,
            "wall_s": round(time.perf_counter() - t0, 2)}


def run(cfg: RunConfig, out: Path, stages: list[str] | None = None, resume: bool = False,
        reporter: Reporter | None = None, overlap: bool = True) -> dict[str, Any]:
    """Train ``stages`` (default: all) into ``out``. With ``overlap``, on a CPU with two or
    more threads and one process, ``scratch`` trains in a second process while ``rm`` and
    ``rl`` run here, each on half the threads (see :func:`_beside_ok`)."""
    t_start = time.perf_counter()
    stages = list(stages or STAGES)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise RunError(f"unknown stage {bad[0]!r}; expected some of {', '.join(STAGES)}")
    hf_logging.disable_progress_bar()  # our own progress reporting is enough
    dist = setup_distributed()
    reporter = reporter or Reporter()
    reporter.enabled = dist.is_main
    ledger = ledger_file.read(out)
    if ledger["stages"] and not resume:
        raise RunError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    config = json.loads(json.dumps(cfg.to_dict()))  # as it reads back from metrics.json
    if ledger.get("config") and ledger["config"] != config:
        key = ledger_file.first_difference(ledger["config"], config)
        raise RunError(f"{out} was trained with another config ({key} differs); "
                       "resume with the same preset and --set flags, or choose another --out")
    ordered = [s for s in STAGES if s in stages]
    for stage in ordered:  # checked before anything is written
        need = _NEEDS.get(stage)
        if need and need not in ordered and not ledger_file.done(out, need):
            raise RunError(f"stage {stage!r} needs {need!r} first: add it to --stages or run it once")
    wall_before = float(ledger.get("wall_s") or 0.0)  # earlier invocations of a resumed run
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        with ledger_file.editing(out) as ledger:
            ledger["config"] = config
    dist.barrier()
    side: _Beside | None = None
    try:
        for stage in ordered:
            if ledger_file.done(out, stage):
                reporter.log(f"{stage}: already done, kept")
                continue
            if overlap and side is None and _beside_ok(stage, ordered, out, dist):
                side = _Beside.start(stage, cfg, out, resume, reporter)
                continue
            distributed = stage in ("pretrain", "sft", "scratch")
            if not distributed and not dist.is_main:
                dist.barrier()  # rank 0 runs this stage alone
                continue
            _finish_stage(stage, cfg, out, dist if distributed else Dist(device=dist.device), reporter, resume)
            if dist.is_main:
                ledger_file.record_wall(out, wall_before + time.perf_counter() - t_start)
            dist.barrier()
        if side is not None:
            side.join(reporter)
            side = None
    finally:
        if side is not None:  # this process failed or was interrupted: stop the other too
            side.stop()
    ledger = ledger_file.read(out)
    if dist.is_main:
        ledger = ledger_file.record_wall(out, wall_before + time.perf_counter() - t_start)
        write_card(out, ledger)
    return ledger


def _finish_stage(stage: str, cfg: RunConfig, out: Path, dist: Dist, reporter: Reporter, resume: bool,
                  beside: bool = False) -> None:
    """Train one stage, then list it in the ledger (on rank 0); ``beside``: it ran in a second
    process, so its ``stage_wall_s`` overlaps the other stages'."""
    t0 = time.perf_counter()
    seed_stage(cfg.seed, stage)  # the stage's own draws, whatever ran before it here
    try:
        metrics = _run_stage(stage, cfg, out, dist, reporter, resume)
    except CheckpointError as exc:
        raise RunError(str(exc)) from exc
    # The whole stage (sampling, evaluation, saving), beside the loop's own wall_s.
    metrics["stage_wall_s"] = round(time.perf_counter() - t0, 2)
    if beside:
        metrics["beside"] = True
    if dist.is_main:
        with ledger_file.editing(out) as ledger:  # a stage in a second process may be writing too
            ledger["stages"][stage] = metrics
        (out / "checkpoints" / f"{stage}.pt").unlink(missing_ok=True)
        reporter.log(f"{stage}: done in {metrics['stage_wall_s']:.1f}s")


def _beside_ok(stage: str, ordered: list[str], out: Path, dist: Dist) -> bool:
    """Whether ``stage`` should train in a second process beside the stages after it.

    Only ``scratch``: it needs nothing but the tokenizer and nothing needs it, while ``rm``
    and ``rl`` need only ``sft``. On 2 CPU cores, a process per core does more than one
    process on both: ``rm`` and ``rl`` mostly sample one token at a time, which a second
    thread barely speeds up. Measured on ``tiny`` here: scratch 248 s on one thread beside
    rm + rl 270 s on the other, against 158 + 96 + 99 s one after another on both. On a GPU,
    under torchrun, or with one thread, the stages run in order.
    """
    later = any(s in ordered and not ledger_file.done(out, s) for s in ("rm", "rl"))
    return (stage == "scratch" and later and not dist.enabled and dist.device.type == "cpu"
            and torch.get_num_threads() >= 2)


@dataclass
class _Beside:
    """A stage training in a second process (``spawn``: a fresh interpreter, no forked
    threads), on half the threads; its log goes to ``RUN/logs/STAGE.log``."""

    stage: str
    out: Path
    process: Any
    threads: int
    log: Path
    t0: float

    @classmethod
    def start(cls, stage: str, cfg: RunConfig, out: Path, resume: bool, reporter: Reporter) -> _Beside:
        threads = torch.get_num_threads()
        theirs = threads // 2
        log = out / "logs" / f"{stage}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        process = multiprocessing.get_context("spawn").Process(
            target=_beside_main, args=(stage, cfg, out, resume, log, theirs, os.getpid()), name=f"assist-{stage}")
        process.start()
        torch.set_num_threads(threads - theirs)
        reporter.log(f"{stage}: training in a second process beside the stages after it "
                     f"({theirs} of {threads} threads; log: {log})")
        return cls(stage, out, process, threads, log, time.perf_counter())

    def join(self, reporter: Reporter) -> None:
        if self.process.is_alive():
            reporter.log(f"{self.stage}: waiting for its process to finish (log: {self.log})")
        self.process.join()
        torch.set_num_threads(self.threads)
        if self.process.exitcode != 0 or not ledger_file.done(self.out, self.stage):
            lines = self.log.read_text().strip().splitlines() if self.log.is_file() else []
            why = lines[-1] if lines else f"exit code {self.process.exitcode}"
            raise RunError(f"stage {self.stage!r} failed in its own process ({why}); its log: {self.log}; "
                           "continue with --resume")
        reporter.log(f"{self.stage}: done beside the others ({time.perf_counter() - self.t0:.1f}s)")

    def stop(self) -> None:
        """End the process; its last checkpoint is kept, so --resume continues it."""
        if self.process.is_alive():
            self.process.terminate()
        self.process.join()
        torch.set_num_threads(self.threads)


def _beside_main(stage: str, cfg: RunConfig, out: Path, resume: bool, log: Path, threads: int,
                 parent: int) -> None:
    """The second process: one stage, its progress as plain lines in ``log``; a failure is
    written there too (its last line says why), not on the terminal the first process draws."""
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    with open(log, "w") as handle:
        reporter = Reporter(console=Console(file=handle, width=120))
        try:
            _finish_stage(stage, cfg, out, Dist(), reporter, resume, beside=True)
        except KeyboardInterrupt:
            sys.exit(130)
        except BaseException as exc:  # noqa: BLE001 - reported through the log and the exit code
            handle.write(traceback.format_exc() if not isinstance(exc, BadRequest) else "")
            handle.write(f"{stage}: {exc}\n")
            handle.flush()
            sys.exit(1)


def _run_stage(stage: str, cfg: RunConfig, out: Path, dist: Dist, reporter: Reporter, resume: bool) -> dict[str, Any]:
    if stage == "tokenizer":
        return _tokenizer_stage(cfg, out, dist, reporter)
    tok = load_tokenizer(out / "tokenizer")
    card = {"stage": stage, "preset": cfg.preset, "seed": cfg.seed}
    if stage == "scratch":  # the control for "pretraining matters"; `assist demo` scores it
        model, result = sft.run(cfg, out, dist, reporter, resume, from_scratch=True)
        if dist.is_main:
            save_stage(model, tok, out / ledger_file.FOLDER[stage], {**card, "init": "random"})
        return _loop_metrics(result, n_params(model), {"init": "random", "same_as": "sft"})
    if stage in ("pretrain", "sft"):
        module = pretrain if stage == "pretrain" else sft
        model, result = module.run(cfg, out, dist, reporter, resume)
        extra = {}
        if dist.is_main:  # other ranks hold the same weights; one writes and scores them
            save_stage(model, tok, out / ledger_file.FOLDER[stage], card)
            extra = evaluate(model, out, cfg, cfg.sft.eval_items)
            if stage == "pretrain":  # why a base model fails, when it does (training/probes.py)
                extra["number_probe"] = arith_probe(model, tok, ArithTask(cfg.arith))
            # what the model knows of the world and whether it reads a passage: SFT can wear
            # the first away, and retrieval fails without the second
            extra["facts_probe"] = facts_probe(model, tok, FactsTask(cfg.facts))
        return _loop_metrics(result, n_params(model), extra)
    if stage == "rm":
        model, result, stats = reward_model.run(cfg, out, dist, reporter, resume)
        save_stage(model, tok, out / "rm", card)
        return _loop_metrics(result, n_params(model), stats)
    model, result = rl.run(cfg, out, dist, reporter, resume)
    save_stage(model, tok, out / "rlhf", {**card, "reward": cfg.rl.reward})
    sft_metrics = ledger_file.read(out)["stages"].get("sft", {})
    if sft_metrics.get("arith_eval_items") == min(cfg.rl.eval_items, cfg.arith.test_size):
        before = {k: sft_metrics[k] for k in ("arith_greedy_accuracy", "arith_eval_items",
                                              "truncated_rate", "diversity")}
    else:  # scored on another number of items: score the SFT model again, like for like
        sft_model = AutoModelForCausalLM.from_pretrained(out / "sft", dtype=torch.float32)
        before = evaluate(sft_model, out, cfg, cfg.rl.eval_items)
    after = evaluate(model, out, cfg, cfg.rl.eval_items)
    share = {"rm_share": rl.run_rm_share(cfg.rl.rm_trust, out)} if cfg.rl.reward == "both" else {}
    return _loop_metrics(result, n_params(model), {
        "reward": cfg.rl.reward, **share, "before": before, "after": after, **after})


def _exit_with(parent: int) -> None:
    """End this process once ``parent`` is gone (killed outright, it cannot stop us): an
    orphan would go on writing the stage's checkpoint while a ``--resume`` starts another."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)  # the last checkpoint was written atomically; --resume continues from it
