"""The built-in torch engine: transformers parity, batching, sampling controls."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from assist.engine import LlamaRunner, SamplingParams, Scheduler


def _model(layers: int = 2, kv: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=kv, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def _scheduler(model, slots: int = 8, eos: tuple[int, ...] = (63,)) -> Scheduler:
    return Scheduler(LlamaRunner(model, slots=slots, max_len=128), lambda ids: " ".join(map(str, ids)), eos_ids=eos)


@pytest.mark.parametrize("kv", [2, 1])
def test_runner_logits_match_transformers(kv):
    model = _model(kv=kv)
    runner = LlamaRunner(model, slots=2, max_len=64)
    ids = torch.tensor([[5, 9, 13, 2, 40, 41]])
    with torch.no_grad():
        ref = model(ids).logits[0, -1]
    ours = runner.forward(ids, torch.arange(6)[None], 1)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def assert_greedy_equals_generate(model: LlamaForCausalLM, sched: Scheduler, timeout: float = 60) -> None:
    """Concurrent greedy requests of different lengths through ``sched`` give
    ``model.generate``'s tokens and finish reasons; closes ``sched``."""
    prompts = [[1, 2, 3], [7], [4, 4, 4, 4, 4, 9], [10, 11], [12, 13, 14, 15], [3, 1]]
    futures = [sched.submit(p, SamplingParams(max_tokens=10 + i)) for i, p in enumerate(prompts)]
    try:
        for i, (p, f) in enumerate(zip(prompts, futures)):
            out = f.result(timeout=timeout).outputs[0]
            ref = model.generate(torch.tensor([p]), max_new_tokens=10 + i, do_sample=False, eos_token_id=63,
                                 pad_token_id=0)[0, len(p):].tolist()
            assert out.token_ids == ref
            assert out.finish_reason == ("stop" if ref[-1] == 63 else "length")
    finally:
        sched.close()


def test_concurrent_greedy_requests_equal_transformers_generate():
    model = _model()
    assert_greedy_equals_generate(model, _scheduler(model))


def test_more_requests_than_slots_all_complete_in_order_of_content():
    model = _model()
    sched = _scheduler(model, slots=3, eos=())
    try:
        futures = [sched.submit([i % 50 + 1, 2], SamplingParams(max_tokens=5)) for i in range(20)]
        results = [f.result(timeout=60) for f in futures]
        alone = sched.submit([1, 2], SamplingParams(max_tokens=5)).result(timeout=60)
    finally:
        sched.close()
    assert all(len(r.outputs[0].token_ids) == 5 for r in results)
    assert results[0].outputs[0].token_ids == alone.outputs[0].token_ids  # batching changes nothing


