"""The demo's diagnostics (evals.claims), on hand-made eval records."""

from __future__ import annotations

import pytest

from evals.claims import maj_at_k_from_votes, paired, per_item, recommend, tool_copy_accuracy
from evals.tasks import ArithTask


def _record(item: str, strategy: str, reference: str, runs: list[dict]) -> dict:
    return {"task": "arith", "item": item, "strategy": strategy, "reference": reference, "runs": runs}


def _run(correct: bool, trace: list | None = None, error: str | None = None) -> dict:
    return {"correct": correct, "answer": None, "error": error, "trace": trace or []}


def test_per_item_averages_runs_and_counts_errors_wrong():
    records = [_record("a", "s", "1", [_run(True), _run(False)]),
               _record("b", "s", "1", [_run(True, error="boom")]),
               _record("a", "t", "1", [_run(True)])]
    assert per_item(records, "s") == {"a": 0.5, "b": 0.0}
    assert per_item(records, "s", keep=lambda i: i == "b") == {"b": 0.0}


def test_paired_verdicts_need_the_interval_to_exclude_zero():
    better = {str(i): 1.0 for i in range(100)}
    worse = {str(i): float(i % 2) for i in range(100)}
    p = paired(better, worse, ("a", "b"))
    assert p.n == 100 and p.acc_better == 1.0 and p.acc_worse == 0.5
    assert p.delta == pytest.approx(0.5) and p.lo > 0 and p.verdict == "shown"
    assert paired(worse, better, ("b", "a")).verdict == "reversed"
    noisy = {str(i): float(i % 2 == 0) for i in range(100)}
    assert paired(noisy, worse, ("c", "b")).verdict == "not significant"  # same mean, opposite items
    assert paired({}, worse, ("x", "b")).verdict == "not run"


def test_maj_at_k_reads_the_vote_in_sample_order():
    # item 1: the right answer "7" wins from k = 3 on; item 2: never right; item 3: right at once.
    records = [
        _record("1", "sc", "7", [_run(True, [{"step": "vote", "answers": ["5", "6", "7", "7", "7"]}])]),
        _record("2", "sc", "9", [_run(False, [{"step": "vote", "answers": ["1", "1", None, "2", "1"]}])]),
        _record("3", "sc", "3", [_run(True, [{"step": "call"}, {"step": "vote", "answers": ["3", "4", "4", "3", "3"]}])]),
        _record("3", "cot", "3", [_run(True)]),
    ]
    curve = maj_at_k_from_votes(records, "sc")
    # k=1: item 3 only; k=2: ties go to the first seen ("5" / "1" / "3"); k=3: 5,6,7 tie -> "5";
    # k=4: "7" leads item 1; item 3 "4" and "3" tie at 2 -> "3" (first seen).
    assert curve["maj_at_k"] == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 3: pytest.approx(0.0),
                                 4: pytest.approx(2 / 3), 5: pytest.approx(2 / 3)}
    assert curve["pass_at_k"][1] == pytest.approx(1 / 3) and curve["pass_at_k"][3] == pytest.approx(2 / 3)
    assert maj_at_k_from_votes(records, "nothing") == {"maj_at_k": {}, "pass_at_k": {}}


def _tool(expression: str, result: str) -> dict:
    return {"step": "tool", "name": "calculator", "arguments": {"expression": expression}, "result": result}


