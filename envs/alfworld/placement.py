"""Placement skills: where objects of each kind lie in TRAIN-split games, as teacher skills.

The generator (``sampler._place``) puts each object in a receptacle that can hold it, so the
kinds of receptacle an object class was found in/on over the train games tell a searcher
where to look first: information the student's prompt (task, observation, actions) lacks.
One skill per object class, retrieved by the object named in the task:

    - apple: usually in/on countertop, fridge, diningtable, sinkbasin

Only train-split games are read (``placement_counts`` raises ValueError on any other id), so
no fact of a held-out game can enter a skill. One bundled bank per generator placement
(``sampler.PLACEMENTS``), each rebuilt byte for byte by

    python -m sdar_envs.alfworld.placement --seed 0 --num-train 600 --room-size small
        [--placement habitual]

"uniform" games spread objects evenly over the receptacles that can hold them, so the skill's
order saves the expert ~1 % of its steps; "habitual" games give each class fixed homes, and
searching in the skill's order saves 34 % (measured on 60 test games: 513 vs 783 steps).
"""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from sdar_engine.progress import progress as progress_bar

from .catalog import ROOM_SIZES
from .gamefiles import load_game_data
from .suite import GENERATOR_VERSION, AlfworldSuite, build_suite

_TYPE_FACT = re.compile(r"\((objectType|receptacleType) (\S+) (\w+)Type\)")
_IN_FACT = re.compile(r"\(inReceptacle (\S+) (\S+)\)")
TOP_KINDS = 8      # receptacle kinds named per object (most frequent first)
MIN_COUNT = 2      # a kind seen once is noise, not a habit
SKILL_PREFIX = "usually in/on "
BANK_DIR = Path(__file__).resolve().parents[1] / "skill_banks"
# The bundled bank of each generator placement (sampler.PLACEMENTS).
BANK_NAMES = {"uniform": "alfworld_placement", "habitual": "alfworld_placement_habitual"}


def game_placements(game_file: str | Path) -> list[tuple[str, str]]:
    """(object class, receptacle class) of every object in one game's initial state, lowercase
    as the game text writes them ("apple", "countertop")."""
    problem = load_game_data(game_file)["pddl_problem"]
    cls = {name: kind.lower() for _, name, kind in _TYPE_FACT.findall(problem)}
    return [(cls[o], cls[r]) for o, r in _IN_FACT.findall(problem) if o in cls and r in cls]


def placement_counts(suite: AlfworldSuite, task_ids: Iterable[str],
                     progress: bool = False) -> dict[str, Counter]:
    """Object class -> Counter of receptacle classes over the games of ``task_ids``.

    Raises ValueError for any id outside the train split: skills never read held-out games.
    """
    ids = list(task_ids)
    held_out = [t for t in ids if not (isinstance(t, str) and t.split("/")[1:2] == ["train"])]
    if held_out:
        raise ValueError(f"task_ids {held_out[:3]!r} are not train-split games; placement skills "
                         "are built from the train split only")
    counts: dict[str, Counter] = {}
    for tid in progress_bar(ids, desc="placement stats", unit="game", disable=not progress, nested=True):
        for obj, recep in game_placements(suite.game_file(tid)):
            counts.setdefault(obj, Counter())[recep] += 1
    return counts


def placement_skills(counts: dict[str, Counter], top: int = TOP_KINDS,
                     min_count: int = MIN_COUNT) -> list[dict]:
    """Skill-bank entries, one per object class (sorted by name), kinds by falling frequency.

    Keywords are space-padded (" pen ") so retrieval matches the whole word: "pen" does not
    pull the skill of "pencil", nor "pot" that of "potato". ``task_types`` is empty: a skill
    scores only by its keyword, so keyword retrieval returns the skills of the objects the task
    names (the target, and the desklamp of look_at_obj_in_light) and nothing else.
    """
    skills = []
    for obj in sorted(counts):
        kinds = [r for r, n in sorted(counts[obj].items(), key=lambda rn: (-rn[1], rn[0])) if n >= min_count]
        if not kinds:
            continue
        skills.append({"id": f"alf-where-{obj}", "title": obj,
                       "text": SKILL_PREFIX + ", ".join(kinds[:top]),
                       "keywords": [f" {obj} "], "task_types": []})
    return skills


def kinds_by_object(skills: list[dict]) -> dict[str, list[str]]:
    """Object class -> receptacle kinds, most frequent first, exactly as the placement skills
    state them (the inverse of ``placement_skills``); other skills are ignored."""
    return {s["title"]: s["text"][len(SKILL_PREFIX):].split(", ") for s in skills
            if s.get("id", "").startswith("alf-where-") and s.get("text", "").startswith(SKILL_PREFIX)}


@lru_cache(maxsize=None)
def bundled_search_prior(placement: str = "uniform") -> dict[str, list[str]]:
    """The expert's search prior (``expert_search: prior``): the kinds the bundled placement
    bank of ``placement`` states, so the expert's next "go to" follows the teacher's skill text."""
    if placement not in BANK_NAMES:
        raise ValueError(f"placement={placement!r} is not valid; use one of {list(BANK_NAMES)}")
    path = BANK_DIR / f"{BANK_NAMES[placement]}.json"
    return kinds_by_object(json.loads(path.read_text(encoding="utf-8"))["skills"])


def build_placement_bank(seed: int = 0, num_train: int = 600, room_size: str = "small",
                         progress: bool = False, placement: str = "uniform") -> dict:
    """The skill-bank JSON object built from the train games of the generated suite."""
    suite = build_suite(seed=seed, num_train=num_train, room_size=room_size, placement=placement)
    train = suite.task_ids("train")
    counts = placement_counts(suite, train, progress=progress)
    return {"env": "alfworld", "version": 1,
            "source": {"kind": "train-split placement statistics", "suite_seed": seed,
                       "num_train": len(train), "room_size": room_size,
                       "generator_version": GENERATOR_VERSION, "top_kinds": TOP_KINDS,
                       "min_count": MIN_COUNT, **({"placement": placement} if placement != "uniform" else {}),
                       "command": (f"python -m sdar_envs.alfworld.placement --seed {seed} --num-train "
                                   f"{num_train} --room-size {room_size}"
                                   + (f" --placement {placement}" if placement != "uniform" else ""))},
            "skills": placement_skills(counts)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--room-size", choices=sorted(ROOM_SIZES), default="small")
    parser.add_argument("--placement", choices=sorted(BANK_NAMES), default="uniform")
    parser.add_argument("--out", default=None, help="default: the bundled bank of --placement")
    args = parser.parse_args(argv)
    args.out = args.out or str(BANK_DIR / f"{BANK_NAMES[args.placement]}.json")
    bank = build_placement_bank(args.seed, args.num_train, args.room_size, progress=True,
                                placement=args.placement)
    Path(args.out).write_text(json.dumps(bank, indent=1) + "\n", encoding="utf-8")
    print(f"alfworld placement skills: {len(bank['skills'])} object classes from "
          f"{bank['source']['num_train']} train games -> {args.out}")


if __name__ == "__main__":
    main()
