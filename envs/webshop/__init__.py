"""Offline WebShop (princeton-nlp/WebShop text mode) as an sdar_envs suite.

    from sdar_envs.webshop import build_suite
    suite = build_suite(seed=0)                       # generated catalogue, 1000 products
    game = suite.make_game(suite.task_ids("test")[0])
    obs, info = game.reset()
    obs, reward, done, info = game.step(game.expert_action())

Task ids are "webshop/<split>/<category>/<goal index>"; task types are product categories
(beauty, electronics, fashion, food, furniture for the generated catalogue). With
``data_dir=...`` the original ``items_shuffle*.json`` / ``items_ins_v2*.json`` are loaded instead.
See ``world.WebShopOptions`` for every option.
"""
from __future__ import annotations

from typing import Any

from .game import WebShopGame
from .goals import split_indices
from .policies import expert_policy, make_random_policy, run_episode, score_and_succ
from .world import WebShopOptions, World, get_world

__all__ = ["build_suite", "WebShopSuite", "WebShopGame", "WebShopOptions", "score_and_succ",
           "run_episode", "expert_policy", "make_random_policy"]


class WebShopSuite:
    """The WebShop task pool; picklable (it pickles as its options and rebuilds the world)."""

    name = "webshop"

    def __init__(self, seed: int = 0, options: WebShopOptions | None = None) -> None:
        if not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} is not valid; use an int")
        self.seed = seed
        self.options = options or WebShopOptions()
        self.world: World = get_world(self.options)

    def task_ids(self, split: str) -> list[str]:
        """Ids "webshop/<split>/<category>/<goal index>"; test = first goals after the shuffle."""
        goals = self.world.goals
        return [f"webshop/{split}/{goals[i].category}/{i}"
                for i in split_indices(len(goals), split, self.options.num_test_goals)]

    def make_game(self, task_id: str) -> WebShopGame:
        """A fresh game for ``task_id`` (call ``reset`` before stepping)."""
        parts = task_id.split("/") if isinstance(task_id, str) else []
        valid = (len(parts) == 4 and parts[0] == "webshop" and parts[3].isdigit()
                 and int(parts[3]) < len(self.world.goals))
        if valid:
            index = int(parts[3])
            goal = self.world.goals[index]
            valid = (goal.category == parts[2]
                     and index in split_indices(len(self.world.goals), parts[1],
                                                self.options.num_test_goals))
        if not valid:
            raise ValueError(f"task_id={task_id!r} is not valid; use one of task_ids('train') "
                             f"or task_ids('test'), e.g. 'webshop/test/beauty/3'")
        return WebShopGame(self.world, goal, task_id)

    def __reduce__(self) -> tuple:
        return (WebShopSuite, (self.seed, self.options))


def build_suite(seed: int = 0, **options: Any) -> WebShopSuite:
    """Build the WebShop suite. Options: see ``WebShopOptions`` (data_dir=None, num_products=1000,
    catalogue_seed=0, num_test_goals=500, max_steps=15, search_anywhere=False, obs_mode="text").

    ``seed`` does not change the shop: the catalogue and goals depend on ``catalogue_seed``
    only, so every seed sees the same tasks (BatchEnv's seed picks which ones are drawn).
    """
    known = set(WebShopOptions.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"webshop options {unknown} are not valid; use any of {sorted(known)}")
    return WebShopSuite(seed, WebShopOptions(**options))
