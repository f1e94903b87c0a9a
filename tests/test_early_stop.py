"""``sc@k:early_stop=true``'s two stopping rules against FakeChatModel: the exact one (the
leader cannot be overtaken) and Adaptive-Consistency's Beta criterion (``confidence``)."""

from __future__ import annotations

import pytest

from assist.testing import FakeChatModel
from strategies import OptionError, SelfConsistency, parse
from strategies.self_consistency import leader_probability


def test_leader_probability_is_the_beta_posterior_mass_above_one_half():
    assert leader_probability(0, 0) == 0.5
    assert leader_probability(4, 0) == 1 - 1 / 32  # Beta(5, 1): 1 - 0.5**5
    assert leader_probability(3, 1) == 1 - 6 / 32
    assert leader_probability(2, 2) == 0.5  # a tie is a coin flip
    assert leader_probability(7, 1) > leader_probability(6, 2) > leader_probability(5, 3)


def test_confidence_stops_a_unanimous_vote_after_one_round():
    fake = FakeChatModel(replies=["#### 7"])
    result = SelfConsistency(k=16, early_stop=True, step=4, confidence=0.95).run_sync(fake, "q")
    assert [c["n"] for c in fake.calls] == [4]  # 4-0: 0.97 >= 0.95
    assert result.answer == "7" and result.trace[-1]["early_stop"] and result.trace[-1]["samples"] == 4


def test_confidence_waits_while_the_lead_is_not_significant():
    fake = FakeChatModel(replies=["#### 7", "#### 7", "#### 7", "#### 8", "#### 7"])
    result = parse("sc@16:early_stop=true,step=4,confidence=0.95").run_sync(fake, "q")
    assert [c["n"] for c in fake.calls] == [4, 4]  # 3-1 (0.81) goes on, 7-1 (0.98) stops
    assert result.answer == "7"


def test_the_default_rule_is_the_exact_one():
    fake = FakeChatModel(replies=["#### 7"])
    SelfConsistency(k=16, early_stop=True, step=4).run_sync(fake, "q")
    assert [c["n"] for c in fake.calls] == [4, 4, 4]  # 12-0 with 4 to go: nothing can overtake it


@pytest.mark.parametrize("bad", [0.3, 1.5, "high"])
def test_confidence_is_checked(bad):
    with pytest.raises(OptionError) as e:
        SelfConsistency(k=8, early_stop=True, confidence=bad)
    assert e.value.option == "confidence"
