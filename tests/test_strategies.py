"""Strategies against FakeChatModel: grammar, votes, ties, early stop, budgets, scorers,
reflection rounds, JSON retries — the logic around the model, not the model."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import BaseModel

from assist.prompts import COT_SUFFIX, DIRECT_SUFFIX, REFLECT_PROMPT, REFLECT_STANDS
from assist.testing import FakeChatModel
from strategies import BestOfN, JsonOutput, Reflect, SelfConsistency, SpecError, parse, vote
from strategies.extract import answer_line, choice_letter, json_field


def run(strategy, model, text="What is 2+2?"):
    return strategy.run_sync(model, text)


# -- grammar --------------------------------------------------------------------------------------
def test_spec_grammar_builds_configured_objects():
    s = parse("sc@8:t=0.5,early_stop=true(cot)")
    assert isinstance(s, SelfConsistency) and s.k == 8 and s.temperature == 0.5 and s.early_stop
    assert s.inner.spec == "cot" and s.inner.temperature == 0.5  # attempts are sampled, not greedy
    assert s.spec == "sc@8:t=0.5,early_stop=true(cot)"
    assert parse("reflect@2(sc@4)").inner.k == 4
    assert parse("bon@3:rm=x").rm == "x"


@pytest.mark.parametrize("spec, bad", [("sc@x", "@x"), ("zz", "zz"), ("sc@4:t", "'t'"), ("sc@4(cot", "')'"),
                                       ("sc@4:zz=1", "zz"), ("", "empty"), ("sc@0", "at least 1"),
                                       ("cot)", ")")])
def test_malformed_specs_name_the_bad_token(spec, bad):
    with pytest.raises(SpecError) as e:
        parse(spec)
    assert bad in str(e.value)


# -- direct / cot ---------------------------------------------------------------------------------
def test_direct_and_cot_send_their_instruction_and_temperature_zero():
    fake = FakeChatModel(replies=["#### 4"])
    assert run(parse("cot"), fake).answer == "4"
    run(parse("direct"), fake)
    cot_call, direct_call = fake.calls
    assert cot_call["messages"][-1]["content"].endswith(COT_SUFFIX)
    assert direct_call["messages"][-1]["content"].endswith(DIRECT_SUFFIX)
    assert cot_call["temperature"] == 0.0 and direct_call["temperature"] == 0.0


def test_unparsable_answer_is_none_not_an_error():
    assert run(parse("cot"), FakeChatModel(replies=["no idea"])).answer is None


# -- self-consistency -----------------------------------------------------------------------------
def test_vote_majority_and_first_seen_tie_rule():
    assert vote(["3", "4", "4", None]) == ("4", {"3": 1.0, "4": 2.0})
    assert vote(["5", "3", "3", "5"])[0] == "5"  # tie: the answer seen first
    assert vote([None, None]) == (None, {})
    assert vote(["a", "b"], [0.2, 0.9])[0] == "b"


def test_sc_uses_one_n_call_and_reports_votes():
    fake = FakeChatModel(replies=["#### 3", "#### 4", "x #### 4", "#### 4", "nothing"])
    result = run(SelfConsistency(k=5, temperature=0.9), fake)
    assert result.answer == "4" and result.message.content == "#### 4"
    assert len(fake.calls) == 1 and fake.calls[0]["n"] == 5 and fake.calls[0]["temperature"] == 0.9
    tally = next(t for t in result.trace if t.get("step") == "vote")
    assert tally["tally"] == {"3": 1.0, "4": 3.0} and tally["answers"][-1] is None


def test_sc_without_n_support_makes_k_seeded_calls():
    fake = FakeChatModel(replies=["#### 1"], supports_n=False)
    result = run(SelfConsistency(k=3, seed=10), fake)
    assert [c["n"] for c in fake.calls] == [1, 1, 1]
    assert sorted(c["seed"] for c in fake.calls) == [10, 11, 12]
    assert result.usage.calls == 3


def test_sc_early_stop_when_the_leader_cannot_be_overtaken():
    fake = FakeChatModel(replies=["#### 7"] * 16)
    result = run(SelfConsistency(k=16, early_stop=True, step=4), fake)
    # after 12 samples 12-0 with 4 to go the leader is safe; after 8 (8-0, 8 to go) it is not yet
    assert [c["n"] for c in fake.calls] == [4, 4, 4]
    assert result.answer == "7" and result.trace[-1]["early_stop"]


def test_sc_usage_is_the_sum_of_calls():
    fake = FakeChatModel(replies=["#### 2 a", "#### 2 b c"], supports_n=False)
    result = run(SelfConsistency(k=2), fake)
    calls = [e for e in result.trace if e.get("step") == "call"]
    assert result.usage.completion_tokens == sum(c["usage"]["completion_tokens"] for c in calls) == 7
    assert result.usage.prompt_tokens == sum(c["usage"]["prompt_tokens"] for c in calls)


def test_budget_stops_sampling_and_says_so():
    fake = FakeChatModel(replies=["x " * 20 + "\n#### 1"], supports_n=False)
    result = run(SelfConsistency(k=8, early_stop=True, step=2, budget=60), fake)
    assert result.budget_exhausted and 0 < len(fake.calls) < 8
    assert result.answer == "1"


def test_composition_sc_over_an_inner_strategy():
    fake = FakeChatModel(replies=["#### 5", "#### 6", "#### 5"])
    result = run(parse("sc@3(direct)"), fake)
    assert result.answer == "5" and len(fake.calls) == 3
    assert all(c["messages"][-1]["content"].endswith(DIRECT_SUFFIX) for c in fake.calls)
    assert all(c["temperature"] == 0.7 for c in fake.calls)


# -- best-of-N ------------------------------------------------------------------------------------
def test_bon_picks_the_best_scored_candidate():
    fake = FakeChatModel(replies=["#### 1", "#### 2", "#### 3"])
    scored = []

    def scorer(messages, candidates):
        scored.append((messages, candidates))
        return [len(c) * (2 if "2" in c else 1) for c in candidates]

    result = run(BestOfN(k=3, scorer=scorer), fake)
    assert result.answer == "2"
    assert scored[0][0][-1]["content"] == "What is 2+2?"  # scored against the question as asked


def test_bon_ties_go_to_the_most_supported_answer_and_async_scorers_work():
    fake = FakeChatModel(replies=["#### 1", "#### 2", "#### 2"])

    async def flat(messages, candidates):
        await asyncio.sleep(0)
        return [1.0] * len(candidates)

    assert run(BestOfN(k=3, scorer=flat), fake).answer == "2"


def test_bon_scorer_failure_falls_back_to_a_vote():
    fake = FakeChatModel(replies=["#### 8", "#### 9", "#### 9"])

    def broken(messages, candidates):
        raise RuntimeError("reward model offline")

    result = run(BestOfN(k=3, scorer=broken), fake)
    assert result.answer == "9"
    assert "reward model offline" in next(t for t in result.trace if t.get("step") == "score")["error"]


def test_bon_without_a_scorer_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("ASSIST_REWARD_MODEL", raising=False)
    result_or_error = BestOfN(k=2)
    result = run(result_or_error, FakeChatModel(replies=["#### 1", "#### 1"]))
    assert result.answer == "1"  # falls back to the vote ...
    assert "rm=PATH" in next(t for t in result.trace if t.get("step") == "score")["error"]  # ... and says why


# -- reflection -----------------------------------------------------------------------------------
def test_reflect_stops_when_the_answer_stands():
    fake = FakeChatModel(replies=["2+2=<<2+2=4>>4\n#### 4", f"2+2=4 correct\n{REFLECT_STANDS}\n#### 4"])
    result = run(Reflect(k=3), fake)
    assert result.answer == "4" and len(fake.calls) == 2
    assert fake.calls[1]["messages"][-1] == {"role": "user", "content": REFLECT_PROMPT}
    assert fake.calls[1]["messages"][-2]["content"].endswith("#### 4")


def test_reflect_revises_and_rechecks():
    fake = FakeChatModel(replies=["#### 5", "2+2=5 wrong, 2+2=4\nCorrected:\n2+2=4\n#### 4",
                                  f"{REFLECT_STANDS}\n#### 4"])
    result = run(Reflect(k=3), fake)
    assert result.answer == "4" and result.text == "2+2=4\n#### 4" and len(fake.calls) == 3
    assert fake.calls[2]["messages"][-2]["content"] == "2+2=4\n#### 4"


def test_reflect_with_a_separate_critic_counts_its_cost():
    actor = FakeChatModel(replies=["#### 5"])
    critic = FakeChatModel(replies=["Corrected:\n#### 4"])
    result = run(Reflect(k=1, critic=critic), actor)
    assert result.answer == "4" and len(actor.calls) == 1 and len(critic.calls) == 1
    assert result.usage.calls == 2


# -- structured output ----------------------------------------------------------------------------
class Answer(BaseModel):
    answer: int


def test_json_output_sends_the_schema_and_validates():
    fake = FakeChatModel(replies=['{"answer": 4}'])
    result = run(JsonOutput(schema=Answer, field="answer"), fake)
    assert result.answer == "4"
    rf = fake.calls[0]["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"]["required"] == ["answer"]


def test_json_output_retries_with_the_error_then_gives_up_with_none():
    fake = FakeChatModel(replies=['{"answer": "four"}', '{"answer": 4}'])
    result = run(JsonOutput(schema=Answer), fake)
    assert json.loads(result.answer) == {"answer": 4} and len(fake.calls) == 2
    assert "does not match the schema" in fake.calls[1]["messages"][-1]["content"]
    never = run(JsonOutput(schema=Answer, retries=1), FakeChatModel(replies=["nope"]))
    assert never.answer is None and sum(1 for t in never.trace if t.get("step") == "validate") == 2


def test_json_spec_and_bad_schema():
    assert parse("json").response_format() == {"type": "json_object"}
    with pytest.raises(ValueError, match="invalid JSON schema"):
        JsonOutput(schema={"type": "nonsense"})


# -- extractors -----------------------------------------------------------------------------------
def test_extractors():
    assert answer_line("so\nAnswer: 42.") == "42"
    assert choice_letter("I think the answer is (C).") == "C"
    assert json_field("a")('x {"a": 3} y') == "3" and json_field("a")("{bad") is None
