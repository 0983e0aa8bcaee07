"""Loaders for real data: a wiki-18 style corpus and FlashRAG style question files (JSONL)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from sdar_engine.progress import progress

_PROGRESS_BYTES = 50 * 2**20   # show a progress bar for files bigger than this

from .questions import TASK_TYPES, Question

# FlashRAG data_source -> our task type (2wiki mixes comparison and bridge: counted multi-hop).
_SOURCE_TYPES = {"nq": "single_hop", "triviaqa": "single_hop", "popqa": "single_hop",
                 "hotpotqa": "multi_hop", "2wikimultihopqa": "multi_hop", "musique": "multi_hop",
                 "bamboogle": "multi_hop"}


def _records(path: str | Path) -> Iterator[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path={str(path)!r} is not a file")
    big = path.stat().st_size > _PROGRESS_BYTES
    with path.open(encoding="utf-8") as fh:
        lines = progress(fh, desc=f"reading {path.name}", unit=" lines", disable=not big)
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
            yield lineno, rec


def load_corpus_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    """wiki-18 lines ``{"id", "contents": "\\"Title\\"\\ntext"}`` -> list of such dicts."""
    docs = []
    for lineno, rec in _records(path):
        if not isinstance(rec.get("contents"), str):
            raise ValueError(f"{path}:{lineno}: field 'contents' must be a str")
        docs.append({"id": str(rec.get("id", len(docs))), "contents": rec["contents"]})
        if limit is not None and len(docs) >= limit:
            break
    if not docs:
        raise ValueError(f"{path}: no passages found")
    return docs


def task_type_of(data_source: str) -> str:
    """FlashRAG ``data_source`` -> single_hop | multi_hop | comparison (default single_hop)."""
    ds = data_source.lower()
    if ds in TASK_TYPES:
        return ds
    return _SOURCE_TYPES.get(ds, "single_hop")


def load_questions_jsonl(path: str | Path) -> list[Question]:
    """FlashRAG lines ``{"id", "question", "golden_answers", "data_source"}`` -> Questions.

    As Search-R1 does, a question that does not end with "?" gets one.
    """
    out = []
    for lineno, rec in _records(path):
        q, gold = rec.get("question"), rec.get("golden_answers")
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"{path}:{lineno}: field 'question' must be a non-empty str")
        if isinstance(gold, str):
            gold = [gold]
        if not isinstance(gold, list) or not gold or not all(isinstance(g, str) for g in gold):
            raise ValueError(f"{path}:{lineno}: field 'golden_answers' must be a non-empty list of str")
        q = q.strip()
        q = q if q.endswith("?") else q + "?"
        source = str(rec.get("data_source", "unknown"))
        task_type = str(rec.get("task_type") or task_type_of(source))
        if task_type not in TASK_TYPES:
            raise ValueError(f"{path}:{lineno}: task_type={task_type!r}; use one of {TASK_TYPES}")
        out.append(Question(str(rec.get("id", lineno)), q, tuple(gold), source, task_type))
    if not out:
        raise ValueError(f"{path}: no questions found")
    return out
