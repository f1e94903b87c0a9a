"""Unit tests of the training pieces: config overrides, schedules, losses, metrics, mixture."""

from __future__ import annotations

import itertools
import math
import types

import pytest
import torch

from evals.diversity import distinct_n, ead_distinct_n, mean_entropy
from training import data
from training._loop import lr_at
from training.config import ConfigError, OptimConfig, SFTConfig, apply_overrides, preset
from training.reward_model import likelihood_pair_accuracy, pair_loss, pairs, sequence_logprobs


def test_presets_and_overrides():
    cfg = apply_overrides(preset("tiny"), ["pretrain.steps=7", "rl.reward=both", "arith.max_steps=4",
                                           "rl.rm_trust=skill",
                                           "data.mixture=arith:1,code:1"])
    assert cfg.pretrain.steps == 7 and cfg.rl.reward == "both" and cfg.arith.max_steps == 4
    assert cfg.rl.rm_trust == "skill"
    assert cfg.data.mixture == {"arith": 1.0, "code": 1.0}
    # a top-level field too (it was once replaced on a copy and silently dropped)
    assert apply_overrides(preset("test"), ["seed=3"]).seed == 3
    for bad, message in [("nosuch.x=1", "no section"), ("pretrain.steps=abc", "not a int"),
                         ("rl.reward=magic", "one of"), ("pretrain.steps", "section.field=value"),
                         ("arith.min_steps=9", "min_steps"), ("sft.replay=1.5", "replay"),
                         ("preset=small", "--preset"), ("sft.micro_batches=0", "micro_batches"),
                         ("sft.micro_batches=99", "micro_batches"), ("rl.rm_trust=some", "one of")]:
        with pytest.raises(ConfigError, match=message):
            apply_overrides(preset("test"), [bad])
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")


def test_lr_warms_up_then_decays_by_cosine_to_the_floor():
    cfg = OptimConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_lr_holds_the_peak_until_decay_start_then_decays_to_the_floor():
    cfg = OptimConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1, decay_start=0.5)
    assert lr_at(5, cfg) == pytest.approx(0.6)  # warm-up as before
    assert lr_at(59, cfg) == pytest.approx(1.0)  # stable through half the steps after warm-up
    assert lr_at(60, cfg) == pytest.approx(1.0)  # the cosine starts here
    assert lr_at(85, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="decay_start"):
        OptimConfig(decay_start=1.0)


