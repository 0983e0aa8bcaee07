"""The per-suite protocols (Game, Suite) and the public batched environment (BatchEnv).

A suite (ALFWorld, WebShop, Search-QA) implements ``Game`` and ``Suite``; ``BatchEnv`` turns
a suite into a batch of ``B * G`` envs that take raw model outputs, project them to actions,
step the games (in process or in worker processes) and render student / teacher prompts.
"""
from __future__ import annotations

import random
from typing import Any, Protocol, runtime_checkable

from .memory import Memory
from .projection import project
from .prompts import (PROMPT_STYLES, THINK_STYLES, check_style, render_prompt, render_teacher_prompt,
                      to_raw_action)
from .skills import RETRIEVALS, SkillBank, load_skill_bank
from .workers import GameMeta, make_runner


@runtime_checkable
class Game(Protocol):
    """One episode of one task; see the module docstring of each suite for its details."""

    task_id: str      # stable, unique in the env: "<env>/<split>/<task_type>/<index>"
    task_type: str    # ALFWorld task type, WebShop product category, Search-QA question kind
    task_text: str    # the instruction as the agent sees it
    max_steps: int    # ALFWorld 50, WebShop 15, Search-QA 4

    def reset(self) -> tuple[str, dict]:
        """First observation; info has "admissible_actions"."""
        ...

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        """Apply a projected action; returns (observation, env-native reward, done, info).

        info has at least "won" (bool), "score" (float) and "admissible_actions" (list[str]).
        Inadmissible or garbage actions never raise: they get the env's genuine feedback.
        """
        ...

    def expert_action(self) -> str:
        """The oracle's next action in projected form (e.g. "go to cabinet 1")."""
        ...


@runtime_checkable
class Suite(Protocol):
    """One environment family with its task pool."""

    name: str  # "alfworld" | "webshop" | "searchqa"

    def task_ids(self, split: str) -> list[str]:
        """Task ids of a split ("train" | "test"); deterministic; train and test disjoint."""
        ...

    def make_game(self, task_id: str) -> Game:
        ...


SPLITS = ("train", "test")


