"""The WebShop oracle: search with the goal's words, open the goal's item, set its options, buy.

It reads the game's page state (never the text), so it is a pure function of the state:
* search page: the goal's instruction (before options and price); after a failed search, the
  target product's title;
* results: click the target if it is on this page, else page towards it; if the search did
  not return it at all, go back to search;
* item: back if it is the wrong product, else click each goal option not yet chosen, then buy;
* description / features / reviews: back to the item.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .pages import PER_PAGE, SUB_PAGES, option_owner

if TYPE_CHECKING:
    from .game import WebShopGame


def _query(text: str) -> str:
    # "[" / "]" would break WebShop's action regex; collapse whitespace as a user would.
    return " ".join(text.replace("[", " ").replace("]", " ").lower().split())


def expert_action(game: "WebShopGame") -> str:
    """The oracle's next action for ``game``, e.g. "click[buy now]"; "" once the game is over."""
    if game.done:
        return ""
    state, goal = game.state, game.goal
    target = game.world.products[goal.asin]
    if state.page == "search":
        text = goal.base_instruction if game.num_searches == 0 else target.title
        return f"search[{_query(text)}]"
    if state.page == "results":
        if goal.asin not in state.results:
            return "click[back to search]"
        want = state.results.index(goal.asin) // PER_PAGE + 1
        if want == state.page_num:
            return f"click[{goal.asin.lower()}]"
        return "click[next >]" if want > state.page_num else "click[< prev]"
    if state.page in SUB_PAGES or state.asin != goal.asin:
        return "click[< prev]"
    for name, value in goal.goal_options:
        if state.options.get(name) != value and option_owner(target, value) == name:
            return f"click[{value}]"
    return "click[buy now]"
