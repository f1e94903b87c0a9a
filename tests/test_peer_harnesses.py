"""The endpoint under the evaluation harnesses people already use, run as their users run them.

lm-eval (``local-completions`` and ``local-chat-completions``) and inspect-ai (the
``openai-api`` provider) are driven as subprocesses against an in-process server over the
trained ``test`` checkpoint; ``docs/peers.md`` gives the same commands for ``assist serve``.
Each harness must finish, write its results, and score what our server answered the way we
score it: lm-eval's exact_match equals our own scorer on the responses it logged, and its
loglikelihoods equal an independent forward pass of the checkpoint.

Every test skips when its harness is not installed (they come with the ``dev`` extra).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from assist.engine import TorchEngine
from assist.server import EngineBackend, create_app
from assist.testing import running_server
from evals.tasks import ArithTask, Sample

pytestmark = pytest.mark.slow

N_GEN = 8  # arith items scored by generation
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

GEN_TASK = """\
task: assist_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|im_end|>", "\\n\\n"]
  max_gen_toks: 48
  do_sample: false
  temperature: 0.0
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
metadata:
  version: 1.0
"""

MC_TASK = """\
task: assist_arith_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer: ####"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

INSPECT_TASK = """\
from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.scorer import match
from inspect_ai.solver import generate

SAMPLES = {samples!r}


@task
def assist_arith():
    return Task(dataset=MemoryDataset([Sample(input=q, target=a) for q, a in SAMPLES]),
                solver=generate(), scorer=match(numeric=True))
"""


# Session-scoped so that a missing harness skips before the checkpoint is trained.
@pytest.fixture(scope="session")
def lm_eval_cli() -> list[str]:
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api]")
    return [sys.executable, "-m", "lm_eval"]


@pytest.fixture(scope="session")
def inspect_cli() -> list[str]:
    pytest.importorskip("inspect_ai")
    return [sys.executable, "-m", "inspect_ai"]


@pytest.fixture(scope="module")
def served(trained_run) -> Any:
    """(base URL, checkpoint folder, engine) of a torch engine serving the test checkpoint."""
    rlhf = trained_run[0] / "rlhf"
    engine = TorchEngine(rlhf, max_batch=16, name="assistant")
    try:
        with running_server(create_app(EngineBackend(engine), owns_backend=False)) as url:
            yield url, rlhf, engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def items() -> list[Sample]:
    return ArithTask().split("test", N_GEN)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory, items: list[Sample]) -> Path:
    """lm-eval tasks over local JSONL: arith by generation and arith as 3-way multiple choice."""
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    gen, mc = d / "arith.jsonl", d / "arith_mc.jsonl"
    gen.write_text("".join(json.dumps({"question": s.question, "answer": s.answer}) + "\n" for s in items))
    rows = []
    for i, s in enumerate(items):
        a = int(s.answer)
        choices = [str(a + k) for k in (0, 1, 2)]
        choices = choices[i % 3:] + choices[:i % 3]  # the gold answer in every position
        rows.append(json.dumps({"question": s.question, "choices": choices, "gold": choices.index(s.answer)}))
    mc.write_text("\n".join(rows) + "\n")
    (d / "assist_arith.yaml").write_text(GEN_TASK.format(data=gen))
    (d / "assist_arith_mc.yaml").write_text(MC_TASK.format(data=mc))
    return d


def _lm_eval(cli: list[str], task: str, model: str, model_args: str, task_dir: Path, out: Path,
             *extra: str) -> tuple[dict, list[dict]]:
    """Run the lm-eval CLI; (results JSON, logged samples) of ``task``."""
    cmd = [*cli, "--model", model, "--model_args", model_args,
           "--tasks", task, "--include_path", str(task_dir), "--output_path", str(out), "--log_samples", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=out.parent,
                          env={**os.environ, **OFFLINE})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = sorted(out.rglob("results_*.json"))
    samples = sorted(out.rglob(f"samples_{task}_*.jsonl"))
    assert results and samples, f"lm-eval wrote no results under {out}"
    logged = [json.loads(line) for line in samples[-1].read_text().splitlines() if line.strip()]
    return json.loads(results[-1].read_text()), logged


def _agrees_with_our_scorer(results: dict, logged: list[dict], items: list[Sample]) -> None:
    """lm-eval's exact_match on each logged response is our scorer's verdict on it."""
    task, by_id = ArithTask(), {s.question: s for s in items}
    assert len(logged) == len(items)
    ours = []
    for row in logged:
        sample = by_id[row["doc"]["question"]]
        assert row["target"] == sample.answer
        response = row["resps"][0][0]
        correct = task.score(sample, response).correct
        assert row["exact_match"] == float(correct), (response, row["filtered_resps"], sample.answer)
        ours.append(correct)
    scored = results["results"]["assist_arith"]["exact_match,strict-match"]
    assert scored == pytest.approx(sum(ours) / len(ours))


