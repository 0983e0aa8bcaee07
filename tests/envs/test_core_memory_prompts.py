"""History rendering and the per-env prompt templates."""
from sdar_envs.memory import Memory
from sdar_envs.prompts import TEACHER_HEADER, render_prompt, render_teacher_prompt, to_raw_action
from sdar_envs.projection import project
from sdar_envs.skills import load_skill_bank


def test_simple_and_search_history():
    m = Memory()
    m.add("obs a", "go to desk 1", "obs b")
    m.add("obs b", "take pen 1", "obs c")
    m.add("obs c", "look", "obs d")
    assert m.render(2) == ("[Observation 2: 'obs b', Action 2: 'take pen 1']\n"
                           "[Observation 3: 'obs c', Action 3: 'look']")
    s = Memory()
    s.add("q", "search[who is x]", "\n\n<information>Doc 1(Title: X) y\n</information>\n\n")
    assert s.render(4, "search") == "Step 1: who is x <information>Doc 1(Title: X) y\n</information>"


def test_webshop_prompt_lists_actions():
    p = render_prompt("webshop", "buy red shoes", Memory(), "WebShop [SEP] Search",
                      ["search[<your query>]", "click[buy now]"], 2)
    assert "buy red shoes" in p and "'click[buy now]'" in p and "<action>" in p


def test_search_prompt():
    m = Memory()
    m.add("Q?", "search[abc]", "<information>info</information>")
    p = render_prompt("searchqa", "Who?", m, "", [], 4)
    for part in ("<search>", "<answer>", "<think>", "Question: Who?", "Step 1: abc"):
        assert part in p


def test_teacher_prompt_and_raw_actions_roundtrip():
    bank = load_skill_bank("alfworld")
    skills = bank.retrieve("pick_clean_then_place", "clean some mug and put it in cabinet")
    t = render_teacher_prompt(skills, "STUDENT")
    assert t.startswith(TEACHER_HEADER + "\n- ") and t.endswith("\n\nSTUDENT") and "sink" in t
    assert project(to_raw_action("go to sinkbasin 1", "action", "x")) == ("go to sinkbasin 1", True)
    assert project(to_raw_action("search[a b]", "search"), "search") == ("search[a b]", True)
    assert project(to_raw_action("answer[Paris]", "search"), "search") == ("answer[Paris]", True)
    assert to_raw_action("", "action") == ""


def test_history_observations_are_clipped():
    m = Memory()
    m.add("x" * 5000, "look", "y")
    line = m.render(2)
    assert len(line) < 400 and line.endswith("…', Action 1: 'look']")


WELCOME_OBS = ("-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room. Looking quickly "
               "around you, you see a cabinet 1, and a shelf 1.\n\nYour task is to: put some pen on shelf.")


def test_compact_prompt_keeps_task_recent_actions_observation_and_actions_only():
    m = Memory()
    for k in range(5):
        m.add(f"obs {k}", f"go to cabinet {k}", f"obs {k + 1}")
    admissible = ["go to cabinet 1", "go to shelf 1", "help", "inventory", "look", "take pen 1 from cabinet 1"]
    p = render_prompt("alfworld", "put some pen on shelf", m, WELCOME_OBS, admissible, 2, style="compact")
    assert p.split("\n") == [
        "Task: put some pen on shelf",
        "Done: go to cabinet 3; go to cabinet 4",
        "Now: You are in the middle of a room. Looking quickly around you, you see a cabinet 1, and a shelf 1.",
        "Actions: go to cabinet 1 | go to shelf 1 | take pen 1 from cabinet 1"]
    verbose = render_prompt("alfworld", "put some pen on shelf", m, WELCOME_OBS, admissible, 2)
    assert len(p) < len(verbose) / 2
    first = render_prompt("webshop", "buy shoes", Memory(), "WebShop [SEP] Search", ["search[<q>]"], 2,
                          style="compact")
    assert "Done:" not in first and first.endswith("Actions: search[<q>]")


def test_unknown_prompt_or_think_style_names_the_field_and_choices():
    import pytest
    with pytest.raises(ValueError, match=r"prompt_style='terse'.*verl-agent.*compact"):
        render_prompt("alfworld", "t", Memory(), "o", [], 1, style="terse")
    with pytest.raises(ValueError, match=r"expert_think='long'.*plan.*empty"):
        to_raw_action("look", "action", think="long")


def test_empty_think_is_still_a_valid_step_in_both_styles():
    assert to_raw_action("look", "action", think="empty") == "<think></think>\n<action>look</action>"
    assert project(to_raw_action("look", "action", think="empty")) == ("look", True)
    assert project(to_raw_action("search[a b]", "search", think="empty"), "search") == ("search[a b]", True)
