"""Search-QA suite: Search-R1's search/answer loop over a generated (or loaded) encyclopedia.

    suite = build_suite(seed=0)                                  # generated, offline
    suite = build_suite(corpus_path="wiki-18.jsonl", questions_path="train.jsonl",
                        test_questions_path="test.jsonl")       # real data on disk

Task ids: ``searchqa/<split>/<task_type>/<index>``; task types single_hop | multi_hop | comparison.
"""
from __future__ import annotations

import random
from pathlib import Path

from .game import INVALID_MESSAGE, MAX_TURNS, SearchGame, exact_match, normalize_answer
from .loaders import load_corpus_jsonl, load_questions_jsonl
from .questions import TASK_TYPES, Question, generate_questions
from .retriever import BM25Retriever, corpus_cache_dir, render_information
from .world import generate_world, passages

__all__ = ["build_suite", "SearchSuite", "SearchGame", "exact_match", "normalize_answer",
           "INVALID_MESSAGE", "render_information", "load_corpus_jsonl", "load_questions_jsonl"]

SPLITS = ("train", "test")


class SearchSuite:
    """Questions per split plus one shared BM25 retriever."""

    name = "searchqa"

    def __init__(self, docs: list[dict], splits: dict[str, list[Question]], topk: int = 3,
                 max_turns: int = MAX_TURNS, index_cache: Path | None = None) -> None:
        if not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"max_turns={max_turns!r} is not valid; use an int >= 1")
        self.docs, self.max_turns = docs, max_turns
        self.retriever = BM25Retriever(docs, topk=topk, cache_dir=index_cache)
        self._games: dict[str, Question] = {}
        self._ids: dict[str, list[str]] = {}
        for split in SPLITS:
            counters = {t: 0 for t in TASK_TYPES}
            ids = []
            for q in splits.get(split, []):
                tid = f"searchqa/{split}/{q.task_type}/{counters[q.task_type]}"
                counters[q.task_type] += 1
                self._games[tid] = q
                ids.append(tid)
            self._ids[split] = ids

    def task_ids(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not valid; use one of {SPLITS}")
        return list(self._ids[split])

    def question(self, task_id: str) -> Question:
        if task_id not in self._games:
            raise ValueError(f"task_id={task_id!r} is not a Search-QA task of this suite")
        return self._games[task_id]

    def make_game(self, task_id: str) -> SearchGame:
        return SearchGame(task_id, self.question(task_id), self.retriever, self.max_turns)


def _split(items: list[Question], seed: int, test_fraction: float) -> dict[str, list[Question]]:
    """Seeded shuffle, then the first ``test_fraction`` of each task type goes to test."""
    rng = random.Random(f"searchqa-split/{seed}")
    out: dict[str, list[Question]] = {"train": [], "test": []}
    for t in TASK_TYPES:
        group = [q for q in items if q.task_type == t]
        rng.shuffle(group)
        n_test = round(len(group) * test_fraction)
        out["test"] += group[:n_test]
        out["train"] += group[n_test:]
    return out


_OPTION_NAMES = ("corpus_path", "questions_path", "test_questions_path", "per_type",
                 "test_fraction", "topk", "max_turns", "world_scale", "world_seed")


def build_suite(seed: int = 0, corpus_path: str | Path | None = None,
                questions_path: str | Path | None = None,
                test_questions_path: str | Path | None = None, per_type: int = 300,
                test_fraction: float = 0.2, topk: int = 3, max_turns: int = MAX_TURNS,
                world_scale: int = 1, world_seed: int = 0, **unknown: object) -> SearchSuite:
    """Generated data by default; real data when ``corpus_path`` and ``questions_path`` are given.

    Generated: ``per_type`` questions per task type over a world of ``world_scale`` times the
    default entity counts. The world, questions and split depend on ``world_seed`` only, not
    on ``seed`` (which only picks the tasks BatchEnv draws), so a train env and an eval env
    with different seeds still see disjoint splits of one world. Real data:
    ``test_questions_path`` is optional (else ``test_fraction`` of the questions are held out).
    """
    if unknown:
        raise ValueError(f"searchqa options {sorted(unknown)} are not valid; use any of "
                         f"{list(_OPTION_NAMES)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} is not valid; use 0 < x < 1")
    if (corpus_path is None) != (questions_path is None):
        raise ValueError("corpus_path and questions_path go together: give both (real data) "
                         "or neither (generated data)")
    if corpus_path is not None:
        docs = load_corpus_jsonl(corpus_path)
        train = load_questions_jsonl(questions_path)
        if test_questions_path is not None:
            splits = {"train": train, "test": load_questions_jsonl(test_questions_path)}
        else:
            splits = _split(train, world_seed, test_fraction)
        return SearchSuite(docs, splits, topk=topk, max_turns=max_turns,
                           index_cache=corpus_cache_dir(corpus_path))
    if not isinstance(world_scale, int) or world_scale < 1:
        raise ValueError(f"world_scale={world_scale!r} is not valid; use an int >= 1")
    s = world_scale
    world = generate_world(world_seed, people=240 * s, cities=80 * s, companies=70 * s,
                           rivers=30 * s, countries=16 * s)
    questions = generate_questions(world, world_seed, per_type)
    items = [q for t in TASK_TYPES for q in questions[t]]
    return SearchSuite(passages(world), _split(items, world_seed, test_fraction), topk=topk,
                       max_turns=max_turns)
