"""The whole pipeline on the `test` preset: outputs, formats, and the CLI's errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from evals.report import DEMO_SC
from tests.conftest import run_assist
from training.rl import rm_share

pytestmark = pytest.mark.slow

STAGE_DIRS = ("base", "sft", "rm", "rlhf")


def test_test_preset_trains_every_stage_in_under_a_minute(trained_run):
    out, elapsed = trained_run
    assert elapsed < 60, f"the test preset took {elapsed:.1f}s"
    ledger = json.loads((out / "metrics.json").read_text())
    assert list(ledger["stages"]) == ["tokenizer", "pretrain", "sft", "scratch", "rm", "rl"]
    for stage in ("pretrain", "sft", "scratch", "rm", "rl"):
        m = ledger["stages"][stage]
        assert m["steps"] > 0 and m["tokens"] > 0 and m["wall_s"] > 0 and m["flops"] > 0
        assert len(m["loss_curve"]) > 0
    assert ledger["stages"]["pretrain"]["loss_last"] < ledger["stages"]["pretrain"]["loss_first"]
    assert ledger["stages"]["sft"]["loss_last"] < ledger["stages"]["sft"]["loss_first"]
    # the control saw the same conversations for the same steps, from a random init
    scratch, sft = ledger["stages"]["scratch"], ledger["stages"]["sft"]
    assert scratch["init"] == "random" and scratch["steps"] == sft["steps"] and scratch["tokens"] == sft["tokens"]
    assert scratch["loss_first"] > sft["loss_first"]
    for stage in ("pretrain", "sft", "rl"):
        assert 0.0 <= ledger["stages"][stage]["arith_greedy_accuracy"] <= 1.0
        assert ledger["stages"][stage]["diversity"]["mean_token_entropy"] > 0
    probe = ledger["stages"]["pretrain"]["number_probe"]  # why a base fails (training/probes.py)
    assert probe["problems"] > 0 and probe["operand_copy_n"] > 0
    assert all(0.0 <= probe[k] <= 1.0 for k in ("operand_copy", "context_copy", "arithmetic"))
    for stage in ("pretrain", "sft"):  # what the world's facts look like to the model
        facts = ledger["stages"][stage]["facts_probe"]
        assert facts["recall_n"] > 0 and facts["read_n"] > 0 and 0.0 <= facts["recall"] <= 1.0
    rl = ledger["stages"]["rl"]
    assert {"reward_first", "kl_last", "before", "after"} <= set(rl)
    rm = ledger["stages"]["rm"]
    # the reward model counted beside the labeller by its held-out skill (tiny's recipe too)
    assert ledger["config"]["rl"]["reward"] == "both" and ledger["config"]["rl"]["rm_trust"] == "skill"
    assert rl["rm_share"] == rm_share("skill", rm) and 0.0 <= rl["rm_share"] <= 1.0
    assert 0.0 <= rm["heldout_pair_accuracy_with_written"] <= 1.0  # a written slip always ranks apart
    # sampled completions of a few held-out prompts may all score alike: then there is no
    # pair to rank, and the accuracy is missing rather than made up
    if rm["heldout_pairs"]:
        assert 0.0 <= rm["heldout_pair_accuracy"] <= 1.0
        assert 0.0 <= rm["policy_likelihood_pair_accuracy"] <= 1.0  # the yardstick, same pairs
    else:
        assert rm["heldout_pair_accuracy"] is None and rm["policy_likelihood_pair_accuracy"] is None
    mix = ledger["stages"]["tokenizer"]
    assert set(mix["realized_mixture"]) == {"arith", "dialogue", "facts", "code", "copy"}
    assert abs(sum(mix["realized_mixture"].values()) - 1.0) < 1e-3
    assert mix["copy_warmup_tokens"] >= 10 * 8 * 128  # the test preset exercises the copy curriculum
    assert (out / "README.md").read_text().startswith("# assist `test` assistant")
    assert not list((out / "checkpoints").glob("*.pt")), "finished stages leave no checkpoints"


def test_every_stage_folder_loads_with_transformers(trained_run):
    out, _ = trained_run
    for name in ("base", "sft", "sft-scratch", "rlhf"):
        model = AutoModelForCausalLM.from_pretrained(out / name)
        tok = AutoTokenizer.from_pretrained(out / name)
        assert model.config.architectures == ["LlamaForCausalLM"]
        ids = tok.apply_chat_template([{"role": "user", "content": "Mia has 3 cups."}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        gen = model.generate(**ids, max_new_tokens=40, do_sample=False)
        new = gen[0, ids["input_ids"].shape[1]:].tolist()
        stops = set(model.generation_config.eos_token_id)
        assert tok.convert_tokens_to_ids("<|im_end|>") in stops
        assert len(new) == 40 or new[-1] in stops  # generation_config stops at end of turn
    rm = AutoModelForSequenceClassification.from_pretrained(out / "rm")
    assert rm.config.num_labels == 1 and rm.config.architectures == ["LlamaForSequenceClassification"]


def test_reward_is_read_at_the_readout_token(trained_run):
    out, _ = trained_run
    rm = AutoModelForSequenceClassification.from_pretrained(out / "rm").eval()
    tok = AutoTokenizer.from_pretrained(out / "rm")
    text = "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n#### 2<|im_end|><|reward|>"
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    padded = torch.cat([ids, torch.full((1, 3), tok.pad_token_id)], dim=1)
    with torch.no_grad():
        out_rm = rm(input_ids=padded, attention_mask=(padded != tok.pad_token_id).long(), output_hidden_states=True)
        last = out_rm.hidden_states[-1][0, ids.shape[1] - 1]
        assert float(out_rm.logits[0, 0]) == pytest.approx(float(rm.score(last)[0]), abs=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "unknown preset"),
    (["--preset", "test", "--set", "pretrain.steps=abc"], "pretrain.steps"),
    (["--preset", "test", "--stages", "pretrain,magic"], "unknown stage 'magic'"),
    (["--preset", "test", "--stages", "sft"], "needs 'pretrain' first"),
])
def test_bad_flags_give_one_clear_line(tmp_path, args, message):
    proc = run_assist("train", "--out", str(tmp_path / "r"), *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # nothing written


def test_existing_run_needs_resume_and_files_are_not_folders(trained_run, tmp_path):
    out, _ = trained_run
    before = (out / "metrics.json").read_text()
    proc = run_assist("train", "--preset", "test", "--out", str(out))
    assert proc.returncode == 2 and "--resume" in proc.stderr
    assert (out / "metrics.json").read_text() == before
    a_file = tmp_path / "file"
    a_file.write_text("x")
    proc = run_assist("train", "--preset", "test", "--out", str(a_file))
    assert proc.returncode == 2 and "not a folder" in proc.stderr
    proc = run_assist("train", "--preset", "test")
    assert proc.returncode == 2 and "--out" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_assist("train", "--preset", "test", "--out", str(out), "--resume", "--set", "sft.steps=99")
    assert proc.returncode == 2 and "sft.steps differs" in proc.stderr
    assert (out / "metrics.json").read_text() == before


def test_demo_reports_every_claim_with_a_verdict(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    proc = run_assist("demo", "--run", str(run), "--limit", "6", "--rl-limit", "10", "--reward-prompts", "12",
                      "--facts-limit", "16", "--concurrency", "8", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    claims = json.loads((run / "eval" / "claims.json").read_text())
    names = [r["claim"] for r in claims["rows"]]
    assert len(names) == 10 and any("Retrieval" in n for n in names) and any("Pretraining" in n for n in names)
    for row in claims["rows"]:
        assert row["verdict"] in {"shown", "not significant", "reversed", "not run", "–"}
        assert row["goal_met"] in (True, False, None)
    assert claims["summary"][DEMO_SC]["n"] == 6 and set(map(int, claims["maj_at_k"])) == set(range(1, 17))
    assert claims["facts"]["n_seen"] + claims["facts"]["n_unseen"] == 16
    rl_row = next(r for r in claims["rows"] if r["claim"].startswith("RLHF"))
    assert "KL(RLHF ‖ SFT)" in rl_row["measured"]  # how far RL moved the policy, beside the entropy
    assert "on 10 items" in rl_row["measured"]  # the SFT -> RLHF claim reads --rl-limit items, the rest --limit
    rm_row = next(r for r in claims["rows"] if r["claim"].startswith("A reward model"))
    yardstick = json.loads((run / "metrics.json").read_text())["stages"]["rm"]["policy_likelihood_pair_accuracy"]
    assert yardstick is None or f"the SFT policy's own likelihood ranks them at {yardstick}" in rm_row["measured"]
    # the reward, SFT against RLHF on the same held-out prompts, as RL scored its samples
    reward = json.loads((run / "eval" / "rl_reward.json").read_text())
    ledger = json.loads((run / "metrics.json").read_text())
    assert reward["reward"] == ledger["config"]["rl"]["reward"] and set(reward["per_prompt"]) == {"sft", "rlhf"}
    assert reward["rm_share"] == ledger["stages"]["rl"]["rm_share"]
    per = reward["per_prompt"]
    assert len(per["sft"]) == len(per["rlhf"]) == reward["prompts"] == reward["prompts_asked"] == 12
    for name, values in per.items():
        assert reward["mean"][name] == pytest.approx(sum(values) / len(values), abs=1e-3)
    assert reward["delta"] == pytest.approx(reward["mean"]["rlhf"] - reward["mean"]["sft"], abs=1e-3)
    assert reward["lo"] <= reward["delta"] <= reward["hi"]
    assert f"SFT {reward['mean']['sft']:.3f} → RLHF {reward['mean']['rlhf']:.3f}" in rl_row["measured"]
    assert reward["rm_share"] == 1.0 or f"reward model × {reward['rm_share']:g}" in rl_row["measured"]
    assert claims["rl_reward_heldout"]["delta"] == reward["delta"]
    report = (run / "REPORT.md").read_text()
    assert "## The talk's claims, in miniature" in report and "| eval: arith |" in report
    assert "*recall* of seen kingdoms' facts" in report and "after SFT: recall" in report
    timing = json.loads((run / "eval" / "demo_timing.json").read_text())
    assert set(timing["steps"]) == {"arith", "arith-rlhf", "arith-sft", "arith-scratch", "facts", "diversity",
                                    "rl-reward"}
    # a second pass resumes everything: nothing is recomputed, the report is rebuilt
    measured_at = (run / "eval" / "rl_reward.json").stat().st_mtime_ns
    again = run_assist("demo", "--run", str(run), "--limit", "6", "--rl-limit", "10", "--reward-prompts", "12",
                       "--facts-limit", "16", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run / "eval" / "demo_timing.json").read_text())["steps"] == timing["steps"]
    assert (run / "eval" / "rl_reward.json").stat().st_mtime_ns == measured_at
