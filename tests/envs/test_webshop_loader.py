"""Loading WebShop's original files (items_shuffle*.json / items_ins_v2*.json) from data_dir."""
from __future__ import annotations

import json

import pytest

from sdar_envs.webshop import build_suite, expert_policy, run_episode
from sdar_envs.webshop.loader import find_data_files, load_products, parse_pricing

COLORS = ["Black/White", "Navy", "Red"]


def _raw(i: int, **kw) -> dict:
    item = {"asin": f"B0FIX{i:05d}", "name": f"Fixture Brand Trail Runner Shoe model {i}",
            "full_description": f"A light running shoe number {i} with a rubber sole.",
            "small_description": [f"Breathable mesh upper {i}", "Lace-up closure"],
            "pricing": f"${20 + i}.99", "category": "fashion", "query": "Running Shoes ",
            "product_category": "Clothing, Shoes & Jewelry › Men › Shoes › Running",
            "customization_options": {"Color": [{"value": c, "image": None} for c in COLORS],
                                      "Size": [{"value": "9"}, {"value": "10"}]},
            "images": ["https://example.invalid/x.jpg"]}
    item.update(kw)
    return item


@pytest.fixture()
def data_dir(tmp_path):
    items = [_raw(i) for i in range(12)]
    items[1]["pricing"] = "$10.00 - $20.00"
    items[2]["pricing"] = ""
    items[3]["small_description"] = "Single bullet string"
    items[4]["customization_options"] = None
    items.append(_raw(0, name="duplicate asin, skipped"))
    items.append(_raw(99, asin="nan"))
    ins = {it["asin"]: {"attributes": ["rubber sole", "lace up"],
                        "instruction": f"i want trail runner shoe model {i} with a rubber sole.",
                        "instruction_attributes": ["rubber sole"]}
           for i, it in enumerate(items[:10])}
    (tmp_path / "items_shuffle_1000.json").write_text(json.dumps(items))
    (tmp_path / "items_ins_v2_1000.json").write_text(json.dumps(ins))
    (tmp_path / "items_human_ins.json").write_text("{}")
    return tmp_path


def test_loader_follows_webshop_schema_rules(data_dir):
    items, ins = find_data_files(data_dir)
    assert items.name == "items_shuffle_1000.json" and ins.name == "items_ins_v2_1000.json"
    products = {p.asin: p for p in load_products(items, ins)}
    assert len(products) == 12                                   # duplicate + nan skipped
    p0, p1, p2 = (products[f"B0FIX{i:05d}"] for i in range(3))
    assert p0.title.startswith("Fixture Brand") and p0.query == "running shoes"
    assert p0.options == {"color": ["black | white", "navy", "red"], "size": ["9", "10"]}
    assert (p1.pricing, p1.price_tag) == ((10.0, 20.0), "$10.0 to $20.0")
    assert (p2.pricing, p2.price_tag) == ((100.0,), "$100.0")
    assert products["B0FIX00003"].bullets == ("Single bullet string",)
    assert products["B0FIX00004"].options == {}
    assert products["B0FIX00011"].attributes == ("DUMMY_ATTR",)  # no items_ins_v2 entry
    assert parse_pricing("$5") == ((5.0,), "$5.0")


def test_suite_on_loaded_data_plays_to_reward_one(data_dir):
    suite = build_suite(data_dir=str(data_dir), num_test_goals=6)
    n_goals = 9 * 6 + 1                                          # 9 products x 6 combos + 1
    assert len(suite.task_ids("test")) == 6 and len(suite.task_ids("train")) == n_goals - 6
    for task_id in suite.task_ids("test"):
        game = suite.make_game(task_id)
        assert game.task_type == "fashion" and "price lower than" in game.task_text
        assert run_episode(game, expert_policy) == 1.0, task_id


def test_bad_data_dir_is_a_clear_value_error(tmp_path):
    with pytest.raises(ValueError, match="data_dir="):
        build_suite(data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="data_dir="):
        build_suite(data_dir=str(tmp_path / "missing"))
    (tmp_path / "items_shuffle.json").write_text("[]")
    (tmp_path / "items_ins_v2.json").write_text("{}")
    with pytest.raises(ValueError, match="no goals"):
        build_suite(data_dir=str(tmp_path))
