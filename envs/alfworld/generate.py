"""Pre-generate (and expert-check) the ALFWorld games of a suite into the cache.

    python -m sdar_envs.alfworld.generate --seed 0 --num-train 600 --num-test 120 [--room-size small]

Games are otherwise generated lazily on first use; pre-generating keeps the first training
resets fast. Prints the cache folder and the mean generation time per game.
"""
from __future__ import annotations

import argparse
import logging
import time

from sdar_engine.progress import progress as progress_bar

from .catalog import ROOM_SIZES
from .suite import build_suite


def pregenerate(seed: int = 0, num_train: int = 600, num_test: int = 120,
                room_size: str = "small", progress: bool = True) -> dict:
    """Generate every game of both splits; returns counts and timings (seconds)."""
    suite = build_suite(seed=seed, num_train=num_train, num_test=num_test, room_size=room_size)
    ids = suite.task_ids("train") + suite.task_ids("test")
    start = time.perf_counter()
    for task_id in progress_bar(ids, desc="alfworld games", disable=not progress):
        suite.game_file(task_id)
    total = time.perf_counter() - start
    return {"root": str(suite.root), "games": len(ids), "seconds": total,
            "seconds_per_game": total / max(1, len(ids))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-test", type=int, default=120)
    parser.add_argument("--room-size", choices=sorted(ROOM_SIZES), default="small")
    args = parser.parse_args(argv)  # parsed before any engine call rewrites sys.argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    out = pregenerate(args.seed, args.num_train, args.num_test, args.room_size)
    print(f"alfworld: {out['games']} games in {out['root']} "
          f"({out['seconds']:.1f}s, {1e3 * out['seconds_per_game']:.0f} ms/game incl. cached)")


if __name__ == "__main__":
    main()
