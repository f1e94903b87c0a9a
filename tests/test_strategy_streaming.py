"""``strategy.stream``: the final stage's text as it is written, against FakeChatModel.

What is sent must be what ``run`` answers (text, usage, trace), only the answer may be
sent (never an attempt, a tool turn or a vote's sample), a vote's progress comes only when
asked for, and a consumer that leaves cancels the calls still pending.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from assist.prompts import REFLECT_AGAIN, REFLECT_DIFFER, REFLECT_STANDS
from assist.testing import FakeChatModel, tool_reply
from assist.types import ChatCompletion
from strategies import Delta, Done, Progress, Retrieve, parse
from strategies.reflect import revision, verdict

QUESTION = "Ann has 2 apples and buys 3 more. How many apples does Ann have?"
ATTEMPT = "Ann has 2 apples.\nShe buys 3 more: 2 + 3 = 4.\n#### 4"
CORRECTED = f"{REFLECT_AGAIN}\n2 + 3 = 5\n{REFLECT_DIFFER}\n  She buys 3 more: 2 + 3 = 5.\n#### 5\n"
STANDS = f"{REFLECT_AGAIN}\n2 + 3 = 5\n{REFLECT_STANDS}\n#### 5"
PASSAGES = [("kb-1", "Ann keeps 5 apples.", 1.0), ("kb-2", "Bob keeps pears.", 0.5)]


def _events(strategy: Any, model: Any, question: str = QUESTION, progress: bool = False) -> list[Any]:
    async def go() -> list[Any]:
        return [e async for e in strategy.stream(model, question, progress=progress)]

    return asyncio.run(go())


def _timeless(trace: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in trace]


# Each case: a spec (or a factory) and the script a fresh FakeChatModel answers from.
CASES: dict[str, tuple[Any, list[Any]]] = {
    "plain": ("plain", ["The answer is 5.\n#### 5"]),
    "cot": ("cot", ["2 + 3 = 5\n#### 5"]),
    "direct": ("direct", ["#### 5"]),
    "reflect-corrected": ("reflect", [ATTEMPT, CORRECTED]),
    "reflect-stands": ("reflect", [ATTEMPT, STANDS]),
    "reflect-unmarked": ("reflect", [ATTEMPT, "2 + 3 = 5\n#### 5"]),
    "reflect-unmarked-no-answer": ("reflect", [ATTEMPT, "hmm"]),
    "reflect-corrected-no-answer": ("reflect", [ATTEMPT, f"{REFLECT_DIFFER} hmm"]),
    "reflect@2": ("reflect@2", [ATTEMPT, CORRECTED, STANDS]),
    "reflect@2-twice": ("reflect@2", [ATTEMPT, CORRECTED, f"x {REFLECT_DIFFER} 2 + 3 = 5, so #### 5"]),
    "tools": ("tools", [tool_reply("calculator", {"expression": "2+3"}), "#### 5"]),
    "tools-forced-last": ("tools:max_turns=1", [tool_reply("calculator", {"expression": "2+3"}),
                                                "So 2 + 3 = 5 apples.\n#### 5"]),
    "tools-still-calling": ("tools:max_turns=1", [tool_reply("calculator", {"expression": "2+3"})]),
    "rag": (lambda: Retrieve(search=lambda q, k: PASSAGES[:k]), ["Ann keeps 5 [kb-1].\n#### 5"]),
    "rag(cot)": (lambda: Retrieve(search=lambda q, k: PASSAGES[:k], inner=parse("cot")), ["#### 5 [kb-1]"]),
    "reflect(rag)": (lambda: parse("reflect").__class__(inner=Retrieve(search=lambda q, k: PASSAGES[:k])),
                     [ATTEMPT, CORRECTED]),
    "sc@4": ("sc@4:seed=1", ["#### 5", "#### 4", "#### 5", "#### 5"]),
    "sc@8-early": ("sc@8:early_stop=true,step=2,seed=1", ["#### 5"]),
    "sc@2(tools)": ("sc@2:seed=1(tools)", [tool_reply("calculator", {"expression": "2+3"}), "#### 5"]),
    "bon@3": ("bon@3:seed=1", ["#### 5", "#### 4", "#### 5"]),
    "json": ("json", ['{"answer": 5}']),
}


def _strategy(case: str) -> Any:
    spec = CASES[case][0]
    strategy = parse(spec) if isinstance(spec, str) else spec()
    if case.startswith("bon"):
        strategy.scorer = lambda messages, texts: [len(t) for t in texts]
    return strategy


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_text_usage_and_trace_are_what_run_answers(case):
    script = CASES[case][1]
    ran = _strategy(case).run_sync(FakeChatModel(list(script)), QUESTION)
    events = _events(_strategy(case), FakeChatModel(list(script)))
    done = events[-1]
    assert isinstance(done, Done) and not any(isinstance(e, Done) for e in events[:-1])
    assert "".join(e.text for e in events if isinstance(e, Delta)) == ran.text == done.result.text
    assert done.result.answer == ran.answer
    assert (done.result.usage.prompt_tokens, done.result.usage.completion_tokens, done.result.calls) == (
        ran.usage.prompt_tokens, ran.usage.completion_tokens, ran.calls)
    assert _timeless(done.result.trace) == _timeless(ran.trace)
    assert not any(isinstance(e, Progress) for e in events)  # progress is opt-in


@pytest.mark.parametrize("case", ["cot", "reflect-corrected", "tools-forced-last", "rag"])
def test_the_final_stage_streams_piece_by_piece(case):
    deltas = [e for e in _events(_strategy(case), FakeChatModel(list(CASES[case][1]))) if isinstance(e, Delta)]
    assert len(deltas) > 3


def test_reflect_verdict_is_the_first_marker():
    assert verdict(STANDS)[0] == "stands" and revision(STANDS) is None
    assert verdict(CORRECTED)[0] == "corrected"
    assert revision(CORRECTED) == "She buys 3 more: 2 + 3 = 5.\n#### 5"
    # a stand after the correction is part of the revision, not a second verdict
    late = f"{REFLECT_DIFFER} 2 + 3 = 5. {REFLECT_STANDS}\n#### 5"
    assert revision(late) == f"2 + 3 = 5. {REFLECT_STANDS}\n#### 5"
    assert verdict("no marker at all") == (None, 0)


class _Logged(FakeChatModel):
    """A FakeChatModel whose streams log each piece they send into ``log``."""

    def __init__(self, replies: list[Any], log: list[str]) -> None:
        super().__init__(replies)
        self.log = log

    async def stream_chat(self, messages: Any, **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        call = len(self.calls)
        async for chunk in super().stream_chat(messages, **kwargs):
            for part in chunk.get("choices") or []:
                if part["delta"].get("content"):
                    self.log.append(f"call{call}:piece")
            yield chunk
        self.log.append(f"call{call}:end")


def _order(spec: str, script: list[Any]) -> list[str]:
    log: list[str] = []

    async def go() -> None:
        async for event in parse(spec).stream(_Logged(script, log), QUESTION):
            if isinstance(event, Delta):
                log.append("sent")

    asyncio.run(go())
    return log


def test_a_revision_is_sent_while_the_check_is_still_writing_it():
    log = _order("reflect", [ATTEMPT, CORRECTED])
    assert "sent" in log[: log.index("call1:end")]


def test_an_attempt_that_stands_is_sent_before_the_check_ends():
    log = _order("reflect", [ATTEMPT, STANDS])
    assert log.count("sent") == 1 and log.index("sent") < log.index("call1:end")


def test_an_attempt_that_is_checked_again_is_never_sent():
    # reflect@2: the first revision is checked again; only the final text goes out
    events = _events(parse("reflect@2"), FakeChatModel([ATTEMPT, CORRECTED, STANDS]))
    assert "".join(e.text for e in events if isinstance(e, Delta)) == revision(CORRECTED)


def test_sc_progress_counts_samples_and_tallies_as_they_finish():
    events = _events(parse("sc@4:seed=1"), FakeChatModel(["#### 5", "#### 4", "#### 5", "#### 5"]),
                     progress=True)
    news = [e.data for e in events if isinstance(e, Progress)]
    assert [n["samples"] for n in news] == [1, 2, 3, 4] and all(n["of"] == 4 for n in news)
    assert news[-1]["tally"] == {"5": 3.0, "4": 1.0} and news[-1]["leader"] == "5"
    vote = next(t for t in events[-1].result.trace if t["step"] == "vote")
    assert news[-1]["tally"] == vote["tally"]
    # the answer itself comes after the vote, in one piece
    assert isinstance(events[-2], Delta) and events[-2].text == "#### 5"


def test_sc_progress_without_n_and_with_early_stop():
    model = FakeChatModel(["#### 5"], supports_n=False)
    events = _events(parse("sc@8:early_stop=true,step=2,seed=1"), model, progress=True)
    news = [e.data for e in events if isinstance(e, Progress)]
    assert [n["samples"] for n in news] == list(range(1, len(news) + 1)) and len(news) == len(model.calls) < 8


def test_bon_progress_ends_with_scoring():
    strategy = parse("bon@3:seed=1")
    strategy.scorer = lambda messages, texts: [len(t) for t in texts]
    events = _events(strategy, FakeChatModel(["#### 5", "#### 4", "#### 5"]), progress=True)
    news = [e.data for e in events if isinstance(e, Progress)]
    assert [n["samples"] for n in news] == [1, 2, 3, 3] and news[-1]["scoring"]


class _Whole:
    """A ChatModel with no stream: answers arrive whole."""

    name, supports_n = "whole", True

    def __init__(self, replies: list[Any]) -> None:
        self.fake = FakeChatModel(replies)

    async def chat(self, messages: Any, **kwargs: Any) -> ChatCompletion:
        return await self.fake.chat(messages, **kwargs)


def test_a_model_without_a_stream_still_streams_the_answer_whole():
    events = _events(parse("reflect"), _Whole([ATTEMPT, CORRECTED]))
    assert [e.text for e in events if isinstance(e, Delta)] == [revision(CORRECTED)]


class _Hanging(FakeChatModel):
    """Each stream after the first ``free`` ones sends ``before`` chunks, then waits until
    it is cancelled; ``cancelled`` counts the streams that ended unfinished."""

    def __init__(self, replies: list[Any], *, before: int, free: int = 0, supports_n: bool = True) -> None:
        super().__init__(replies, supports_n=supports_n)
        self.before, self.free = before, free
        self.cancelled = self.started = 0

    async def stream_chat(self, messages: Any, **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        self.started += 1
        hangs = self.started > self.free
        sent = 0
        try:
            async for chunk in super().stream_chat(messages, **kwargs):
                yield chunk
                sent += 1
                if hangs and sent >= self.before:
                    await asyncio.Event().wait()
        except (asyncio.CancelledError, GeneratorExit):  # cancelled, or closed unfinished
            self.cancelled += 1
            raise


def _leave_at_first(strategy: Any, model: Any, kind: type) -> Any:
    async def go() -> Any:
        events = strategy.stream(model, QUESTION, progress=True)
        async for event in events:
            if isinstance(event, kind):
                await events.aclose()
                return event
        return None

    return asyncio.run(asyncio.wait_for(go(), 10))


def test_a_consumer_that_leaves_mid_answer_cancels_the_call():
    model = _Hanging(["2 + 3 = 5\n#### 5 and some more words"], before=3)
    assert _leave_at_first(parse("cot"), model, Delta).text
    assert model.started == 1 and model.cancelled == 1


def test_a_consumer_that_leaves_mid_vote_cancels_the_samples_still_running():
    model = _Hanging(["#### 5"], before=2, free=1, supports_n=False)  # one sample ends, two hang
    news = _leave_at_first(parse("sc@3:seed=1"), model, Progress)
    assert news.data["samples"] == 1
    assert model.started == 3 and model.cancelled == 2
