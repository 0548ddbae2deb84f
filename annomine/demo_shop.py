"""A seeded generator of a realistic synthetic shop, in the CrowdFlower file layout.

The README demo runs on this, so a fresh clone needs no external data. It writes
`products.tsv` (product_id, title, description), `queries.tsv` (query_id, query, frequency)
and `labels.tsv` (query_id, product_id, grade 1-4, variance) into one folder.

Products have brands, types, materials, colours and sizes; queries are type, brand + type,
attribute + type and misspelt forms with Zipf-like frequencies, so head, torso and tail exist.
About 40% of queries name their type the way shoppers do rather than the way the catalog does
(`SHOPPER_WORDS`: 'sneakers' for running shoes, 'gamepad' for a game controller): no product text
holds those words, so a lexical retriever finds nothing of the type for them, while a dense model can
learn the mapping from mined, graded pairs. That vocabulary gap is what the pipeline is for.
Grades follow a simple, documented rule (4 = type and every constraint match, 3 = type matches
but one constraint does not, 2 = a related type of the same department, 1 = unrelated), with
rater noise. A few deliberately bad rows exercise the quarantine.

Each labelled query is judged on what a retriever could plausibly put in its top 10 (`judged_pool`):
every product of its type, every product of its department sharing a type or brand word with it, some
products of other departments sharing a word (lexical distractors, grade 1; every product sharing a
word for a query in shopper words, whose lexical matches are nothing but such) and a random sample,
so evaluation scores retrieved products instead of counting most of them as unjudged.
"""

from __future__ import annotations

import csv
import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

DEPARTMENTS: dict[str, dict[str, list[str]]] = {
    "kitchen": {
        "types": ["coffee maker", "rice cooker", "blender", "cast iron skillet", "chef knife", "mixing bowl", "toaster", "kettle"],
        "brands": ["Cuisinart", "KitchenAid", "Hamilton Beach", "Lodge", "Oster", "Zwilling"],
        "materials": ["stainless steel", "cast iron", "glass", "ceramic", "plastic"],
        "features": ["dishwasher safe parts", "auto shut-off", "a 2-year warranty", "non-slip base", "easy-pour spout"],
    },
    "electronics": {
        "types": ["headphones", "memory card", "hard drive", "phone case", "projector", "bluetooth speaker", "usb charger", "game controller"],
        "brands": ["Sony", "Samsung", "SanDisk", "Seagate", "Otterbox", "Anker", "Logitech"],
        "materials": ["aluminum", "silicone", "plastic", "rubberized"],
        "features": ["noise cancelling", "fast charging", "a 12-hour battery", "USB-C", "water resistance"],
    },
    "apparel": {
        "types": ["running shoes", "jeans", "dress shirt", "sports bra", "rain jacket", "wool socks", "cargo shorts", "sweater dress"],
        "brands": ["Nike", "Adidas", "Levis", "Columbia", "Hanes", "Under Armour"],
        "materials": ["cotton", "denim", "wool", "polyester", "leather"],
        "features": ["a relaxed fit", "moisture wicking fabric", "reinforced seams", "machine washable fabric", "stretch comfort"],
    },
    "home": {
        "types": ["comforter set", "wall mirror", "table runner", "decorative pillow", "storage drawer", "floor lamp", "area rug", "candle holder"],
        "brands": ["Better Homes", "Mainstays", "Pottery Barn", "IKEA", "Threshold"],
        "materials": ["velvet", "wood", "metal", "linen", "bamboo"],
        "features": ["hidden zipper", "easy assembly", "fade resistant colour", "a hand-finished look", "anti-slip backing"],
    },
    "sports": {
        "types": ["yoga mat", "bike lock", "golf clubs", "sleeping bag", "baseball cleats", "gym gloves", "water bottle", "camping tent"],
        "brands": ["Coleman", "Gaiam", "Callaway", "Kryptonite", "Wilson", "CamelBak"],
        "materials": ["foam", "steel", "nylon", "titanium", "neoprene"],
        "features": ["a carrying strap", "all-weather use", "lightweight design", "extra padding", "a lifetime warranty"],
    },
    "toys": {
        "types": ["action figure", "dollhouse", "building blocks", "board game", "plush toy", "remote control car", "puzzle", "play kitchen"],
        "brands": ["LEGO", "Mattel", "Hasbro", "Melissa Doug", "Fisher Price"],
        "materials": ["plastic", "wood", "plush", "cardboard"],
        "features": ["ages 3 and up", "batteries included", "over 500 pieces", "a storage box", "non-toxic paint"],
    },
}

