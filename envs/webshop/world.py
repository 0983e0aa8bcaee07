"""The loaded shop: options, products, prices, goals and the search index, memoized per process.

A world is a pure function of its ``WebShopOptions``, so worker processes rebuild it from the
options (the generated catalogue comes from the disk cache) instead of unpickling it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .catalogue import ensure_catalogue
from .goals import Goal, build_goals
from .loader import Product, find_data_files, load_products, sample_prices
from .reward import NounFn
from .search import SearchEngine, heuristic_nouns, lexicon_nouns

log = logging.getLogger("sdar_envs.webshop")
OBS_MODES = ("text", "va")


@dataclass(frozen=True)
class WebShopOptions:
    """Options of the WebShop suite (all have offline defaults).

    data_dir: folder with WebShop's items_shuffle*.json / items_ins_v2*.json; None generates
        a catalogue instead. data_variant: file suffix to pick there ("_1000", "").
    num_products: generated catalogue size, or a cap on the loaded rows (None = all rows).
    catalogue_seed: seed of the generated catalogue, the sampled prices and the price bounds.
    num_test_goals: the first goals after WebShop's seed-233 shuffle form the test split (500
        as in verl-agent); the rest are train.
    max_steps: episode cap (15). search_anywhere: accept ``search[…]`` on every page, as the
        original text env's ``step`` does (default False: only where the search bar is).
    obs_mode: "text" (WebShop's text mode) or "va" (verl-agent: drop the header up to the
        instruction and quote each part).
    """

    data_dir: str | None = None
    data_variant: str | None = None
    num_products: int | None = 1000
    catalogue_seed: int = 0
    num_test_goals: int = 500
    max_steps: int = 15
    search_anywhere: bool = False
    obs_mode: str = "text"

    def __post_init__(self) -> None:
        checks = (
            ("num_products", self.num_products,
             self.num_products is None or (isinstance(self.num_products, int)
                                           and self.num_products >= 50), "None or an int >= 50"),
            ("catalogue_seed", self.catalogue_seed, isinstance(self.catalogue_seed, int), "an int"),
            ("num_test_goals", self.num_test_goals,
             isinstance(self.num_test_goals, int) and self.num_test_goals >= 1, "an int >= 1"),
            ("max_steps", self.max_steps,
             isinstance(self.max_steps, int) and self.max_steps >= 1, "an int >= 1"),
            ("obs_mode", self.obs_mode, self.obs_mode in OBS_MODES, f"one of {OBS_MODES}"),
            ("search_anywhere", self.search_anywhere, isinstance(self.search_anywhere, bool),
             "a bool"),
        )
        for name, value, ok, valid in checks:
            if not ok:
                raise ValueError(f"webshop option {name}={value!r} is not valid; use {valid}")
        if self.data_dir is None and self.num_products is None:
            raise ValueError("webshop option num_products=None is only valid with data_dir; "
                             "use an int >= 50 for the generated catalogue")

    def key(self) -> tuple:
        return tuple(sorted(asdict(self).items()))


@dataclass
class World:
    """Everything the games of one suite share (read-only after construction)."""

    options: WebShopOptions
    products: dict[str, Product]
    prices: dict[str, float]     # dollars: the price the reward compares with the bound
    goals: list[Goal]
    engine: SearchEngine
    nouns: NounFn


_WORLDS: dict[tuple, World] = {}


def _load(opts: WebShopOptions) -> World:
    start = time.perf_counter()
    if opts.data_dir is None:
        folder = ensure_catalogue(opts.catalogue_seed, opts.num_products)
        items, ins = folder / "items_shuffle.json", folder / "items_ins_v2.json"
        nouns: NounFn = lexicon_nouns
    else:
        items, ins = find_data_files(Path(opts.data_dir), opts.data_variant)
        nouns = heuristic_nouns
    products = load_products(items, ins, opts.num_products)
    prices = sample_prices(products, opts.catalogue_seed)
    goals = build_goals(products, prices, opts.catalogue_seed)
    if not goals:
        raise ValueError(f"webshop data in {items.parent} gives no goals: items_ins_v2 needs "
                         f"'instruction' and 'instruction_attributes' for some asins")
    world = World(opts, {p.asin: p for p in products}, prices, goals,
                  SearchEngine(products), nouns)
    log.info("webshop: %d products, %d goals from %s in %.2fs", len(products), len(goals),
             items, time.perf_counter() - start)
    return world


def get_world(opts: WebShopOptions) -> World:
    """The world of ``opts``, built once per process."""
    key = opts.key()
    if key not in _WORLDS:
        _WORLDS[key] = _load(opts)
    return _WORLDS[key]
