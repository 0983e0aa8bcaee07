"""The generator lexicon of the offline WebShop: categories, product types, words.

Written for this project. Each product type gives the catalogue generator a search query
(WebShop's ``query`` field), a category path, the attributes a product of that type may have,
and its customization options. ``NOUNS`` stands in for spaCy's noun tagger in the type reward:
a title's nouns are its tokens found in this set.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProductType:
    """One kind of product, e.g. a shampoo.

    query: WebShop's ``query`` (the search that "scraped" the product), also the type noun phrase.
    path: category levels below the top-level department, joined by WebShop's " › ".
    attrs: attribute phrases a product may carry (goal attributes are drawn from these).
    options: option name -> pool of values (a product offers a subset of each pool).
    tails: phrases a title may end with ("for men and women"); their nouns are in NOUNS.
    """

    query: str
    path: tuple[str, ...]
    attrs: tuple[str, ...]
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)
    tails: tuple[str, ...] = ()


DEPARTMENTS: dict[str, str] = {
    "beauty": "Beauty & Personal Care",
    "electronics": "Electronics",
    "fashion": "Clothing, Shoes & Jewelry",
    "food": "Grocery & Gourmet Food",
    "furniture": "Home & Kitchen",
}

_COLORS_A = ("black", "white", "navy blue", "grey", "red", "beige", "olive green", "pink")
_COLORS_B = ("walnut", "espresso", "natural oak", "white", "black", "grey", "teal")
_APPAREL_SIZES = ("x-small", "small", "medium", "large", "x-large", "xx-large")

PRODUCT_TYPES: dict[str, tuple[ProductType, ...]] = {
    "beauty": (
        ProductType("shampoo", ("Hair Care", "Shampoo & Conditioner", "Shampoos"),
                    ("sulfate free", "paraben free", "dry hair", "natural ingredients",
                     "color treated hair", "hair growth", "cruelty free", "damaged hair"),
                    {"size": ("8 fl oz", "16 fl oz", "33.8 fl oz"),
                     "scent": ("lavender", "coconut", "argan oil", "tea tree", "unscented")},
                    ("for men and women", "with keratin", "salon formula")),
        ProductType("hair extension", ("Hair Care", "Hair Extensions, Wigs & Accessories"),
                    ("natural looking", "easy to use", "high quality", "heat resistant",
                     "long lasting", "synthetic hair", "human hair"),
                    {"color": ("jet black", "dark brown", "honey blonde", "auburn", "platinum"),
                     "size": ("16 inch", "20 inch", "24 inch")},
                    ("clip in", "with wefts")),
        ProductType("lipstick", ("Makeup", "Lips", "Lipstick"),
                    ("long lasting", "cruelty free", "highly pigmented", "matte finish",
                     "vegan formula", "moisturizing", "travel size"),
                    {"color": ("ruby red", "nude", "berry", "coral", "mauve", "plum")},
                    ("for women", "with vitamin e")),
        ProductType("face serum", ("Skin Care", "Face", "Serums"),
                    ("hyaluronic acid", "fine lines", "dark spots", "sensitive skin",
                     "oil free", "fragrance free", "anti aging", "dermatologist tested"),
                    {"size": ("1 fl oz", "2 fl oz"), "item package quantity": ("1", "2", "3")},
                    ("with vitamin c", "for face and neck")),
        ProductType("nail polish", ("Foot, Hand & Nail Care", "Nail Art & Polish"),
                    ("quick drying", "non toxic", "long lasting", "high gloss", "chip resistant",
                     "easy to apply"),
                    {"color": ("cherry red", "baby pink", "nude beige", "midnight blue", "gold")},
                    ("set", "for manicure")),
        ProductType("toothbrush", ("Oral Care", "Toothbrushes & Accessories"),
                    ("soft bristles", "sensitive teeth", "travel case", "rechargeable battery",
                     "fresh breath", "easy to clean"),
                    {"color": ("blue", "white", "black", "pink"), "style": ("manual", "electric")},
                    ("for adults", "with timer")),
    ),
    "electronics": (
        ProductType("bluetooth headphones", ("Headphones, Earbuds & Accessories", "Headphones"),
                    ("noise cancelling", "wireless charging", "long battery life", "hands free",
                     "high fidelity", "water resistant", "built in microphone", "fast charging"),
                    {"color": ("black", "white", "midnight blue", "rose gold")},
                    ("over ear", "with microphone")),
        ProductType("phone case", ("Cell Phones & Accessories", "Cases, Holsters & Sleeves"),
                    ("shock absorbing", "wireless charging", "slim fit", "easy install",
                     "heavy duty", "scratch resistant", "kickstand"),
                    {"color": ("clear", "black", "lavender", "dark green", "red"),
                     "size": ("iphone 13", "iphone 14", "galaxy s22", "pixel 7")},
                    ("for women", "with screen protector")),
        ProductType("usb cable", ("Computers & Accessories", "Cables", "USB Cables"),
                    ("fast charging", "high speed", "gold plated", "durable nylon", "usb c",
                     "data transfer", "plug and play"),
                    {"size": ("3 ft", "6 ft", "10 ft"), "item package quantity": ("1", "2", "3")},
                    ("braided cord", "with adapter")),
        ProductType("power bank", ("Cell Phones & Accessories", "Chargers & Power Adapters"),
                    ("fast charging", "high capacity", "led display", "usb c", "compact size",
                     "dual output", "travel friendly"),
                    {"color": ("black", "white", "blue"),
                     "capacity": ("10000mah", "20000mah", "26800mah")},
                    ("portable charger", "for phones")),
        ProductType("security camera", ("Camera & Photo", "Surveillance & Security Cameras"),
                    ("night vision", "motion detection", "two way audio", "easy install",
                     "weatherproof", "cloud storage", "1080p hd"),
                    {"color": ("white", "black"), "item package quantity": ("1", "2", "4")},
                    ("for home", "with siren")),
        ProductType("wireless mouse", ("Computers & Accessories", "Keyboards, Mice & Accessories"),
                    ("ergonomic design", "silent click", "long battery life", "plug and play",
                     "rechargeable battery", "adjustable dpi"),
                    {"color": ("black", "grey", "white", "pink")},
                    ("for laptop", "with usb receiver")),
    ),
    "fashion": (
        ProductType("women's t-shirt", ("Women", "Clothing", "Tops, Tees & Blouses"),
                    ("machine wash", "short sleeve", "soft cotton", "loose fit", "crew neck",
                     "button closure", "quick dry"),
                    {"color": _COLORS_A, "size": _APPAREL_SIZES},
                    ("casual summer top", "with pocket")),
        ProductType("men's running shoes", ("Men", "Shoes", "Athletic", "Running"),
                    ("non slip", "rubber sole", "lace up", "arch support", "breathable mesh",
                     "lightweight design", "memory foam"),
                    {"color": ("black white", "grey", "navy", "red"),
                     "size": ("8", "9", "9.5", "10", "11", "12")},
                    ("walking sneakers", "for gym")),
        ProductType("leather belt", ("Men", "Accessories", "Belts"),
                    ("genuine leather", "adjustable fit", "easy clean", "alloy buckle",
                     "gift box", "classic design"),
                    {"color": ("brown", "black", "tan"), "size": ("32", "34", "36", "38")},
                    ("for jeans", "with ratchet buckle")),
        ProductType("winter jacket", ("Women", "Clothing", "Coats, Jackets & Vests"),
                    ("water resistant", "zipper closure", "hooded", "warm fleece", "long sleeve",
                     "machine wash", "windproof"),
                    {"color": _COLORS_A[:6], "size": _APPAREL_SIZES[1:5]},
                    ("puffer coat", "with faux fur")),
        ProductType("yoga pants", ("Women", "Clothing", "Active", "Leggings"),
                    ("high waist", "tummy control", "four way stretch", "moisture wicking",
                     "squat proof", "side pockets"),
                    {"color": ("black", "charcoal", "wine red", "dusty blue"),
                     "size": _APPAREL_SIZES[:5]},
                    ("workout leggings", "for women")),
        ProductType("wool socks", ("Men", "Clothing", "Socks"),
                    ("moisture wicking", "cushioned sole", "warm wool", "machine wash",
                     "odor resistant", "crew length"),
                    {"color": ("assorted", "grey", "black", "brown"),
                     "size": ("shoe size 6-9", "shoe size 9-12"),
                     "item package quantity": ("3 pairs", "6 pairs")},
                    ("hiking socks", "for cold weather")),
    ),
    "food": (
        ProductType("protein bar", ("Snack Foods", "Bars", "Protein Bars"),
                    ("gluten free", "low sugar", "high protein", "non gmo", "keto friendly",
                     "plant based", "individually wrapped"),
                    {"flavor": ("chocolate peanut butter", "cookies and cream", "vanilla almond",
                                "salted caramel"),
                     "size": ("12 count", "24 count")},
                    ("snack", "for energy")),
        ProductType("green tea", ("Beverages", "Tea", "Green Tea"),
                    ("caffeine free", "usda organic", "non gmo", "zero calorie",
                     "naturally sweetened", "individually wrapped", "gluten free"),
                    {"flavor": ("jasmine", "matcha", "honey ginger", "lemon mint"),
                     "size": ("20 count", "40 count", "100 count")},
                    ("tea bags", "loose leaf")),
        ProductType("dark chocolate", ("Candy & Chocolate", "Chocolate Bars"),
                    ("dairy free", "low sugar", "fair trade", "gluten free", "usda organic",
                     "high cocoa", "gift box"),
                    {"flavor": ("sea salt", "almond", "orange", "mint"),
                     "size": ("3.5 ounce", "pack of 6", "pack of 12")},
                    ("bar", "for baking")),
        ProductType("coffee beans", ("Beverages", "Coffee", "Whole Coffee Beans"),
                    ("medium roast", "dark roast", "fair trade", "usda organic",
                     "single origin", "low acid", "resealable bag"),
                    {"size": ("12 ounce", "2 pound", "5 pound"),
                     "flavor": ("classic", "hazelnut", "french vanilla")},
                    ("whole bean", "arabica blend")),
        ProductType("beef jerky", ("Snack Foods", "Jerky & Dried Meats"),
                    ("high protein", "low fat", "gluten free", "keto friendly",
                     "no preservatives", "ready to eat", "grass fed"),
                    {"flavor": ("original", "teriyaki", "black pepper", "sweet and spicy"),
                     "size": ("3.25 ounce", "10 ounce")},
                    ("snack pack", "strips")),
        ProductType("olive oil", ("Pantry Staples", "Cooking & Baking", "Oils"),
                    ("extra virgin", "cold pressed", "non gmo", "usda organic", "kosher",
                     "glass bottle", "first harvest"),
                    {"size": ("16.9 fl oz", "33.8 fl oz", "68 fl oz")},
                    ("for cooking", "from spain")),
    ),
    "furniture": (
        ProductType("office chair", ("Furniture", "Home Office Furniture", "Chairs"),
                    ("lumbar support", "height adjustable", "easy assembly", "breathable mesh",
                     "swivel base", "padded armrests", "heavy duty"),
                    {"color": ("black", "grey", "white", "blue")},
                    ("ergonomic desk chair", "with wheels")),
        ProductType("coffee table", ("Furniture", "Living Room Furniture", "Tables"),
                    ("solid wood", "easy assembly", "storage shelf", "space saving",
                     "living room", "metal frame", "water resistant"),
                    {"color": _COLORS_B, "size": ("small", "large")},
                    ("for living room", "with lift top")),
        ProductType("bookshelf", ("Furniture", "Home Office Furniture", "Bookcases"),
                    ("easy assembly", "sturdy frame", "space saving", "adjustable shelves",
                     "wall mounted", "engineered wood"),
                    {"color": _COLORS_B[:5], "size": ("3 tier", "4 tier", "5 tier")},
                    ("storage rack", "for bedroom")),
        ProductType("bed frame", ("Furniture", "Bedroom Furniture", "Beds, Frames & Bases"),
                    ("noise free", "easy assembly", "under bed storage", "no box spring needed",
                     "heavy duty", "wood slat support"),
                    {"color": ("black", "white", "grey"),
                     "size": ("twin", "full", "queen", "king")},
                    ("platform bed", "with headboard")),
        ProductType("throw pillow", ("Home Décor Products", "Decorative Pillows"),
                    ("machine wash", "hidden zipper", "super soft", "living room",
                     "double sided", "faux linen"),
                    {"color": ("mustard yellow", "navy", "cream", "sage green", "blush pink"),
                     "size": ("18 x 18 inch", "20 x 20 inch"),
                     "item package quantity": ("pack of 2", "pack of 4")},
                    ("cover for couch", "for sofa")),
        ProductType("floor lamp", ("Lighting & Ceiling Fans", "Lamps & Shades", "Floor Lamps"),
                    ("dimmable", "energy efficient", "easy assembly", "remote control",
                     "reading light", "living room"),
                    {"color": ("black", "gold", "white", "silver")},
                    ("standing light", "with shelves")),
    ),
}

BRANDS: tuple[str, ...] = (
    "Aurelle", "Bramwell", "Cindora", "Dovelane", "Elkridge", "Fernwick", "Glenmoor", "Halvia",
    "Ivoryn", "Juniper", "Kestrel", "Lumora", "Marlow", "Norvik", "Oakhaven", "Pellucid",
    "Quillon", "Rivanna", "Solenne", "Tavira", "Ulmara", "Veloura", "Westbrook", "Zephyra",
)

STYLE_WORDS: tuple[str, ...] = (
    "premium", "classic", "modern", "deluxe", "essential", "everyday", "professional",
    "signature", "ultra", "original", "advanced", "compact",
)

# Nouns of titles beyond the type queries: what spaCy would tag NOUN/PROPN in our titles.
_EXTRA_NOUNS = (
    "men women hair keratin salon formula wefts vitamin face neck set manicure adults timer ear "
    "microphone screen protector cord adapter charger phones home siren laptop receiver top "
    "pocket sneakers gym jeans buckle coat fur leggings weather baking bag bean blend pack "
    "strips cooking spain desk wheels room top rack bedroom bed headboard cover couch sofa "
    "light shelves snack energy tea bags leaf bar oil"
)


def all_product_types() -> list[tuple[str, ProductType]]:
    """Every (category, product type) pair in a fixed order."""
    return [(cat, pt) for cat in sorted(PRODUCT_TYPES) for pt in PRODUCT_TYPES[cat]]


_NOT_NOUNS = frozenset({"green", "dark", "wireless", "running", "olive"})


def word_tokens(text: str) -> list[str]:
    """Lowercase alphanumeric tokens of two or more characters (the noun matcher's words)."""
    return [t for t in re.findall(r"[a-z0-9]+", text.lower()) if len(t) > 1]


def _build_nouns() -> frozenset[str]:
    words = set(word_tokens(_EXTRA_NOUNS))
    for _, ptype in all_product_types():
        words.update(word_tokens(ptype.query))
    words.update(b.lower() for b in BRANDS)
    return frozenset(words - _NOT_NOUNS)


NOUNS: frozenset[str] = _build_nouns()
