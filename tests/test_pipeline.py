"""The whole pipeline on the `test` preset: outputs, formats, and the CLI's errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import run_assist

pytestmark = pytest.mark.slow

STAGE_DIRS = ("base", "sft", "rm", "rlhf")


def test_test_preset_trains_every_stage_in_under_a_minute(trained_run):
    out, elapsed = trained_run
    assert elapsed < 60, f"the test preset took {elapsed:.1f}s"
    ledger = json.loads((out / "metrics.json").read_text())
    assert list(ledger["stages"]) == ["tokenizer", "pretrain", "sft", "rm", "rl"]
    for stage in ("pretrain", "sft", "rm", "rl"):
        m = ledger["stages"][stage]
        assert m["steps"] > 0 and m["tokens"] > 0 and m["wall_s"] > 0 and m["flops"] > 0
        assert len(m["loss_curve"]) > 0
    assert ledger["stages"]["pretrain"]["loss_last"] < ledger["stages"]["pretrain"]["loss_first"]
    assert ledger["stages"]["sft"]["loss_last"] < ledger["stages"]["sft"]["loss_first"]
    for stage in ("pretrain", "sft", "rl"):
        assert 0.0 <= ledger["stages"][stage]["arith_greedy_accuracy"] <= 1.0
        assert ledger["stages"][stage]["diversity"]["mean_token_entropy"] > 0
    rl = ledger["stages"]["rl"]
    assert {"reward_first", "kl_last", "before", "after"} <= set(rl)
    assert 0.0 <= ledger["stages"]["rm"]["heldout_pair_accuracy"] <= 1.0
    mix = ledger["stages"]["tokenizer"]
    assert set(mix["realized_mixture"]) == {"arith", "dialogue", "facts", "code", "copy"}
    assert abs(sum(mix["realized_mixture"].values()) - 1.0) < 1e-3
    assert (out / "README.md").read_text().startswith("# assist `test` assistant")
    assert not list((out / "checkpoints").glob("*.pt")), "finished stages leave no checkpoints"


def test_every_stage_folder_loads_with_transformers(trained_run):
    out, _ = trained_run
    for name in ("base", "sft", "rlhf"):
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
