"""BM25 product search (bm25s) over WebShop's search documents, and the title noun matchers.

The indexed document of a product is WebShop's (``search_engine/convert_product_file_format.py``):
``(title + description + first bullet + "name: v1, v2, and name: …").lower()``. WebShop's
Lucene index stems English words; we apply a minimal plural stemmer before bm25s scores
(documents and queries alike). Results are the top 50 with a positive score.
"""
from __future__ import annotations

import re

import bm25s
from bm25s.stopwords import STOPWORDS_EN

from .lexicon import NOUNS, word_tokens
from .loader import Product

TOP_K = 50
_TOKEN = re.compile(r"(?u)\b\w\w+\b")
_STOP = frozenset(STOPWORDS_EN)


def _stem(word: str) -> str:
    """Minimal English plural stemmer (in the spirit of Lucene's EnglishMinimalStemmer)."""
    if len(word) > 4 and word.endswith("ies") and word[-4] not in "ae":
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("es") and word[-3] in "sxz" and not word.endswith("ses"):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and word[-2] not in "usi":
        return word[:-1]
    return word


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens, English stopwords removed, plurals stemmed."""
    return [_stem(t) for t in _TOKEN.findall(text.lower()) if t not in _STOP]


def search_document(product: Product) -> str:
    """The lowercase text WebShop indexes for one product."""
    option_text = ", and ".join(f"{name}: {', '.join(values)}"
                                for name, values in product.options.items())
    return " ".join([product.title, product.description, product.bullets[0],
                     option_text]).lower()


class SearchEngine:
    """BM25 over a product list; ``search(query)`` -> ASINs of the top ``TOP_K`` hits."""

    def __init__(self, products: list[Product]) -> None:
        self.asins = [p.asin for p in products]
        self._bm25 = bm25s.BM25()
        self._bm25.index([tokenize(search_document(p)) or ["_"] for p in products],
                         show_progress=False)

    def search(self, query: str, k: int = TOP_K) -> list[str]:
        """ASINs ranked by BM25 score (ties by catalogue order); only positive scores."""
        tokens = tokenize(query)
        if not tokens or not self.asins:
            return []
        k = min(k, len(self.asins))
        ids, scores = self._bm25.retrieve([tokens], k=k, show_progress=False, n_threads=1)
        hits = sorted((-float(s), int(i)) for i, s in zip(ids[0], scores[0]) if s > 0)
        return [self.asins[i] for _, i in hits]


def lexicon_nouns(text: str) -> set[str]:
    """Nouns of a generated title: its words found in the generator lexicon."""
    return {t for t in word_tokens(text) if t in NOUNS}


def heuristic_nouns(text: str) -> set[str]:
    """Noun stand-in for original data (no spaCy): alphabetic non-stopword words."""
    return {t for t in word_tokens(text) if t.isalpha() and t not in _STOP}
