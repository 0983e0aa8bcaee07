"""Reference policies (expert, random) and WebShop's metrics: Score and Succ.

Score = mean raw reward x 100; Succ = % of episodes whose raw reward is 1.0. An episode that
never buys scores 0.
"""
from __future__ import annotations

import random
from typing import Callable

from .game import WebShopGame

Policy = Callable[[WebShopGame], str]


def score_and_succ(raw_rewards: list[float]) -> tuple[float, float]:
    """(Score, Succ) in percent from per-episode raw rewards in [0, 1]."""
    if not raw_rewards:
        raise ValueError("raw_rewards is empty; pass one raw reward per episode")
    n = len(raw_rewards)
    return 100.0 * sum(raw_rewards) / n, 100.0 * sum(r == 1.0 for r in raw_rewards) / n


def expert_policy(game: WebShopGame) -> str:
    return game.expert_action()


def make_random_policy(seed: int) -> Policy:
    """Uniform over the admissible actions; a search uses 3 random words of the instruction."""
    rng = random.Random(f"webshop-random/{seed}")

    def policy(game: WebShopGame) -> str:
        actions = game.admissible_actions()
        if not actions:
            return "click[buy now]"
        action = rng.choice(actions)
        if action.startswith("search["):
            words = game.task_text.split()
            action = f"search[{' '.join(rng.sample(words, k=min(3, len(words))))}]"
        return action

    return policy


def run_episode(game: WebShopGame, policy: Policy) -> float:
    """Play one episode from reset; returns the raw reward (0 when nothing was bought)."""
    game.reset()
    info: dict = {"score": 0.0}
    while not game.done:
        _, _, _, info = game.step(policy(game))
    return float(info["score"])
