"""BM25 top-k retrieval (bm25s) over wiki-18 style passages, rendered as in Search-R1."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import bm25s

from ..cache import cache_root

log = logging.getLogger("sdar_envs.searchqa")


def split_contents(contents: str) -> tuple[str, str]:
    """wiki-18 ``contents`` -> (title line as stored, text). Search-R1 keeps the title's quotes."""
    title, _, text = contents.partition("\n")
    return title, text


class BM25Retriever:
    """Lucene-flavoured BM25 over ``contents`` (title + text), English stopwords removed."""

    def __init__(self, docs: list[dict], topk: int = 3, cache_dir: Path | None = None) -> None:
        if not docs:
            raise ValueError("docs is empty; a retriever needs at least one passage")
        if not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk={topk!r} is not valid; use an int >= 1")
        bad = [d.get("id") for d in docs[:1000] if not isinstance(d.get("contents"), str)]
        if bad:
            raise ValueError(f"docs {bad[:3]!r} lack a str 'contents' field")
        self.docs, self.topk = docs, min(topk, len(docs))
        if cache_dir is not None and (cache_dir / "params.index.json").is_file():
            self.model = bm25s.BM25.load(str(cache_dir), show_progress=False)
            log.info("loaded bm25s index of %d passages from %s", len(docs), cache_dir)
            return
        big = len(docs) > 50_000
        tokens = bm25s.tokenize([d["contents"] for d in docs], stopwords="en",
                                return_ids=False, show_progress=big)
        self.model = bm25s.BM25()
        self.model.index(tokens, show_progress=big)
        log.info("indexed %d passages with bm25s", len(docs))
        if cache_dir is not None:
            _save_atomically(self.model, cache_dir)

    def search(self, query: str) -> list[dict]:
        """Top-k docs for ``query`` (best first); an empty/stopword-only query gives the first k."""
        toks = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)
        if not toks or not toks[0]:
            return self.docs[:self.topk]
        ids, _ = self.model.retrieve(toks, k=self.topk, show_progress=False, n_threads=0)
        return [self.docs[int(j)] for j in ids[0]]


def _save_atomically(model: bm25s.BM25, target: Path) -> None:
    """Save into a temp dir beside ``target``, then rename; a concurrent writer's copy wins."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save(str(tmp), show_progress=False)
        os.replace(tmp, target)
        log.info("cached bm25s index at %s", target)
    except OSError:
        if not (target / "params.index.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def corpus_cache_dir(corpus_path: str | Path) -> Path:
    """Index cache folder keyed by the corpus file's path, size and mtime."""
    st = Path(corpus_path).resolve().stat()
    key = f"{Path(corpus_path).resolve()}|{st.st_size}|{st.st_mtime_ns}|bm25s-en"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "searchqa" / f"bm25-{digest}"


def render_information(docs: list[dict]) -> str:
    """Search-R1's observation block: ``\\n\\n<information>Doc 1(Title: T) text\\n…</information>\\n\\n``."""
    ref = ""
    for idx, doc in enumerate(docs):
        title, text = split_contents(doc["contents"])
        ref += f"Doc {idx + 1}(Title: {title}) {text}\n"
    return f"\n\n<information>{ref}</information>\n\n"
