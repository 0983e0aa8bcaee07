"""Env throughput: env steps per second at batch 16, expert and random policies, per suite.

    pytest benchmarks/bench_envs.py                       # timed (pytest-benchmark)
    pytest benchmarks/bench_envs.py --benchmark-disable   # smoke test: one pass each
    python benchmarks/bench_envs.py [--envs searchqa webshop] [--batch 16]   # printed table

A suite whose module cannot be imported yet is skipped with the reason. Steps/s counts one
step per live env per ``env.step`` call; reset time is reported separately.
"""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from typing import Callable

import pytest

import sdar_envs

BATCH = 16
ENVS = ("alfworld", "webshop", "searchqa")
POLICIES = ("expert", "random")
Policy = Callable[[sdar_envs.BatchEnv, list[dict]], list[str]]


def expert_policy(env: sdar_envs.BatchEnv, infos: list[dict]) -> list[str]:
    return env.expert_actions()


def random_policy(seed: int = 0) -> Policy:
    """Uniform over admissible actions (action style); random search/answer for Search-QA."""
    rng = random.Random(seed)

    def act(env: sdar_envs.BatchEnv, infos: list[dict]) -> list[str]:
        out = []
        for i, info in enumerate(infos):
            if env.style == "search":
                words = env.prompt(i).rsplit("Question: ", 1)[-1].split() or ["x"]
                tag = "search" if rng.random() < 0.5 else "answer"
                out.append(f"<think>random</think><{tag}>{' '.join(rng.sample(words, 1))}</{tag}>")
                continue
            acts = info.get("admissible_actions") or ["look"]
            out.append(f"<think>random</think><action>{rng.choice(acts)}</action>")
        return out
    return act


@dataclass
class PlayResult:
    env_steps: int
    reset_s: float
    step_s: float
    win_rate: float
    mean_score: float

    @property
    def steps_per_s(self) -> float:
        return self.env_steps / self.step_s if self.step_s > 0 else float("nan")


def play(env: sdar_envs.BatchEnv, policy: Policy, batch: int = BATCH) -> PlayResult:
    """Reset ``batch`` tasks and play every env to its end with ``policy``."""
    t0 = time.perf_counter()
    _, infos = env.reset(batch_size=batch, group_size=1)
    t1 = time.perf_counter()
    steps = 0
    while not all(env.dones):
        live = env.num_envs - sum(env.dones)
        _, _, _, infos = env.step(policy(env, infos))
        steps += live
    t2 = time.perf_counter()
    won = [bool(i["won"]) for i in infos]
    return PlayResult(steps, t1 - t0, t2 - t1, sum(won) / len(won),
                      sum(float(i["score"]) for i in infos) / len(infos))


def open_env(name: str, seed: int = 0) -> sdar_envs.BatchEnv:
    """Test-split env, or pytest.skip with the reason if the suite is not importable."""
    reason = sdar_envs.available()[name]
    if reason != "ok":
        pytest.skip(f"{name} not importable yet: {reason}")
    return sdar_envs.make(name, split="test", seed=seed)


@pytest.fixture(scope="module", params=ENVS)
def env(request):
    e = open_env(request.param)
    yield e
    e.close()


@pytest.mark.parametrize("policy_name", POLICIES)
def test_env_steps_per_second(benchmark, env, policy_name):
    policy = expert_policy if policy_name == "expert" else random_policy(0)
    result = benchmark.pedantic(play, args=(env, policy), rounds=1, iterations=1)
    benchmark.extra_info.update(env=env.name, policy=policy_name, batch=BATCH,
                                env_steps=result.env_steps, steps_per_s=result.steps_per_s,
                                reset_s=result.reset_s, win_rate=result.win_rate,
                                mean_score=result.mean_score)
    print(f"\n{env.name:9s} {policy_name:6s} steps/s={result.steps_per_s:9.1f} "
          f"reset={result.reset_s:6.2f}s win={result.win_rate:.2f} score={result.mean_score:.2f}")
    assert result.env_steps >= BATCH
    if policy_name == "expert":
        assert result.win_rate >= 0.8, f"{env.name} expert won only {result.win_rate:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--envs", nargs="+", default=list(ENVS), choices=ENVS)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"{'env':9s} {'policy':6s} {'steps/s':>9s} {'steps':>6s} {'reset_s':>8s} "
          f"{'win':>5s} {'score':>6s}")
    status = sdar_envs.available()
    for name in args.envs:
        if status[name] != "ok":
            print(f"{name:9s} skipped: {status[name]}")
            continue
        with sdar_envs.make(name, split="test", seed=args.seed) as env:
            for pname in POLICIES:
                pol = expert_policy if pname == "expert" else random_policy(args.seed)
                r = play(env, pol, args.batch)
                print(f"{name:9s} {pname:6s} {r.steps_per_s:9.1f} {r.env_steps:6d} "
                      f"{r.reset_s:8.2f} {r.win_rate:5.2f} {r.mean_score:6.2f}")


if __name__ == "__main__":
    main()
