"""WebShop's purchase reward, case by case (hand-built products and goals)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdar_envs.webshop.goals import Goal, product_goals
from sdar_envs.webshop.loader import Product
from sdar_envs.webshop.reward import (normalize_color, option_matches, purchase_reward,
                                      type_reward)
from sdar_envs.webshop.search import lexicon_nouns


def _product(**kw) -> Product:
    base = dict(asin="B0TEST0001", title="Lumora Premium Sulfate Free Shampoo for men and women",
                category="beauty", query="shampoo",
                product_category="Beauty & Personal Care › Hair Care › Shampoos",
                description="The Lumora premium shampoo is paraben free.",
                bullets=("LUMORA SHAMPOO: premium quality.",), price_tag="$12.5",
                pricing=(12.5,), options={"scent": ["lavender", "coconut"],
                                          "size": ["8 fl oz", "16 fl oz"]},
                attributes=("sulfate free", "dry hair", "cruelty free"),
                instruction_text="i need a sulfate free shampoo for dry hair",
                instruction_attributes=("sulfate free", "dry hair"))
    base.update(kw)
    return Product(**base)


def _goal(product: Product, **kw) -> Goal:
    base = dict(asin=product.asin, category=product.category, query=product.query,
                name=product.title, product_category=product.product_category,
                instruction_text="...", base_instruction="...",
                attributes=("sulfate free", "dry hair"),
                goal_options=(("scent", "coconut"), ("size", "16 fl oz")), price_upper=20.0)
    base.update(kw)
    return Goal(**base)


RIGHT = {"scent": "coconut", "size": "16 fl oz"}


def _reward(product, goal, selected=RIGHT, price=12.5):
    return purchase_reward(product, price, selected, goal, lexicon_nouns)


def test_everything_right_is_one():
    p = _product()
    info = _reward(p, _goal(p))
    assert info.total == 1.0 and (info.n_attr, info.n_option, info.r_price) == (2, 2, True)


def test_price_over_the_bound_loses_one_of_five():
    p = _product()
    assert _reward(p, _goal(p), price=20.01).total == pytest.approx(4 / 5)
    assert _reward(p, _goal(p), price=20.0).total == 1.0   # "lower than" is inclusive


def test_partial_attributes_and_options():
    p = _product()
    goal = _goal(p, attributes=("sulfate free", "hair growth", "vegan formula"))
    info = _reward(p, goal, selected={"scent": "lavender", "size": "16 fl oz"})
    assert (info.n_attr, info.n_option) == (1, 1)
    assert info.total == pytest.approx((1 + 1 + 1) / (3 + 2 + 1))


def test_no_options_selected_counts_zero_options():
    p = _product()
    assert _reward(p, _goal(p), selected={}).total == pytest.approx(3 / 5)


def test_attribute_found_in_description_or_by_fuzzy_match():
    p = _product()
    goal = _goal(p, attributes=("paraben free", "Sulfate-Free"), goal_options=())
    assert _reward(p, goal, selected={}).total == 1.0   # description substring + fuzzy match


def test_option_colors_are_normalized():
    assert normalize_color("light navy blue") == "blue"   # first color of the sorted set
    assert option_matches(["jet black"], [("color", "black")]) == 1
    assert option_matches(["ruby red"], [("color", "jet black")]) == 0


def test_wrong_type_scores_zero():
    p = _product()
    lamp = _product(asin="B0TEST0002", title="Oakhaven Modern Floor Lamp with shelves",
                    query="floor lamp", category="furniture",
                    product_category="Home & Kitchen › Lighting & Ceiling Fans › Floor Lamps",
                    attributes=("dimmable",))
    info = _reward(lamp, _goal(p))
    assert info.r_type == 0.0 and info.total == 0.0


@pytest.mark.parametrize("goal_title, bought_title, query, expected", [
    # 1 of 6 goal nouns shared (0.167), other query, 1 shared category level -> 0.5
    ("Lumora shampoo salon formula keratin men", "Lumora lamp", "lamp", 0.5),
    # 1 of 11 goal nouns shared (< 0.1) -> 0.1 even though the query matches
    ("Lumora shampoo salon formula keratin men women hair face neck set", "Lumora lamp",
     "shampoo", 0.1),
    # same query, > 0.2 noun overlap -> 1
    ("Lumora Shampoo", "Halvia Shampoo", "shampoo", 1.0),
])
def test_type_score_rules(goal_title, bought_title, query, expected):
    goal_product = _product(title=goal_title)
    bought = _product(title=bought_title, query=query,
                      product_category="Beauty & Personal Care › Lamps")
    r_type, *_ = type_reward(bought, _goal(goal_product), lexicon_nouns)
    assert r_type == expected


def test_category_overlap_of_two_levels_is_a_type_match():
    p = _product()
    other = _product(title="Lumora conditioner bottle bar oil leaf pack tea", query="conditioner")
    goal = _goal(p, name="Lumora Shampoo keratin salon formula")   # 1 of 5 nouns = 0.2
    r_type, title_score, q_match, c_match = type_reward(other, goal, lexicon_nouns)
    assert (title_score, q_match, c_match, r_type) == (0.2, False, True, 1.0)


def test_goal_text_has_options_and_price_clause():
    import random
    p = _product()
    goals = product_goals(p, 12.5, random.Random(0))
    assert len(goals) == 4   # 2 scents x 2 sizes
    text = goals[0].instruction_text
    assert text.startswith("i need a sulfate free shampoo for dry hair with scent: lavender, "
                           "and size: 8 fl oz, and price lower than ")
    assert goals[0].price_upper in (30.0, 40.0, 50.0) and text.endswith(" dollars")


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    import json
    from sdar_envs.webshop.catalogue import generate_raw
    from sdar_envs.webshop.goals import build_goals
    from sdar_envs.webshop.loader import load_products, sample_prices
    folder = tmp_path_factory.mktemp("catalogue")
    items, ins = generate_raw(seed=3, num_products=120)
    (folder / "items.json").write_text(json.dumps(items))
    (folder / "ins.json").write_text(json.dumps(ins))
    products = load_products(folder / "items.json", folder / "ins.json")
    prices = sample_prices(products, seed=3)
    return products, prices, build_goals(products, prices, seed=3)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_reward_is_bounded_and_full_only_for_a_fitting_purchase(catalogue, data):
    products, prices, goals = catalogue
    goal = data.draw(st.sampled_from(goals))
    product = data.draw(st.sampled_from(products))
    selected = {name: data.draw(st.sampled_from(values))
                for name, values in product.options.items() if data.draw(st.booleans())}
    info = purchase_reward(product, prices[product.asin], selected, goal, lexicon_nouns)
    assert 0.0 <= info.total <= 1.0
    if info.total == 1.0:
        assert info.r_type == 1.0 and info.r_price
        assert info.n_attr == len(goal.attributes) and info.n_option == len(goal.goal_options)
    target = next(p for p in products if p.asin == goal.asin)
    full = purchase_reward(target, prices[target.asin], dict(goal.goal_options), goal,
                           lexicon_nouns)
    assert full.total == 1.0
