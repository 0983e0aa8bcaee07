"""Static catalogue for generated ALFWorld rooms: task types, room pools and size presets.

Object/receptacle class names are ALFRED's CamelCase classes; every class used here is
checked against the installed wheel's ``alfworld.gen.constants`` at import time so a
wheel upgrade that renames a class fails loudly instead of producing unloadable games.
"""
from __future__ import annotations

from dataclasses import dataclass

import alfworld.gen.constants as _C

# Short task-type names used in task ids -> ALFWorld's full task-type names.
TASK_TYPES: dict[str, str] = {
    "pick_and_place": "pick_and_place_simple",
    "look_at_obj_in_light": "look_at_obj_in_light",
    "pick_clean_then_place": "pick_clean_then_place_in_recep",
    "pick_heat_then_place": "pick_heat_then_place_in_recep",
    "pick_cool_then_place": "pick_cool_then_place_in_recep",
    "pick_two_obj": "pick_two_obj_and_place",
}
FULL_TO_SHORT: dict[str, str] = {v: k for k, v in TASK_TYPES.items()}
SHORT_TYPES: tuple[str, ...] = tuple(TASK_TYPES)

MAX_STEPS = 50

# Receptacle class -> max instances in one room (1 for appliances and big furniture).
_RECEP_CAP = {"Cabinet": 6, "Drawer": 6, "Shelf": 4, "CounterTop": 2, "StoveBurner": 4,
              "SideTable": 2, "Dresser": 1, "ArmChair": 2}

ROOM_RECEPTACLES: dict[str, tuple[str, ...]] = {
    "Kitchen": ("Cabinet", "CounterTop", "Drawer", "Fridge", "Microwave", "SinkBasin",
                "StoveBurner", "CoffeeMachine", "DiningTable", "GarbageCan", "Toaster", "Shelf"),
    "LivingRoom": ("Sofa", "ArmChair", "CoffeeTable", "SideTable", "TVStand", "Drawer", "Shelf",
                   "Cabinet", "GarbageCan", "Dresser", "DiningTable", "Ottoman", "Safe"),
    "Bedroom": ("Bed", "Desk", "Drawer", "Dresser", "SideTable", "Shelf", "GarbageCan",
                "LaundryHamper", "Safe", "ArmChair"),
    "Bathroom": ("Toilet", "SinkBasin", "BathtubBasin", "Cabinet", "CounterTop", "Drawer",
                 "GarbageCan", "HandTowelHolder", "TowelHolder", "ToiletPaperHanger", "Shelf",
                 "Dresser"),
}

ROOM_OBJECTS: dict[str, tuple[str, ...]] = {
    "Kitchen": ("Apple", "Bread", "ButterKnife", "Cup", "DishSponge", "Egg", "Fork", "Kettle",
                "Knife", "Ladle", "Lettuce", "Mug", "Pan", "PepperShaker", "Plate", "Pot",
                "Potato", "SaltShaker", "SoapBottle", "Spatula", "Spoon", "Tomato",
                "WineBottle", "Bowl"),
    "LivingRoom": ("Book", "CellPhone", "CreditCard", "KeyChain", "Laptop", "Newspaper",
                   "Pillow", "RemoteControl", "Statue", "Vase", "Watch", "Plate", "Candle",
                   "TissueBox", "WateringCan"),
    "Bedroom": ("AlarmClock", "BaseballBat", "BasketBall", "Book", "CD", "CellPhone",
                "CreditCard", "KeyChain", "Laptop", "Mug", "Pen", "Pencil", "Pillow",
                "TennisRacket", "Watch", "Cloth", "Bowl"),
    "Bathroom": ("Candle", "Cloth", "DishSponge", "HandTowel", "Plunger",
                 "SoapBar", "SoapBottle", "SprayBottle", "ToiletPaper", "Towel", "TissueBox"),
}

# Receptacles the lamp of look_at_obj_in_light may stand on (ALFRED's DeskLamp hosts).
LAMP_HOSTS: tuple[str, ...] = ("Desk", "SideTable", "Dresser")
LAMP = "DeskLamp"
# Appliance each state-change task needs in the room.
NEEDED_APPLIANCE = {"pick_clean_then_place": "SinkBasin", "pick_heat_then_place": "Microwave",
                    "pick_cool_then_place": "Fridge"}
# Object property each state-change task needs (constants.VAL_ACTION_OBJECTS key).
NEEDED_PROPERTY = {"pick_clean_then_place": "Cleanable", "pick_heat_then_place": "Heatable",
                   "pick_cool_then_place": "Coolable"}
# Room types where ALFRED allows each task (constants.GOALS_VALID).
VALID_ROOMS: dict[str, tuple[str, ...]] = {
    short: tuple(sorted(_C.GOALS_VALID[full])) for short, full in TASK_TYPES.items()}

OPENABLE: frozenset[str] = frozenset(_C.OPENABLE_CLASS_LIST)
CAN_CONTAIN: dict[str, frozenset[str]] = {
    r: frozenset(o for o in objs if not o.endswith("Sliced"))
    for r, objs in _C.VAL_RECEPTACLE_OBJECTS.items()}
ACTION_PROPS: dict[str, frozenset[str]] = {
    k: frozenset(v) for k, v in _C.VAL_ACTION_OBJECTS.items()}
# Classes whose <Class>Type the wheel's alfred.pddl uses as bare constants; always declared.
DOMAIN_CONSTANT_TYPES = {"otype": ("Knife", "ButterKnife"),
                         "rtype": ("SinkBasin", "Microwave", "Fridge")}


@dataclass(frozen=True)
class RoomSize:
    """Bounds on receptacle and object counts for one room-size preset."""
    min_receptacles: int
    max_receptacles: int
    min_objects: int
    max_objects: int
    cap_scale: int  # multiplies _RECEP_CAP so big rooms can hold more cabinets/drawers


ROOM_SIZES: dict[str, RoomSize] = {
    "small": RoomSize(6, 12, 3, 8, 1),
    "alfworld": RoomSize(20, 32, 20, 45, 3),
}


def receptacle_cap(cls: str, size: RoomSize) -> int:
    """Max instances of receptacle class ``cls`` in a room of preset ``size``."""
    return _RECEP_CAP.get(cls, 1) * (size.cap_scale if cls in _RECEP_CAP else 1)


def _check_classes() -> None:
    known = set(_C.OBJECTS)
    used = {c for pool in ROOM_OBJECTS.values() for c in pool}
    used |= {c for pool in ROOM_RECEPTACLES.values() for c in pool} | set(LAMP_HOSTS) | {LAMP}
    missing = sorted(used - known)
    if missing:
        raise RuntimeError(f"alfworld wheel lacks classes {missing}; catalog.py is out of date")
    for room, receps in ROOM_RECEPTACLES.items():
        no_home = [o for o in ROOM_OBJECTS[room]
                   if not any(o in CAN_CONTAIN.get(r, ()) for r in receps)]
        if no_home:
            raise RuntimeError(f"{room}: objects {no_home} fit no receptacle of the room")


_check_classes()