def test_reward_pairs_and_pairwise_loss():
    assert sorted(pairs([1.0, 0.0, 0.35, 0.0])) == [(0, 1), (0, 2), (0, 3), (2, 1), (2, 3)]
    assert pairs([0.0, 0.0]) == []
    rewards = torch.tensor([2.0, 0.0, 1.0])
    loss, acc = pair_loss(rewards, [(0, 1), (1, 2)])
    expected = (-math.log(1 / (1 + math.exp(-2.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
    assert float(loss) == pytest.approx(expected) and acc == 0.5


class _Prefers(torch.nn.Module):
    """A stand-in policy over ``vocab`` tokens that puts ``bias`` more logit on ``token`` at
    every position (0: uniform)."""

    def __init__(self, token: int, bias: float, vocab: int = 8) -> None:
        super().__init__()
        self.token, self.bias, self.vocab = token, bias, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # where the caller finds the device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> types.SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token] = self.bias
        return types.SimpleNamespace(logits=logits)


def test_policy_likelihood_ranks_pairs_by_the_completions_probability():
    uniform = _Prefers(token=1, bias=0.0)
    # one padded forward; padding (id 0 here) is left out of the shorter row's sum
    assert sequence_logprobs(uniform, [[0, 3, 4, 5], [0, 3]], pad_id=0) == pytest.approx(
        [-3 * math.log(8), -math.log(8)])
    likes_one = _Prefers(token=1, bias=3.0)
    prompt = [0, 2]
    likely, unlikely, written = prompt + [1, 1, 1], prompt + [5, 6, 7], prompt + [1, 1]
    # the labeller's winner is the likely completion: every pair ranked right
    assert likelihood_pair_accuracy(likes_one, [([likely, unlikely], [1.0, 0.0])], k=2) == (1.0, 1)
    # and wrong when the labeller prefers the unlikely one; equal values make no pair
    groups = [([likely, unlikely], [0.0, 1.0]), ([likely, unlikely], [1.0, 1.0])]
    assert likelihood_pair_accuracy(likes_one, groups, k=2) == (0.0, 1)
    # only the first k (sampled) completions count, not the written ones after them
    group = [([unlikely, likely, written], [1.0, 0.0, 0.5])]
    assert likelihood_pair_accuracy(likes_one, group, k=2) == (0.0, 1)
    assert likelihood_pair_accuracy(likes_one, group, k=3) == (round(1 / 3, 4), 3)
    assert likelihood_pair_accuracy(likes_one, [([likely], [1.0])], k=2) == (None, 0)


def test_diversity_metrics_on_known_sequences():
    seqs = [[1, 2, 3, 4], [1, 2, 3, 5]]
    assert distinct_n(seqs, 1) == pytest.approx(5 / 8)
    assert distinct_n(seqs, 2) == pytest.approx(4 / 6)
    v, c = 10, 8
    assert ead_distinct_n(seqs, 1, v) == pytest.approx(5 / (v * (1 - ((v - 1) / v) ** c)))
    assert ead_distinct_n([[7, 7, 7, 7]] * 2, 1, 100) < ead_distinct_n(seqs, 1, 100)
    assert mean_entropy([[1.0, 2.0], [3.0]]) == pytest.approx(2.0)


def test_mixture_realizes_configured_token_shares(tmp_path):
    def const(text):
        return itertools.repeat(text)

    streams = {"a": const("x" * 10), "b": const("y" * 100)}
    ratios = {"a": 0.75, "b": 0.25}
    docs = data.documents(ratios, streams, seed=0)
    result = data.build_stream(docs, lambda t: [ord(ch) for ch in t], 0, 200_000, tmp_path / "s.npy", ratios)
    assert result.tokens >= 200_000
    assert result.realized["a"] == pytest.approx(0.75, abs=0.03)
    assert result.realized["b"] == pytest.approx(0.25, abs=0.03)
    with pytest.raises(ValueError, match="mixture"):
        next(data.documents({"zzz": 1.0}, streams, seed=0))


def test_pretraining_windows_start_at_documents():
    import numpy as np

    from training.pretrain import batch, doc_starts

    eot = 0
    stream = np.array([5, 6, 7, eot, 8, 9, eot, 1, 2, 3, 4, eot, 7, 7, 7, 7, 7], dtype=np.uint16)
    starts = doc_starts(stream, eot, seq_len=4)
    assert starts.tolist() == [0, 4, 7, 12]  # every document start that leaves room for a window
    for step in range(20):
        x = batch(stream, seed=0, step=step, rank=0, size=3, seq_len=4, starts=starts)
        assert x.shape == (3, 4)
        assert all(row[0].item() in (5, 8, 1, 7) for row in x)
    again = batch(stream, seed=0, step=3, rank=0, size=3, seq_len=4, starts=starts)
    assert torch.equal(again, batch(stream, seed=0, step=3, rank=0, size=3, seq_len=4, starts=starts))


def test_copy_documents_can_only_be_predicted_by_copying():
    from evals.tasks import ArithTask, FactsTask

    facts = FactsTask()
    world = {e.name for e in facts.entities}
    docs = list(itertools.islice(data._copy(ArithTask(), 0, facts), 300))
    for doc in docs:
        first, _, second = doc.partition("\n")
        assert first and second
    lookups = [d for d in docs if "is a kingdom" not in d and d.split("\n")[0].split(". ")[0].split(" ")[-1].isdigit()]
    assert lookups  # keyed random numbers: the second line restates the first's pairs
    for doc in lookups:
        first, second = doc.split("\n")
        assert sorted(first.rstrip(".").split(". ")) == sorted(second.rstrip(".").split(". "))
    readings = [d for d in docs if "is a kingdom" in d]
    assert readings and not any(name in d for d in readings for name in world)


def test_reading_lessons_come_in_the_shares_asked():
    from evals.tasks import ArithTask, FactsTask
    from evals.tasks.facts import ATTRIBUTES
    from training.config import DataConfig

    facts, arith = FactsTask(), ArithTask()
    for share in (0.0, 0.5):
        docs = list(itertools.islice(data._copy(arith, 0, facts, lookups=share), 400))
        assert sum("is a kingdom" in d for d in docs) / len(docs) == pytest.approx(share, abs=0.08)
    seen = {e.name: e for e in facts.entities if e.seen}
    assert not any("\n" in d for d in itertools.islice(data._facts(facts, 0), 200))
    docs = list(itertools.islice(data._facts(facts, 0, restate=0.5), 400))
    restated = [d for d in docs if "\n" in d]
    assert len(restated) / len(docs) == pytest.approx(0.5, abs=0.08)
    for doc in restated:  # the second line states again facts of the passage's own (seen) kingdom
        passage, again = doc.split("\n")
        entity = seen[passage.split(" is a kingdom")[0]]
        claims = [f"{c.strip()}." for c in again.split(".") if c.strip()]
        assert 1 <= len(claims) <= 4
        answers = {facts.question(entity, a).solution.removeprefix("#### ") for a in ATTRIBUTES}
        assert set(claims) <= answers  # as an answer states them: the values, no name
    with pytest.raises(ValueError, match="data.lookups"):
        DataConfig(lookups=1.5)


def test_sft_replays_seen_passages_in_the_share_asked():
    from evals.tasks import FactsTask
    from training.sft import _replay_rows, _with_replay
    from training.tokenizer import train_tokenizer

    cfg = preset("test")
    facts = FactsTask(cfg.facts)
    tok = train_tokenizer([facts.passage(e) for e in facts.entities], 400)
    chats = [([1, 2, 3], [-100, 2, 3]) for _ in range(40)]
    rows = list(itertools.islice(_replay_rows(tok, cfg, 96), 30))
    mixed = _with_replay(chats, 0.25, iter(rows), seed=0)
    assert len(mixed) == 40 and sum(r not in chats for r in mixed) == 10
    assert _with_replay(chats, 0.0, iter(rows), seed=0) == chats
    for ids, labels in rows:
        assert 0 < len(ids) <= 96 and labels == ids  # the loss falls on every token
    text = tok.decode([t for ids, _ in rows for t in ids])
    unseen = [e.name for e in facts.entities if not e.seen]
    assert not any(f"{name} is a kingdom" in text for name in unseen)  # only the seen world
    assert any(f"{e.name} is a kingdom" in text for e in facts.entities if e.seen)


def test_sft_micro_batches_give_the_one_pass_loss_and_gradient():
    from transformers import LlamaConfig, LlamaForCausalLM

    from training._model import IGNORE
    from training.sft import batch_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, pad_token_id=0))
    gen = torch.Generator().manual_seed(1)
    rows = []
    for length in (5, 17, 9, 30, 12, 3, 21):  # ragged, the way conversations and replay rows are
        ids = torch.randint(1, 50, (length,), generator=gen).tolist()
        prompt = length // 3  # the loss falls only on what follows the prompt
        rows.append((ids, [IGNORE] * prompt + ids[prompt:]))

    def loss_and_grad(micro: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        model.zero_grad()
        loss, tokens, labelled = batch_loss(model, rows, 0, micro)
        loss.backward()
        return loss.detach(), model.model.embed_tokens.weight.grad.clone(), tokens, labelled

    one, grad, tokens, labelled = loss_and_grad(1)
    assert tokens == sum(len(r[0]) for r in rows)  # padding is not counted
    assert labelled == sum(len(r[0]) - len(r[0]) // 3 for r in rows)
    # the transformers loss on the same batch in one padded pass, as SFT once computed it
    from training._model import pad_right
    ids, labels = pad_right([r[0] for r in rows], 0), pad_right([r[1] for r in rows], IGNORE)
    mask = pad_right([[1] * len(r[0]) for r in rows], 0)
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss.detach()
    torch.testing.assert_close(one, reference, rtol=1e-5, atol=1e-6)
    for micro in (2, 3, 7):
        loss, g, t, n = loss_and_grad(micro)
        torch.testing.assert_close(loss, one, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, grad, rtol=1e-4, atol=1e-7)
        assert (t, n) == (tokens, labelled)


def test_call_weights_cover_each_tool_call_from_its_start_token_through_its_end_token():
    from training.sft import call_weights

    # 7 = <tool_call>, 8 = </tool_call>: two calls, text before, between and after
    ids = [1, 2, 7, 3, 4, 8, 5, 7, 6, 8, 9]
    assert call_weights(ids, 7, 8, 4.0) == [1, 1, 4, 4, 4, 4, 1, 4, 4, 4, 1]
    assert call_weights([1, 2, 3], 7, 8, 4.0) == [1.0, 1.0, 1.0]


def test_sft_call_weight_is_a_weighted_mean_of_the_token_losses_and_weight_one_changes_nothing():
    from transformers import LlamaConfig, LlamaForCausalLM

    from training._model import IGNORE, token_logprobs
    from training.sft import batch_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, pad_token_id=0))
    start, end = 48, 49
    rows = [([5, 6, start, 7, 8, end, 9], [IGNORE, IGNORE, start, 7, 8, end, 9]),
            ([3, 4, 10, 11], [IGNORE, 4, 10, 11])]
    with torch.no_grad():
        plain, _, labelled = batch_loss(model, rows, 0, 1)
        same, _, _ = batch_loss(model, rows, 0, 2, (start, end, 1.0))
        heavy, _, n = batch_loss(model, rows, 0, 2, (start, end, 5.0))
        lp = [token_logprobs(model, [r[0]], 0)[0] for r in rows]
    torch.testing.assert_close(same, plain)
    assert n == labelled == 8  # the count of labelled tokens is not the weights' sum
    # by hand: row 0's targets are tokens 2..6, of which 2..5 (the call) weigh 5; row 1's 1..3
    w0 = [5.0, 5.0, 5.0, 5.0, 1.0]
    num = -sum(w * float(lp[0][t]) for w, t in zip(w0, range(2, 7))) - float(lp[1][1:4].sum())
    torch.testing.assert_close(heavy, torch.tensor(num / (sum(w0) + 3)), rtol=1e-5, atol=1e-6)
    assert float(heavy) != float(plain)
    with pytest.raises(ValueError, match="call_weight"):
        SFTConfig(call_weight=0.0)
