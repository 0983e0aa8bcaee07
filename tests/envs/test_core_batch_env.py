"""BatchEnv over a tiny in-test suite: groups, dones, caps, penalties, determinism, prompts."""
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from sdar_envs import BatchEnv, Game, Suite
from sdar_envs.prompts import TEACHER_HEADER


class CountGame:
    """Reach ``target`` by 'inc' then 'stop'; anything else gets 'Nothing happens.'."""

    max_steps = 6

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        idx = int(task_id.rsplit("/", 1)[1])
        self.task_type = "pick_and_place" if idx % 2 else "pick_cool_then_place"
        self.target = 1 + idx % 3
        self.task_text = f"count to {self.target}"
        self.n = 0

    def reset(self):
        self.n = 0
        return f"You are at 0. Goal {self.target}.", {"admissible_actions": ["inc", "stop", "help"]}

    def step(self, action):
        info = {"admissible_actions": ["inc", "stop", "help"], "won": False, "score": 0.0}
        if action == "inc":
            self.n += 1
            return f"You are at {self.n}.", 0.0, False, info
        if action == "stop":
            won = self.n == self.target
            return "Stopped.", 10.0 * won, True, dict(info, won=won, score=float(won))
        return "Nothing happens.", 0.0, False, info

    def expert_action(self):
        return "inc" if self.n < self.target else "stop"


class CountSuite:
    name = "alfworld"

    def task_ids(self, split):
        base = 0 if split == "train" else 100
        return [f"count/{split}/x/{base + i}" for i in range(12)]

    def make_game(self, task_id):
        return CountGame(task_id)


def make_env(**kw):
    return BatchEnv("alfworld", CountSuite(), split=kw.pop("split", "train"), seed=kw.pop("seed", 0), **kw)


def run_expert(env):
    rewards = [0.0] * env.num_envs
    while not all(env.dones):
        _, r, _, infos = env.step(env.expert_actions())
        rewards = [a + b for a, b in zip(rewards, r)]
    return rewards, infos


def test_protocols_are_runtime_checkable():
    assert isinstance(CountSuite(), Suite) and isinstance(CountGame("a/b/c/1"), Game)


def test_groups_share_a_task_and_expert_wins():
    env = make_env()
    obs, infos = env.reset(batch_size=3, group_size=4)
    assert len(obs) == 12
    for g in range(3):
        assert len({infos[g * 4 + j]["task_id"] for j in range(4)}) == 1
    rewards, infos = run_expert(env)
    assert rewards == [10.0] * 12 and all(i["won"] for i in infos)
    assert all(i["is_action_valid"] and i["penalty"] == 0.0 for i in infos)


def test_required_info_keys():
    env = make_env()
    _, infos = env.reset(batch_size=2)
    _, _, _, infos2 = env.step(["junk", "<think>a</think><action>inc</action>"])
    for info in infos + infos2:
        assert {"won", "score", "task_type", "is_action_valid", "admissible_actions", "task_id",
                "penalty", "step"} <= set(info)
    assert infos2[0]["penalty"] == pytest.approx(0.1) and not infos2[0]["is_action_valid"]
    assert infos2[1]["penalty"] == 0.0 and infos2[1]["step"] == 1


def test_garbage_gets_genuine_feedback_and_custom_penalty():
    env = make_env(invalid_penalty=0.5)
    env.reset(batch_size=1)
    obs, r, d, infos = env.step(["x" * 10_000])
    assert obs == ["Nothing happens."] and r == [0.0] and d == [False]
    assert infos[0]["penalty"] == 0.5


def test_done_envs_ignore_actions_and_max_steps_caps():
    env = make_env()
    env.reset(batch_size=1)
    dones = [False]
    for _ in range(CountGame.max_steps):
        assert not dones[0]
        obs, r, dones, infos = env.step(["junk"])
    assert dones == [True]
    again = env.step(["<think>a</think><action>stop</action>"])
    assert again[0] == obs and again[1] == [0.0] and again[2] == [True]
    assert again[3][0]["step"] == CountGame.max_steps and again[3][0]["penalty"] == 0.0


