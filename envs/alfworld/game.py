"""One ALFWorld episode on the real engine (the ``sdar_envs.base.Game`` protocol).

Observations, admissible commands, "Nothing happens." feedback and ``won`` come from the
engine unchanged. Reward is ALFWorld's ``10 * won``; the game ends on success or after
``max_steps`` (50) actions. Every reset replays the same randomness (the handcoded
expert's tie-breaking draws from a ``random.Random(seed)`` restarted at reset), so the same
seed gives identical observations. Games pickle without their engine (it is reloaded on
the next ``reset``), so they can be shipped to worker processes.
"""
from __future__ import annotations

import random
from typing import Any

from .catalog import MAX_STEPS
from .engine import engine_guard, open_engine, release_engine
from .gamefiles import load_game_data, task_text_of


class AlfworldGame:
    """An episode of the ALFWorld game stored in ``game_file`` (``game.tw-pddl``)."""

    def __init__(self, task_id: str, task_type: str, game_file: str, seed: int = 0,
                 max_steps: int = MAX_STEPS, search_prior: dict[str, list[str]] | None = None) -> None:
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps={max_steps!r} is not valid; use an int >= 1")
        self.task_id, self.task_type, self.game_file = task_id, task_type, str(game_file)
        self.seed, self.max_steps = seed, max_steps
        self.search_prior = search_prior  # the expert's search order (None: ALFWorld's room order)
        self.task_text = task_text_of(load_game_data(self.game_file))
        self._env: Any = None
        self._state: Any = None
        self._rng = random.Random(seed)
        self._steps = 0
        self._done = False
        self._obs = ""

    # ------------------------------------------------------------------ protocol
    def reset(self) -> tuple[str, dict]:
        """Start the episode; returns (intro observation, info)."""
        self._rng = random.Random(self.seed)
        with engine_guard(self._rng):
            if self._env is None:
                self._env = open_engine(self.game_file)
            self._env.search_prior = self.search_prior
            self._state = self._env.reset()
        self._steps, self._done = 0, False
        self._obs = str(self._state["feedback"])
        return self._obs, self._info()

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        """Apply one text command; garbage gets the engine's "Nothing happens."."""
        if self._state is None:
            raise RuntimeError(f"{self.task_id}: call reset() before step()")
        if self._done:
            return self._obs, 0.0, True, self._info()
        command = action if isinstance(action, str) else str(action)
        with engine_guard(self._rng):
            self._state, _, _ = self._env.step(command)
        self._steps += 1
        won = bool(self._state["won"])
        self._done = won or self._steps >= self.max_steps
        self._obs = str(self._state["feedback"])
        return self._obs, 10.0 if won else 0.0, self._done, self._info()

    def expert_action(self) -> str:
        """The fixed handcoded expert's next command ("look" when it has none); it searches
        by ``search_prior`` when one is set."""
        if self._state is None:
            raise RuntimeError(f"{self.task_id}: call reset() before expert_action()")
        plan = self._state.get("extra.expert_plan") or ["look"]
        return str(plan[0])

    # ------------------------------------------------------------------ helpers
    @property
    def admissible_actions(self) -> list[str]:
        return list(self._state["admissible_commands"]) if self._state is not None else []

    def _info(self) -> dict:
        won = bool(self._state["won"])
        return {"won": won, "score": 1.0 if won else 0.0,
                "admissible_actions": self.admissible_actions, "task_type": self.task_type,
                "task_id": self.task_id, "step": self._steps,
                "expert_error": getattr(self._env, "expert_error", "")}

    def close(self) -> None:
        """Return the engine to the process pool (the next game of this file reuses it)."""
        env, self._env, self._state = self._env, None, None
        if env is not None:
            release_engine(self.game_file, env)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: module globals may already be gone
            pass

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_env=None, _state=None, _done=False, _steps=0, _obs="")
        return state