# What shoppers type for each product type. None of these words (after the lexical channels' stemming) occurs
# in any product's title or description: tests/test_demo_shop.py checks it.
SHOPPER_WORDS: dict[str, list[str]] = {
    "coffee maker": ["drip brewer", "percolator"], "rice cooker": ["grain steamer"], "blender": ["smoothie jug", "liquidizer"],
    "cast iron skillet": ["frying pan", "griddle pan"], "chef knife": ["cleaver", "santoku"], "mixing bowl": ["batter basin"],
    "toaster": ["bread browner"], "kettle": ["tea boiler", "teakettle"],
    "headphones": ["earphones", "earbuds"], "memory card": ["microsd", "sdxc"], "hard drive": ["hdd", "external disk"],
    "phone case": ["smartphone cover", "mobile cover"], "projector": ["beamer"], "bluetooth speaker": ["boombox"],
    "usb charger": ["plug adapter", "power brick"], "game controller": ["gamepad", "joystick"],
    "running shoes": ["sneakers", "trainers"], "jeans": ["dungarees"], "dress shirt": ["button down"],
    "sports bra": ["athletic bralette"], "rain jacket": ["raincoat", "anorak"], "wool socks": ["winter stockings"],
    "cargo shorts": ["utility trunks", "bermudas"], "sweater dress": ["knit frock", "jumper frock"],
    "comforter set": ["duvet", "quilt"], "wall mirror": ["vanity reflector"], "table runner": ["tablecloth"],
    "decorative pillow": ["throw cushion", "accent cushion"], "storage drawer": ["dresser", "organizer bin"],
    "floor lamp": ["torchiere", "standing light"], "area rug": ["carpet"], "candle holder": ["candlestick", "votive stand"],
    "yoga mat": ["pilates roll", "workout roll"], "bike lock": ["bicycle padlock", "cycle padlock"],
    "golf clubs": ["putter"], "sleeping bag": ["bedroll", "slumber sack"], "baseball cleats": ["ballpark spikes"],
    "gym gloves": ["lifting mitts", "weightlifting mitts"], "water bottle": ["hydration flask", "canteen"],
    "camping tent": ["bivouac", "backpacking shelter"],
    "action figure": ["figurine", "superhero doll"], "dollhouse": ["doll mansion"], "building blocks": ["stacking bricks", "construction bricks"],
    "board game": ["tabletop strategy"], "plush toy": ["stuffed animal", "teddy"], "remote control car": ["rc racer"],
    "puzzle": ["jigsaw"], "play kitchen": ["pretend stove", "pretend oven"],
}
SHOPPER_WORDS_SHARE = 0.4  # of queries name their type in shopper words

COLORS = ["black", "white", "red", "blue", "green", "grey", "pink", "navy", "silver", "brown"]
SIZES = ["small", "medium", "large", "xl", "twin", "queen", "king", "32 gb", "64 gb", "2tb", "10 inch", "12 inch"]
LINES = ["Classic", "Pro", "Essential", "Premier", "Elite", "Signature", "Everyday", "Ultra"]


@dataclass
class Product:
    product_id: str
    department: str
    ptype: str
    brand: str
    material: str
    color: str
    size: str
    title: str
    description: str


def _pid(seed: int, i: int) -> str:
    return hashlib.sha1(f"demo-{seed}-{i}".encode()).hexdigest()[:12]


def _misspell(text: str, rng: random.Random) -> str:
    words = text.split()
    idx = max(range(len(words)), key=lambda j: len(words[j]))
    w = words[idx]
    if len(w) < 4:
        return text
    k = rng.randrange(1, len(w) - 1)
    choice = rng.random()
    if choice < 0.4:
        w = w[:k] + w[k + 1:]  # drop a letter
    elif choice < 0.7:
        w = w[:k] + w[k] + w[k:]  # double a letter
    else:
        w = w[:k - 1] + w[k] + w[k - 1] + w[k + 1:]  # swap two letters
    words[idx] = w
    return " ".join(words)


