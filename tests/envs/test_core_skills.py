"""Skill banks: schema, coverage of task types, and the four retrieval methods."""
import json

import pytest

from sdar_envs.skills import BANK_DIR, Skill, SkillBank, load_skill_bank, read_skills

REQUIRED_TYPES = {
    "alfworld": ["pick_and_place", "look_at_obj_in_light", "pick_clean_then_place",
                 "pick_heat_then_place", "pick_cool_then_place", "pick_two_obj"],
    "webshop": ["beauty", "electronics", "fashion", "food", "furniture"],
    "searchqa": ["single_hop", "multi_hop", "comparison"],
}


@pytest.mark.parametrize("env", sorted(REQUIRED_TYPES))
def test_banks_cover_general_and_every_task_type(env):
    bank = load_skill_bank(env)
    assert any(s.general for s in bank.skills)
    for t in REQUIRED_TYPES[env]:
        assert any(t in s.task_types for s in bank.skills), t
    for s in bank.skills:
        assert s.id and s.title and len(s.text) > 20 and s.keywords


def _bank():
    skills = [Skill("g", "General", "general text", ("any",), ("general",)),
              Skill("h", "Heat", "use the microwave", ("heat", "hot"), ("pick_heat_then_place",)),
              Skill("c", "Cool", "use the fridge", ("cool",), ("pick_cool_then_place",)),
              Skill("x", "Other", "unrelated", ("zzz",), ("pick_two_obj",))]
    return SkillBank("alfworld", skills, seed=0, ucb_c=1.0)


def test_keyword_prefers_type_then_keywords():
    got = [s.id for s in _bank().retrieve("pick_heat_then_place", "put a hot apple in fridge", "keyword", 3)]
    assert got[0] == "h" and "x" not in got and "g" in got


def test_full_and_random():
    bank = _bank()
    assert [s.id for s in bank.retrieve("t", "", "full")] == ["g", "h", "c", "x"]
    r1 = [s.id for s in _bank().retrieve("t", "", "random", 2)]
    r2 = [s.id for s in _bank().retrieve("t", "", "random", 2)]
    assert r1 == r2 and len(set(r1)) == 2  # seeded


def test_ucb_explores_then_exploits():
    bank = _bank()
    first = {s.id for s in bank.retrieve("pick_heat_then_place", "", "ucb", 1)}
    bank.update(sorted(first), True)
    second = {s.id for s in bank.retrieve("pick_heat_then_place", "", "ucb", 1)}
    assert first != second  # the untried skill comes first
    bank.update(sorted(second), False)
    for _ in range(20):
        bank.update(sorted(first), True)
        bank.update(sorted(second), False)
    assert {s.id for s in bank.retrieve("pick_heat_then_place", "", "ucb", 1)} == first
    assert bank.stats.pulls[next(iter(first))] == 21


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="method='bm25'"):
        _bank().retrieve("t", "", "bm25")
    with pytest.raises(ValueError, match="not in the alfworld bank"):
        _bank().update(["nope"], True)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"skills": [{"id": "a", "title": "t", "text": "x"}]}))
    with pytest.raises(ValueError, match="lacks fields"):
        read_skills(bad)
    with pytest.raises(ValueError, match="env='nope'"):
        load_skill_bank("nope")


def test_bank_files_are_plain_json():
    assert {p.stem for p in BANK_DIR.glob("*.json")} >= set(REQUIRED_TYPES)