def test_n_samples_share_the_prompt_and_seeds_reproduce():
    model = _model()
    sched = _scheduler(model)
    try:
        p = SamplingParams(max_tokens=12, temperature=1.0, n=4, seed=11, logprobs=True, top_logprobs=3)
        a = sched.submit([1, 2, 3], p).result(timeout=60)
        b = sched.submit([1, 2, 3], p).result(timeout=60)
        c = sched.submit([1, 2, 3], SamplingParams(max_tokens=12, temperature=1.0, n=4, seed=12)).result(timeout=60)
    finally:
        sched.close()
    assert [o.index for o in a.outputs] == [0, 1, 2, 3]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert [o.token_ids for o in a.outputs] != [o.token_ids for o in c.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1
    first = a.outputs[0].logprobs[0]
    assert len(first.top) == 3 and first.top[0][1] >= first.top[-1][1] and first.logprob <= 0


def test_stop_strings_cut_the_text():
    model = _model()
    sched = _scheduler(model)
    try:
        free = sched.submit([1, 2, 3], SamplingParams(max_tokens=8)).result(timeout=60).outputs[0]
        cut = free.text.split(" ")[2]
        stopped = sched.submit([1, 2, 3], SamplingParams(max_tokens=8, stop=(" " + cut,))).result(timeout=60).outputs[0]
    finally:
        sched.close()
    assert stopped.finish_reason == "stop"
    assert free.text.startswith(stopped.text) and (" " + cut) not in stopped.text


def test_cancelled_requests_free_their_slots():
    model = _model()
    sched = _scheduler(model, slots=2)
    try:
        long = [sched.submit([1], SamplingParams(max_tokens=100)) for _ in range(2)]
        for f in long:
            f.cancel()
        quick = sched.submit([2], SamplingParams(max_tokens=3)).result(timeout=60)
    finally:
        sched.close()
    assert len(quick.outputs[0].token_ids) == 3


def test_bad_requests_are_refused():
    sched = _scheduler(_model(), slots=2)
    try:
        with pytest.raises(ValueError, match="empty"):
            sched.submit([], SamplingParams())
        with pytest.raises(ValueError, match="slots"):
            sched.submit([1], SamplingParams(n=3))
        with pytest.raises(ValueError, match="context"):
            sched.submit([1] * 200, SamplingParams())
    finally:
        sched.close()


@pytest.mark.slow
def test_torch_engine_chat_on_a_trained_checkpoint(trained_run):
    import assist

    out, _ = trained_run
    engine = assist.load(out / "sft", max_batch=16)
    try:
        result = asyncio.run(engine.chat([{"role": "user", "content": "Mia has 3 cups."}], n=3, temperature=0.8,
                                         seed=1, max_tokens=20))
        greedy = asyncio.run(engine.chat([{"role": "user", "content": "Mia has 3 cups."}], max_tokens=20))
    finally:
        engine.close()
    assert len(result.choices) == 3
    assert result.usage.completion_tokens >= 3 and result.usage.prompt_tokens > 5
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert greedy.choices[0].finish_reason in ("stop", "length")


def test_prompt_logprobs_come_from_the_prefill_and_max_tokens_0_only_scores():
    model = _model()
    sched = _scheduler(model, slots=2)
    ids = [5, 9, 13, 2, 40, 41]
    try:
        scored = sched.submit(ids, SamplingParams(max_tokens=0, prompt_logprobs=2)).result(timeout=60)
        full = sched.submit([i % 60 + 1 for i in range(128)], SamplingParams(max_tokens=0, prompt_logprobs=0)).result(timeout=60)
        both = sched.submit(ids, SamplingParams(max_tokens=3, prompt_logprobs=1)).result(timeout=60)
    finally:
        sched.close()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    assert scored.prompt_logprobs[0] is None and [o.token_ids for o in scored.outputs] == [[]]
    assert scored.outputs[0].finish_reason == "length"
    for t, entry in enumerate(scored.prompt_logprobs[1:]):
        assert entry.token_id == ids[t + 1] and abs(entry.logprob - float(ref[t, ids[t + 1]])) < 1e-5
        assert [i for i, _ in entry.top] == torch.topk(ref[t], 2).indices.tolist()
    assert len(full.prompt_logprobs) == 128  # scoring may fill the whole context
    assert len(both.outputs[0].token_ids) == 3 and len(both.prompt_logprobs) == len(ids)


class _EvenThenStop:
    """A toy constraint: even tokens only, and the sequence is complete after three."""

    def __init__(self) -> None:
        self.seen = 0

    def new(self) -> _EvenThenStop:
        return _EvenThenStop()

    def mask_(self, logits: torch.Tensor) -> None:
        logits[1::2] = float("-inf")

    def accept(self, token: int) -> bool:
        self.seen += 1
        return token % 2 == 0

    def is_terminated(self) -> bool:
        return self.seen >= 3


def test_a_grammar_masks_every_sample_and_ends_the_sequence():
    sched = _scheduler(_model())
    try:
        p = SamplingParams(max_tokens=20, temperature=1.0, n=3, seed=0, grammar=_EvenThenStop(), logprobs=True)
        out = sched.submit([1, 2, 3], p).result(timeout=60)
    finally:
        sched.close()
    for o in out.outputs:
        assert len(o.token_ids) == 3 and all(t % 2 == 0 for t in o.token_ids) and o.finish_reason == "stop"
        assert all(lp.logprob > float("-inf") for lp in o.logprobs)  # reported from the raw distribution


@pytest.mark.parametrize("vocab", [64, 1000, 50257])
def test_batched_draws_are_each_rows_own_draw(vocab):
    from assist.sampling import draw

    seeds = [3, 11, 12, 1 << 40]
    alone = [torch.Generator().manual_seed(s) for s in seeds]
    batched = [torch.Generator().manual_seed(s) for s in seeds]
    probs = torch.softmax(torch.randn(len(seeds), vocab, generator=torch.Generator().manual_seed(0)) * 3, -1)
    for _ in range(3):  # later steps too: each generator advances by one draw, batched or not
        want = torch.cat([draw(probs[i: i + 1], [g]) for i, g in enumerate(alone)])
        assert torch.equal(draw(probs, batched), want)
    # and a row's draw does not depend on which rows share its batch
    again = [torch.Generator().manual_seed(s) for s in seeds]
    first = draw(probs, again)
    assert torch.equal(draw(probs[2:3], [torch.Generator().manual_seed(seeds[2])]), first[2:3])


