"""One step's batch as every rank sees it: who plays which episodes, and what the ranks gathered.

Episodes are numbered 0 .. B*G-1 (episode e is copy e % G of task e // G) and rank r plays the
contiguous block ``distributed.shard(B*G)``. After the rollout, ``gather_step`` collects the
light per-sample data (advantage inputs) and the per-episode outcomes of every rank. Rank order
is episode order, which is the single-process sample order, so advantages, metrics and the PPO
mini-batch plan are computed on the whole batch, identically on every rank; each rank then
keeps its own slice (``StepBatch.mine``). The samples themselves (token ids, log-probs) never
leave their rank.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from .advantages import AdvantageInput
from .distributed import gather_objects, rank
from .rollout import Rollout

_OUTCOME_LISTS = ("won", "task_types", "episode_rewards", "episode_lengths", "episode_ids")


@dataclass
class StepBatch:
    """The gathered view of one step (the same on every rank).

    adv: advantage inputs of all samples in global order; counts[r]: samples of rank r;
    outcomes: the episodes of all ranks (a sample-less Rollout, for metrics); episodes_by_rank:
    the episode numbers each rank played; records: one dict per sample (episode, step, task,
    action, reward, rank) when asked for, else None. A sample is one env step, or one episode
    under ``algo.sample_mode: trajectory`` (then its action is the list of the episode's actions).
    """

    adv: AdvantageInput
    counts: list[int]
    outcomes: Rollout
    episodes_by_rank: list[list[int]] = field(default_factory=list)
    records: Optional[list[dict]] = None
    tokens: int = 0                  # prompt + response tokens of all samples

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def mine(self, rank_: Optional[int] = None) -> range:
        """Global indices of rank ``rank_``'s samples (this rank's by default)."""
        r = rank() if rank_ is None else rank_
        start = sum(self.counts[:r])
        return range(start, start + self.counts[r])

    def episode_overlap(self) -> int:
        """Episodes played by more than one rank (0 when the shares are disjoint)."""
        seen = Counter(e for eps in self.episodes_by_rank for e in eps)
        return sum(1 for c in seen.values() if c > 1)


def _part(ro: Rollout, with_records: bool) -> dict[str, Any]:
    part: dict[str, Any] = {k: list(getattr(ro, k)) for k in _OUTCOME_LISTS}
    part.update(rewards=list(ro.rewards), step_rewards=list(ro.step_rewards), anchors=list(ro.anchors),
                groups=[s.group for s in ro.samples], episodes=[s.episode for s in ro.samples],
                steps=[s.step for s in ro.samples], invalid_steps=ro.invalid_steps, gen_tokens=ro.gen_tokens,
                gen_seconds=ro.gen_seconds, env_seconds=ro.env_seconds, rank=rank(), context_cut=ro.context_cut,
                tokens=sum(len(s.prompt_ids) + len(s.response_ids) for s in ro.samples))
    if with_records:
        part["records"] = [{"episode": s.episode, "step": s.step, "task": s.meta.get("task"),
                            "action": s.meta.get("action"), "reward": r, "rank": rank()}
                           for s, r in zip(ro.samples, ro.rewards)]
    return part


def merge_outcomes(parts: list[dict[str, Any]]) -> Rollout:
    """One sample-less Rollout of the ranks' episodes (rank order); the slowest rank's seconds."""
    out = Rollout()
    for key in _OUTCOME_LISTS:
        setattr(out, key, [x for p in parts for x in p[key]])
    out.invalid_steps = sum(p["invalid_steps"] for p in parts)
    out.gen_tokens = sum(p["gen_tokens"] for p in parts)
    out.context_cut = sum(p.get("context_cut", 0) for p in parts)
    out.gen_seconds = max(p["gen_seconds"] for p in parts)
    out.env_seconds = max(p["env_seconds"] for p in parts)
    return out


def gather_step(ro: Rollout, with_records: bool = False) -> StepBatch:
    """Gather this rank's rollout summary with every other rank's (a collective)."""
    parts = gather_objects(_part(ro, with_records))
    cat = {k: [x for p in parts for x in p[k]]
           for k in ("rewards", "groups", "episodes", "steps", "anchors", "step_rewards")}
    adv = AdvantageInput(**cat)
    records = [x for p in parts for x in p["records"]] if with_records else None
    return StepBatch(adv=adv, counts=[len(p["rewards"]) for p in parts], outcomes=merge_outcomes(parts),
                     episodes_by_rank=[p["episode_ids"] for p in parts], records=records,
                     tokens=sum(p["tokens"] for p in parts))


def gather_outcomes(ro: Rollout) -> Rollout:
    """The episodes of every rank in one sample-less Rollout (for eval metrics; a collective)."""
    return merge_outcomes(gather_objects(_part(ro, False)))
