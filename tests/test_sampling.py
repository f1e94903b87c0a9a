from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from assist.sampling import filter_logits, sample


def _model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def test_greedy_matches_transformers_generate_with_ragged_batches():
    model = _model()
    prompts = [[5, 6, 7], [9], [3, 4, 5, 6, 7, 8, 10], [11, 12]]
    ours = sample(model, prompts, max_new_tokens=12, stop_ids=[49], pad_id=0)
    for p, c in zip(prompts, ours):
        ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                             eos_token_id=49, pad_token_id=0)[0, len(p):].tolist()
        assert c.tokens == ref[: len(c.tokens)]
        assert len(c.tokens) == len(ref)


def test_stops_on_stop_tokens_and_reports_length():
    model = _model()
    free = sample(model, [[5, 6]], max_new_tokens=8, stop_ids=[49], pad_id=0)[0]
    assert free.finish_reason == "length" and len(free.tokens) == 8
    stop_at = free.tokens[3]
    first = free.tokens.index(stop_at)
    stopped = sample(model, [[5, 6]], max_new_tokens=8, stop_ids=[stop_at], pad_id=0)[0]
    assert stopped.finish_reason == "stop" and stopped.tokens == free.tokens[: first + 1]
    assert len(stopped.logprobs) == len(stopped.entropies) == len(stopped.tokens)


def test_seeded_sampling_is_reproducible_and_varies_across_seeds():
    model = _model()
    kw = dict(max_new_tokens=10, stop_ids=[49], pad_id=0, temperature=1.0)
    a = sample(model, [[5]] * 4, seed=7, **kw)
    b = sample(model, [[5]] * 4, seed=7, **kw)
    c = sample(model, [[5]] * 4, seed=8, **kw)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, 2, 1.0)).tolist() == [[True, True, False, False]]
    # softmax ~ [0.64, 0.24, 0.09, 0.03]: top_p=0.7 keeps the first two (the crossing token too).
    assert torch.isfinite(filter_logits(logits, 0, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, 0, 0.5)).tolist() == [[True, False, False, False]]


def test_finished_rows_leave_the_batch_without_changing_the_others():
    model = _model()
    prompts = [[5, 6, 7], [9], [3, 4, 5, 6, 7, 8, 10], [11, 12], [13], [14, 15]]
    free = [sample(model, [p], max_new_tokens=16, stop_ids=[49], pad_id=0)[0] for p in prompts]
    # A stop token that ends some rows early and leaves others running to the end.
    counts: dict[int, int] = {}
    for c in free:
        for t in c.tokens[1:8]:
            counts[t] = counts.get(t, 0) + 1
    stop = max(counts, key=lambda t: (counts[t] < len(prompts), counts[t]))
    widths: list[int] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: widths.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        together = sample(model, prompts, max_new_tokens=16, stop_ids=[stop], pad_id=0)
    finally:
        hook.remove()
    alone = [sample(model, [p], max_new_tokens=16, stop_ids=[stop], pad_id=0)[0] for p in prompts]
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    assert [c.finish_reason for c in together] == [c.finish_reason for c in alone]
    assert {c.finish_reason for c in together} == {"stop", "length"}  # the case this test is about
    assert widths[0] == len(prompts) and min(widths) < len(prompts)  # rows really left
    for c in together:
        assert len(c.logprobs) == len(c.entropies) == len(c.tokens)


def test_draw_follows_the_distribution_and_never_picks_an_excluded_token():
    from assist.sampling import draw

    probs = torch.tensor([0.1, 0.0, 0.2, 0.7, 0.0])
    g = torch.Generator().manual_seed(0)
    picks = draw(probs.expand(40_000, 5).contiguous(), g)
    share = torch.bincount(picks, minlength=5) / len(picks)
    assert share[1] == 0 and share[4] == 0  # probability 0, never drawn (the top-k/top-p masks)
    assert torch.allclose(share, probs, atol=0.01)  # 40k draws: a share's sd is at most 0.0025
    again = draw(probs.expand(40_000, 5).contiguous(), torch.Generator().manual_seed(0))
    assert torch.equal(picks, again)
    # every row draws from its own distribution
    rows = torch.eye(5)[[3, 0, 2]]
    assert draw(rows, g).tolist() == [3, 0, 2]
