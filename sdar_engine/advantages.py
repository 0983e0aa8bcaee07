"""Advantage estimators over step samples, in a registry by name (verl's core_algos style).

Every estimator takes per-step-sample arrays (all of length S, the number of step samples of a
rollout batch) and returns S advantages, one scalar per step sample, later broadcast over that
sample's response tokens.

- ``grpo``: (r - mean_g) / (std_g + eps) over ALL step samples of group g (verl-agent's
  cross-step statistics), unbiased std; a group of one sample gets advantage 0.
- ``drgrpo``: r - mean_g (Dr.GRPO: no std division).
- ``gigpo``: episode advantage (grpo or drgrpo) + step_advantage_w x step advantage, where
  step groups are the samples of one task group that saw the same anchor observation and the
  step reward is the discounted return-to-go (gamma, 0.95 by default).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence


@dataclass
class AdvantageInput:
    """Per-step-sample arrays of one rollout batch (length S each).

    rewards: episode reward minus this step's invalid-action penalty.
    groups: task group id (the G copies of one task share it).
    episodes: trajectory id; steps: 0-based env step of the sample.
    anchors: the raw observation the action answered (GiGPO step groups).
    step_rewards: the env reward of this very step minus its penalty (GiGPO returns).
    """

    rewards: Sequence[float]
    groups: Sequence[Hashable]
    episodes: Sequence[Hashable] | None = None
    steps: Sequence[int] | None = None
    anchors: Sequence[Hashable] | None = None
    step_rewards: Sequence[float] | None = None

    def __post_init__(self) -> None:
        n = len(self.rewards)
        for name in ("groups", "episodes", "steps", "anchors", "step_rewards"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"AdvantageInput.{name} has {len(value)} entries; "
                                 f"expected {n} (one per step sample, like rewards)")
        for i, r in enumerate(self.rewards):
            if not math.isfinite(float(r)):
                raise ValueError(f"AdvantageInput.rewards[{i}]={r!r} is not finite")


ADVANTAGES: dict[str, Callable[..., list[float]]] = {}


def register(name: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        ADVANTAGES[name] = fn
        return fn
    return deco


def _group_normalize(values: Sequence[float], keys: Sequence[Hashable], eps: float,
                     use_std: bool) -> list[float]:
    """(x - mean_k) [/ (std_k + eps)] within each key; singleton keys give 0."""
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        members[k].append(i)
    out = [0.0] * len(values)
    for idx in members.values():
        if len(idx) < 2:
            continue  # verl: a group of one has mean = its value -> advantage 0
        xs = [float(values[i]) for i in idx]
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
        denom = std + eps
        for i, x in zip(idx, xs):
            if not use_std:
                out[i] = x - mean
            else:  # all-equal rewards with eps 0: no signal, not a division by zero
                out[i] = (x - mean) / denom if denom > 0 else 0.0
    return out


@register("grpo")
def grpo(inp: AdvantageInput, eps: float = 1e-6, **_: object) -> list[float]:
    """GRPO outcome advantage with group mean and unbiased std over all step samples."""
    return _group_normalize(inp.rewards, inp.groups, eps, use_std=True)


@register("drgrpo")
def drgrpo(inp: AdvantageInput, eps: float = 1e-6, **_: object) -> list[float]:
    """Dr.GRPO: group mean subtracted, no std division."""
    return _group_normalize(inp.rewards, inp.groups, eps, use_std=False)


def discounted_returns(step_rewards: Sequence[float], episodes: Sequence[Hashable],
                       steps: Sequence[int], gamma: float) -> list[float]:
    """Return-to-go sum_{k>=t} gamma^(k-t) r_k along each episode (ordered by step)."""
    by_ep: dict[Hashable, list[int]] = defaultdict(list)
    for i, e in enumerate(episodes):
        by_ep[e].append(i)
    out = [0.0] * len(step_rewards)
    for idx in by_ep.values():
        running = 0.0
        for i in sorted(idx, key=lambda j: steps[j], reverse=True):
            running = float(step_rewards[i]) + gamma * running
            out[i] = running
    return out


@register("gigpo")
def gigpo(inp: AdvantageInput, eps: float = 1e-6, step_advantage_w: float = 1.0,
          gamma: float = 0.95, episode_norm: str = "grpo", **_: object) -> list[float]:
    """GiGPO: episode-level advantage + w x anchor-state step-level advantage."""
    missing = [n for n in ("episodes", "steps", "anchors", "step_rewards") if getattr(inp, n) is None]
    if missing:
        raise ValueError(f"advantage 'gigpo' needs AdvantageInput fields {missing}")
    if episode_norm not in ("grpo", "drgrpo"):
        raise ValueError(f"gigpo episode_norm={episode_norm!r} is invalid; use grpo or drgrpo")
    episode_adv = ADVANTAGES[episode_norm](inp, eps=eps)
    returns = discounted_returns(inp.step_rewards, inp.episodes, inp.steps, gamma)
    step_keys = [(g, a) for g, a in zip(inp.groups, inp.anchors)]
    step_adv = _group_normalize(returns, step_keys, eps, use_std=(episode_norm == "grpo"))
    return [e + step_advantage_w * s for e, s in zip(episode_adv, step_adv)]


def compute_advantages(name: str, inp: AdvantageInput, **kwargs: object) -> list[float]:
    """Dispatch by registry name (grpo | drgrpo | gigpo)."""
    if name not in ADVANTAGES:
        raise ValueError(f"advantage={name!r} is invalid; valid choices: {', '.join(ADVANTAGES)}")
    return ADVANTAGES[name](inp, **kwargs)
