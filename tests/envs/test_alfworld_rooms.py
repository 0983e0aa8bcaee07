"""ALFWorld room/task generation and PDDL rendering (no engine runs here: fast)."""
from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdar_envs.alfworld.catalog import (CAN_CONTAIN, LAMP_HOSTS, NEEDED_APPLIANCE, ROOM_SIZES,
                                        SHORT_TYPES)
from sdar_envs.alfworld.problem import mangle, problem_pddl
from sdar_envs.alfworld.sampler import combo_is_test, layout_is_test, sample_spec


def test_mangle_matches_alfworld_character_map():
    assert mangle("Mug|+00.10|-01.20,a#b") == "Mug_bar__plus_00_dot_10_bar__minus_01_dot_20_comma_a-b"


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), task_type=st.sampled_from(SHORT_TYPES),
       test=st.booleans(), room_size=st.sampled_from(sorted(ROOM_SIZES)))
def test_sampled_rooms_obey_alfred_validity_rules(seed, task_type, test, room_size):
    spec = sample_spec(random.Random(seed), task_type, room_size, test)
    size = ROOM_SIZES[room_size]
    classes = [r.cls for r in spec.receptacles]
    assert size.min_receptacles <= len(classes) <= size.max_receptacles
    assert len({r.rid for r in spec.receptacles}) == len(classes)
    assert len({r.loc for r in spec.receptacles} | {spec.agent_loc}) == len(classes) + 1
    targets = [o for o in spec.objects if o.cls == spec.object_target]
    assert len(targets) >= (2 if task_type == "pick_two_obj" else 1)
    for o in spec.objects:  # every object sits in a receptacle that can hold it
        assert o.cls in CAN_CONTAIN[spec.receptacles[o.parent].cls] or o.cls == "DeskLamp"
    for o in targets:       # the goal is not already satisfied at the start
        assert spec.receptacles[o.parent].cls != spec.parent_target
    if task_type in NEEDED_APPLIANCE:
        assert NEEDED_APPLIANCE[task_type] in classes
    if task_type == "look_at_obj_in_light":
        lamps = [o for o in spec.objects if o.cls == "DeskLamp"]
        assert len(lamps) == 1 and spec.receptacles[lamps[0].parent].cls in LAMP_HOSTS
    assert combo_is_test(task_type, spec.object_target, spec.parent_target or "DeskLamp") == test
    assert layout_is_test(spec.layout_signature()) == test


def test_problem_text_follows_alfworld_conventions():
    spec = sample_spec(random.Random(3), "pick_clean_then_place", "small", False)
    text = problem_pddl(spec)
    assert text.startswith("(define (problem") and "(:domain alfred)" in text
    assert "Sliced" not in text and "|" not in text and "#" not in text
    assert re.search(r"Sink_bar_\S+_bar_SinkBasin - receptacle", text)  # shows "sinkbasin 1"
    for const in ("SinkBasinType - rtype", "MicrowaveType - rtype", "KnifeType - otype"):
        assert const in text
    assert text.count("(") == text.count(")")  # the goal template closes the define


def test_generation_is_deterministic_per_seed():
    a = sample_spec(random.Random("k"), "pick_two_obj")
    b = sample_spec(random.Random("k"), "pick_two_obj")
    c = sample_spec(random.Random("other"), "pick_two_obj")
    assert problem_pddl(a) == problem_pddl(b) != problem_pddl(c)


def test_test_combos_and_layouts_never_sampled_for_train():
    rng = random.Random(0)
    train = [sample_spec(rng, t, test=False) for t in SHORT_TYPES for _ in range(40)]
    test = [sample_spec(rng, t, test=True) for t in SHORT_TYPES for _ in range(15)]
    combos = lambda specs: {(s.task_type, s.object_target, s.parent_target) for s in specs}
    layouts = lambda specs: {s.layout_signature() for s in specs}
    assert not combos(train) & combos(test)
    assert not layouts(train) & layouts(test)


def test_bad_sampler_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="task_type='cook'"):
        sample_spec(random.Random(0), "cook")
    with pytest.raises(ValueError, match="room_size='huge'"):
        sample_spec(random.Random(0), "pick_two_obj", room_size="huge")
