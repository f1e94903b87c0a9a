"""Automatic prefix caching: the block pool (keys, pins, LRU, budget) and the engine's
answers, which must not change when prompts are read from the cache."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from assist.engine import LlamaRunner, SamplingParams, Scheduler
from assist.engine._prefix_cache import PrefixCache, block_hashes

SHAPE = (4, 2, 8)  # planes (2 layers x k, v), kv heads, head dim
B = 4  # tokens per block in the unit tests


def _cache(blocks: int) -> PrefixCache:
    per_block = SHAPE[0] * SHAPE[1] * B * SHAPE[2] * 4
    return PrefixCache(SHAPE, budget_bytes=blocks * per_block + per_block - 1, dtype=torch.float32, block_size=B)


def _slot(tokens: list[int], length: int = 64) -> torch.Tensor:
    """A slot view whose contents at position p are a function of the tokens up to p."""
    slot = torch.zeros(SHAPE[0], SHAPE[1], length, SHAPE[2])
    for p in range(len(tokens)):
        slot[:, :, p] = float(sum(tokens[:p + 1]) * 31 + p)
    return slot


# -- the block pool ----------------------------------------------------------------------------
def test_keys_chain_so_a_block_names_its_whole_prefix():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], B, 2)
    b = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], B, 2)
    assert a[1] != b[1]  # same second block, different first: different prefixes
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], B, 2) == a
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], B, 2, known=a[:1]) == a


def test_a_stored_prefix_loads_back_and_only_full_blocks_are_kept():
    cache = _cache(8)
    tokens = list(range(1, 11))  # two full blocks and two tokens
    keys = cache.hashes(tokens)
    assert len(keys) == 2
    assert cache.store(keys, _slot(tokens)) == 2 and cache.used == 2
    assert cache.store(keys, _slot(tokens)) == 0  # already cached
    longer = tokens[:8] + [99, 98, 97, 96, 95]
    ids = cache.lookup(cache.hashes(longer), limit_blocks=10)
    assert len(ids) == 2  # the third block differs
    out = torch.full((SHAPE[0], SHAPE[1], 64, SHAPE[2]), -1.0)
    cache.load(ids, out)
    cache.release(ids)
    torch.testing.assert_close(out[:, :, :8], _slot(tokens)[:, :, :8])
    assert bool((out[:, :, 8:] == -1).all())  # nothing past the prefix is touched
    assert cache.lookup(cache.hashes(tokens), limit_blocks=1) == ids[:1]  # limit: leave tokens to prefill
    cache.release(ids[:1])


def test_pins_count_lookups_and_pinned_blocks_are_never_evicted():
    cache = _cache(2)
    first = list(range(1, 9))
    cache.store(cache.hashes(first), _slot(first))
    ids = cache.lookup(cache.hashes(first), 2)
    again = cache.lookup(cache.hashes(first), 2)
    assert [cache.refs[i] for i in ids] == [2, 2] and not cache.idle
    other = list(range(20, 28))
    assert cache.store(cache.hashes(other), _slot(other)) == 0  # full, and every block pinned
    cache.release(again)
    assert cache.store(cache.hashes(other), _slot(other)) == 0  # still pinned once
    cache.release(ids)
    assert [cache.refs[i] for i in ids] == [0, 0]
    with pytest.raises(ValueError, match="released"):
        cache.release(ids)
    assert cache.store(cache.hashes(other), _slot(other)) == 2  # unpinned blocks make room
    assert cache.lookup(cache.hashes(first), 2) == [] and cache.evictions == 2


def test_eviction_takes_the_least_recently_used_tail_first():
    cache = _cache(3)
    shared = list(range(1, 9))  # two blocks: a head and a tail
    cache.store(cache.hashes(shared), _slot(shared))
    lone = [50, 51, 52, 53]
    cache.store(cache.hashes(lone), _slot(lone))  # the pool is full
    ids = cache.lookup(cache.hashes(shared), 2)  # the shared prefix is used again...
    cache.release(ids)
    newer = [60, 61, 62, 63]
    cache.store(cache.hashes(newer), _slot(newer))  # ...so the lone block goes first
    assert cache.lookup(cache.hashes(lone), 1) == []
    newest = [70, 71, 72, 73]
    cache.store(cache.hashes(newest), _slot(newest))  # then the shared prefix's tail, not its head
    head = cache.lookup(cache.hashes(shared), 2)
    assert len(head) == 1
    cache.release(head)


def test_random_traffic_never_exceeds_the_budget_and_always_loads_what_was_stored():
    rng = random.Random(0)
    budget_blocks = 5
    cache = _cache(budget_blocks)
    assert cache.capacity == budget_blocks and cache.pool.numel() * 4 <= budget_blocks * cache.block_bytes + 1
    for _ in range(300):
        tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 20))]
        keys = cache.hashes(tokens)
        ids = cache.lookup(keys, len(keys))
        if ids:
            out = torch.zeros(SHAPE[0], SHAPE[1], 64, SHAPE[2])
            cache.load(ids, out)
            n = len(ids) * B
            torch.testing.assert_close(out[:, :, :n], _slot(tokens)[:, :, :n])
        if rng.random() < 0.5:
            cache.release(ids)
            cache.store(keys, _slot(tokens))
        else:  # several slots at once (the runner's cache), this one among junk slots
            other = [t + 1 for t in tokens]
            slots = torch.stack([_slot(other), _slot(tokens), _slot(other)], 1)
            cache.store_many([(keys, 1)], slots)
            cache.release(ids)
        assert cache.used <= budget_blocks and cache.used_bytes <= cache.capacity * cache.block_bytes
        assert all(r == 0 for r in cache.refs)
        assert len(cache.table) + len(cache.free) == budget_blocks
    assert cache.evictions > 0


def test_storing_many_slots_at_once_keeps_each_slots_own_blocks():
    cache = _cache(16)
    prompts = [list(range(1, 13)), list(range(30, 38)), list(range(1, 9)) + [70, 71, 72, 73]]
    slots = torch.stack([_slot(p) for p in prompts], 1)
    assert cache.store_many([(cache.hashes(p), i) for i, p in enumerate(prompts)], slots) == 3 + 2 + 1
    for p in prompts:
        ids = cache.lookup(cache.hashes(p), 3)
        out = torch.zeros(SHAPE[0], SHAPE[1], 64, SHAPE[2])
        cache.load(ids, out)
        cache.release(ids)
        torch.testing.assert_close(out[:, :, :len(p)], _slot(p)[:, :, :len(p)])


def test_a_chain_with_a_hole_stores_only_the_missing_blocks():
    cache = _cache(8)
    tokens = list(range(1, 17))  # four blocks
    keys = cache.hashes(tokens)
    cache.store(keys, _slot(tokens))
    for key in (keys[1], keys[3]):  # as if evicted: blocks 1 and 3 are gone, 0 and 2 stay
        block = cache.table.pop(key)
        cache.keys[block] = None
        del cache.idle[block]
        cache.free.append(block)
    assert cache.store(keys, _slot(tokens)) == 2
    ids = cache.lookup(keys, 4)
    out = torch.zeros(SHAPE[0], SHAPE[1], 64, SHAPE[2])
    cache.load(ids, out)
    cache.release(ids)
    assert len(ids) == 4
    torch.testing.assert_close(out[:, :, :16], _slot(tokens)[:, :, :16])


def test_a_budget_below_one_block_caches_nothing():
    cache = PrefixCache(SHAPE, budget_bytes=10, dtype=torch.float32, block_size=B)
    assert cache.capacity == 0
    tokens = list(range(8))
    assert cache.store(cache.hashes(tokens), _slot(tokens)) == 0 and cache.lookup(cache.hashes(tokens), 2) == []


# -- the scheduler -----------------------------------------------------------------------------
def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def _scheduler(model: LlamaForCausalLM, budget_blocks: int | None, slots: int = 8) -> Scheduler:
    runner = LlamaRunner(model, slots=slots, max_len=128)
    cache = None
    if budget_blocks is not None:
        probe = PrefixCache(runner.block_shape, budget_bytes=1 << 30, dtype=runner.dtype, device="meta")
        cache = PrefixCache(runner.block_shape, budget_bytes=budget_blocks * probe.block_bytes, dtype=runner.dtype)
    return Scheduler(runner, lambda ids: " ".join(map(str, ids)), eos_ids=(63,), prefix_cache=cache)


def _conversations(sched: Scheduler) -> list[list[int]]:
    """Three multi-turn conversations, each turn resending the last prompt, its answer and
    a new message (as a chat client and every multi-call strategy do), run concurrently,
    plus sampled n=3 requests on the same prefixes. Returns every answer's tokens."""
    rng = random.Random(1)
    prompts = [[rng.randrange(1, 60) for _ in range(rng.randrange(5, 30))] for _ in range(3)]
    answers: list[list[int]] = []
    for turn in range(3):
        futures = [sched.submit(p, SamplingParams(max_tokens=6 + turn)) for p in prompts]
        sampled = [sched.submit(p, SamplingParams(max_tokens=5, temperature=1.0, n=3, seed=turn)) for p in prompts]
        for i, f in enumerate(futures):
            out = f.result(timeout=60).outputs[0].token_ids
            answers.append(out)
            prompts[i] = prompts[i] + out + [rng.randrange(1, 60) for _ in range(rng.randrange(1, 9))]
        answers += [o.token_ids for f in sampled for o in f.result(timeout=60).outputs]
    return answers


