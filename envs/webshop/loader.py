"""Load products in WebShop's schema (generated files or the original ``items_*.json``).

Follows ``web_agent_site/engine/engine.py::load_products``: skips ``nan`` / over-long / duplicate
ASINs; ``Title`` = name, ``Description`` = full_description, ``BulletPoints`` = small_description
(a string becomes a one-item list); ``pricing`` "$a - $b" -> [a, b] and the price tag "$a to $b"
(missing -> [100.0], "$100.0"); option names and values lowercased with "/" -> " | ";
``Attributes`` from items_ins_v2 (``["DUMMY_ATTR"]`` when absent); ``query`` lowercased.
The price the reward compares is drawn once per product: uniform in a range, else the value.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path


@dataclass(frozen=True)
class Product:
    """One product as the pages and the reward see it (WebShop field names in comments)."""

    asin: str
    title: str                       # Title (= raw "name")
    category: str                    # category (the task type)
    query: str                       # query (lowercased)
    product_category: str            # product_category, "Dept › A › B"
    description: str                 # Description
    bullets: tuple[str, ...]         # BulletPoints
    price_tag: str                   # Price as displayed, "$x" or "$a to $b"
    pricing: tuple[float, ...]       # pricing, 1 or 2 numbers (dollars)
    options: dict[str, list[str]]    # options: lowercased name -> lowercased values
    attributes: tuple[str, ...]      # Attributes
    instruction_text: str | None     # instruction_text (synthetic goal text), if any
    instruction_attributes: tuple[str, ...]


def _find(data_dir: Path, stem: str, variant: str | None) -> Path:
    if variant is not None:
        path = data_dir / f"{stem}{variant}.json"
        if not path.exists():
            raise ValueError(f"data_variant={variant!r} is not valid: {path} does not exist")
        return path
    found = sorted(data_dir.glob(f"{stem}*.json"), key=lambda p: (len(p.name), p.name))
    if not found:
        raise ValueError(f"data_dir={str(data_dir)!r} is not valid: no {stem}*.json in it "
                         f"(expected WebShop's items_shuffle*.json and items_ins_v2*.json)")
    return found[0]


def find_data_files(data_dir: str | Path, variant: str | None = None) -> tuple[Path, Path]:
    """(items_shuffle*.json, items_ins_v2*.json) in ``data_dir``.

    variant: the file-name suffix to pick, e.g. "_1000" or "" (the full files); by default the
    shortest name wins, i.e. the full files when both are present.
    """
    folder = Path(data_dir)
    if not folder.is_dir():
        raise ValueError(f"data_dir={str(data_dir)!r} is not valid: not a directory")
    return _find(folder, "items_shuffle", variant), _find(folder, "items_ins_v2", variant)


def parse_pricing(raw: object) -> tuple[tuple[float, ...], str]:
    """WebShop's pricing rule: "$a - $b" -> ((a, b), "$a to $b"); missing -> ((100.0,), "$100.0")."""
    if not raw or not isinstance(raw, str):
        return (100.0,), "$100.0"
    values = []
    for chunk in raw.split("$")[1:]:
        try:
            values.append(float(Decimal(re.sub(r"[^\d.]", "", chunk))))
        except InvalidOperation:
            continue
    if not values:
        return (100.0,), "$100.0"
    if len(values) == 1:
        return (values[0],), f"${values[0]}"
    return (values[0], values[1]), f"${values[0]} to ${values[1]}"


def _options(raw: object) -> dict[str, list[str]]:
    options: dict[str, list[str]] = {}
    if not isinstance(raw, dict):
        return options
    for name, contents in raw.items():
        if not contents:
            continue
        values = [str(c.get("value", "")).strip().replace("/", " | ").lower()
                  for c in contents if isinstance(c, dict)]
        options[str(name).lower()] = [v for v in values if v]
    return {k: v for k, v in options.items() if v}


def _product(raw: dict, ins: dict) -> Product:
    meta = ins.get(raw["asin"], {})
    bullets = raw.get("small_description") or []
    bullets = bullets if isinstance(bullets, list) else [bullets]
    pricing, tag = parse_pricing(raw.get("pricing"))
    return Product(
        asin=raw["asin"], title=str(raw.get("name", "")), category=str(raw.get("category", "")),
        query=str(raw.get("query", "")).lower().strip(),
        product_category=str(raw.get("product_category", "")),
        description=str(raw.get("full_description") or ""),
        bullets=tuple(str(b) for b in bullets) or ("",), price_tag=tag, pricing=pricing,
        options=_options(raw.get("customization_options")),
        attributes=tuple(meta.get("attributes") or ["DUMMY_ATTR"]),
        instruction_text=meta.get("instruction"),
        instruction_attributes=tuple(meta.get("instruction_attributes") or ()))


def load_products(items_path: str | Path, ins_path: str | Path,
                  num_products: int | None = None) -> list[Product]:
    """Products of an items_shuffle-style file (first ``num_products`` rows if given)."""
    with open(items_path, encoding="utf-8") as f:
        raw_items = json.load(f)
    with open(ins_path, encoding="utf-8") as f:
        ins = json.load(f)
    if not isinstance(raw_items, list) or not isinstance(ins, dict):
        raise ValueError(f"items file {items_path} must hold a list and {ins_path} a dict "
                         f"keyed by asin (WebShop's items_shuffle / items_ins_v2 schema)")
    if num_products is not None:
        raw_items = raw_items[:num_products]
    products, seen = [], set()
    for raw in raw_items:
        asin = str(raw.get("asin", "nan"))
        if asin == "nan" or len(asin) > 10 or asin in seen:
            continue
        seen.add(asin)
        products.append(_product(raw, ins))
    return products


def sample_prices(products: list[Product], seed: int) -> dict[str, float]:
    """The price each product sells at: uniform in its range, else its single price."""
    rng = random.Random(f"webshop-prices/{seed}")
    return {p.asin: (rng.uniform(*p.pricing[:2]) if len(p.pricing) > 1 else p.pricing[0])
            for p in products}
