"""Sample a random ``RoomSpec`` for one task type, keeping train and test apart.

"Unseen" test games: every (task type, object class, target receptacle/lamp) combination and
every room layout (room type + receptacle-class counts) is assigned to exactly one split by
a stable hash, so test games use combinations and layouts that never occur in training.
"""
from __future__ import annotations

import random
import zlib

from .catalog import (CAN_CONTAIN, LAMP, LAMP_HOSTS, NEEDED_APPLIANCE, NEEDED_PROPERTY,
                      ACTION_PROPS, ROOM_OBJECTS, ROOM_RECEPTACLES, ROOM_SIZES, SHORT_TYPES,
                      VALID_ROOMS, RoomSize, receptacle_cap)
from .problem import Obj, Receptacle, RoomSpec

TEST_FRACTION_MOD = 4  # 1 in 4 combinations / layouts is reserved for the test split
_MAX_TRIES = 2000
# How objects are put in receptacles: "uniform" (any receptacle that can hold the class, equally
# likely) or "habitual" (each class has a fixed ranking of the receptacle kinds that can hold it, and
# a home of rank r is HABIT_DECAY**r times as likely as one of rank 0, as mugs in AI2-THOR are
# mostly in cabinets or the coffee machine), and the task's object finds its best-ranked home in
# the room. The ranking is a stable hash of (class, kind), the same in train and test games, so
# train-split statistics predict where a test game's object lies.
PLACEMENTS = ("uniform", "habitual")
HABIT_DECAY = 0.15


def _is_test_key(key: str) -> bool:
    return zlib.crc32(key.encode()) % TEST_FRACTION_MOD == 0


def combo_is_test(task_type: str, obj: str, target: str) -> bool:
    """Whether the (task type, object class, receptacle or lamp class) combo is test-only."""
    return _is_test_key(f"combo|{task_type}|{obj}|{target}")


def layout_is_test(signature: str) -> bool:
    """Whether a room layout signature (``RoomSpec.layout_signature``) is test-only."""
    return _is_test_key(f"layout|{signature}")


def _combo_candidates(task_type: str, room: str) -> list[tuple[str, str]]:
    """All (object class, parent class) pairs valid for ``task_type`` in ``room``."""
    objs = list(ROOM_OBJECTS[room])
    if task_type in NEEDED_PROPERTY:
        objs = [o for o in objs if o in ACTION_PROPS[NEEDED_PROPERTY[task_type]]]
    if task_type == "look_at_obj_in_light":
        return [(o, "") for o in objs]
    banned = {NEEDED_APPLIANCE.get(task_type), "BathtubBasin" if
              task_type == "pick_clean_then_place" else None}
    return [(o, r) for o in objs for r in ROOM_RECEPTACLES[room]
            if o in CAN_CONTAIN.get(r, ()) and r not in banned]


def _sample_receptacles(rng: random.Random, room: str, required: list[str],
                        size: RoomSize) -> list[str]:
    n = rng.randint(size.min_receptacles, size.max_receptacles)
    classes = list(required)
    pool = list(ROOM_RECEPTACLES[room])
    while len(classes) < n:
        options = [c for c in pool if classes.count(c) < receptacle_cap(c, size)]
        if not options:
            break
        classes.append(rng.choice(options))
    return classes


def _coord(rng: random.Random) -> str:
    return "|".join(f"{rng.uniform(-3.0, 3.0):+06.2f}" for _ in range(3))


def _recep_id(cls: str, coord: str) -> str:
    if cls == "SinkBasin":
        return f"Sink|{coord}|SinkBasin"   # Demangler appends "basin" to ids containing it
    if cls == "BathtubBasin":
        return f"Bathtub|{coord}|BathtubBasin"
    return f"{cls}|{coord}"


def habit_rank(cls: str, kind: str) -> int:
    """Rank of receptacle ``kind`` among the kinds that can hold object ``cls`` (0 = its habitual
    home) under ``placement="habitual"``; a stable hash, so every split shares it."""
    kinds = sorted((k for k, objs in CAN_CONTAIN.items() if cls in objs),
                   key=lambda k: (zlib.crc32(f"habit|{cls}|{k}".encode()), k))
    return kinds.index(kind)


def _place(rng: random.Random, spec: RoomSpec, cls: str, avoid: str, used: set[str],
           placement: str = "uniform") -> bool:
    homes = [i for i, r in enumerate(spec.receptacles)
             if cls in CAN_CONTAIN.get(r.cls, ()) and r.cls != avoid]
    if not homes:
        return False
    oid = f"{cls}|{_coord(rng)}"
    while oid in used:
        oid = f"{cls}|{_coord(rng)}"
    used.add(oid)
    if placement == "habitual":
        weights = [HABIT_DECAY ** habit_rank(cls, spec.receptacles[i].cls) for i in homes]
        home = rng.choices(homes, weights=weights)[0]
    else:
        home = rng.choice(homes)
    spec.objects.append(Obj(cls, oid, home))
    return True


