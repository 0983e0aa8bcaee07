"""Procedural WebShop catalogue, written in the original data schema and cached on disk.

The generator writes the two files princeton-nlp/WebShop reads, so generated and original data
share one loader (``loader.py``):

* ``items_shuffle.json``: a list of raw products with ``asin``, ``name``, ``full_description``,
  ``small_description`` (bullets), ``pricing`` ("$x" or "$a - $b"), ``customization_options``
  (``{Name: [{"value": V, "image": None}]}``), ``category``, ``query``, ``product_category``
  ("Dept › A › B") and ``images``.
* ``items_ins_v2.json``: ``{asin: {"attributes", "instruction", "instruction_attributes"}}``.

Files live under ``$SDAR_CACHE/webshop/catalogue-<hash of options>/`` (default cache root
``~/.cache/sdar_envs``) and are written atomically (temp file + ``os.replace``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

from sdar_engine.progress import progress

from ..cache import cache_root
from .lexicon import (BRANDS, DEPARTMENTS, PRODUCT_TYPES, STYLE_WORDS, ProductType,
                      all_product_types)

log = logging.getLogger("sdar_envs.webshop")

GENERATOR_VERSION = 2
PRICE_BANDS = {"beauty": (4.0, 45.0), "electronics": (9.0, 160.0), "fashion": (9.0, 90.0),
               "food": (3.0, 40.0), "furniture": (35.0, 420.0)}
_ASIN_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"
_TEMPLATES = (
    "i need {art}{q} that is {attrs}",
    "i am looking for {art}{a1} {q}{with_rest}",
    "i want to buy {art}{q} which is {attrs}",
    "find me {art}{a1} {q}{that_rest}",
    "i'd like {art}{q} that has {attrs}",
)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` via a temp file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _join_and(items: list[str]) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + ", and " + items[-1]


def _article(phrase: str, plural: bool) -> str:
    if plural:
        return ""
    return "an " if phrase[:1] in "aeiou" else "a "


def make_instruction(rng: random.Random, query: str, attrs: list[str]) -> str:
    """A WebShop-style instruction (before options and price) naming ``query`` and ``attrs``."""
    plural = query.endswith("s") and not query.endswith("ss")
    template = rng.choice(_TEMPLATES)
    first_word = attrs[0] if "{a1}" in template else query
    rest = attrs[1:]
    return template.format(
        art=_article(first_word, plural), q=query, a1=attrs[0], attrs=_join_and(attrs),
        with_rest=f" with {_join_and(rest)}" if rest else "",
        that_rest=f", that is {_join_and(rest)}" if rest else "")


def _asin(rng: random.Random, taken: set[str]) -> str:
    while True:
        asin = "B0" + "".join(rng.choice(_ASIN_CHARS) for _ in range(8))
        if asin not in taken:
            taken.add(asin)
            return asin


def _pricing(rng: random.Random, category: str) -> str:
    lo, hi = PRICE_BANDS[category]
    price = round(rng.uniform(lo, hi), 2)
    if rng.random() < 0.25:  # about a quarter of WebShop products list a price range
        return f"${price:.2f} - ${round(price * rng.uniform(1.05, 1.4), 2):.2f}"
    return f"${price:.2f}"


def _options(rng: random.Random, ptype: ProductType) -> dict[str, list[dict]]:
    out = {}
    for name, pool in ptype.options.items():
        k = rng.randint(min(2, len(pool)), min(4, len(pool)))
        values = sorted(rng.sample(pool, k), key=pool.index)
        out[name.title()] = [{"value": v.title(), "image": None} for v in values]
    return out


def _texts(rng: random.Random, brand: str, style: str, ptype: ProductType,
           attrs: list[str]) -> tuple[str, str, list[str]]:
    """(title, full description, bullets); every attribute shows up in the bullets."""
    shown = rng.choice(attrs) if rng.random() < 0.6 else None
    tail = rng.choice(ptype.tails) if ptype.tails else ""
    parts = [brand, style.title(), shown.title() if shown else "", ptype.query.title(), tail]
    title = " ".join(p for p in parts if p)
    described = rng.sample(attrs, k=min(2, len(attrs)))
    desc = (f"The {brand} {style} {ptype.query} is made to last. "
            f"It is {_join_and(described)}. Backed by a {rng.choice((30, 60, 90))}-day guarantee.")
    bullets = [f"{a.upper()}: part of what makes this {ptype.query} a favorite." for a in attrs]
    bullets.insert(0, f"{brand.upper()} {ptype.query.upper()}: {style} quality.")
    return title, desc, bullets


def generate_raw(seed: int, num_products: int) -> tuple[list[dict], dict[str, dict]]:
    """Generate (items_shuffle list, items_ins_v2 dict) in WebShop's raw schema."""
    rng = random.Random(f"webshop-catalogue/{seed}")
    types = all_product_types()
    items, ins, taken = [], {}, set()
    for i in progress(range(num_products), desc="webshop catalogue", nested=True,
                  disable=num_products < 5000):
        category, ptype = types[i % len(types)] if i < len(types) else rng.choice(types)
        brand, style = rng.choice(BRANDS), rng.choice(STYLE_WORDS)
        attrs = rng.sample(ptype.attrs, k=rng.randint(3, min(5, len(ptype.attrs))))
        title, desc, bullets = _texts(rng, brand, style, ptype, attrs)
        asin = _asin(rng, taken)
        items.append({
            "asin": asin, "name": title, "full_description": desc,
            "small_description": bullets, "pricing": _pricing(rng, category),
            "customization_options": _options(rng, ptype), "category": category,
            "query": ptype.query,
            "product_category": " › ".join((DEPARTMENTS[category],) + ptype.path),
            "images": [""],
        })
        goal_attrs = rng.sample(attrs, k=rng.randint(1, min(3, len(attrs))))
        ins[asin] = {"attributes": attrs, "instruction_attributes": goal_attrs,
                     "instruction": make_instruction(rng, ptype.query, goal_attrs)}
    rng.shuffle(items)  # "items_shuffle": the original file is shuffled too
    return items, ins


def ensure_catalogue(seed: int, num_products: int) -> Path:
    """Generate the catalogue files once per (seed, num_products); returns their folder."""
    if not isinstance(num_products, int) or not 50 <= num_products <= 100_000:
        raise ValueError(f"num_products={num_products!r} is not valid; use an int in "
                         f"[50, 100000] (the results page lists the top 50)")
    # The key covers the lexicon too, so editing it never serves a stale cached catalogue.
    recipe = repr((GENERATOR_VERSION, seed, num_products, PRODUCT_TYPES, BRANDS, STYLE_WORDS,
                   DEPARTMENTS, PRICE_BANDS, _TEMPLATES))
    key = hashlib.sha1(recipe.encode()).hexdigest()[:12]
    folder = cache_root() / "webshop" / f"catalogue-{key}"
    done = folder / "items_ins_v2.json"
    if not done.exists():
        log.info("webshop: generating %d products (seed %d) into %s", num_products, seed, folder)
        items, ins = generate_raw(seed, num_products)
        write_json_atomic(folder / "items_shuffle.json", items)
        write_json_atomic(done, ins)  # written last: its presence marks a complete folder
    return folder
