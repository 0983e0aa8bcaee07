"""The real ALFWorld text engine: TextWorld ``PddlEnv`` + ALFWorld's wrappers, made safe to reuse.

What this module adds around the upstream engine (and why):

* ``engine_guard``: every engine call runs with ``sys.argv`` saved/restored (Fast Downward's
  translator overwrites it), with the game's own ``random.Random`` state swapped into the
  global ``random`` module (the handcoded expert and the goal-text filler call the global
  ``random``), and with pure parsers memoized: ``fast_downward.pddl2sas`` (``reset``
  translates the same problem twice per call; memoizing makes re-resets >10x faster), the
  game's parsed ``GameLogic`` (shared by the group copies of one game), and
  the tatsu parses of grammar templates and conjunctive queries that TextWorld repeats for
  every admissible command on every step; and the grammar's per-symbol context copies
  made shallow. Together ~10x faster steps; outputs are unchanged (a test compares
  transcripts with and without these patches).
* ``FixedAlfredExpert``: ALFWorld's handcoded expert with the move->put state-tracking fix
  (upstream renamed ``put X in/on Y`` to ``move X to Y`` but the expert's state tracker still
  tests ``"put" in last_action``, so it never empties its inventory and loops on pick_two).
  It also never raises: an expert failure yields ``"look"``. Optionally it searches for an
  object by a placement prior (``search_prior``) instead of in room order.
* A pool of loaded engines (each owns a private copy of ``libdownward.so``, 33 MB, whose
  global state is per copy) so discarded games hand their engine to the next game of the
  same file instead of leaking a dlopen'ed library.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import random
import sys
from collections import OrderedDict
from typing import Iterator

import fast_downward
import textworld
from alfworld.agents.environment.alfred_tw_env import (AlfredDemangler, AlfredExpert,
                                                        AlfredExpertType, AlfredInfos)
from textworld.envs.pddl import PddlEnv
from textworld.envs.pddl import logic as _pddl_logic
from textworld.envs.pddl import textgen as _textgen
from textworld.logic import Rule

log = logging.getLogger("sdar_envs.alfworld")

_ORIG_PDDL2SAS = fast_downward.pddl2sas
_SAS_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
SAS_CACHE_SIZE = 256


_ORIG_GAME_LOGIC = _pddl_logic.GameLogic
_LOGIC_CACHE: "OrderedDict[tuple, object]" = OrderedDict()
LOGIC_CACHE_SIZE = 64


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _lru_get(cache: OrderedDict, key: tuple, size: int, build):
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    cache[key] = hit = build()
    if len(cache) > size:
        cache.popitem(last=False)
    return hit


def _cached_pddl2sas(domain: str, problem: str, verbose: bool = False, optimize: bool = False):
    return _lru_get(_SAS_CACHE, (_digest(domain), _digest(problem), bool(optimize)), SAS_CACHE_SIZE,
                    lambda: _ORIG_PDDL2SAS(domain, problem, verbose=verbose, optimize=optimize))


def _cached_game_logic(domain: str, grammar: str):
    # Group copies of a game share one parsed GameLogic: play only reads it (PddlState's
    # re-adding of the domain's types is a no-op after the first time).
    return _lru_get(_LOGIC_CACHE, (_digest(domain), _digest(grammar)), LOGIC_CACHE_SIZE,
                    lambda: _ORIG_GAME_LOGIC(domain=domain, grammar=grammar))


_ORIG_PARSE = _textgen._parse_and_convert
_PARSE_CACHE: dict[tuple, list] = {}
_ORIG_QUERY = Rule.__dict__["parse_conjunctive_query"]
_QUERY_CACHE: dict[str, Rule] = {}
PARSE_CACHE_SIZE = 20000


def _cached_parse_and_convert(text: str, rule_name: str = "symbols", **kwargs):
    # Symbols get their context assigned after parsing, so hand out a fresh copy.
    key = (text, rule_name)
    hit = _PARSE_CACHE.get(key)
    if hit is None:
        hit = _ORIG_PARSE(text, rule_name=rule_name, **kwargs)
        if len(_PARSE_CACHE) < PARSE_CACHE_SIZE:
            _PARSE_CACHE[key] = hit
    return copy.deepcopy(hit)


def _cached_query(cls, expr: str) -> Rule:
    # Rules are only read (matched against the state), so one shared instance is safe.
    hit = _QUERY_CACHE.get(expr)
    if hit is None:
        hit = _ORIG_QUERY.__func__(cls, expr)
        if len(_QUERY_CACHE) < PARSE_CACHE_SIZE:
            _QUERY_CACHE[expr] = hit
    return hit


_ORIG_COPY_CONTEXT = _textgen.copy_context
_ORIG_SYMBOL_COPY = _textgen.Symbol.copy


def _shallow_copy_context(context: dict) -> dict:
    # Upstream deep-copies the variable/mapping dicts for every symbol (most of the step
    # time); their values (EntityInfo, Variable) are only read during derivation, and the
    # dicts themselves are copied, so a shallow copy derives the same text.
    return {"state": context["state"], "facts": context["facts"],
            "variables": dict(context["variables"]), "mapping": dict(context["mapping"]),
            "entity_infos": context["entity_infos"]}


def _symbol_copy(self, context: dict):
    saved, self.context = self.context, {}
    try:
        clone = copy.deepcopy(self)
    finally:
        self.context = saved
    clone.context = _shallow_copy_context(context)
    return clone


MEMOIZE = True  # tests flip this to compare against the unpatched engine


@contextlib.contextmanager
def engine_guard(rng: random.Random | None = None) -> Iterator[None]:
    """Run engine code with argv restored, parsers memoized and ``rng`` as global random."""
    argv_obj, saved_argv = sys.argv, list(sys.argv)
    saved_state = random.getstate() if rng is not None else None
    if rng is not None:
        random.setstate(rng.getstate())
    if MEMOIZE:
        fast_downward.pddl2sas = _cached_pddl2sas
        _pddl_logic.GameLogic = _cached_game_logic
        _textgen._parse_and_convert = _cached_parse_and_convert
        Rule.parse_conjunctive_query = classmethod(_cached_query)
        _textgen.copy_context = _shallow_copy_context
        _textgen.Symbol.copy = _symbol_copy
    try:
        yield
    finally:
        fast_downward.pddl2sas = _ORIG_PDDL2SAS
        _pddl_logic.GameLogic = _ORIG_GAME_LOGIC
        _textgen._parse_and_convert = _ORIG_PARSE
        Rule.parse_conjunctive_query = _ORIG_QUERY
        _textgen.copy_context = _ORIG_COPY_CONTEXT
        _textgen.Symbol.copy = _ORIG_SYMBOL_COPY
        if rng is not None:
            rng.setstate(random.getstate())
            random.setstate(saved_state)
        argv_obj[:] = saved_argv  # the translator rebinds sys.argv; restore list and binding
        sys.argv = argv_obj


def _as_put(last_action: str) -> str:
    return "put " + last_action[5:] if last_action.startswith("move ") else last_action


def _use_search_prior(policy, kinds_by_object: dict[str, list[str]]) -> None:
    """Make ``policy`` (a handcoded-expert policy) search for objects by a placement prior.

    The policy visits ``receptacles_to_check`` from its end, so the search list ends with the
    ranked receptacles reversed: visit order = the ranked kinds (most frequent first; the
    instances of one kind in the handcoded expert's order, i.e. reversed room listing, which
    lists "drawer 2, drawer 1": drawer 1 first), then the handcoded expert's other candidates
    in its own order, then (added by the policy) every other receptacle.
    """
    handcoded = policy.get_list_of_receptacles_to_search_for_object_cls
    of_type = policy.get_list_of_receptacles_of_type

    def search(obj_cls: str) -> list[str]:
        ranked = [name for kind in kinds_by_object.get(obj_cls, ())
                  for name in reversed(policy.receptacles) if policy.receptacles[name] == kind]
        return [r for r in handcoded(obj_cls) if r not in ranked] + ranked[::-1]

    def receptacles_of_type(cls: str) -> list[str]:
        # ALFRED also counts cup, mug, bowl, pan, plate and pot as receptacles, so the policy
        # looks one up by type; none is listed in the room, and upstream then searches every
        # receptacle in room order. Search those classes by the prior too.
        found = of_type(cls)
        if found or cls not in kinds_by_object:
            return found
        ordered = search(cls)
        return [r for r in policy.receptacles if r not in ordered] + ordered

    policy.get_list_of_receptacles_to_search_for_object_cls = search
    policy.get_list_of_receptacles_of_type = receptacles_of_type


class FixedAlfredExpert(AlfredExpert):
    """ALFWorld's handcoded expert with the move->put fix; never raises from the expert.

    ``search_prior`` (object class -> receptacle kinds, most frequent first; None = ALFWorld's
    room-order search) is read at every ``reset``: the owner sets it before each episode, so a
    pooled engine never carries one game's search order into another's.
    """

    def __init__(self, env=None) -> None:
        super().__init__(env=env, expert_type=AlfredExpertType.HANDCODED)
        self.expert_error: str = ""
        self.search_prior: dict[str, list[str]] | None = None

    def reset(self):
        state = super().reset()
        policy = self._handcoded_expert.policy
        track = policy.update_state_tracking
        policy.update_state_tracking = lambda gs, last: track(gs, _as_put(last))
        if self.search_prior is not None:
            _use_search_prior(policy, self.search_prior)
        self.expert_error = ""
        return state

    def step(self, command: str):
        admissible = self.state["admissible_commands"] if self.state else []
        self.state, reward, done = textworld.core.Wrapper.step(self, command)
        # The expert tracks the trajectory from the commands; an inadmissible command
        # changed nothing, so it is shown to the expert as a no-op "look".
        self.prev_command = str(command) if str(command).strip() in admissible else "look"
        self._gather_infos()
        return self.state, reward, done

    def _gather_infos(self) -> None:
        try:
            super()._gather_infos()
        except Exception as err:  # expert state broke on an odd trajectory: fall back
            self.state["extra.expert_plan"] = ["look"]
            if not self.expert_error:
                self.expert_error = f"{type(err).__name__}: {err}"
                log.debug("handcoded expert failed (%s); falling back to 'look'", err)


class _PooledPddlEnv(PddlEnv):
    """``PddlEnv`` whose downward library comes from (and returns to) a process pool."""

    def __init__(self, infos: textworld.EnvInfos) -> None:
        textworld.Environment.__init__(self, infos)
        self.downward_lib = _LIBS.pop() if _LIBS else fast_downward.load_lib()


_LIBS: list = []
_IDLE: "OrderedDict[int, tuple[str, textworld.core.Wrapper]]" = OrderedDict()
IDLE_ENGINES = 32


def _request_infos() -> textworld.EnvInfos:
    return textworld.EnvInfos(won=True, admissible_commands=True, facts=True,
                              extras=["gamefile", "expert_plan"])


def open_engine(game_file: str) -> textworld.core.Wrapper:
    """A loaded engine for ``game_file`` (reused from the idle pool when possible).

    Call inside ``engine_guard``. The engine is the wrapper chain
    FixedAlfredExpert(AlfredInfos(AlfredDemangler(PddlEnv))).
    """
    for key, (path, env) in _IDLE.items():
        if path == game_file:
            del _IDLE[key]
            return env
    env = FixedAlfredExpert(AlfredInfos(AlfredDemangler(_PooledPddlEnv(_request_infos()))))
    env.load(game_file)
    return env


def retarget_engine(env: textworld.core.Wrapper, game_file: str) -> None:
    """Point a loaded engine at ``game_file`` after its directory was renamed (the expert
    re-reads ``traj_data.json`` next to the game file on every reset)."""
    env.gamefile = game_file
    infos = env._wrapped_env
    if isinstance(infos, AlfredInfos):
        infos._gamefile = game_file


def _recycle_lib(env: textworld.core.Wrapper) -> None:
    lib = getattr(env.unwrapped, "downward_lib", None)
    if lib is None:
        return
    if len(_LIBS) < IDLE_ENGINES:
        _LIBS.append(lib)
    else:
        fast_downward.close_lib(lib)


def release_engine(game_file: str, env: textworld.core.Wrapper, keep: bool = True) -> None:
    """Hand an engine back: kept idle for the next game of ``game_file`` (``keep``) or
    dismantled with its library recycled. Evicts the oldest idle engines beyond the cap."""
    if not keep:
        _recycle_lib(env)
        return
    _IDLE[id(env)] = (game_file, env)
    while len(_IDLE) > IDLE_ENGINES:
        _, (_, old) = _IDLE.popitem(last=False)
        _recycle_lib(old)
