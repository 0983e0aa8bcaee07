"""Placement skills (sdar_envs.alfworld.placement): built from train games only, no test fact leaks.

The suite is generated into a fresh cache (12 train + 12 test small rooms, ~10 s on 2 cores).
"""
import json

import pytest

from sdar_envs.alfworld import build_suite
from sdar_envs.alfworld.placement import game_placements, placement_counts, placement_skills
from sdar_envs.skills import BANK_DIR, load_skill_bank


@pytest.fixture(scope="module")
def suite(fresh_alfworld_cache):
    return build_suite(seed=0, num_train=12, num_test=12, room_size="small")


def _facts(skills):
    """(object, receptacle kind) pairs stated by placement skills."""
    return {(s["title"], kind) for s in skills
            for kind in s["text"].removeprefix("usually in/on ").split(", ")}


def _pairs(suite, ids):
    return {p for t in ids for p in game_placements(suite.game_file(t))}


def test_builder_refuses_any_held_out_game(suite):
    train, test = suite.task_ids("train"), suite.task_ids("test")
    with pytest.raises(ValueError, match="not train-split"):
        placement_counts(suite, [test[0]])
    with pytest.raises(ValueError, match=test[3]):
        placement_counts(suite, train[:2] + [test[3]])


def test_no_test_only_placement_enters_a_skill(suite):
    train, test = suite.task_ids("train"), suite.task_ids("test")
    test_only = _pairs(suite, test) - _pairs(suite, train)
    assert test_only, "no test-only placement in these games: the check below would prove nothing"
    # every kind, even seen once, so a leak could not hide under the frequency cut
    skills = placement_skills(placement_counts(suite, train), top=100, min_count=1)
    assert _facts(skills) == _pairs(suite, train)
    assert not _facts(skills) & test_only
    # the same check catches a bank built with held-out games (bypassing the split guard)
    counts = placement_counts(suite, train)
    for obj, recep in _pairs(suite, test):
        counts.setdefault(obj, {}).setdefault(recep, 0)
        counts[obj][recep] += 1
    assert _facts(placement_skills(counts, top=100, min_count=1)) & test_only


def test_skills_are_deterministic_and_rank_kinds_by_frequency(suite):
    train = suite.task_ids("train")
    counts = placement_counts(suite, train)
    a, b = placement_skills(counts), placement_skills(placement_counts(suite, train))
    assert a == b and a
    for s in a:
        kinds = s["text"].removeprefix("usually in/on ").split(", ")
        seen = [counts[s["title"]][k] for k in kinds]
        assert seen == sorted(seen, reverse=True) and min(seen) >= 2


def test_committed_bank_is_train_only_and_retrieves_the_named_object():
    data = json.loads((BANK_DIR / "alfworld_placement.json").read_text())
    assert data["source"]["kind"] == "train-split placement statistics"
    bank = load_skill_bank("alfworld", bank="alfworld_placement")
    names = {s.title for s in bank.skills}
    assert {"pen", "pencil", "pot", "potato", "desklamp"} <= names
    got = bank.retrieve("pick_and_place", "put a pencil in drawer", "keyword", k=2)
    assert [s.title for s in got] == ["pencil"]          # not "pen": whole-word keywords
    got = bank.retrieve("look_at_obj_in_light", "examine the pen with the desklamp", "keyword", k=2)
    assert sorted(s.title for s in got) == ["desklamp", "pen"]
    with pytest.raises(ValueError, match="skill_bank='nope'"):
        load_skill_bank("alfworld", bank="nope")
