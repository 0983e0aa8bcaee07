"""Per-env history of (observation, action, next observation) records and its rendering.

Two renderings, as in verl-agent: the simple one,
``[Observation k: '…', Action k: '…']``, and the Search one, ``Step k: {query} {information}``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# History observations are clipped (the tiny CPU model pays per token); Search keeps more
# because earlier <information> blocks hold the facts the final answer needs.
MAX_OBS_CHARS = {"simple": 300, "search": 1500}


@dataclass(frozen=True)
class Record:
    """One step: the observation the action answered, the action, and what came back."""

    observation: str
    action: str
    next_observation: str


@dataclass
class Memory:
    """Append-only history of one env's episode."""

    records: list[Record] = field(default_factory=list)

    def add(self, observation: str, action: str, next_observation: str) -> None:
        self.records.append(Record(observation, action, next_observation))

    def __len__(self) -> int:
        return len(self.records)

    def recent(self, k: int) -> list[tuple[int, Record]]:
        """The last ``k`` records with their 1-based step numbers."""
        if k <= 0:
            return []
        start = max(0, len(self.records) - k)
        return [(start + j + 1, r) for j, r in enumerate(self.records[start:])]

    def render(self, k: int, style: str = "simple") -> str:
        """Render the last ``k`` records; style "simple" or "search"."""
        if style not in ("simple", "search"):
            raise ValueError(f"style={style!r} is not valid; use 'simple' or 'search'")
        lines = []
        for n, r in self.recent(k):
            if style == "search":
                info = _clip(r.next_observation.strip(), MAX_OBS_CHARS["search"])
                lines.append(f"Step {n}: {_search_query(r.action)} {info}")
            else:
                obs = _clip(r.observation, MAX_OBS_CHARS["simple"])
                lines.append(f"[Observation {n}: '{obs}', Action {n}: '{r.action}']")
        return "\n".join(lines)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " …"


def _search_query(action: str) -> str:
    """``search[q]`` -> ``q``; other projected forms are shown as they are."""
    if action.startswith("search[") and action.endswith("]"):
        return action[len("search["):-1]
    return action
