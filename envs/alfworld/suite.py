"""The ALFWorld suite: task ids per split and ``make_game``, over generated or downloaded games.

Two sources, one code path (both end in ``AlfworldGame(game.tw-pddl)``):

* generated (default): games are sampled per (split, task type, index) from the suite seed,
  built lazily on first use and cached under ``$SDAR_CACHE/alfworld/<options hash>/``
  (``json_2.1.1/{train,valid_unseen}/<task_type>/<index>/``, the layout of the download).
  A game the handcoded expert cannot solve in 50 steps is resampled (next attempt).
* downloaded: ``data_dir`` (or ``$ALFWORLD_DATA``) holding ``json_2.1.1/{train,valid_unseen}``;
  like ``AlfredTWEnv``, only dirs with ``traj_data.json`` and a solvable ``game.tw-pddl``
  count, and paths with "movable"/"Sliced" are skipped. Test = ``valid_unseen``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import zlib
from pathlib import Path

from ..cache import cache_root
from .catalog import FULL_TO_SHORT, MAX_STEPS, ROOM_SIZES, SHORT_TYPES, TASK_TYPES
from .game import AlfworldGame
from .gamefiles import GAME_FILE, TRAJ_FILE, load_game_data, write_game_dir
from .sampler import PLACEMENTS, sample_spec

log = logging.getLogger("sdar_envs.alfworld")

# Part of the cache key: bump it whenever sampler/problem/gamefiles change what a seed generates.
# 2: caches written by version-1 code before the sampler's last changes held different games for
# the same key (found 2026-11-27: 33 of 525 common files differed from a fresh generation).
GENERATOR_VERSION = 2
SPLIT_DIRS = {"train": "train", "test": "valid_unseen"}
DEFAULT_COUNTS = {"train": 600, "test": 120}
MAX_ATTEMPTS = 8
# How the expert searches for an object: ALFWorld's room order, or the train-split placement
# prior the teacher's skills state. Not part of the cache key: games are generated and checked
# (and their stored walkthrough written) by the handcoded expert under either value, so both
# values play the same games; the prior only changes the expert's actions at play time.
EXPERT_SEARCH = ("handcoded", "prior")


def _has_games(path: Path) -> bool:
    for sub in (path / "json_2.1.1" / "train", path / "train"):
        if sub.is_dir() and next(sub.rglob(TRAJ_FILE), None) is not None:
            return True
    return False


def _check_count(field: str, value: object) -> None:
    if value is not None and (not isinstance(value, int) or value < 0):
        raise ValueError(f"{field}={value!r} is not valid; use an int >= 0 (or None)")


class AlfworldSuite:
    """ALFWorld task pool; ``task_ids`` are ``alfworld/<split>/<task_type>/<index>``."""

    name = "alfworld"

    def __init__(self, seed: int = 0, num_train: int | None = None, num_test: int | None = None,
                 room_size: str = "small", data_dir: str | None = None,
                 max_steps: int = MAX_STEPS, task_types: list[str] | None = None,
                 expert_search: str = "handcoded", placement: str = "uniform") -> None:
        if not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} is not valid; use an int")
        _check_count("num_train", num_train)
        _check_count("num_test", num_test)
        if room_size not in ROOM_SIZES:
            raise ValueError(f"room_size={room_size!r} is not valid; use one of {sorted(ROOM_SIZES)}")
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps={max_steps!r} is not valid; use an int >= 1")
        if task_types is not None and (not task_types or any(t not in SHORT_TYPES for t in task_types)):
            raise ValueError(f"task_types={task_types!r} is not valid; use a non-empty list of {list(SHORT_TYPES)}")
        if expert_search not in EXPERT_SEARCH:
            raise ValueError(f"expert_search={expert_search!r} is not valid; use one of {list(EXPERT_SEARCH)}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement={placement!r} is not valid; use one of {list(PLACEMENTS)}")
        self.task_types = list(task_types) if task_types is not None else list(SHORT_TYPES)
        self.expert_search, self.placement = expert_search, placement
        self._search_prior = None
        if expert_search == "prior":
            from .placement import bundled_search_prior  # placement imports this module
            self._search_prior = bundled_search_prior(placement)
        self.seed, self.room_size, self.max_steps = seed, room_size, max_steps
        self.counts = {"train": num_train, "test": num_test}
        if data_dir is None:  # the wheel sets $ALFWORLD_DATA itself: use it only if it has games
            env_dir = os.environ.get("ALFWORLD_DATA")
            data_dir = env_dir if env_dir and _has_games(Path(env_dir)) else None
        self.data_dir = Path(data_dir) if data_dir else None
        self._files: dict[str, dict[str, Path]] = {}
        if self.data_dir is not None:
            self._files = {s: self._scan(s) for s in SPLIT_DIRS}
            self.root = self.data_dir
        else:
            fields = {"v": GENERATOR_VERSION, "seed": seed, "room_size": room_size,
                      "max_steps": max_steps}
            if placement != "uniform":  # uniform games keep the cache key they always had
                fields["placement"] = placement
            key = json.dumps(fields, sort_keys=True)
            self.root = cache_root() / "alfworld" / hashlib.sha1(key.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ task ids
    def task_ids(self, split: str) -> list[str]:
        """Task ids of ``split`` ("train" | "test"); generated ids cycle through ``task_types``."""
        self._check_split(split)
        types = self.task_types
        if self.data_dir is not None:
            ids = [i for i in self._files[split] if self._parse(i)[1] in types]
            limit = self.counts[split]
            return ids if limit is None else ids[:limit]
        n = self.counts[split] if self.counts[split] is not None else DEFAULT_COUNTS[split]
        return [f"alfworld/{split}/{types[i % len(types)]}/{i // len(types)}" for i in range(n)]

    def make_game(self, task_id: str) -> AlfworldGame:
        """The game of ``task_id`` (generated and cached on first use)."""
        split, task_type, index = self._parse(task_id)
        path = self.game_file(task_id)
        seed = zlib.crc32(f"{self.seed}|{task_id}".encode())
        return AlfworldGame(task_id, task_type, str(path), seed=seed, max_steps=self.max_steps,
                            search_prior=self._search_prior)

    def game_file(self, task_id: str) -> Path:
        """Path of the ``game.tw-pddl`` of ``task_id``; generates it if needed."""
        split, task_type, index = self._parse(task_id)
        if self.data_dir is not None:
            if task_id not in self._files[split]:
                raise ValueError(f"task_id={task_id!r} is not in {self.data_dir}")
            return self._files[split][task_id]
        return self._ensure_generated(split, task_type, index)

    # ------------------------------------------------------------------ generated source
    def _ensure_generated(self, split: str, task_type: str, index: int) -> Path:
        base = self.root / "json_2.1.1" / SPLIT_DIRS[split] / TASK_TYPES[task_type]
        for attempt in range(MAX_ATTEMPTS):
            game_dir = base / f"{index:05d}-a{attempt}"
            if not (game_dir / GAME_FILE).exists():
                key = f"{self.seed}|{self.room_size}|{split}|{task_type}|{index}|{attempt}"
                if self.placement != "uniform":
                    key += f"|{self.placement}"
                spec = sample_spec(random.Random(key), task_type, self.room_size, split == "test",
                                   self.placement)
                won, walk, sec = write_game_dir(game_dir, spec, key)
                log.info("generated %s (%s, solvable=%s, %d expert steps, %.2fs)",
                         game_dir, spec.layout_signature(), won, len(walk), sec)
            if load_game_data(game_dir / GAME_FILE).get("solvable"):
                return game_dir / GAME_FILE
        raise RuntimeError(f"no solvable game for {split}/{task_type}/{index} in "
                           f"{MAX_ATTEMPTS} attempts; the generator is broken")

    # ------------------------------------------------------------------ downloaded source
    def _scan(self, split: str) -> dict[str, Path]:
        root = self.data_dir / "json_2.1.1" / SPLIT_DIRS[split]
        if not root.is_dir():
            root = self.data_dir / SPLIT_DIRS[split]
        if not root.is_dir():
            raise ValueError(f"data_dir={str(self.data_dir)!r} has no json_2.1.1/"
                             f"{SPLIT_DIRS[split]} (nor {SPLIT_DIRS[split]}) folder")
        by_type: dict[str, list[Path]] = {t: [] for t in SHORT_TYPES}
        for traj in sorted(root.rglob(TRAJ_FILE)):
            game = traj.parent / GAME_FILE
            if "movable" in str(traj.parent) or "Sliced" in str(traj.parent) or not game.exists():
                continue
            task_type = FULL_TO_SHORT.get(json.loads(traj.read_text()).get("task_type", ""))
            if task_type and load_game_data(game).get("solvable"):
                by_type[task_type].append(game)
        files = {f"alfworld/{split}/{t}/{i}": p for t in SHORT_TYPES
                 for i, p in enumerate(by_type[t])}
        log.info("alfworld %s: %d games from %s", split, len(files), root)
        return files

    # ------------------------------------------------------------------ parsing
    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLIT_DIRS:
            raise ValueError(f"split={split!r} is not valid; use one of {sorted(SPLIT_DIRS)}")

    def _parse(self, task_id: str) -> tuple[str, str, int]:
        parts = task_id.split("/") if isinstance(task_id, str) else []
        if (len(parts) != 4 or parts[0] != "alfworld" or parts[1] not in SPLIT_DIRS
                or parts[2] not in SHORT_TYPES or not parts[3].isdigit()):
            raise ValueError(f"task_id={task_id!r} is not valid; use "
                             f"'alfworld/<train|test>/<{'|'.join(SHORT_TYPES)}>/<index>'")
        return parts[1], parts[2], int(parts[3])


def build_suite(seed: int = 0, **options: object) -> AlfworldSuite:
    """The ALFWorld suite. Options: num_train, num_test, room_size ("small"|"alfworld"),
    data_dir (downloaded games; default $ALFWORLD_DATA, else generated), max_steps (50),
    task_types (a subset of the six short type names; default all), expert_search
    ("handcoded": ALFWorld's room-order search | "prior": search receptacle kinds in the order
    of the bundled train-split placement skills of the suite's placement), placement ("uniform":
    any receptacle that can hold an object, equally likely | "habitual": each object class has a
    fixed ranking of homes, see ``sampler.PLACEMENTS``)."""
    allowed = {"num_train", "num_test", "room_size", "data_dir", "max_steps", "task_types",
               "expert_search", "placement"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"options {unknown} are not valid for alfworld; use {sorted(allowed)}")
    return AlfworldSuite(seed=seed, **options)  # type: ignore[arg-type]
