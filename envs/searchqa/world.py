"""A generated encyclopedia: people, cities, companies, rivers and countries with linked facts.

Every entity becomes one passage in wiki-18 form, ``"Title"\\ntext``. Links between entities
(a person's birthplace is a city, a company's founder is a person, a city lies on a river)
make two-hop questions answerable only by two searches.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

_SYL = ("ka", "lo", "mer", "vin", "ta", "ros", "el", "dra", "ni", "bel", "cor", "as", "tu", "ven",
        "mi", "sar", "o", "lin", "qua", "the", "zan", "por", "ul", "ge", "fa", "rin", "jo", "mal")
_CITY_SUFFIX = ("ford", "burg", "polis", "haven", "mouth", "stad", "ton", "field", "port", "grad")
_COMPANY_SUFFIX = ("Systems", "Foods", "Motors", "Labs", "Textiles", "Energy", "Media", "Pharma")
_INDUSTRY = {"Systems": "software", "Foods": "food processing", "Motors": "automobiles",
             "Labs": "biotechnology", "Textiles": "textiles", "Energy": "energy",
             "Media": "publishing", "Pharma": "pharmaceuticals"}
_JOBS = ("painter", "chemist", "novelist", "architect", "composer", "physician", "engineer",
         "historian", "sculptor", "astronomer", "economist", "poet")
_CONTINENTS = ("Europe", "Asia", "Africa", "South America", "North America", "Oceania")


@dataclass
class Entity:
    """One encyclopedia entry; ``facts`` maps attribute name -> value (str or int)."""

    kind: str
    name: str
    facts: dict[str, object] = field(default_factory=dict)


@dataclass
class World:
    entities: dict[str, Entity]          # by name
    by_kind: dict[str, list[str]]        # kind -> names, in generation order

    def get(self, name: str) -> Entity:
        return self.entities[name]


class _Names:
    """Unique pronounceable names from a seeded syllable stream."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.used = rng, set()

    def word(self, lo: int = 2, hi: int = 3) -> str:
        return "".join(self.rng.choice(_SYL) for _ in range(self.rng.randint(lo, hi))).capitalize()

    def unique(self, make) -> str:
        for _ in range(1000):
            name = make()
            key = name.lower()
            if key not in self.used:
                self.used.add(key)
                return name
        raise RuntimeError("name space exhausted; lower the entity counts")


def generate_world(seed: int = 0, people: int = 240, cities: int = 80, companies: int = 70,
                   rivers: int = 30, countries: int = 16) -> World:
    """Build a seeded world; counts are numbers of entities per kind (each >= 2)."""
    for field_name, v in (("people", people), ("cities", cities), ("companies", companies),
                          ("rivers", rivers), ("countries", countries)):
        if not isinstance(v, int) or v < 2:
            raise ValueError(f"{field_name}={v!r} is not valid; use an int >= 2")
    rng = random.Random(f"searchqa-world/{seed}")
    names = _Names(rng)
    ents: dict[str, Entity] = {}
    kinds: dict[str, list[str]] = {k: [] for k in ("country", "river", "city", "person", "company")}

    def add(kind: str, name: str, **facts: object) -> None:
        ents[name] = Entity(kind, name, dict(facts))
        kinds[kind].append(name)

    for _ in range(countries):
        add("country", names.unique(lambda: names.word(2, 3) + "ia"),
            continent=rng.choice(_CONTINENTS), population=rng.randrange(2, 200) * 1_000_000)
    for _ in range(rivers):
        add("river", names.unique(lambda: names.word(2, 2)), country=rng.choice(kinds["country"]),
            length_km=rng.randrange(120, 4000))
    for _ in range(cities):
        add("city", names.unique(lambda: names.word(1, 2) + rng.choice(_CITY_SUFFIX)),
            country=rng.choice(kinds["country"]), river=rng.choice(kinds["river"]),
            founded=rng.randrange(800, 1900), population=rng.randrange(20, 3000) * 1000)
    for _ in range(people):
        add("person", names.unique(lambda: f"{names.word(2, 2)} {names.word(2, 3)}"),
            birth_year=rng.randrange(1900, 1995), birthplace=rng.choice(kinds["city"]),
            occupation=rng.choice(_JOBS))
    for _ in range(companies):
        suffix = rng.choice(_COMPANY_SUFFIX)
        add("company", names.unique(lambda: f"{names.word(2, 3)} {suffix}"),
            founder=rng.choice(kinds["person"]), headquarters=rng.choice(kinds["city"]),
            founded=rng.randrange(1920, 2020), industry=_INDUSTRY[suffix])
    for name in kinds["person"]:  # employers after companies exist
        ents[name].facts["employer"] = rng.choice(kinds["company"])
    return World(ents, kinds)


def _num(n: object) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def describe(world: World, e: Entity) -> str:
    """The passage text (no title line) stating every fact of ``e``."""
    f = e.facts
    if e.kind == "country":
        return (f"{e.name} is a country in {f['continent']}. It has a population of about "
                f"{_num(f['population'])} people.")
    if e.kind == "river":
        return (f"The {e.name} is a river in {f['country']}. The {e.name} river is "
                f"{_num(f['length_km'])} km long.")
    if e.kind == "city":
        return (f"{e.name} is a city in {f['country']}, on the banks of the {f['river']} river. "
                f"It was founded in {f['founded']} and has a population of {_num(f['population'])}.")
    if e.kind == "person":
        return (f"{e.name} (born {f['birth_year']}) is a {f['occupation']} born in "
                f"{f['birthplace']}. {e.name.split()[0]} works for {f['employer']}.")
    return (f"{e.name} is a {f['industry']} company founded in {f['founded']} by {f['founder']}. "
            f"Its headquarters are in {f['headquarters']}.")


def passages(world: World) -> list[dict]:
    """wiki-18 style records: {"id", "contents": '"Title"\\ntext'} in a stable order."""
    out = []
    for kind in ("country", "river", "city", "person", "company"):
        for name in world.by_kind[kind]:
            text = describe(world, world.get(name))
            out.append({"id": str(len(out)), "contents": f'"{name}"\n{text}'})
    return out
