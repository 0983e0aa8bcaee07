"""Teacher prompts under rollout.max_prompt_tokens keep every skill line and the current observation."""
from functools import lru_cache

import pytest

from sdar_engine.prompt_fit import fit_prompt_ids, student_prompt_ids
from sdar_engine.rollout import render_prompt_ids
from sdar_engine.teacher import teacher_prompt_ids
from sdar_engine.tokenizer import train_tokenizer
from sdar_envs import BatchEnv
from sdar_envs.prompts import TEACHER_HEADER
from sdar_envs.skills import load_skill_bank

TASK = "put a clean mug in the cabinet"


class HallGame:
    """Each 'walk' answers a long observation with a marker; the episode never ends by itself."""

    max_steps = 50

    def __init__(self, task_id: str) -> None:
        self.task_id, self.task_type, self.task_text, self.n = task_id, "pick_clean_then_place", TASK, 0

    def reset(self):
        self.n = 0
        return self._obs(), {"admissible_actions": ["walk", "look", "go to sinkbasin 1"]}

    def _obs(self) -> str:
        return (f"You are in hall {self.n}. You see " + ", ".join(f"a shelf {k}" for k in range(1, 12))
                + f". marker{self.n}")

    def step(self, action):
        self.n += 1
        return self._obs(), 0.0, False, {"admissible_actions": ["walk", "look", "go to sinkbasin 1"],
                                         "won": False, "score": 0.0}

    def expert_action(self):
        return "walk"


class HallSuite:
    name = "alfworld"

    def task_ids(self, split):
        return [f"hall/{split}/x/{i}" for i in range(2)]

    def make_game(self, task_id):
        return HallGame(task_id)


@lru_cache(maxsize=None)
def tokenizer():
    """A small byte-level ChatML tokenizer (any text round-trips), trained in well under a second."""
    bank = load_skill_bank("alfworld")
    corpus = [f"{s.title}: {s.text}" for s in bank.skills] + [TASK, HallGame("hall/train/x/0")._obs()]
    return train_tokenizer(corpus, vocab_size=600)


def walked_env(steps: int = 5) -> BatchEnv:
    env = BatchEnv("alfworld", HallSuite(), history_length=4, skill_top_k=3)
    env.reset(batch_size=1)
    for _ in range(steps):
        env.step(["<think>t</think><action>walk</action>"])
    return env


def skill_block(text: str) -> str:
    return text.split("\n\n", 1)[0]


def test_teacher_prompt_at_the_cap_keeps_every_skill_line_and_the_current_observation():
    tok, env = tokenizer(), walked_env()
    cands = env.teacher_prompt_candidates(0, "keyword")
    skills = skill_block(cands[0])
    assert skills.startswith(TEACHER_HEADER) and skills.count("\n- ") == 3
    full = len(render_prompt_ids(tok, cands[0]))
    floor = len(render_prompt_ids(tok, cands[-1]))  # no history left: the smallest cap that can work
    assert floor < full - 100
    current = "marker5"
    for cap in (full, full - 1, (full + floor) // 2, floor):
        ids = teacher_prompt_ids(env, tok, [0], "keyword", max_prompt_tokens=cap)[0]
        text = tok.decode(ids)
        assert len(ids) <= cap
        assert text.startswith("<|im_start|>user\n" + TEACHER_HEADER)  # chat header, then the skills
        for line in skills.splitlines():
            assert line in text
        assert current in text and TASK in text and text.endswith("<|im_start|>assistant\n")
        if cap < full:
            assert "marker1." not in text  # the oldest history record went first
    # what a left cut did before: at the same cap the header and skills are the first to go
    left = tok.decode(render_prompt_ids(tok, cands[0], floor))
    assert TEACHER_HEADER not in left and current in left
    with pytest.raises(ValueError, match=rf"rollout.max_prompt_tokens={floor - 1} is too small.*skills"):
        teacher_prompt_ids(env, tok, [0], "keyword", max_prompt_tokens=floor - 1)


def test_student_prompt_at_the_cap_keeps_task_and_current_observation():
    tok, env = tokenizer(), walked_env()
    floor = len(render_prompt_ids(tok, env.prompt_candidates(0)[-1]))
    text = tok.decode(student_prompt_ids(env, tok, [0], floor)[0])
    assert text.startswith("<|im_start|>user\n") and TASK in text and "marker5" in text
    assert "marker4." not in text  # no history left at this cap
    assert student_prompt_ids(env, tok, [0], 0)[0] == render_prompt_ids(tok, env.prompt(0))


def test_fit_takes_the_longest_candidate_that_fits():
    tok = tokenizer()
    a, b = "a shelf 1 " * 30, "a shelf 1"
    n_a, n_b = len(render_prompt_ids(tok, a)), len(render_prompt_ids(tok, b))
    assert fit_prompt_ids(tok, [a, b], n_a) == render_prompt_ids(tok, a)
    assert fit_prompt_ids(tok, [a, b], n_a - 1) == render_prompt_ids(tok, b)
    with pytest.raises(ValueError, match=rf"max_prompt_tokens={n_b - 1} is too small for this prompt"):
        fit_prompt_ids(tok, [a, b], n_b - 1)
