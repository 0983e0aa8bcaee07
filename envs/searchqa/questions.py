"""Questions over the generated world: single-hop, two-hop (multi_hop) and comparison.

Each question carries golden answers (any one counts), a FlashRAG-style ``data_source`` and a
``plan``: the searches an expert makes, each with the title of the passage that supports it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .world import Entity, World

TASK_TYPES = ("single_hop", "multi_hop", "comparison")


@dataclass(frozen=True)
class Question:
    """One QA item. ``plan`` is ((query, support_title), ...); empty for loaded data."""

    qid: str
    question: str
    golden_answers: tuple[str, ...]
    data_source: str
    task_type: str
    plan: tuple[tuple[str, str], ...] = ()


def _hop(e: Entity, attr_words: str) -> tuple[str, str]:
    return (f"{e.name} {attr_words}", e.name)


def _answers(value: object, *extra: str) -> tuple[str, ...]:
    return (str(value),) + tuple(extra)


def _single(world: World, rng: random.Random) -> tuple[str, tuple[str, ...], tuple]:
    kind = rng.choice(("person", "person", "city", "company", "river", "country"))
    e = world.get(rng.choice(world.by_kind[kind]))
    f = e.facts
    options = {
        "person": lambda: [(f"In which city was {e.name} born?", _answers(f["birthplace"]), "born in city"),
                   (f"In what year was {e.name} born?", _answers(f["birth_year"]), "born year"),
                   (f"What is the occupation of {e.name}?", _answers(f["occupation"]), "occupation"),
                   (f"Which company does {e.name} work for?", _answers(f["employer"]), "works for")],
        "city": lambda: [(f"In which country is the city of {e.name}?", _answers(f["country"]), "city country"),
                 (f"Which river flows through {e.name}?", _answers(f["river"], f"{f['river']} river"),
                  "city river"),
                 (f"In what year was the city of {e.name} founded?", _answers(f["founded"]),
                  "city founded")],
        "company": lambda: [(f"Who founded {e.name}?", _answers(f["founder"]), "company founded by"),
                    (f"In which city is {e.name} headquartered?", _answers(f["headquarters"]),
                     "company headquarters"),
                    (f"In what year was {e.name} founded?", _answers(f["founded"]), "company founded")],
        "river": lambda: [(f"In which country is the {e.name} river?", _answers(f["country"]), "river country")],
        "country": lambda: [(f"On which continent is {e.name}?", _answers(f["continent"]), "country continent")],
    }[kind]()
    q, ans, words = rng.choice(options)
    return q, ans, (_hop(e, words),)


def _multi(world: World, rng: random.Random) -> tuple[str, tuple[str, ...], tuple]:
    choice = rng.randrange(5)
    if choice in (0, 1, 2):
        p = world.get(rng.choice(world.by_kind["person"]))
        if choice == 0:
            c = world.get(p.facts["birthplace"])
            return (f"In which country was {p.name} born?", _answers(c.facts["country"]),
                    (_hop(p, "born in city"), _hop(c, "city country")))
        if choice == 1:
            c = world.get(p.facts["birthplace"])
            river = c.facts["river"]
            return (f"Which river flows through the city where {p.name} was born?",
                    _answers(river, f"{river} river"), (_hop(p, "born in city"), _hop(c, "city river")))
        co = world.get(p.facts["employer"])
        return (f"Who founded the company that {p.name} works for?", _answers(co.facts["founder"]),
                (_hop(p, "works for company"), _hop(co, "company founded by")))
    co = world.get(rng.choice(world.by_kind["company"]))
    if choice == 3:
        founder = world.get(co.facts["founder"])
        return (f"In what year was the founder of {co.name} born?",
                _answers(founder.facts["birth_year"]),
                (_hop(co, "company founded by"), _hop(founder, "born year")))
    hq = world.get(co.facts["headquarters"])
    return (f"In which country are the headquarters of {co.name}?", _answers(hq.facts["country"]),
            (_hop(co, "company headquarters"), _hop(hq, "city country")))


_COMPARE = (  # kind, attribute, question template, pick the larger value?, query words
    ("person", "birth_year", "Who was born first, {a} or {b}?", False, "born year"),
    ("company", "founded", "Which company was founded earlier, {a} or {b}?", False, "company founded"),
    ("river", "length_km", "Which river is longer, the {a} or the {b}?", True, "river length km"),
    ("city", "population", "Which city has more inhabitants, {a} or {b}?", True, "city population"),
)


def _compare(world: World, rng: random.Random) -> tuple[str, tuple[str, ...], tuple] | None:
    kind, attr, template, larger, words = rng.choice(_COMPARE)
    a, b = (world.get(n) for n in rng.sample(world.by_kind[kind], 2))
    va, vb = a.facts[attr], b.facts[attr]
    if va == vb:
        return None
    win = a if (va > vb) == larger else b
    extra = (f"{win.name} river",) if kind == "river" else ()
    return (template.format(a=a.name, b=b.name), _answers(win.name, *extra),
            (_hop(a, words), _hop(b, words)))


_MAKERS = {"single_hop": _single, "multi_hop": _multi, "comparison": _compare}


def generate_questions(world: World, seed: int, per_type: int) -> dict[str, list[Question]]:
    """``per_type`` distinct questions of each task type (fewer if the world is too small)."""
    if not isinstance(per_type, int) or per_type < 1:
        raise ValueError(f"per_type={per_type!r} is not valid; use an int >= 1")
    rng = random.Random(f"searchqa-questions/{seed}")
    out: dict[str, list[Question]] = {}
    for task_type in TASK_TYPES:
        seen: set[str] = set()
        items: list[Question] = []
        for _ in range(per_type * 20):
            if len(items) >= per_type:
                break
            made = _MAKERS[task_type](world, rng)
            if made is None or made[0] in seen:
                continue
            seen.add(made[0])
            q, ans, plan = made
            items.append(Question(f"{task_type}-{len(items)}", q, ans, f"synthetic_{task_type}",
                                  task_type, plan))
        out[task_type] = items
    return out