@pytest.mark.parametrize("budget_blocks", [512, 3])
def test_answers_are_the_same_with_the_cache_and_prompts_are_computed_once(budget_blocks):
    model = _model()
    off, on = _scheduler(model, None), _scheduler(model, budget_blocks)
    try:
        want = _conversations(off)
        got = _conversations(on)
    finally:
        off.close()
        on.close()
    assert got == want
    assert off.prefilled_tokens == off.prompt_tokens and off.prefix_queries == 0
    assert on.prompt_tokens == off.prompt_tokens == on.prefix_queries
    assert on.prefilled_tokens == on.prompt_tokens - on.prefix_hits
    assert on.prefix_cache is not None and on.prefix_cache.used <= budget_blocks
    if budget_blocks > 100:
        assert on.prefilled_tokens < 0.5 * on.prompt_tokens  # later turns resend earlier ones
    else:
        assert on.prefix_cache.evictions > 0


def test_cached_tokens_are_reported_and_a_whole_prompt_hit_still_prefills_one_token():
    sched = _scheduler(_model(), 64)
    prompt = list(range(1, 33))  # exactly two blocks of 16
    try:
        first = sched.submit(prompt, SamplingParams(max_tokens=4)).result(timeout=60)
        again = sched.submit(prompt, SamplingParams(max_tokens=4)).result(timeout=60)
        scored = sched.submit(prompt, SamplingParams(max_tokens=0, prompt_logprobs=0)).result(timeout=60)
    finally:
        sched.close()
    assert first.cached_tokens == 0
    assert again.cached_tokens == 16  # the last block holds the token whose logits pick the answer
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert scored.cached_tokens == 0  # prompt logprobs need every position computed


