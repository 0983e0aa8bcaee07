"""Prompt candidates (longest first) that a token cap chooses from: history goes, the head stays."""
from sdar_envs import BatchEnv
from sdar_envs.prompts import TEACHER_HEADER


class WalkGame:
    """Every 'walk' answers a new, marked observation; the episode never ends by itself."""

    max_steps = 50

    def __init__(self, task_id: str) -> None:
        self.task_id, self.task_type, self.task_text = task_id, "pick_and_place", "put a mug in the cabinet"
        self.n = 0

    def reset(self):
        self.n = 0
        return "You stand at the door (obs-0).", {"admissible_actions": ["walk", "look"]}

    def step(self, action):
        self.n += 1
        obs = f"You walk on past shelf {self.n} and drawer {self.n} (obs-{self.n})."
        return obs, 0.0, False, {"admissible_actions": ["walk", "look"], "won": False, "score": 0.0}

    def expert_action(self):
        return "walk"


class WalkSuite:
    def __init__(self, name: str) -> None:
        self.name = name

    def task_ids(self, split):
        return [f"walk/{split}/x/{i}" for i in range(4)]

    def make_game(self, task_id):
        return WalkGame(task_id)


def walked_env(name: str = "alfworld", steps: int = 4, **kw) -> BatchEnv:
    style = "search" if name == "searchqa" else "action"
    env = BatchEnv(name, WalkSuite(name), style=style, **kw)
    env.reset(batch_size=1)
    for _ in range(steps):
        act = "<search> mug </search>" if style == "search" else "<action>walk</action>"
        env.step([act])
    return env


def skill_lines(teacher_text: str) -> list[str]:
    head = teacher_text.split("\n\n", 1)[0].splitlines()
    assert head[0] == TEACHER_HEADER
    return head[1:]


def test_first_candidate_is_the_prompt_and_history_shrinks_to_none():
    env = walked_env(history_length=3)
    cands = env.prompt_candidates(0)
    assert cands[0] == env.prompt(0) and len(cands) == 4  # 3, 2, 1, 0 history records
    assert [len(c) for c in cands] == sorted((len(c) for c in cands), reverse=True)
    assert len(set(cands)) == 4
    for c in cands:  # head and current step in every candidate
        assert "put a mug in the cabinet" in c and "(obs-4)" in c and "'walk'" in c and "<action>" in c
    assert "(obs-1)" in cands[0] and "(obs-3)" in cands[0]  # the 3 records answered obs-1..obs-3
    assert "(obs-1)" not in cands[1] and "(obs-3)" in cands[1]  # the oldest goes first
    assert "Observation" not in cands[-1] and "(obs-3)" not in cands[-1]


def test_teacher_candidates_keep_every_skill_line_and_retrieve_once():
    env = walked_env(history_length=2)
    for retrieval in ("keyword", "random", "ucb", "full"):
        cands = env.teacher_prompt_candidates(0, retrieval)
        skills = skill_lines(cands[0])
        assert skills and all(line.startswith("- ") for line in skills)
        assert [skill_lines(c) for c in cands] == [skills] * len(cands)  # one draw for all candidates
        assert [c.split("\n\n", 1)[1] for c in cands] == env.prompt_candidates(0)
    assert env.teacher_prompt(0, "keyword") == env.teacher_prompt_candidates(0, "keyword")[0]


def test_search_keeps_its_latest_result_and_fresh_envs_have_one_candidate():
    env = walked_env("searchqa", history_length=4, steps=3)
    cands = env.prompt_candidates(0)
    assert len(cands) == 3  # 3, 2, 1 records: the latest search result is the current observation
    assert all("(obs-3)" in c for c in cands) and "(obs-2)" not in cands[-1]
    fresh = walked_env(steps=0, history_length=2)
    assert fresh.prompt_candidates(0) == [fresh.prompt(0)]
    assert len(walked_env(history_length=0).prompt_candidates(0)) == 1
