"""sdar_envs: ALFWorld, WebShop and Search-QA behind one text-env protocol (no torch here).

    import sdar_envs
    env = sdar_envs.make("searchqa", split="train", seed=0)
    obs, infos = env.reset(batch_size=4, group_size=2)
    obs, rewards, dones, infos = env.step(env.expert_actions())
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

from .base import BatchEnv, Game, Suite
from .projection import project

__all__ = ["make", "build_suite", "available", "SUITES", "BatchEnv", "Game", "Suite", "project"]


@dataclass(frozen=True)
class SuiteSpec:
    """Static facts about one suite: where it lives and how its actions look."""

    module: str            # import path exposing build_suite(seed=0, **options)
    pip: str               # the pip package(s) a missing import most likely needs
    style: str             # projection style: "action" (<action>) or "search" (<search>/<answer>)
    history_length: int    # k recent (observation, action) pairs in the student prompt
    invalid_penalty: float
    num_workers: int       # default worker processes (0 = in-process)


SUITES: dict[str, SuiteSpec] = {
    "alfworld": SuiteSpec("sdar_envs.alfworld", "alfworld", "action", 2, 0.1, 2),
    "webshop": SuiteSpec("sdar_envs.webshop", "bm25s rapidfuzz", "action", 2, 0.1, 0),
    "searchqa": SuiteSpec("sdar_envs.searchqa", "bm25s", "search", 4, 0.01, 0),
}

# Options consumed by BatchEnv; every other keyword goes to the suite's build_suite.
log = logging.getLogger("sdar_envs")
_ENV_OPTIONS = ("history_length", "invalid_penalty", "num_workers", "skill_top_k", "ucb_c",
                "prompt_style", "expert_think")


def _spec(name: str) -> SuiteSpec:
    if name not in SUITES:
        raise ValueError(f"env name={name!r} is not valid; use one of {sorted(SUITES)}")
    return SUITES[name]


def build_suite(name: str, seed: int = 0, **options: Any) -> Suite:
    """Import the suite module lazily and build its task pool (cached on disk by the suite)."""
    spec = _spec(name)
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith(spec.module):
            raise ImportError(f"suite {name!r} is not available: module {spec.module} "
                              f"is missing from this checkout") from err
        raise ImportError(f"suite {name!r} needs the optional dependency {err.name!r}; "
                          f"install it with `pip install {spec.pip}`") from err
    if not hasattr(module, "build_suite"):
        raise ImportError(f"suite module {spec.module} does not define build_suite(seed, **options)")
    return module.build_suite(seed=seed, **options)


def available() -> dict[str, str]:
    """Map each suite name to "ok" or the reason it cannot be built (import error text)."""
    status = {}
    for name, spec in SUITES.items():
        try:
            module = importlib.import_module(spec.module)
        except Exception as err:  # reported, not swallowed: the caller prints the reason
            status[name] = f"{type(err).__name__}: {err}"
            continue
        ok = callable(getattr(module, "build_suite", None))
        status[name] = "ok" if ok else f"{spec.module} does not define build_suite yet"
    return status


def make(name: str, split: str = "train", seed: int = 0, **options: Any) -> BatchEnv:
    """Build a BatchEnv for suite ``name`` ("alfworld" | "webshop" | "searchqa").

    Env options: history_length, invalid_penalty, num_workers, skill_top_k, ucb_c (defaults
    per suite), prompt_style ("verl-agent" | "compact"), expert_think ("plan" | "empty"),
    skill_bank (a bundled bank name, default the env's own). All other options are passed to
    the suite's ``build_suite``.
    """
    spec = _spec(name)
    if not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} is not valid; use an int")
    env_opts = {k: options.pop(k) for k in _ENV_OPTIONS if k in options}
    env_opts.setdefault("history_length", spec.history_length)
    env_opts.setdefault("invalid_penalty", spec.invalid_penalty)
    env_opts.setdefault("num_workers", spec.num_workers)
    if "skill_bank" in options:  # a bundled bank by name, e.g. "alfworld_placement"
        from .skills import load_skill_bank
        env_opts["skill_bank"] = load_skill_bank(name, seed, env_opts.get("ucb_c", 1.0),
                                                 bank=options.pop("skill_bank"))
    suite = build_suite(name, seed=seed, **options)
    env = BatchEnv(name, suite, split=split, seed=seed, suite_options=options,
                   style=spec.style, **env_opts)
    log.info("make %s split=%s seed=%d tasks=%d num_workers=%d options=%s", name, split, seed,
             len(env.task_ids), env_opts["num_workers"], options)
    return env
