"""Packaged configs pick the ALFWorld room size: paper (*_qwen*) configs ALFWorld-sized, tiny ones small."""
from pathlib import Path

import pytest
import yaml

from sdar_envs.alfworld import build_suite
from sdar_envs.alfworld.catalog import ROOM_SIZES

CONFIG_DIR = Path(__file__).resolve().parents[2] / "sdar_engine" / "configs"


def alfworld_configs() -> list[Path]:
    paths = sorted(CONFIG_DIR.glob("*.yaml"))
    return [p for p in paths if (yaml.safe_load(p.read_text()) or {}).get("env", {}).get("name") == "alfworld"]


def test_paper_configs_play_alfworld_sized_rooms_and_tiny_ones_small_rooms():
    paths = alfworld_configs()
    paper = [p for p in paths if "_qwen" in p.name]
    tiny = [p for p in paths if p.name.startswith("tiny_")]
    assert len(paper) == 3 and len(tiny) == 3 and len(paper) + len(tiny) == len(paths)
    for p, want in [(p, "alfworld") for p in paper] + [(p, "small") for p in tiny]:
        options = yaml.safe_load(p.read_text())["env"]["options"]
        assert options["room_size"] == want, p.name
        suite_options = {k: v for k, v in options.items() if k != "skill_bank"}  # skill_bank is the env's
        suite = build_suite(seed=0, **suite_options)  # the options reach the suite as they are (no games built)
        assert suite.room_size == want
    assert ROOM_SIZES["alfworld"].min_receptacles > ROOM_SIZES["small"].max_receptacles


def test_unknown_room_size_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match=r"room_size='paper' is not valid; use one of \['alfworld', 'small'\]"):
        build_suite(room_size="paper")