def test_lm_eval_local_completions_generate_until(lm_eval_cli, served, task_dir, items, tmp_path):
    url, _, _ = served
    args = f"model=assistant,base_url={url}/v1/completions,num_concurrent=2,tokenized_requests=False,tokenizer_backend=None"
    results, logged = _lm_eval(lm_eval_cli, "assist_arith", "local-completions", args, task_dir, tmp_path / "out")
    _agrees_with_our_scorer(results, logged, items)
    assert all(row["resps"][0][0] for row in logged)  # the model answered every prompt


def test_lm_eval_local_chat_completions_generate_until(lm_eval_cli, served, task_dir, items, tmp_path):
    url, _, engine = served
    args = f"model=assistant,base_url={url}/v1/chat/completions,num_concurrent=2"
    results, logged = _lm_eval(lm_eval_cli, "assist_arith", "local-chat-completions", args, task_dir, tmp_path / "out",
                               "--apply_chat_template")
    _agrees_with_our_scorer(results, logged, items)
    # lm-eval sent the prompt as one user turn, greedily: the server's own greedy answer comes back
    row = logged[0]
    prompt = row["arguments"]["gen_args_0"]["arg_0"]  # the messages as a JSON string (in a list, 0.4.13)
    messages = json.loads(prompt[0] if isinstance(prompt, list) else prompt)
    assert messages == [{"role": "user", "content": f"Question: {row['doc']['question']}\nAnswer:"}]
    direct = asyncio.run(engine.chat(messages, temperature=0, max_tokens=48, stop=["<|im_end|>", "\n\n"]))
    assert row["resps"][0][0] == direct.choices[0].message.content


@pytest.mark.parametrize("tokenizer", ["huggingface", "remote", "auto"])
def test_lm_eval_loglikelihood_via_echo_logprobs(lm_eval_cli, served, task_dir, tmp_path, tokenizer):
    """multiple_choice through /v1/completions (echo + logprobs). lm-eval needs a tokenizer to
    split context from continuation: the checkpoint's own (a local folder: no Hub), or the
    server's through vLLM's /tokenize, /detokenize and /tokenizer_info ("remote", which lm-eval
    also picks by itself when no backend is named), with no copy of the checkpoint at all."""
    url, rlhf, _ = served
    backend = {"huggingface": f"tokenizer_backend=huggingface,tokenizer={rlhf}",
               "remote": "tokenizer_backend=remote", "auto": ""}[tokenizer]
    args = f"model=assistant,base_url={url}/v1/completions,num_concurrent=2,tokenized_requests=True"
    args += f",{backend}" if backend else ""
    results, logged = _lm_eval(lm_eval_cli, "assist_arith_mc", "local-completions", args, task_dir, tmp_path / "out")
    assert len(logged) == N_GEN

    tok = AutoTokenizer.from_pretrained(rlhf)
    model = AutoModelForCausalLM.from_pretrained(rlhf).eval()
    accs = []
    for row in logged:
        theirs, ours = [], []
        for arg, resp in zip(row["arguments"].values(), row["resps"]):
            ctx = tok(arg["arg_0"], add_special_tokens=False).input_ids
            cont = tok(arg["arg_1"], add_special_tokens=False).input_ids
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            picked = logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
            ours.append(picked[len(ctx) - 1:].sum().item())
            theirs.append(float(resp[0][0]))
        assert theirs == pytest.approx(ours, abs=1e-3)  # lm-eval read the server's logprobs right
        best = max(range(len(ours)), key=ours.__getitem__)
        assert row["acc"] == float(best == int(row["target"]))
        accs.append(row["acc"])
    assert results["results"]["assist_arith_mc"]["acc,none"] == pytest.approx(sum(accs) / len(accs))
    assert not math.isnan(results["results"]["assist_arith_mc"]["acc_stderr,none"])


def test_inspect_ai_openai_api_provider(inspect_cli, served, items, tmp_path):
    from inspect_ai.log import read_eval_log

    url, _, engine = served
    chosen = [(s.question, s.answer) for s in items[:4]]
    (tmp_path / "arith_task.py").write_text(INSPECT_TASK.format(samples=chosen))
    cmd = [*inspect_cli, "eval", "arith_task.py", "--model", "openai-api/assist/assistant",
           "--log-dir", str(tmp_path / "logs"), "--temperature", "0", "--max-tokens", "48", "--display", "plain"]
    env = {**os.environ, **OFFLINE, "ASSIST_BASE_URL": f"{url}/v1", "ASSIST_API_KEY": "unused"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    logs = sorted((tmp_path / "logs").glob("*.eval"))
    assert logs, proc.stdout[-2000:]
    log = read_eval_log(str(logs[-1]))
    assert log.status == "success"
    assert log.results is not None and log.results.scores[0].name == "match"
    assert "accuracy" in log.results.scores[0].metrics
    assert log.samples is not None and len(log.samples) == len(chosen)

    for sample in log.samples:
        assert sample.scores and sample.scores["match"].value in ("C", "I")
        calls = [ev.call.request for ev in sample.events if ev.event == "model" and ev.call is not None]
        assert calls and calls[0].get("temperature") == 0  # asked for; inspect sends none by default
        direct = asyncio.run(engine.chat([{"role": "user", "content": sample.input}], temperature=0, max_tokens=48))
        assert sample.output.completion == direct.choices[0].message.content
