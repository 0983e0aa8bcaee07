"""Measure ALFWorld generation, load, reset (cold/warm) and step times on this machine.

    python -m sdar_envs.alfworld.timing [--room-size small] [--games 12] [--no-memo]

Uses a fresh cache folder (so generation is really measured) unless --cache is given.
"First reset" = load + first reset of a game not seen by this process (PDDL translated from
scratch); "re-reset" = resetting the same game again (the translation is memoized). Step time is
the expert's steps, admissible commands and expert plan included.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from . import engine
from .catalog import ROOM_SIZES


def measure(room_size: str = "small", games: int = 12, seed: int = 0) -> dict[str, float]:
    """Milliseconds per generation / load+first reset / re-reset / step, averaged."""
    from .suite import build_suite
    suite = build_suite(seed=seed, num_test=games, room_size=room_size)
    gen, first, again, steps, wins = [], [], [], [], 0
    for task_id in suite.task_ids("test"):
        t0 = time.perf_counter()
        suite.game_file(task_id)
        t1 = time.perf_counter()
        engine._IDLE.clear()  # force a real load + translation for the "first reset" number
        engine._SAS_CACHE.clear()
        game = suite.make_game(task_id)
        game.reset()
        t3 = time.perf_counter()
        game.reset()
        t4 = time.perf_counter()
        done = False
        while not done:
            s0 = time.perf_counter()
            _, _, done, info = game.step(game.expert_action())
            steps.append(time.perf_counter() - s0)
        wins += int(info["won"])
        gen.append(t1 - t0)
        first.append(t3 - t1)
        again.append(t4 - t3)
    ms = lambda xs: 1e3 * statistics.mean(xs)
    return {"generate_ms": ms(gen), "load_and_first_reset_ms": ms(first),
            "re_reset_ms": ms(again), "step_ms": ms(steps), "steps": len(steps), "expert_wins": wins}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--room-size", choices=sorted(ROOM_SIZES), default="small")
    parser.add_argument("--games", type=int, default=12)
    parser.add_argument("--no-memo", action="store_true", help="upstream engine, no memoizing")
    parser.add_argument("--cache", default=None, help="cache folder (default: a fresh temp dir)")
    args = parser.parse_args(argv)
    os.environ["SDAR_CACHE"] = args.cache or tempfile.mkdtemp(prefix="sdar_alf_timing_")
    engine.MEMOIZE = not args.no_memo
    out = measure(args.room_size, args.games)
    print(f"alfworld timing room_size={args.room_size} memo={engine.MEMOIZE} games={args.games}: "
          + ", ".join(f"{k}={v:.1f}" for k, v in out.items()))


if __name__ == "__main__":
    main()