def _build_room(rng: random.Random, spec: RoomSpec, classes: list[str]) -> None:
    used: set[str] = set()
    cells = rng.sample([(x, z) for x in range(-10, 11) for z in range(-10, 11)], len(classes) + 1)
    for cls, (x, z) in zip(classes, cells):
        rid = _recep_id(cls, _coord(rng))
        while rid in used:
            rid = _recep_id(cls, _coord(rng))
        used.add(rid)
        loc = f"loc|{x}|{z}|{rng.choice((0, 90, 180, 270))}|{rng.choice((0, 30, 60))}"
        spec.receptacles.append(Receptacle(cls, rid, loc))
    x, z = cells[-1]
    spec.agent_loc = f"loc|{x}|{z}|{rng.choice((0, 90, 180, 270))}|30"


def _populate(rng: random.Random, spec: RoomSpec, size: RoomSize, placement: str) -> bool:
    """Place targets, the lamp and distractors; False if the targets have no legal home."""
    used: set[str] = set()
    n_targets = rng.randint(2, 3) if spec.task_type == "pick_two_obj" else 1
    for _ in range(n_targets):
        if not _place(rng, spec, spec.object_target, spec.parent_target, used, placement):
            return False
    if spec.toggle_target:
        hosts = [i for i, r in enumerate(spec.receptacles) if r.cls in LAMP_HOSTS]
        spec.objects.append(Obj(LAMP, f"{LAMP}|{_coord(rng)}", rng.choice(hosts)))
    n_total = rng.randint(size.min_objects, size.max_objects)
    distractors = [o for o in ROOM_OBJECTS[spec.room_type] if o != spec.object_target]
    tries = 0
    while len(spec.objects) < n_total and tries < 10 * size.max_objects:
        tries += 1
        _place(rng, spec, rng.choice(distractors), "", used, placement)
    return True


def sample_spec(rng: random.Random, task_type: str, room_size: str = "small",
                test: bool = False, placement: str = "uniform") -> RoomSpec:
    """Draw a valid room + task of ``task_type`` whose combo/layout belong to the split.

    ``placement``: "uniform" | "habitual" (see ``PLACEMENTS``). Raises ValueError for an unknown
    task type, room size or placement; RuntimeError if no valid spec is found (a catalogue bug,
    not bad luck: the search space is large).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r} is not valid; use one of {list(PLACEMENTS)}")
    if task_type not in SHORT_TYPES:
        raise ValueError(f"task_type={task_type!r} is not valid; use one of {SHORT_TYPES}")
    if room_size not in ROOM_SIZES:
        raise ValueError(f"room_size={room_size!r} is not valid; use one of {sorted(ROOM_SIZES)}")
    size = ROOM_SIZES[room_size]
    for _ in range(_MAX_TRIES):
        room = rng.choice(VALID_ROOMS[task_type])
        combos = _combo_candidates(task_type, room)
        obj = rng.choice(sorted({o for o, _ in combos}))  # object first, so receptacles that
        parent = rng.choice([r for o, r in combos if o == obj])  # hold anything don't dominate
        toggle = LAMP if task_type == "look_at_obj_in_light" else ""
        if combo_is_test(task_type, obj, parent or toggle) != test:
            continue
        required = [c for c in (parent, NEEDED_APPLIANCE.get(task_type)) if c]
        if placement == "habitual":  # the target's habitual home is in its room, as a mug's cabinet
            homes = [r for r in ROOM_RECEPTACLES[room] if obj in CAN_CONTAIN.get(r, ()) and r != parent]
            best = min(homes, key=lambda r: habit_rank(obj, r)) if homes else None
            if best and best not in required:
                required.append(best)
        if toggle:
            required.append(rng.choice([h for h in LAMP_HOSTS if h in ROOM_RECEPTACLES[room]]))
        spec = RoomSpec(room, task_type, obj, parent, toggle)
        classes = _sample_receptacles(rng, room, required, size)
        rng.shuffle(classes)
        _build_room(rng, spec, classes)
        if layout_is_test(spec.layout_signature()) != test:
            continue
        if _populate(rng, spec, size, placement):
            return spec
    raise RuntimeError(f"no valid {task_type} room found in {_MAX_TRIES} tries")
