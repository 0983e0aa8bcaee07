"""One WebShop episode: ``reset`` / ``step(action)`` / ``expert_action`` (the Game protocol).

Actions follow WebShop's text env: ``parse_action`` = regex ``(.+)\\[(.+)\\]``; the argument is
lowercased; ``search[q]`` needs a non-empty q and a search bar; ``click[x]`` needs x among the
current clickables (``click[search]`` is rejected); anything else is a no-op that returns the
unchanged page with reward 0. ``click[buy now]`` ends the episode with WebShop's reward.
The game reward is 10 when that raw reward is 1.0, else 0; ``info["score"]`` is the raw reward.
"""
from __future__ import annotations

import re
from dataclasses import replace

from .expert import expert_action
from .goals import Goal
from .pages import (SEP, PageState, admissible_actions as _admissible, clickables, do_click,
                    do_search, render)
from .reward import RewardInfo, purchase_reward
from .world import World

_ACTION = re.compile(r"(.+)\[(.+)\]")
MAX_ACTION_CHARS = 1000   # longer inputs are no-ops (the regex would backtrack quadratically)
WIN_REWARD = 10.0


def parse_action(action: str) -> tuple[str, str | None]:
    """WebShop's split of "name[arg]" into (name, arg); (action, None) when it does not match."""
    match = _ACTION.match(action)
    if match is None:
        return action, None
    return match.group(1), match.group(2)


def format_obs_va(obs: str, instruction: str) -> str:
    """verl-agent's observation: the parts after the instruction, each in single quotes."""
    parts = obs.split(" [SEP] ")
    if instruction not in parts:
        return obs
    return " [SEP] ".join(f"'{p}'" for p in parts[parts.index(instruction) + 1:])


class WebShopGame:
    """One episode of one goal. Not thread-safe; cheap to create (the world is shared)."""

    def __init__(self, world: World, goal: Goal, task_id: str) -> None:
        self.world, self.goal, self.task_id = world, goal, task_id
        self.task_type = goal.category
        self.task_text = goal.instruction_text
        self.max_steps = world.options.max_steps
        self._init_episode()

    def _init_episode(self) -> None:
        self.state = PageState()
        self.steps = 0
        self.num_searches = 0
        self.done = False
        self.purchase: RewardInfo | None = None

    # ------------------------------------------------------------------ protocol
    def reset(self) -> tuple[str, dict]:
        """Back to the search page; returns (observation, info)."""
        self._init_episode()
        return self.observation(), self._info(accepted=True)

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        """Apply one projected action; returns (observation, reward, done, info)."""
        if self.done:
            return self.observation(), 0.0, True, self._info(accepted=False)
        self.steps += 1
        accepted = self._apply(action if isinstance(action, str) else str(action))
        if self.steps >= self.max_steps:
            self.done = True
        reward = 0.0
        if self.purchase is not None and self.purchase.total == 1.0:
            reward = WIN_REWARD
        return self.observation(), reward, self.done, self._info(accepted=accepted)

    def expert_action(self) -> str:
        """The oracle's next action (projected form, e.g. "click[buy now]")."""
        return expert_action(self)

    # ------------------------------------------------------------------ mechanics
    def available_actions(self) -> dict:
        """WebShop's ``get_available_actions``: {"has_search_bar": bool, "clickables": [...]}."""
        bar = self.world.options.search_anywhere or self.state.page == "search"
        return {"has_search_bar": bar,
                "clickables": clickables(self.state, self.world.products)}

    def admissible_actions(self) -> list[str]:
        """verl-agent's admissible list for this page ([] once the episode is over)."""
        if self.done:
            return []
        return _admissible(self.state, self.world.products, self.world.options.search_anywhere)

    def _apply(self, action: str) -> bool:
        """Change the page if ``action`` is valid here; False (page unchanged) otherwise."""
        if len(action) > MAX_ACTION_CHARS:
            return False
        name, arg = parse_action(action)
        arg = arg.lower() if arg is not None else None
        avail = self.available_actions()
        if name == "search" and arg and arg.strip() and avail["has_search_bar"]:
            self.state = do_search(self.state, arg, self.world.engine)
            self.num_searches += 1
            return True
        if name == "click" and arg in avail["clickables"] and arg != "search":
            if arg == "buy now":
                self._buy()
            else:
                self.state = do_click(self.state, arg, self.world.products)
            return True
        return False

    def _buy(self) -> None:
        asin = self.state.asin
        self.purchase = purchase_reward(self.world.products[asin], self.world.prices[asin],
                                        self.state.options, self.goal, self.world.nouns)
        self.state = replace(self.state, page="done")
        self.done = True

    def observation(self) -> str:
        """The current page as text (WebShop text mode, or verl-agent's form)."""
        if self.purchase is not None:
            # WebShop's done page, less its MTurk code and hidden debug fields.
            return SEP.join(["Thank you for shopping with us!", "Your score (min 0.0, max 1.0)",
                             str(self.purchase.total)])
        obs = render(self.state, self.goal.instruction_text, self.world.products)
        if self.world.options.obs_mode == "va":
            return format_obs_va(obs, self.goal.instruction_text)
        return obs

    def _info(self, accepted: bool) -> dict:
        score = self.purchase.total if self.purchase is not None else 0.0
        info = {"won": score == 1.0, "score": score, "task_score": score,
                "admissible_actions": self.admissible_actions(),
                "page": self.state.page, "action_accepted": accepted, "step": self.steps}
        if self.purchase is not None:
            info["purchased_asin"] = self.state.asin
            info["r_type"] = self.purchase.r_type
        return info

    def __reduce__(self) -> tuple:
        # Pickles as (options, task id, episode state); the world is rebuilt (memoized) on load.
        episode = (self.state, self.steps, self.num_searches, self.done, self.purchase)
        return (_restore_game, (self.world.options, self.task_id, episode))

    def __repr__(self) -> str:
        return f"WebShopGame({self.task_id!r}, page={self.state.page!r}, step={self.steps})"


def _restore_game(options: object, task_id: str, episode: tuple) -> WebShopGame:
    from .world import get_world
    world = get_world(options)
    game = WebShopGame(world, world.goals[int(task_id.rsplit("/", 1)[1])], task_id)
    game.state, game.steps, game.num_searches, game.done, game.purchase = episode
    return game