class BatchEnv:
    """A batch of envs over one suite: ``reset(B, G)`` then ``step(raw_outputs)``.

    Env ``i`` of a reset plays task ``i // G``. Rewards are env-native; the invalid-action
    penalty is reported in ``infos[i]["penalty"]`` for the trainer to subtract.
    """

    def __init__(self, name: str, suite: Suite, split: str = "train", seed: int = 0,
                 suite_options: dict[str, Any] | None = None, *, style: str = "action",
                 history_length: int = 2, invalid_penalty: float = 0.1,
                 num_workers: int = 0, skill_top_k: int = 3, ucb_c: float = 1.0,
                 skill_bank: SkillBank | None = None, prompt_style: str = "verl-agent",
                 expert_think: str = "plan") -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not valid; use one of {SPLITS}")
        for field, value in (("history_length", history_length), ("num_workers", num_workers),
                             ("skill_top_k", skill_top_k)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{field}={value!r} is not valid; use an int >= 0")
        if not (isinstance(invalid_penalty, (int, float)) and invalid_penalty >= 0):
            raise ValueError(f"invalid_penalty={invalid_penalty!r} is not valid; use a float >= 0")
        self.name, self.split, self.seed, self.style = name, split, seed, style
        self.prompt_style = check_style("prompt_style", prompt_style, PROMPT_STYLES)
        self.expert_think = check_style("expert_think", expert_think, THINK_STYLES)
        self.history_length, self.invalid_penalty = history_length, float(invalid_penalty)
        self.skill_top_k = skill_top_k
        self._task_ids = list(suite.task_ids(split))
        self._task_set = frozenset(self._task_ids)
        if not self._task_ids:
            raise ValueError(f"suite {name!r} has no tasks in split {split!r}")
        self._rng = random.Random(f"{name}/{split}/{seed}")
        self._runner = make_runner(name, suite, seed, dict(suite_options or {}), num_workers)
        self.skills = skill_bank if skill_bank is not None else load_skill_bank(name, seed, ucb_c)
        self.group_size = 1
        self._metas: list[GameMeta] = []
        self._obs: list[str] = []
        self._infos: list[dict] = []
        self._dones: list[bool] = []
        self._steps: list[int] = []
        self._memories: list[Memory] = []
        self._shown_skills: list[list[str]] = []

    # ------------------------------------------------------------------ episode control
    @property
    def num_envs(self) -> int:
        return len(self._metas)

    @property
    def task_ids(self) -> list[str]:
        """All task ids of this env's split (the pool resets draw from)."""
        return list(self._task_ids)

    def reset(self, batch_size: int = 1, group_size: int = 1,
              task_ids: list[str] | None = None) -> tuple[list[str], list[dict]]:
        """Start ``batch_size * group_size`` episodes; returns (observations, infos).

        Tasks come from a seeded stream (or ``task_ids`` if given, one per group).
        """
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size={group_size!r} is not valid; use an int >= 1")
        if task_ids is None:
            if not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"batch_size={batch_size!r} is not valid; use an int >= 1")
            task_ids = self._draw_tasks(batch_size)
        else:
            unknown = [t for t in task_ids if t not in self._task_set]
            if unknown:
                raise ValueError(f"task_ids={unknown[:3]!r} are not in split {self.split!r}")
        self.group_size = group_size
        expanded = [t for t in task_ids for _ in range(group_size)]
        self._metas = self._runner.load(expanded)
        results = self._runner.reset_all()
        n = len(expanded)
        self._obs = [obs for obs, _ in results]
        self._dones, self._steps = [False] * n, [0] * n
        self._memories = [Memory() for _ in range(n)]
        self._shown_skills = [[] for _ in range(n)]
        self._infos = [self._make_info(i, info, valid=True, penalty=0.0)
                       for i, (_, info) in enumerate(results)]
        return list(self._obs), [dict(x) for x in self._infos]

    def _draw_tasks(self, batch_size: int) -> list[str]:
        if batch_size <= len(self._task_ids):
            return self._rng.sample(self._task_ids, batch_size)
        return [self._rng.choice(self._task_ids) for _ in range(batch_size)]

    def step(self, actions: list[str]) -> tuple[list[str], list[float], list[bool], list[dict]]:
        """Step every env with its raw model output; returns (obs, rewards, dones, infos)."""
        self._require_reset()
        if not isinstance(actions, (list, tuple)) or len(actions) != self.num_envs:
            got = len(actions) if isinstance(actions, (list, tuple)) else type(actions).__name__
            raise ValueError(f"actions has {got} entries; expected a list of {self.num_envs}")
        rewards = [0.0] * self.num_envs
        todo: dict[int, str] = {}
        projected: dict[int, tuple[str, bool]] = {}
        for i, raw in enumerate(actions):
            if self._dones[i]:
                continue
            act, valid = project(raw if isinstance(raw, str) else str(raw), self.style)
            projected[i] = (act, valid)
            todo[i] = act
        results = self._runner.step(todo)
        for i, (obs, reward, done, info) in results.items():
            act, valid = projected[i]
            self._steps[i] += 1
            self._memories[i].add(self._obs[i], act, obs)
            done = bool(done) or self._steps[i] >= self._metas[i].max_steps
            penalty = 0.0 if valid else self.invalid_penalty
            self._obs[i], self._dones[i], rewards[i] = obs, done, float(reward)
            self._infos[i] = self._make_info(i, info, valid=valid, penalty=penalty)
        for i in range(self.num_envs):
            if i not in results:  # already done: ignored, no penalty, no reward
                self._infos[i] = dict(self._infos[i], penalty=0.0, is_action_valid=True)
        return list(self._obs), rewards, list(self._dones), [dict(x) for x in self._infos]

    def _make_info(self, i: int, info: dict, *, valid: bool, penalty: float) -> dict:
        meta = self._metas[i]
        out = dict(info)
        out.update(won=bool(info.get("won", False)), score=float(info.get("score", 0.0)),
                   task_type=meta.task_type, task_id=meta.task_id, is_action_valid=valid,
                   admissible_actions=list(info.get("admissible_actions", [])),
                   penalty=penalty, step=self._steps[i], group=i // self.group_size)
        return out

    def expert_actions(self) -> list[str]:
        """The oracle's next action per env, in raw model format (think + action tags);
        "" for envs that are already done."""
        self._require_reset()
        live = [i for i in range(self.num_envs) if not self._dones[i]]
        projected = dict(zip(live, self._runner.expert(live)))
        return [to_raw_action(projected.get(i, ""), self.style, self._metas[i].task_type, self.expert_think)
                for i in range(self.num_envs)]

    # ------------------------------------------------------------------ prompts
    def prompt(self, i: int) -> str:
        """The student prompt of env ``i``: task, recent history, observation, actions."""
        return self.prompt_candidates(i)[0]

    def prompt_candidates(self, i: int) -> list[str]:
        """Env ``i``'s student prompt with fewer and fewer history records, longest first.

        Candidate j shows the last ``k - j`` records (k = min(history_length, steps taken))
        down to none; Search-QA keeps at least the latest record, whose search result is its
        current observation. Task, current observation and admissible actions are in every
        candidate, so a token cap picks the first that fits: history goes, the head and the
        current step stay.
        """
        self._check_index(i)
        meta = self._metas[i]
        return [render_prompt(self.name, meta.task_text, self._memories[i], self._obs[i],
                              self._infos[i]["admissible_actions"], k, self.prompt_style)
                for k in self._history_lengths(i)]

    def teacher_prompt(self, i: int, retrieval: str = "keyword") -> str:
        """Privileged-skills header (skills retrieved for env ``i``'s task) + student prompt."""
        return self.teacher_prompt_candidates(i, retrieval)[0]

    def teacher_prompt_candidates(self, i: int, retrieval: str = "keyword") -> list[str]:
        """``prompt_candidates(i)``, each behind the same privileged-skills header.

        Skills are retrieved once per call (a "random" or "ucb" draw is not repeated per
        candidate), so every candidate keeps every skill line.
        """
        self._check_index(i)
        if retrieval not in RETRIEVALS:
            raise ValueError(f"retrieval={retrieval!r} is not valid; use one of {RETRIEVALS}")
        meta = self._metas[i]
        skills = self.skills.retrieve(meta.task_type, meta.task_text, retrieval, self.skill_top_k)
        shown = self._shown_skills[i]
        shown.extend(s.id for s in skills if s.id not in shown)
        return [render_teacher_prompt(skills, p) for p in self.prompt_candidates(i)]

    def _history_lengths(self, i: int) -> list[int]:
        """History records shown by each prompt candidate of env ``i``, most first."""
        most = min(self.history_length, len(self._memories[i]))
        least = min(most, 1) if self.style == "search" else 0
        return list(range(most, least - 1, -1))

    def report_outcomes(self, successes: list[bool]) -> None:
        """UCB update at episode end: each skill shown to env i is credited with successes[i]."""
        self._require_reset()
        if len(successes) != self.num_envs:
            raise ValueError(f"successes has {len(successes)} entries; expected {self.num_envs}")
        for shown, ok in zip(self._shown_skills, successes):
            self.skills.update(shown, bool(ok))
        self._shown_skills = [[] for _ in range(self.num_envs)]

    # ------------------------------------------------------------------ state / lifecycle
    @property
    def dones(self) -> list[bool]:
        return list(self._dones)

    def observation(self, i: int) -> str:
        self._check_index(i)
        return self._obs[i]

    def _require_reset(self) -> None:
        if not self._metas:
            raise RuntimeError(f"{self.name} env: call reset() before step/expert/report")

    def _check_index(self, i: int) -> None:
        self._require_reset()
        if not isinstance(i, int) or not 0 <= i < self.num_envs:
            raise ValueError(f"env index i={i!r} is not valid; use 0..{self.num_envs - 1}")

    def close(self) -> None:
        """Stop worker processes (if any). Safe to call twice."""
        self._runner.close()

    def __enter__(self) -> "BatchEnv":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"BatchEnv(name={self.name!r}, split={self.split!r}, seed={self.seed}, "
                f"tasks={len(self._task_ids)}, envs={self.num_envs})")