def test_same_seed_same_tasks_and_rewards():
    runs = []
    for _ in range(2):
        env = make_env(seed=7)
        obs, _ = env.reset(batch_size=5, group_size=2)
        rng = random.Random(0)
        trace = [tuple(obs)]
        while not all(env.dones):
            acts = [f"<think>t</think><action>{rng.choice(['inc', 'stop', 'jump'])}</action>"
                    for _ in range(env.num_envs)]
            o, r, _, _ = env.step(acts)
            trace.append((tuple(o), tuple(r)))
        runs.append(trace)
    assert runs[0] == runs[1]


def test_different_seeds_draw_different_tasks():
    ids = [[i["task_id"] for i in make_env(seed=s).reset(batch_size=6)[1]] for s in (1, 2)]
    assert ids[0] != ids[1]


def test_prompt_contents():
    env = make_env()
    env.reset(batch_size=1)
    p0 = env.prompt(0)
    assert "count to" in p0 and "'inc'" in p0 and "'help'" not in p0
    assert "<think>" in p0 and "<action>" in p0
    for a in ("inc", "inc", "inc"):
        env.step([f"<think>t</think><action>{a}</action>"])
    p = env.prompt(0)
    assert "[Observation 3: 'You are at 2.', Action 3: 'inc']" in p
    assert "Observation 1:" not in p  # only the last k=2 pairs
    assert "You are at 3." in p


def test_teacher_prompt_is_header_plus_student_prompt():
    env = make_env()
    env.reset(batch_size=2)
    for method in ("keyword", "full", "random", "ucb"):
        t = env.teacher_prompt(1, retrieval=method)
        assert t.startswith(TEACHER_HEADER) and t.endswith(env.prompt(1))
    kw = env.teacher_prompt(0, retrieval="keyword")
    assert "fridge" in kw.lower()  # task 0 is pick_cool_then_place


def test_report_outcomes_updates_ucb():
    env = make_env()
    env.reset(batch_size=2)
    env.teacher_prompt(0, "ucb")
    env.teacher_prompt(1, "ucb")
    env.report_outcomes([True, False])
    assert env.skills.stats.total == 2 and sum(env.skills.stats.pulls.values()) >= 2
    with pytest.raises(ValueError, match="successes has 1"):
        env.report_outcomes([True])


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "dev"}, "split='dev'"), ({"num_workers": -1}, "num_workers=-1"),
    ({"invalid_penalty": -0.1}, "invalid_penalty=-0.1"), ({"history_length": 1.5}, "history_length"),
])
def test_bad_options_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_env(**kwargs)


def test_bad_calls_are_clear_errors():
    env = make_env()
    with pytest.raises(RuntimeError, match="reset"):
        env.step(["x"])
    env.reset(batch_size=2)
    with pytest.raises(ValueError, match="expected a list of 2"):
        env.step(["x"])
    with pytest.raises(ValueError, match="retrieval='bm25'"):
        env.teacher_prompt(0, "bm25")
    with pytest.raises(ValueError, match="env index"):
        env.prompt(5)


def test_import_loads_no_torch():
    code = "import sdar_envs, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_suite_modules_load_no_torch():
    code = ("import sdar_envs, importlib, sys\n"
            "for name, status in sdar_envs.available().items():\n"
            "    if status == 'ok':\n"
            "        importlib.import_module(sdar_envs.SUITES[name].module)\n"
            "        assert 'torch' not in sys.modules, name\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_make_unknown_env():
    import sdar_envs
    with pytest.raises(ValueError, match="env name='minecraft'"):
        sdar_envs.make("minecraft")

_ACTIONS = st.sampled_from(["<think>t</think><action>inc</action>", "<think>t</think><action>stop</action>",
                            "inc", "", "<action>stop</action>", "🙂" * 50])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(_ACTIONS, min_size=4, max_size=4), min_size=1, max_size=9))
def test_invariants_under_random_play(rounds):
    env = make_env(seed=3)
    env.reset(batch_size=2, group_size=2)
    was_done = [False] * 4
    for acts in rounds:
        _, rewards, dones, infos = env.step(acts)
        for i in range(4):
            assert dones[i] or not was_done[i]            # done is absorbing
            assert infos[i]["step"] <= CountGame.max_steps
            if was_done[i]:
                assert rewards[i] == 0.0 and infos[i]["penalty"] == 0.0
            assert infos[i]["penalty"] in (0.0, 0.1)
        was_done = dones