def test_tool_copy_accuracy_follows_the_results_the_model_read():
    sample = ArithTask().split("test", 1)[0]
    start, changes = sample.metadata["start"], sample.metadata["changes"]
    value, right = start, []
    for op, b in changes:
        nxt = value + b if op == "+" else value - b
        right.append(_tool(f"{value} {op} {b}", str(nxt)))  # spaces are ignored
        value = nxt
    op0, b0 = changes[0]
    wrong_first = [_tool(f"{start}{op0}{b0 + 1}", "1"), *right[1:]]
    # after a wrong first copy the second call should start from what the tool returned ("1")
    op1, b1 = changes[1]
    follows = [wrong_first[0], _tool(f"1{op1}{b1}", "2"), _tool(f"2{changes[2][0]}{changes[2][1]}", "3")]
    records = [_record(sample.id, "tools", sample.answer, [_run(True, right), _run(False, follows)]),
               _record(sample.id, "cot", sample.answer, [_run(True, right)])]
    got = tool_copy_accuracy(records, {sample.id: sample})
    assert got["calls"] == 6 and got["call_accuracy"] == pytest.approx(5 / 6)
    assert got["items"] == 2 and got["item_accuracy"] == pytest.approx(0.5)
    assert tool_copy_accuracy([], {})["calls"] == 0


def test_recommend_names_the_best_and_the_cheapest_within_the_margin():
    summary = {
        "cot": {"accuracy": 0.60, "tokens_per_item": {"total": 100}},
        "sc@16": {"accuracy": 0.80, "tokens_per_item": {"total": 1600}},
        "tools": {"accuracy": 0.79, "tokens_per_item": {"total": 800}},
        "reflect": {"accuracy": 0.70, "tokens_per_item": {"total": 300}},
    }
    rec = recommend(summary)
    assert rec["best"] == "sc@16" and rec["cheapest"] == "tools"
    assert recommend(summary, margin=0.0)["cheapest"] == "sc@16"
    assert recommend({}) is None


def test_rl_advantages_are_standardised_within_each_group():
    import torch

    from training.rl import advantages

    reward = torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0, 5.0, 7.0, 7.0])
    adv = advantages(reward, 4).view(2, 4)
    assert torch.allclose(adv.mean(1), torch.zeros(2), atol=1e-6)
    assert adv[0, 0] > 0 > adv[0, 1] and adv[1, 2] > 0 > adv[1, 0]
    # a scaled signal gets the same advantages: scale cannot drown another signal
    assert torch.allclose(advantages(reward * 100, 4), advantages(reward, 4), atol=1e-3)



def test_the_reward_model_counts_by_its_held_out_skill_when_asked():
    import torch

    from evals.tasks import ArithTask
    from training.rl import rewards, rm_share
    from training.rollouts import Rollout

    assert rm_share("full", {"heldout_pair_accuracy": 0.5}) == 1.0
    assert rm_share("skill", {"heldout_pair_accuracy": 0.75}) == 0.5
    assert rm_share("skill", {"heldout_pair_accuracy": 0.4}) == 0.0  # worse than a coin: nothing
    assert rm_share("skill", {"heldout_pair_accuracy": 1.0}) == 1.0
    assert rm_share("skill", {}) == 0.0  # never measured: not trusted

    class ByLength(torch.nn.Module):  # a stand-in reward model whose scalar is the row's length
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, input_ids, attention_mask=None, **_):
            return type("Out", (), {"logits": self.w * attention_mask.sum(1, keepdim=True).float()})()

    class Tok:
        pad_token_id = 0

        def convert_tokens_to_ids(self, token):
            return 9

    item = ArithTask().split("test", 1)[0]
    flat = [Rollout(item, [5, 6], [7] * 3, f"#### {item.answer}", "stop", []),
            Rollout(item, [5, 6], [7] * 5, "#### -1", "stop", [])]
    checker, learned, reward = rewards(flat, ArithTask(), ByLength(), Tok(), "both", share=0.25)
    assert checker[0] == 1.0 > checker[1] and learned.tolist() == [6.0, 8.0]  # prompt + completion + readout
    assert torch.allclose(reward, 0.25 * learned + checker)
    assert rewards(flat, ArithTask(), ByLength(), Tok(), "rm", share=0.25)[2].tolist() == [6.0, 8.0]
    # RL skips a reward model that counts 0: without it, `both` is the same reward
    unscored = rewards(flat, ArithTask(), None, Tok(), "both")
    assert unscored[1] is None
    assert torch.equal(unscored[2], rewards(flat, ArithTask(), ByLength(), Tok(), "both", share=0.0)[2])
