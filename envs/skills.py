"""Skill banks (envs/skill_banks/<env>.json) and retrieval for the teacher prompt.

Each skill is {id, title, text, keywords, task_types}; ``task_types`` holds "general" for skills
that apply to every task of the env. Retrieval methods:

- keyword (default): rank by task-type match (+3), keyword hits in the task text (+1 each)
  and generality (+0.5); top k with a positive score.
- full: every skill of the bank, in file order.
- random: k skills drawn with a seeded ``random.Random``.
- ucb: among the skills relevant to the task type (general + matching), the top k by UCB1
  (untried skills first), updated from episode outcomes via ``update``.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

BANK_DIR = Path(__file__).resolve().parent / "skill_banks"
RETRIEVALS = ("keyword", "full", "random", "ucb")  # the one definition: engine config and teacher import it
_FIELDS = ("id", "title", "text", "keywords", "task_types")


@dataclass(frozen=True)
class Skill:
    id: str
    title: str
    text: str
    keywords: tuple[str, ...]
    task_types: tuple[str, ...]

    @property
    def general(self) -> bool:
        return "general" in self.task_types

    def matches_type(self, task_type: str) -> bool:
        t = task_type.lower()
        return any(tt.lower() == t or (tt != "general" and tt.lower() in t) for tt in self.task_types)


@dataclass
class UCBStats:
    """Per-skill pull counts and successes for the UCB1 bandit."""

    pulls: dict[str, int] = field(default_factory=dict)
    wins: dict[str, float] = field(default_factory=dict)
    total: int = 0

    def score(self, skill_id: str, c: float) -> float:
        n = self.pulls.get(skill_id, 0)
        if n == 0:
            return math.inf
        mean = self.wins.get(skill_id, 0.0) / n
        return mean + c * math.sqrt(2.0 * math.log(max(self.total, 1)) / n)


class SkillBank:
    """An env's skills plus the retrieval state (seeded RNG, UCB statistics)."""

    def __init__(self, env: str, skills: list[Skill], seed: int = 0, ucb_c: float = 1.0) -> None:
        if not skills:
            raise ValueError(f"skill bank for env={env!r} is empty")
        ids = [s.id for s in skills]
        if len(set(ids)) != len(ids):
            raise ValueError(f"skill bank for env={env!r} has duplicate ids")
        if not (isinstance(ucb_c, (int, float)) and ucb_c >= 0):
            raise ValueError(f"ucb_c={ucb_c!r} is not valid; use a float >= 0")
        self.env, self.skills, self.ucb_c = env, list(skills), float(ucb_c)
        self._by_id = {s.id: s for s in skills}
        self._rng = random.Random(f"skills/{env}/{seed}")
        self.stats = UCBStats()

    def __len__(self) -> int:
        return len(self.skills)

    def get(self, skill_id: str) -> Skill:
        return self._by_id[skill_id]

    def retrieve(self, task_type: str, task_text: str, method: str = "keyword",
                 k: int = 3) -> list[Skill]:
        """Skills for one task; ``k`` bounds every method except "full"."""
        if method not in RETRIEVALS:
            raise ValueError(f"retrieval method={method!r} is not valid; use one of {RETRIEVALS}")
        if method == "full":
            return list(self.skills)
        if method == "random":
            return self._rng.sample(self.skills, min(k, len(self.skills)))
        if method == "ucb":
            return self._ucb(task_type, k)
        return self._keyword(task_type, task_text, k)

    def keyword_score(self, skill: Skill, task_type: str, task_text: str) -> float:
        text = f" {task_text.lower()} "
        score = 3.0 if skill.matches_type(task_type) and not skill.general else 0.0
        score += sum(1.0 for kw in skill.keywords if kw.lower() in text)
        return score + (0.5 if skill.general else 0.0)

    def _keyword(self, task_type: str, task_text: str, k: int) -> list[Skill]:
        scored = [(self.keyword_score(s, task_type, task_text), j, s)
                  for j, s in enumerate(self.skills)]
        scored = [x for x in scored if x[0] > 0]
        scored.sort(key=lambda x: (-x[0], x[1]))
        return [s for _, _, s in scored[:k]]

    def _ucb(self, task_type: str, k: int) -> list[Skill]:
        pool = [s for s in self.skills if s.general or s.matches_type(task_type)] or self.skills
        ranked = sorted(enumerate(pool), key=lambda js: (-self.stats.score(js[1].id, self.ucb_c), js[0]))
        return [s for _, s in ranked[:k]]

    def update(self, skill_ids: list[str], success: bool) -> None:
        """Credit one episode outcome to each skill that was shown for it."""
        unknown = [i for i in skill_ids if i not in self._by_id]
        if unknown:
            raise ValueError(f"skill_ids {unknown[:3]!r} are not in the {self.env} bank")
        if not skill_ids:
            return
        self.stats.total += 1
        for sid in skill_ids:
            self.stats.pulls[sid] = self.stats.pulls.get(sid, 0) + 1
            self.stats.wins[sid] = self.stats.wins.get(sid, 0.0) + float(success)


def _parse_skill(raw: object, where: str) -> Skill:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: each skill must be an object with fields {_FIELDS}")
    missing = [f for f in _FIELDS if f not in raw]
    if missing:
        raise ValueError(f"{where}: skill {raw.get('id', '?')!r} lacks fields {missing}")
    for f in ("keywords", "task_types"):
        if not isinstance(raw[f], list) or not all(isinstance(x, str) for x in raw[f]):
            raise ValueError(f"{where}: skill {raw['id']!r} field {f!r} must be a list of str")
    return Skill(str(raw["id"]), str(raw["title"]), str(raw["text"]),
                 tuple(raw["keywords"]), tuple(raw["task_types"]))


def read_skills(path: str | Path) -> list[Skill]:
    """Parse a skill-bank JSON file ({"env": ..., "skills": [...]})."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("skills"), list):
        raise ValueError(f"{path}: expected an object with a 'skills' list")
    return [_parse_skill(raw, str(path)) for raw in data["skills"]]


def available_banks() -> list[str]:
    """Names of the bundled banks (envs/skill_banks/<name>.json)."""
    return sorted(p.stem for p in BANK_DIR.glob("*.json"))


def load_skill_bank(env: str, seed: int = 0, ucb_c: float = 1.0,
                    path: str | Path | None = None, bank: str | None = None) -> SkillBank:
    """The bank of ``env`` from envs/skill_banks/<env>.json, or the bundled bank named ``bank``
    (e.g. "alfworld_placement"), or the file ``path``."""
    if bank is not None:
        if path is not None:
            raise ValueError("give skill_bank (a bundled bank name) or path, not both")
        if bank not in available_banks():
            raise ValueError(f"skill_bank={bank!r} is not valid; use one of {available_banks()}")
        path = BANK_DIR / f"{bank}.json"
    path = Path(path) if path is not None else BANK_DIR / f"{env}.json"
    if not path.is_file():
        raise ValueError(f"no skill bank for env={env!r}: {path} does not exist")
    return SkillBank(env, read_skills(path), seed=seed, ucb_c=ucb_c)