# -- the engine on a trained checkpoint ----------------------------------------------------------
def _strategy_answers(path: Path, mb: float) -> tuple[list[str], list[int], int, int]:
    import assist
    import strategies

    engine = assist.load(path, prefix_cache_mb=mb, max_batch=16)
    try:
        async def run() -> tuple[list[str], list[int]]:
            texts: list[str] = []
            cached: list[int] = []
            questions = ["What is 12 + 30?", "Tom has 3 pens and buys 4 more. How many pens?"]
            for spec in ("reflect:max_tokens=48", "tools:max_tokens=48", "sc@3:t=0.8,seed=5,max_tokens=32(tools)"):
                for q in questions:
                    texts.append((await strategies.parse(spec).run(engine, q)).message.content or "")
            convo = [{"role": "user", "content": "Mia has 3 cups and buys 2 more."}]
            for turn in range(3):  # a multi-turn chat resends its history each time
                out = await engine.chat(convo, max_tokens=24)
                texts.append(out.text)
                assert out.usage.prompt_tokens_details is not None
                cached.append(out.usage.prompt_tokens_details.cached_tokens)
                convo += [{"role": "assistant", "content": out.text},
                          {"role": "user", "content": f"And then {turn + 1} more?"}]
            long = "Mia has 3 cups and buys 2 more cups at the market on a sunny Monday morning, then she"
            done = await engine.complete(long, max_tokens=4)
            again = await engine.complete(long, max_tokens=4)
            texts += [done["choices"][0]["text"], again["choices"][0]["text"]]
            cached.append(again["usage"]["prompt_tokens_details"]["cached_tokens"])
            return texts, cached

        texts, cached = asyncio.run(run())
        return texts, cached, engine.scheduler.prompt_tokens, engine.scheduler.prefilled_tokens
    finally:
        engine.close()


