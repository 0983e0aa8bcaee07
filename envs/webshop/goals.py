"""Synthetic goals in WebShop's instruction form and the train/test split.

Follows ``web_agent_site/engine/goal.py::get_synthetic_goals``: one goal per product and per
combination of its option values (option names sorted); text = instruction (as stored) +
" with name: value, and name: value" + ", and price lower than U dollars", where
U is the larger of two draws from the first four multiples of 10 above the product's price
(no price clause, U = 1e6, when fewer than two exist). The goal list is shuffled with seed
233 and, as in verl-agent, the first ``num_test_goals`` goals are the test split.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from .loader import Product

PRICE_RANGE = [10.0 * i for i in range(1, 100)]
GOAL_SHUFFLE_SEED = 233
NO_PRICE_BOUND = 1_000_000.0


@dataclass(frozen=True)
class Goal:
    """One shopping goal; the fields the reward reads carry WebShop's names."""

    asin: str                        # the product the goal was written from
    category: str
    query: str
    name: str                        # that product's title (the type reward compares nouns)
    product_category: str
    instruction_text: str            # full text the agent sees
    base_instruction: str            # the text before the option and price clauses
    attributes: tuple[str, ...]      # goal attributes
    goal_options: tuple[tuple[str, str], ...]   # (option name, value), names sorted
    price_upper: float               # dollars


def _price_clause(rng: random.Random, price: float) -> tuple[float, str]:
    candidates = [p for p in PRICE_RANGE if p > price][:4]
    if len(candidates) < 2:
        return NO_PRICE_BOUND, ""
    upper = max(rng.sample(candidates, 2))
    return upper, f", and price lower than {upper:.2f} dollars"


def product_goals(product: Product, price: float, rng: random.Random) -> list[Goal]:
    """Every goal of one product (one per option combination); [] without an instruction."""
    if not product.instruction_text or not product.instruction_attributes:
        return []
    upper, price_text = _price_clause(rng, price)
    names = sorted(product.options)
    base = product.instruction_text
    goals = []
    for combo in itertools.product(*(product.options[n] for n in names)):
        pairs = tuple(zip(names, combo))
        option_text = ", and ".join(f"{k}: {v}" for k, v in pairs)
        option_text = f" with {option_text}" if option_text else ""
        goals.append(Goal(
            asin=product.asin, category=product.category, query=product.query,
            name=product.title, product_category=product.product_category,
            instruction_text=base + option_text + price_text, base_instruction=base,
            attributes=product.instruction_attributes, goal_options=pairs,
            price_upper=upper))
    return goals


def build_goals(products: list[Product], prices: dict[str, float], seed: int) -> list[Goal]:
    """All synthetic goals, shuffled with WebShop's seed 233 (price bounds drawn with ``seed``)."""
    rng = random.Random(f"webshop-goals/{seed}")
    goals = [g for p in products for g in product_goals(p, prices[p.asin], rng)]
    random.Random(GOAL_SHUFFLE_SEED).shuffle(goals)
    return goals


def split_indices(num_goals: int, split: str, num_test_goals: int) -> range:
    """Goal indices of a split: test = [0, num_test_goals), train = the rest (verl-agent)."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not valid; use 'train' or 'test'")
    cut = min(num_test_goals, num_goals)
    return range(0, cut) if split == "test" else range(cut, num_goals)