def generate_products(n: int, rng: random.Random, seed: int) -> list[Product]:
    products = []
    departments = sorted(DEPARTMENTS)
    for i in range(n):
        dept = departments[i % len(departments)]
        spec = DEPARTMENTS[dept]
        ptype = rng.choice(spec["types"])
        brand = rng.choice(spec["brands"])
        material = rng.choice(spec["materials"])
        color = rng.choice(COLORS)
        size = rng.choice(SIZES)
        line = rng.choice(LINES)
        title_forms = [
            f"{brand} {line} {ptype.title()} - {color.title()}, {size.title()}",
            f"{brand} {material.title()} {ptype.title()} ({color}, {size})",
            f"{line} {color.title()} {ptype.title()} by {brand}",
            f"{brand} {ptype} {material} {color} {size}",
        ]
        title = rng.choice(title_forms)
        features = rng.sample(spec["features"], 2)
        sentences = [
            f"This {color} {ptype} from {brand} is made of {material}.",
            f"Features {features[0]} and {features[1]}.",
            f"Size: {size}. Part of the {line} collection.",
        ]
        roll = rng.random()
        if roll < 0.15:
            description = ""
        elif roll < 0.3:
            description = "<p>" + "</p><p>".join(sentences) + "</p>"
        else:
            description = " ".join(sentences)
        products.append(Product(_pid(seed, i), dept, ptype, brand, material, color, size, title, description))
    return products


def _grade(query: dict, p: Product) -> int:
    if p.ptype != query["ptype"]:
        return 2 if p.department == query["department"] else 1
    mismatches = 0
    if query.get("brand") and query["brand"] != p.brand:
        mismatches += 1
    if query.get("color") and query["color"] != p.color:
        mismatches += 1
    if query.get("material") and query["material"] != p.material:
        mismatches += 1
    return 4 if mismatches == 0 else (3 if mismatches == 1 else 2)


def generate_queries(n: int, rng: random.Random) -> list[dict]:
    queries, seen = [], set()
    departments = sorted(DEPARTMENTS)
    attempts = 0
    while len(queries) < n and attempts < n * 50:
        attempts += 1
        dept = rng.choice(departments)
        spec = DEPARTMENTS[dept]
        ptype = rng.choice(spec["types"])
        form = rng.random()
        q = {"department": dept, "ptype": ptype, "brand": None, "color": None, "material": None}
        name = rng.choice(SHOPPER_WORDS[ptype]) if rng.random() < SHOPPER_WORDS_SHARE else ptype
        q["shopper_words"] = name != ptype
        if form < 0.3:
            text = name
        elif form < 0.55:
            q["brand"] = rng.choice(spec["brands"])
            text = f"{q['brand'].lower()} {name}"
        elif form < 0.75:
            q["color"] = rng.choice(COLORS)
            text = f"{q['color']} {name}"
        elif form < 0.88:
            q["material"] = rng.choice(spec["materials"])
            text = f"{q['material']} {name}"
        else:
            q["brand"] = rng.choice(spec["brands"])
            q["color"] = rng.choice(COLORS)
            text = f"{q['brand'].lower()} {q['color']} {name}"
        if rng.random() < 0.12:
            text = _misspell(text, rng)
        if text in seen:
            continue
        seen.add(text)
        q["query"] = text
        queries.append(q)
    # Zipf-like traffic: a few head queries carry most of it.
    order = list(range(len(queries)))
    rng.shuffle(order)
    for rank, idx in enumerate(order, start=1):
        queries[idx]["frequency"] = max(1, int(5000 / rank ** 1.1))
    return queries


DEMO_FILES = ("products", "queries", "labels")


def _product_rows(products: list[Product], seed: int, bad_rows: bool) -> list[list]:
    rows = [[p.product_id, p.title, p.description] for p in products]
    if bad_rows:
        rows += [
            ["", "Product without an id", "lost id"],
            [_pid(seed, 10**6), "", "a product with an empty title"],
            [products[0].product_id, products[0].title + " (conflicting copy)", "different content, same id"],
            [_pid(seed, 10**6 + 1), "Broken \ufffd encoding \ufffd title", ""],
        ]
    return rows


_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> set[str]:
    """Lower-case words of a query or product text ('Seagate 2Tb Hard Drive' -> {'seagate', '2tb', 'hard', 'drive'})."""
    return set(_WORD.findall(text.lower()))


def product_words(p: Product) -> set[str]:
    return words(f"{p.title} {p.description}")


