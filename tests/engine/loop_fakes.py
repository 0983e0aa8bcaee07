"""Test helpers for the ENGINE-LOOP tests: a tiny fake BatchEnv and a cached tiny model.

FakeEnv follows the sdar_envs BatchEnv protocol. Each task is "fetch <obj>": the agent wins
(reward 10) by answering ``<action>go to <place></action>`` and then
``<action>take <obj></action>``; anything else keeps the episode going until ``max_steps``.
Missing action tags make the step invalid (penalty 0.1).
"""
from __future__ import annotations

import re
import tempfile
from functools import lru_cache
from pathlib import Path

OBJECTS = ["apple", "mug", "book", "key", "pen", "cup", "box", "lamp"]
PLACES = ["desk", "shelf", "table", "drawer"]
_ACTION = re.compile(r"<action>(.*?)</action>", re.S)


class FakeEnv:
    """Protocol twin of sdar_envs.BatchEnv on a two-step fetch game (deterministic)."""

    def __init__(self, split: str = "train", n_tasks: int = 8, max_steps: int = 3,
                 invalid_penalty: float = 0.1) -> None:
        offset = 0 if split == "train" else 100
        self.split, self.max_steps, self.invalid_penalty = split, max_steps, invalid_penalty
        self._tasks = [f"fake/{split}/{'even' if k % 2 == 0 else 'odd'}/{k + offset}" for k in range(n_tasks)]
        self.reported: list[list[bool]] = []

    @property
    def task_ids(self) -> list[str]:
        return list(self._tasks)

    def _goal(self, task_id: str) -> tuple[str, str]:
        k = int(task_id.rsplit("/", 1)[1])
        return OBJECTS[k % len(OBJECTS)], PLACES[k % len(PLACES)]

    def reset(self, batch_size: int = 1, group_size: int = 1, task_ids: list[str] | None = None):
        task_ids = list(task_ids or self._tasks[:batch_size])
        self.envs = [t for t in task_ids for _ in range(group_size)]
        self.group_size = group_size
        n = len(self.envs)
        self.stage, self.steps, self.done = [0] * n, [0] * n, [False] * n
        self.obs = [f"You are in a room. Find the {self._goal(t)[0]}." for t in self.envs]
        self.infos = [self._info(i, True, 0.0) for i in range(n)]
        return list(self.obs), [dict(x) for x in self.infos]

    def _info(self, i: int, valid: bool, penalty: float) -> dict:
        t = self.envs[i]
        return {"won": self.stage[i] >= 2, "score": float(self.stage[i] >= 2), "task_id": t,
                "task_type": t.split("/")[2], "is_action_valid": valid, "penalty": penalty,
                "admissible_actions": self._admissible(i), "step": self.steps[i]}

    def _admissible(self, i: int) -> list[str]:
        obj, place = self._goal(self.envs[i])
        return [f"go to {p}" for p in PLACES] if self.stage[i] == 0 else [f"take {obj}", "look"]

    def step(self, actions: list[str]):
        assert len(actions) == len(self.envs), "one action per env"
        rewards = [0.0] * len(self.envs)
        for i, raw in enumerate(actions):
            if self.done[i]:
                self.infos[i] = dict(self.infos[i], penalty=0.0, is_action_valid=True)
                continue
            m = _ACTION.search(raw)
            act = m.group(1).strip().lower() if m else raw[-20:]
            obj, place = self._goal(self.envs[i])
            want = f"go to {place}" if self.stage[i] == 0 else f"take {obj}"
            if act == want:
                self.stage[i] += 1
            self.steps[i] += 1
            won = self.stage[i] >= 2
            rewards[i] = 10.0 if won else 0.0
            self.done[i] = won or self.steps[i] >= self.max_steps
            self.obs[i] = f"You see the {obj} on the {place}." if self.stage[i] else "Nothing happens."
            self.infos[i] = self._info(i, m is not None, 0.0 if m else self.invalid_penalty)
        return list(self.obs), rewards, list(self.done), [dict(x) for x in self.infos]

    def expert_actions(self) -> list[str]:
        out = []
        for i, t in enumerate(self.envs):
            obj, place = self._goal(t)
            act = f"go to {place}" if self.stage[i] == 0 else f"take {obj}"
            out.append("" if self.done[i] else f"<think>find it</think><action>{act}</action>")
        return out

    def prompt(self, i: int) -> str:
        return (f"Task: fetch the {self._goal(self.envs[i])[0]}. Observation: {self.obs[i]} "
                f"Admissible actions: {', '.join(self._admissible(i))}. Answer with "
                "<think>...</think><action>...</action>.")

    def teacher_prompt(self, i: int, retrieval: str = "keyword") -> str:
        obj, place = self._goal(self.envs[i])
        return f"Skill: objects like the {obj} are usually on the {place}.\n" + self.prompt(i)

    def report_outcomes(self, successes: list[bool]) -> None:
        self.reported.append(list(successes))

    def observation(self, i: int) -> str:
        return self.obs[i]

    def close(self) -> None:
        pass


def corpus() -> list[str]:
    env = FakeEnv(n_tasks=8)
    env.reset(batch_size=8)
    texts = []
    for _ in range(2):
        texts += [env.prompt(i) for i in range(8)] + [env.teacher_prompt(i) for i in range(8)]
        acts = env.expert_actions()
        texts += acts
        env.step(acts)
    return texts


@lru_cache(maxsize=None)
def tiny_model_dir() -> str:
    """A tiny Qwen2 + tokenizer trained on the fake env's text, built once per test session."""
    from sdar_engine.model import ModelConfig, build_tiny

    out = Path(tempfile.mkdtemp(prefix="sdar-loop-tiny-")) / "model"
    cfg = ModelConfig(tiny_hidden=32, tiny_layers=1, tiny_heads=2, tiny_kv_heads=1, tiny_vocab=400)
    return build_tiny(str(out), corpus(), cfg, seed=0)


def tiny_config(tmp_path: Path, *overrides: str):
    """A validated TrainConfig for the fake env and the tiny model (CPU, seconds per step)."""
    from sdar_engine.config import from_dict

    base = [f"model.path={tiny_model_dir()}", "model.attn=sdpa", "env.tasks_per_step=2", "env.group_size=2",
            "rollout.max_new_tokens=8", "rollout.max_prompt_tokens=256", "rollout.eval_temperature=0",
            "algo.max_tokens=2048", "optim.lr=0.001", "train.steps=2", "train.save_every=2",
            "train.tensorboard=false", "train.plot=false", f"train.output_dir={tmp_path}",
            "train.device=cpu"]
    return from_dict({}, base + list(overrides))
