"""warmstart.student_expert_search: the student-prompt samples from one expert, the skill-prefixed
(teacher) samples from the env's own (sdar_engine.demo.collect_expert, warmstart.expert_samples)."""
from __future__ import annotations

import pytest

from sdar_engine.config import load_config
from sdar_engine.demo import collect_expert
from sdar_engine.trainer import draw_tasks, make_env
from sdar_engine.warmstart import ExpertStep, expert_samples, play_expert


class CharTokenizer:
    """Just enough of a tokenizer for expert_samples: one id per character, a chat template."""

    eos_token_id = 1
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(c) % 200) for c in text]}

    def convert_tokens_to_ids(self, token):
        return None

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kwargs):
        return "<user>" + messages[-1]["content"] + "<assistant>"


def _step(role: str, i: int) -> ExpertStep:
    return ExpertStep(prompt=f"student {i}", teacher=f"teacher {i}", action=f"act {i}", episode=i, step=0,
                      role=role)


def test_roles_pick_the_prompts_each_step_labels():
    tok = CharTokenizer()
    steps = [_step("both", 0), _step("student", 1), _step("teacher", 2)]
    samples = expert_samples(steps, tok, teacher_prompts=True)
    # student samples (roles both, student), then teacher samples (roles both, teacher)
    assert [s.episode for s in samples] == [0, 1, 0, 2]
    assert samples[1].response_ids[:-1] == tok("act 1")["input_ids"]
    assert samples[3].response_ids[:-1] == tok("act 2")["input_ids"]
    plain = expert_samples(steps, tok, teacher_prompts=False)
    assert [s.episode for s in plain] == [0, 1]  # a teacher-only step has no student sample


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    return tmp_path


def _cfg(*extra: str):
    return load_config("tiny_alfworld_skills.yaml", ["warmstart.episodes=3", "rollout.max_turns=12",
                                                     *extra])


def test_student_samples_come_from_the_other_expert(fresh_cache):
    cfg = _cfg("warmstart.student_expert_search=handcoded")
    env = make_env(cfg, "train")
    steps, _ = collect_expert(cfg, env)
    tasks = draw_tasks(env.task_ids, 3, cfg.train.seed, -1)
    handcoded_env = make_env(_cfg("env.options.expert_search=handcoded"), "train")
    handcoded, _ = play_expert(handcoded_env, tasks, max_turns=12, retrieval=cfg.env.retrieval)
    prior, _ = play_expert(make_env(cfg, "train"), tasks, max_turns=12, retrieval=cfg.env.retrieval)
    student = [s for s in steps if s.role == "student"]
    teacher = [s for s in steps if s.role == "teacher"]
    assert len(student) + len(teacher) == len(steps)
    assert [s.action for s in student] == [s.action for s in handcoded]
    assert [s.action for s in teacher] == [s.action for s in prior]
    # the two experts really search differently on these games (else the option proves nothing)
    assert [s.action for s in handcoded] != [s.action for s in prior]


def test_without_the_option_both_prompts_share_the_expert(fresh_cache):
    cfg = _cfg("warmstart.student_expert_search=null")
    assert cfg.warmstart.student_expert_search is None
    steps, _ = collect_expert(cfg, make_env(cfg, "train"))
    assert {s.role for s in steps} == {"both"}


@pytest.mark.parametrize("overrides, match", [
    (["warmstart.student_expert_search=handcoded", "warmstart.teacher_prompts=false"], "teacher_prompts"),
    (["warmstart.student_expert_search=''"], "student_expert_search"),
])
def test_bad_values_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        _cfg(*overrides)

