"""ALFWorld on the real text engine (TextWorld PddlEnv + ALFWorld wrappers), offline.

    from sdar_envs.alfworld import build_suite
    suite = build_suite(seed=0, num_train=600, num_test=120, room_size="small")
    game = suite.make_game(suite.task_ids("test")[0])
    obs, info = game.reset()
    obs, reward, done, info = game.step(game.expert_action())

Games are generated ALFRED-domain PDDL problems assembled with the wheel's own domain and
grammar (see ``suite``), or the downloaded ALFWorld games when ``data_dir`` / ``$ALFWORLD_DATA``
is set.
"""
from __future__ import annotations

from .catalog import MAX_STEPS, SHORT_TYPES, TASK_TYPES
from .game import AlfworldGame
from .suite import AlfworldSuite, build_suite

__all__ = ["AlfworldGame", "AlfworldSuite", "build_suite", "MAX_STEPS", "SHORT_TYPES", "TASK_TYPES"]
