"""Evaluate reference policies on the offline WebShop and print WebShop's metrics.

    python -m sdar_envs.webshop                          # expert + random, 50 test goals
    python -m sdar_envs.webshop --n 500 --policies random --seeds 0 1 2
    python -m sdar_envs.webshop --transcript 1           # print one expert episode
    python -m sdar_envs.webshop --data-dir ~/webshop/data  # the original items_*.json

Each result line reads ``webshop-eval split=… policy=… seed=… n=… score=… succ=…``
(Score = mean raw reward x 100, Succ = % of episodes with raw reward 1.0).
"""
from __future__ import annotations

import argparse
import time

from sdar_engine.progress import progress

from . import build_suite, expert_policy, make_random_policy, run_episode, score_and_succ


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sdar_envs.webshop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--n", type=int, default=50, help="number of goals (first n of split)")
    parser.add_argument("--policies", nargs="+", default=["expert", "random"],
                        choices=("expert", "random"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="random-policy seeds")
    parser.add_argument("--num-products", type=int, default=1000)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--transcript", type=int, default=0,
                        help="print this many expert episodes step by step")
    return parser.parse_args()


def _transcript(suite, task_id: str) -> None:
    game = suite.make_game(task_id)
    obs, info = game.reset()
    print(f"== {task_id} ({game.task_type})\n{obs}\n   admissible: {info['admissible_actions']}")
    while not game.done:
        action = game.expert_action()
        obs, reward, done, info = game.step(action)
        print(f"-> {action}\n{obs}\n   reward={reward} done={done} score={info['score']}")


def main() -> None:
    args = _args()
    options = {"data_dir": args.data_dir} if args.data_dir else {}
    options["num_products"] = None if args.data_dir else args.num_products
    start = time.perf_counter()
    suite = build_suite(**options)
    ids = suite.task_ids(args.split)[:args.n]
    print(f"webshop-suite products={len(suite.world.products)} goals={len(suite.world.goals)} "
          f"build_s={time.perf_counter() - start:.2f}")
    for task_id in ids[:args.transcript]:
        _transcript(suite, task_id)
    for name in args.policies:
        for seed in (args.seeds if name == "random" else [0]):
            policy = expert_policy if name == "expert" else make_random_policy(seed)
            rewards = [run_episode(suite.make_game(t), policy)
                       for t in progress(ids, desc=f"{name}/{seed}", nested=True)]
            score, succ = score_and_succ(rewards)
            print(f"webshop-eval split={args.split} policy={name} seed={seed} n={len(ids)} "
                  f"score={score:.1f} succ={succ:.1f}")


if __name__ == "__main__":
    main()
