"""A generated room+task (``RoomSpec``) and its rendering as an ALFRED-domain PDDL problem.

Follows ALFWorld's ``augment_pddl_states.state_to_pddl`` layout: ALFRED-style ids
(``Mug|+00.10|+00.90|-01.20``, ``loc|x|z|rot|hor``) mangled with ALFWorld's character map,
one location per receptacle, the agent on a location with no receptacle, and the goal
taken from the wheel's ``goal_library`` templates.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import alfworld.gen.goal_library as _glib

from .catalog import (ACTION_PROPS, CAN_CONTAIN, DOMAIN_CONSTANT_TYPES, LAMP, OPENABLE,
                      TASK_TYPES)

_MANGLE = {"-": "_minus_", "#": "-", "|": "_bar_", "+": "_plus_", ".": "_dot_", ",": "_comma_"}
_MANGLE_RE = re.compile("|".join(re.escape(k) for k in _MANGLE))


def mangle(text: str) -> str:
    """ALFWorld's ``fix_pddl_str_chars``: simultaneous replacement of ``- # | + . ,``."""
    return _MANGLE_RE.sub(lambda m: _MANGLE[m.group(0)], text)


@dataclass
class Receptacle:
    """A static receptacle at its own location."""
    cls: str        # ALFRED class, e.g. "Cabinet" or "SinkBasin"
    rid: str        # ALFRED id before mangling, e.g. "Sink|+01.00|+00.90|-00.50|SinkBasin"
    loc: str        # "loc|x|z|rot|hor"


@dataclass
class Obj:
    """An object (or the desk lamp) inside ``RoomSpec.receptacles[parent]``."""
    cls: str
    oid: str
    parent: int     # index into RoomSpec.receptacles


@dataclass
class RoomSpec:
    """One generated game: room type, receptacles, objects, task and where the agent starts."""
    room_type: str
    task_type: str                       # short name (catalog.TASK_TYPES key)
    object_target: str
    parent_target: str                   # "" for look_at_obj_in_light
    toggle_target: str                   # "DeskLamp" for look_at_obj_in_light, else ""
    receptacles: list[Receptacle] = field(default_factory=list)
    objects: list[Obj] = field(default_factory=list)
    agent_loc: str = "loc|0|0|0|30"

    def layout_signature(self) -> str:
        """Room layout as a string: room type + sorted receptacle-class counts."""
        counts: dict[str, int] = {}
        for r in self.receptacles:
            counts[r.cls] = counts.get(r.cls, 0) + 1
        return self.room_type + ":" + ",".join(f"{k}x{v}" for k, v in sorted(counts.items()))

    def traj_data(self) -> dict:
        """The ``traj_data.json`` the grammar filler and the handcoded expert read."""
        return {
            "task_type": TASK_TYPES[self.task_type],
            "pddl_params": {"object_target": self.object_target,
                            "parent_target": self.parent_target,
                            "toggle_target": self.toggle_target,
                            "mrecep_target": "", "object_sliced": False},
            "scene": {"room_type": self.room_type, "layout": self.layout_signature(),
                      "generator": "sdar_envs.alfworld"},
        }


def _rtype(cls: str) -> str:
    return f"{cls}Type"


def _objects_block(spec: RoomSpec) -> list[str]:
    otypes = sorted({o.cls for o in spec.objects} | {spec.object_target}
                    | ({spec.toggle_target} - {""}) | set(DOMAIN_CONSTANT_TYPES["otype"]))
    rtypes = sorted({r.cls for r in spec.receptacles} | set(DOMAIN_CONSTANT_TYPES["rtype"])
                    | ({spec.parent_target} - {""}))
    locs = sorted({r.loc for r in spec.receptacles} | {spec.agent_loc})
    lines = ["  agent1 - agent"]
    lines += [f"  {_rtype(t)} - otype" for t in otypes]
    lines += [f"  {_rtype(t)} - rtype" for t in rtypes]
    lines += [f"  {mangle(o.oid)} - object" for o in spec.objects]
    lines += [f"  {mangle(r.rid)} - receptacle" for r in spec.receptacles]
    lines += [f"  {mangle(loc)} - location" for loc in locs]
    return lines


def _object_facts(spec: RoomSpec) -> list[str]:
    facts = []
    for o in spec.objects:
        oid, parent = mangle(o.oid), spec.receptacles[o.parent]
        facts.append(f"(objectType {oid} {_rtype(o.cls)})")
        if o.cls != LAMP:
            facts.append(f"(pickupable {oid})")
        for prop, pred in (("Cleanable", "cleanable"), ("Heatable", "heatable"),
                           ("Coolable", "coolable"), ("Toggleable", "toggleable"),
                           ("Sliceable", "sliceable")):
            if o.cls in ACTION_PROPS[prop]:
                facts.append(f"({pred} {oid})")
        facts.append(f"(inReceptacle {oid} {mangle(parent.rid)})")
        facts.append(f"(objectAtLocation {oid} {mangle(parent.loc)})")
    return facts


def _init_block(spec: RoomSpec) -> list[str]:
    facts = [f"(atLocation agent1 {mangle(spec.agent_loc)})"]
    for r in spec.receptacles:
        rid = mangle(r.rid)
        facts.append(f"(receptacleType {rid} {_rtype(r.cls)})")
        if r.cls in OPENABLE:
            facts.append(f"(openable {rid})")
        facts.append(f"(receptacleAtLocation {rid} {mangle(r.loc)})")
    facts += _object_facts(spec)
    rclasses = sorted({r.cls for r in spec.receptacles})
    oclasses = sorted({o.cls for o in spec.objects})
    facts += [f"(canContain {_rtype(r)} {_rtype(o)})"
              for r in rclasses for o in oclasses if o in CAN_CONTAIN.get(r, ())]
    return ["  " + f for f in facts]


def goal_pddl(spec: RoomSpec) -> str:
    """The wheel's goal template for the task, filled in and mangled (ends the define)."""
    template = _glib.gdict[TASK_TYPES[spec.task_type]]["pddl"]
    filled = template.format(obj=spec.object_target, recep=spec.parent_target,
                             toggle=spec.toggle_target, mrecep="")
    return mangle(filled)


def problem_pddl(spec: RoomSpec, name: str = "plan_sdar") -> str:
    """Full PDDL problem text for ``spec`` in the wheel's ``alfred`` domain."""
    lines = [f"(define (problem {name})", "(:domain alfred)", "(:objects"]
    lines += _objects_block(spec)
    lines += ["  )", "(:init"]
    lines += _init_block(spec)
    lines += ["  )"]
    return "\n".join(lines) + "\n" + goal_pddl(spec)