def judged_pool(query: dict, products: list[Product], vocab: list[set[str]], rng: random.Random,
                n_sampled: int = 30) -> list[int]:
    """Indices (catalog order) of the products judged for `query`: what a retriever could plausibly return.

    - every product of the query's type (grades 2-4: what lexical and semantic retrievers rank first),
    - every product of the query's department sharing a word of the query's type or brand with it
      (another Sony product for 'sony headphones', a 'sweater dress' for 'dress shirt'; grade 2): the
      words that put other types in a top 10 (a colour or a material alone does not, against the
      type's own products),
    - up to n_sampled // 3 products of other departments sharing any word with the query (lexical
      distractors, grade 1),
    - for a query in shopper words, every product sharing any word with it: a lexical retriever
      returns nothing else for it,
    - n_sampled // 6 random products of the department and n_sampled // 6 of the whole catalog.
    `vocab[i]` is `product_words(products[i])`. Misspelt query words match nothing, as in a retriever.
    """
    q_words = words(query["query"])
    key_words = q_words & (words(query["ptype"]) | words(query.get("brand") or ""))
    chosen, distractors, dept_rest = set(), [], []
    every_match = bool(query.get("shopper_words"))
    for i, p in enumerate(products):
        if p.ptype == query["ptype"] or (p.department == query["department"] and key_words & vocab[i]):
            chosen.add(i)
        elif every_match and q_words & vocab[i]:
            chosen.add(i)
        elif p.department == query["department"]:
            dept_rest.append(i)
        elif q_words & vocab[i]:
            distractors.append(i)
    chosen.update(rng.sample(distractors, min(len(distractors), n_sampled // 3)))
    chosen.update(rng.sample(dept_rest, min(len(dept_rest), n_sampled // 6)))
    chosen.update(rng.sample(range(len(products)), min(len(products), n_sampled // 6)))
    return sorted(chosen)


def _label_rows(queries: list[dict], products: list[Product], rng: random.Random, n_labelled: int,
                sampled_per_query: int, unloadable: set[str]) -> list[list]:
    """Judged (query, product) pairs (`judged_pool`); none for the products in `unloadable` (they are quarantined)."""
    vocab = [product_words(p) for p in products]
    rows = []
    labelled = rng.sample(range(len(queries)), min(n_labelled, len(queries)))
    for qi in sorted(labelled):
        q = queries[qi]
        for i in judged_pool(q, products, vocab, rng, sampled_per_query):
            p = products[i]
            grade = _grade(q, p)
            noisy = rng.random() < 0.08  # drawn for every pair, so skipping one leaves the others unchanged
            if noisy:
                grade = min(4, max(1, grade + rng.choice([-1, 1])))
            if p.product_id not in unloadable:
                rows.append([str(qi), p.product_id, grade, round(0.471 if noisy else 0.0, 3)])
    return rows


def _write_new_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    """Write a TSV file that must not exist yet: the generator never overwrites a file."""
    with open(path, "x", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
        w.writerow(header)
        w.writerows(rows)


def write_demo_shop(out_dir: str | Path, n_products: int = 3000, n_queries: int = 400,
                    n_labelled: int = 120, sampled_per_query: int = 30, seed: int = 7,
                    bad_rows: bool = True, files: tuple[str, ...] = DEMO_FILES) -> dict[str, Path]:
    """Write `files` (of products.tsv, queries.tsv, labels.tsv) into `out_dir`; return their paths.

    The shop is generated whole from `seed`, so files written by separate calls fit together. A
    file that already exists is an error (FileExistsError): nothing is ever overwritten.
    """
    unknown = sorted(set(files) - set(DEMO_FILES))
    if unknown:
        raise ValueError(f"unknown demo shop file(s) {unknown}; the demo writes {list(DEMO_FILES)}")
    rng = random.Random(seed)
    out = Path(out_dir)
    products = generate_products(n_products, rng, seed)
    queries = generate_queries(n_queries, rng)
    # The conflicting copy quarantines products[0] (both versions), so no label points at it.
    unloadable = {products[0].product_id} if bad_rows else set()
    content = {
        "products": (["product_id", "title", "description"], _product_rows(products, seed, bad_rows)),
        "queries": (["query_id", "query", "frequency"], [[str(i), q["query"], q["frequency"]] for i, q in enumerate(queries)]),
        "labels": (["query_id", "product_id", "grade", "variance"],
                   _label_rows(queries, products, rng, n_labelled, sampled_per_query, unloadable)),
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in files:
        paths[name] = out / f"{name}.tsv"
        _write_new_tsv(paths[name], *content[name])
    return paths
