"""Advantage estimators against hand-computed values (GRPO, Dr.GRPO, GiGPO)."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdar_engine.advantages import AdvantageInput, compute_advantages, discounted_returns


def test_grpo_hand_computed_unbiased_std():
    # group 0: rewards 10, 0, 0, 10 -> mean 5, unbiased std sqrt(100/3) = 5.7735
    inp = AdvantageInput(rewards=[10, 0, 0, 10, 3], groups=[0, 0, 0, 0, 1])
    adv = compute_advantages("grpo", inp, eps=1e-6)
    std = math.sqrt(100 / 3)
    assert adv[:4] == pytest.approx([5 / (std + 1e-6), -5 / (std + 1e-6), -5 / (std + 1e-6), 5 / (std + 1e-6)])
    assert adv[4] == 0.0  # a group of one gets 0


def test_grpo_stats_over_all_step_samples_of_a_group():
    # episode A (3 steps, reward 9.9 at each step after a 0.1 penalty on step 2), episode B (1 step, 0)
    inp = AdvantageInput(rewards=[10, 9.9, 10, 0], groups=[7, 7, 7, 7])
    adv = compute_advantages("grpo", inp)
    xs = [10, 9.9, 10, 0]
    mean = sum(xs) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / 3)
    assert adv == pytest.approx([(x - mean) / (std + 1e-6) for x in xs])


def test_equal_rewards_give_zero_and_drgrpo_has_no_std():
    assert compute_advantages("grpo", AdvantageInput([1, 1, 1], [0, 0, 0])) == [0.0, 0.0, 0.0]
    assert compute_advantages("drgrpo", AdvantageInput([10, 0, 2], [0, 0, 0])) == pytest.approx([6, -4, -2])


def test_discounted_returns_follow_step_order():
    # one episode, steps given out of order; rewards 0, 0, 10 at steps 0, 1, 2; gamma 0.5
    r = discounted_returns([10, 0, 0], ["e", "e", "e"], [2, 0, 1], gamma=0.5)
    assert r == pytest.approx([10, 2.5, 5])


def test_gigpo_adds_anchor_state_step_advantage():
    # two episodes of one group, both start at anchor "s0"; ep a wins at its 2nd step.
    inp = AdvantageInput(rewards=[10, 10, 0, 0], groups=[0, 0, 0, 0], episodes=["a", "a", "b", "b"],
                         steps=[0, 1, 0, 1], anchors=["s0", "s1", "s0", "s2"], step_rewards=[0, 10, 0, 0])
    adv = compute_advantages("gigpo", inp, step_advantage_w=1.0, gamma=0.95, eps=0.0)
    ep = compute_advantages("grpo", inp, eps=0.0)
    # step groups: {0, 2} at s0 with returns 9.5 and 0 -> +-1/sqrt(2)*... ; s1, s2 are singletons
    std = math.sqrt((9.5 - 4.75) ** 2 * 2)
    assert adv[0] == pytest.approx(ep[0] + 4.75 / std)
    assert adv[2] == pytest.approx(ep[2] - 4.75 / std)
    assert adv[1] == pytest.approx(ep[1]) and adv[3] == pytest.approx(ep[3])


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="advantage='ppo'.*grpo, drgrpo, gigpo"):
        compute_advantages("ppo", AdvantageInput([1.0], [0]))
    with pytest.raises(ValueError, match="groups has 1 entries"):
        AdvantageInput([1.0, 2.0], [0])
    with pytest.raises(ValueError, match="rewards\\[0\\]"):
        AdvantageInput([float("nan")], [0])
    with pytest.raises(ValueError, match="gigpo.*anchors"):
        compute_advantages("gigpo", AdvantageInput([1.0], [0], episodes=[0], steps=[0], step_rewards=[0]))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=2, max_size=12), st.floats(-5, 5), st.floats(0.5, 4))
def test_grpo_is_invariant_to_shift_and_positive_scale(rewards, shift, scale):
    groups = [0] * len(rewards)
    base = compute_advantages("grpo", AdvantageInput(rewards, groups), eps=0.0)
    moved = compute_advantages("grpo", AdvantageInput([r * scale + shift for r in rewards], groups), eps=0.0)
    spread = max(rewards) - min(rewards)
    if spread > 1e-3:
        assert moved == pytest.approx(base, abs=1e-6)
        assert sum(base) == pytest.approx(0.0, abs=1e-6)
