"""WebShop's purchase reward (``web_agent_site/engine/goal.py::get_reward``), re-implemented.

    reward = (n_attr + n_opt + [price <= U]) / (|goal attrs| + |goal options| + 1) * r_type

* attribute match: rapidfuzz ``token_set_ratio`` > 85 against any product attribute, else the
  attribute is a substring of the lowercased title, bullets or description;
* option match: ``token_set_ratio`` > 85 between a selected value and the goal option, both
  passed through ``normalize_color``. Faithful quirk: WebShop passes the goal's
  ``dict.items()`` tuples, so each goal option is compared as the text "name value";
* ``r_type``: 1 if the query matches, or >= 2 category levels overlap, or the noun overlap of
  the titles (share of the goal title's nouns) is > 0.2; else 0.5; then 0.1 if that overlap is
  < 0.1 and 0 if it is 0. Nouns come from a word lexicon instead of spaCy.
thefuzz (which WebShop uses) lowercases and strips punctuation first, hence ``default_process``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from rapidfuzz import fuzz, utils

from .goals import Goal
from .loader import Product

MATCH_THRESHOLD = 85
# Written for this project; alphabetical, so "dark red" normalizes to "dark" as in WebShop's
# first-match rule.
COLOR_SET: tuple[str, ...] = (
    "apricot", "aqua", "auburn", "beige", "berry", "black", "blonde", "blue", "blush", "bronze",
    "brown", "burgundy", "camel", "caramel", "charcoal", "cherry", "chocolate", "coral",
    "cream", "dark", "espresso", "gold", "gray", "green", "grey", "ivory", "khaki", "lavender",
    "light", "mauve", "mint", "mustard", "natural", "navy", "nude", "olive", "orange", "pink",
    "platinum", "plum", "purple", "red", "rose", "ruby", "sage", "silver", "tan", "teal",
    "walnut", "white", "wine", "yellow",
)

NounFn = Callable[[str], set[str]]


@dataclass(frozen=True)
class RewardInfo:
    """The reward and its parts (counts are matches; ``total`` is the raw reward in [0, 1])."""

    total: float
    r_type: float
    title_score: float
    query_match: bool
    category_match: bool
    n_attr: int
    n_option: int
    r_price: bool


def normalize_color(text: str) -> str:
    """The first COLOR_SET entry contained in ``text``, else ``text`` unchanged."""
    for color in COLOR_SET:
        if color in text:
            return color
    return text


def _goal_option_text(pair: tuple[str, str]) -> str:
    # normalize_color on a tuple tests tuple membership (equality with name or value);
    # thefuzz then stringifies the tuple, which its processor turns into "name value".
    for color in COLOR_SET:
        if color in pair:
            return color
    return " ".join(pair)


def similar(a: str, b: str) -> bool:
    """WebShop's fuzzy match: token_set_ratio > 85 after lowercasing and punctuation removal."""
    return fuzz.token_set_ratio(a, b, processor=utils.default_process) > MATCH_THRESHOLD


def type_reward(product: Product, goal: Goal, nouns: NounFn) -> tuple[float, float, bool, bool]:
    """(r_type, title_score, query_match, category_match) of buying ``product`` for ``goal``."""
    query_match = product.query == goal.query
    bought_levels = {x.strip() for x in product.product_category.split("›")}
    goal_levels = {x.strip() for x in goal.product_category.split("›")}
    category_match = len(bought_levels & goal_levels) >= 2
    goal_nouns = nouns(goal.name)
    if not goal_nouns:
        title_score = 0.2
    else:
        title_score = len(nouns(product.title) & goal_nouns) / len(goal_nouns)
    r_type = 1.0
    if not (query_match or category_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return r_type, title_score, query_match, category_match


def attribute_matches(product: Product, goal_attrs: Iterable[str]) -> int:
    """How many goal attributes the product has (fuzzy attribute match or text substring)."""
    title, desc = product.title.lower(), product.description.lower()
    bullets = " ".join(product.bullets).lower()
    count = 0
    for g_attr in goal_attrs:
        if any(similar(p_attr, g_attr) for p_attr in product.attributes):
            count += 1
        elif g_attr in title or g_attr in bullets or g_attr in desc:
            count += 1
    return count


def option_matches(selected: Iterable[str], goal_options: Iterable[tuple[str, str]]) -> int:
    """How many goal options are met by the selected option values."""
    chosen = [normalize_color(v) for v in selected]
    count = 0
    for pair in goal_options:
        target = _goal_option_text(pair)
        if any(similar(v, target) for v in chosen):
            count += 1
    return count


def purchase_reward(product: Product, price: float, selected: dict[str, str], goal: Goal,
                    nouns: NounFn) -> RewardInfo:
    """Raw reward of buying ``product`` at ``price`` (dollars) with ``selected`` options."""
    r_type, title_score, q_match, c_match = type_reward(product, goal, nouns)
    r_price = price <= goal.price_upper
    n_attr = attribute_matches(product, goal.attributes)
    n_opt = option_matches(selected.values(), goal.goal_options)
    total = (n_attr + n_opt + int(r_price)) / (len(goal.attributes) + len(goal.goal_options) + 1)
    return RewardInfo(total=total * r_type, r_type=r_type, title_score=title_score,
                      query_match=q_match, category_match=c_match, n_attr=n_attr,
                      n_option=n_opt, r_price=r_price)
