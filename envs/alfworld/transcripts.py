"""Print one expert transcript per ALFWorld task type, played on the real engine.

    python -m sdar_envs.alfworld.transcripts [--seed 0] [--split test] [--room-size small]

Each transcript shows the task id, the first observation, the admissible commands at the
start, every expert action with the engine's feedback, and whether the game was won.
"""
from __future__ import annotations

import argparse
import logging

from .catalog import ROOM_SIZES, SHORT_TYPES
from .suite import build_suite


def transcript(suite, task_id: str) -> list[str]:
    """Lines of one expert episode on ``task_id``."""
    game = suite.make_game(task_id)
    obs, info = game.reset()
    lines = [f"=== {task_id} ({game.task_type}) ===", obs,
             f"[admissible] {', '.join(info['admissible_actions'])}"]
    done = False
    while not done:
        action = game.expert_action()
        obs, reward, done, info = game.step(action)
        lines.append(f"> {action}")
        lines.append(obs)
    lines.append(f"[admissible at end] {', '.join(info['admissible_actions'])}")
    lines.append(f"[result] won={info['won']} steps={info['step']} reward={reward}")
    game.close()
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("train", "test"), default="test")
    parser.add_argument("--room-size", choices=sorted(ROOM_SIZES), default="small")
    args = parser.parse_args(argv)  # parsed before any engine call rewrites sys.argv
    logging.basicConfig(level=logging.WARNING)
    suite = build_suite(seed=args.seed, num_train=6, num_test=6, room_size=args.room_size)
    for task_type in SHORT_TYPES:
        print("\n".join(transcript(suite, f"alfworld/{args.split}/{task_type}/0")))
        print()


if __name__ == "__main__":
    main()
