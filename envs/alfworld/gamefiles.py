"""Game files on disk: assemble ``game.tw-pddl`` + ``traj_data.json``, check, write atomically.

A game directory holds exactly what ALFWorld's ``alfworld-generate`` writes (and what
``AlfredTWEnv`` loads): ``traj_data.json`` (task type + pddl_params) and ``game.tw-pddl``
(JSON with the wheel's ``alfred.pddl`` domain, the wheel's ``alfred.twl2`` grammar with the
task text filled in, our PDDL problem, ``solvable`` and the expert ``walkthrough``).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import alfworld
from alfworld.agents.utils.misc import add_task_to_grammar

from .catalog import MAX_STEPS
from .engine import engine_guard, open_engine, release_engine, retarget_engine
from .problem import RoomSpec, problem_pddl

GAME_FILE = "game.tw-pddl"
TRAJ_FILE = "traj_data.json"
_TASK_RE = re.compile(r"Your task is to: (.*?)\.?\"", re.S)


@lru_cache(maxsize=1)
def wheel_logic() -> tuple[str, str]:
    """The installed wheel's (alfred.pddl, alfred.twl2) texts."""
    data = Path(alfworld.__file__).parent / "data"
    return (data / "alfred.pddl").read_text(), (data / "alfred.twl2").read_text()


def task_text_of(game_data: dict) -> str:
    """The instruction from a game's grammar ("put some mug on coffeemachine")."""
    match = _TASK_RE.search(game_data.get("grammar", ""))
    if not match:
        raise ValueError("game grammar has no 'Your task is to: ...' rule")
    return match.group(1).strip()


def build_game_data(spec: RoomSpec, rng: random.Random) -> dict:
    """Game JSON (without solvable/walkthrough) for ``spec``; ``rng`` picks the goal template."""
    domain, grammar = wheel_logic()
    with engine_guard(rng):
        filled = add_task_to_grammar(grammar, spec.traj_data())
    return {"pddl_domain": domain, "grammar": filled, "pddl_problem": problem_pddl(spec)}


def expert_rollout(env, max_steps: int = MAX_STEPS) -> tuple[bool, list[str]]:
    """Play the (fixed) handcoded expert on a loaded engine; returns (won, actions).

    Call inside ``engine_guard`` (which supplies the expert's random stream).
    """
    actions: list[str] = []
    state = env.reset()
    while not state["won"] and len(actions) < max_steps:
        action = state["extra.expert_plan"][0]
        state, _, _ = env.step(action)
        actions.append(action)
    return bool(state["won"]), actions


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON to ``path`` via a temp file + rename (readers never see a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def write_game_dir(dest: Path, spec: RoomSpec, seed_key: str) -> tuple[bool, list[str], float]:
    """Assemble, expert-check and atomically publish one game directory at ``dest``.

    Returns (solvable, walkthrough, seconds). The directory is built under a temp name and
    renamed into place, so concurrent workers generating the same game cannot collide.
    Unsolvable games are still published (``solvable: false``) so the caller can skip them.
    """
    start = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    env, published = None, False
    try:
        data = build_game_data(spec, random.Random(f"grammar|{seed_key}"))
        write_json_atomic(tmp / TRAJ_FILE, spec.traj_data())
        write_json_atomic(tmp / GAME_FILE, data)
        with engine_guard(random.Random(f"check|{seed_key}")):
            env = open_engine(str(tmp / GAME_FILE))
            won, walk = expert_rollout(env)
        data.update(solvable=won, walkthrough=walk)
        write_json_atomic(tmp / GAME_FILE, data)
        try:
            os.rename(tmp, dest)
            published = True
        except OSError:  # another process published this game first: theirs is identical
            if not (dest / GAME_FILE).exists():
                raise
    finally:
        if env is not None:
            if published:  # the next game of this file reuses the loaded engine
                retarget_engine(env, str(dest / GAME_FILE))
            release_engine(str(dest / GAME_FILE), env, keep=published)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return won, walk, time.perf_counter() - start


def load_game_data(game_file: str | Path) -> dict:
    """Parsed ``game.tw-pddl``; ValueError naming the file if it is missing or not JSON."""
    try:
        with open(game_file) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"game_file={str(game_file)!r} is not a readable game: {err}") from err