@pytest.mark.slow
def test_strategies_and_chats_answer_the_same_with_the_cache_on_a_checkpoint(trained_run):
    out, _ = trained_run
    path = out / "rlhf"
    off, off_cached, off_prompt, off_computed = _strategy_answers(path, 0)
    on, on_cached, on_prompt, on_computed = _strategy_answers(path, 64)
    squeezed, _, _, _ = _strategy_answers(path, 0.05)  # a few blocks: evictions all along
    assert on == off and squeezed == off
    assert off_cached == [0] * len(off_cached) and off_computed == off_prompt
    assert all(c > 0 for c in on_cached[1:])  # turns 2, 3 and the repeated completion
    assert on_prompt == off_prompt and on_computed < off_computed


# -- the endpoint ------------------------------------------------------------------------------
def test_metrics_expose_the_engines_prefix_counters_under_vllms_names():
    from assist.server._metrics import Metrics

    text = Metrics("m").render({"queue_depth": 0, "prefix_cache_queries": 120, "prefix_cache_hits": 48})
    assert 'vllm:prefix_cache_queries_total{model_name="m"} 120.0' in text
    assert 'vllm:prefix_cache_hits_total{model_name="m"} 48.0' in text
    assert "assist_prefix_cache" not in text  # counters, not gauges
    assert "prefix_cache" not in Metrics("m").render({"queue_depth": 0})  # no cache (an upstream): none


@pytest.mark.slow
def test_the_endpoint_reports_cached_tokens_and_counts_them(trained_run):
    import httpx

    from assist.engine import TorchEngine
    from assist.server import EngineBackend, create_app
    from assist.testing import running_server

    engine = TorchEngine(trained_run[0] / "rlhf", max_batch=8, name="assistant", prefix_cache_mb=16)
    chat = {"model": "assistant", "temperature": 0, "max_tokens": 8, "messages": [
        {"role": "system", "content": "You are a careful assistant who answers arithmetic questions briefly."},
        {"role": "user", "content": "Mia has 3 cups and buys 2 more. How many cups does Mia have?"}]}
    complete = {"model": "assistant", "temperature": 0, "max_tokens": 4,
                "prompt": "Mia has 3 cups and buys 2 more cups at the market on a sunny Monday morning"}
    try:
        with running_server(create_app(EngineBackend(engine), owns_backend=False)) as url:
            def post(path: str, body: dict) -> dict:
                response = httpx.post(url + path, json=body, timeout=120)
                response.raise_for_status()
                return response.json()

            first, again = post("/v1/chat/completions", chat), post("/v1/chat/completions", chat)
            done, redone = post("/v1/completions", complete), post("/v1/completions", complete)
            with httpx.stream("POST", url + "/v1/chat/completions", timeout=120,
                              json={**chat, "stream": True, "stream_options": {"include_usage": True}}) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            metrics = httpx.get(url + "/metrics", timeout=30).text
    finally:
        engine.close()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < again["usage"]["prompt_tokens"] and cached % 16 == 0
    assert again["choices"][0]["message"] == first["choices"][0]["message"]
    assert redone["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert redone["choices"][0]["text"] == done["choices"][0]["text"]
    assert events[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
    queries = sum(u["prompt_tokens"] for u in (first["usage"], again["usage"], done["usage"], redone["usage"],
                                               events[-1]["usage"]))
    hits = cached * 2 + redone["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert f'vllm:prefix_cache_queries_total{{model_name="assistant"}} {float(queries)}' in metrics
    assert f'vllm:prefix_cache_hits_total{{model_name="assistant"}} {float(hits)}' in metrics
