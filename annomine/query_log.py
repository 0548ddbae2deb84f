"""A query log for catalogs without traffic, sampled from the catalog text itself.

Shoppers search for product types ("area rug"), brand + type ("nike shoes"), attribute + type
("red dress", "32 gb memory card") and brands, and they misspell. The builder reads only the
product titles (plus brand/category/attributes when the catalog has them):

- product types: the trailing one- and two-word n-grams of a title's head (the part before
  " - ", ",", "(", " with ", " for ", ...), kept when several products share them;
- brands: leading capitalised title words that start several titles and rarely appear elsewhere
  (or the catalog's `brand` column);
- attributes: colours, materials, sizes and capacities ("32 gb", "8 oz", "queen") found in titles.

Each candidate's support (how many products gave rise to it), times log-normal noise, orders the
sampled queries; frequencies follow a Zipf law over that order, so head, torso and tail exist.
Misspellings (one deleted, doubled, swapped or neighbour-key letter) get a small share of their
source's traffic. It never looks at any labelled query.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict

import numpy as np
import pandas as pd

from annomine.retrievers.analysis import normalise

COLOURS = ("black white red blue green yellow orange purple pink brown grey gray silver gold beige navy ivory "
           "cream tan teal turquoise burgundy khaki charcoal clear bronze copper multicolor").split()
MATERIALS = ("leather cotton wool silk wood wooden metal steel glass ceramic plastic bamboo linen denim velvet "
             "canvas rubber aluminum marble porcelain suede polyester microfiber cast-iron oak pine").split()
SIZE_WORDS = "small medium large xl xxl queen king twin mini compact oversized".split()
_UNIT = r"(gb|tb|mb|oz|ounce|ounces|inch|inches|in|ft|feet|qt|quart|piece|pc|pack|watt|w|mm|cm|ml|lb|lbs|gallon|cup|v|mah)"
SIZE_PATTERN = re.compile(r"\b(\d+(?:\.\d+)?)\s?-?" + _UNIT + r"\b")
_HEAD_CUT = re.compile(r"\s+-\s+|,|\(|\[|\||:|/| with | for | by | in | featuring | includes ")
_WORD = re.compile(r"[a-z][a-z'&]*[a-z]|[a-z]")
GENERIC = set((
    "set of pack new the a an and or kit piece pieces pc pcs inch in ft oz lb count size style design collection "
    "edition series model version assorted item each pair one two three four").split()) | set(COLOURS) | set(MATERIALS) | set(SIZE_WORDS)
KEYBOARD = "qwertyuiop asdfghjkl zxcvbnm".split()
KINDS = ("type", "brand_type", "attribute_type", "brand", "misspelling")
DEFAULT_MIX = {"type": 0.2, "brand_type": 0.25, "attribute_type": 0.35, "brand": 0.08, "misspelling": 0.12}


def _head(title: str) -> list[str]:
    head = _HEAD_CUT.split(" " + normalise(title) + " ", maxsplit=1)[0]
    words = _WORD.findall(head)
    while words and (words[-1] in GENERIC or len(words[-1]) < 3):
        words.pop()
    return words


def product_types(title: str) -> list[str]:
    """Trailing unigram and bigram of the title's head ('Accent Pillow with ...' -> ['pillow', 'accent pillow'])."""
    words = _head(title)
    if not words:
        return []
    out = [words[-1]]
    if len(words) >= 2 and words[-2] not in GENERIC and len(words[-2]) >= 3:
        out.append(f"{words[-2]} {words[-1]}")
    return out


def attributes_of(title: str) -> list[str]:
    text = normalise(title)
    words = set(_WORD.findall(text))
    found = [w for w in COLOURS + MATERIALS + SIZE_WORDS if w in words]
    if "stainless" in words and "steel" in words:
        found = ["stainless steel" if w == "steel" else w for w in found]
    for number, unit in SIZE_PATTERN.findall(text):
        unit = {"ounce": "oz", "ounces": "oz", "inches": "inch", "in": "inch", "lbs": "lb", "feet": "ft"}.get(unit, unit)
        found.append(f"{number} {unit}")
    return list(dict.fromkeys(found))


def _leading_word(title: str) -> str | None:
    match = re.match(r"\s*([A-Z][A-Za-z'&]+)", title or "")
    return match.group(1).lower() if match else None


def find_brands(titles: list[str], type_words: set[str], min_titles: int = 3, min_lead_share: float = 0.7) -> set[str]:
    """Capitalised words that start >= min_titles titles and appear mostly in the first position."""
    lead = Counter(w for w in (_leading_word(t) for t in titles) if w)
    anywhere = Counter()
    for t in titles:
        anywhere.update(set(_WORD.findall(normalise(t))))
    return {w for w, n in lead.items()
            if n >= min_titles and len(w) >= 3 and w not in GENERIC and w not in type_words
            and n / max(anywhere[w], 1) >= min_lead_share}


def misspell(query: str, rng: np.random.Generator) -> str | None:
    """One typo in one word of >= 4 letters: deletion, doubling, transposition or neighbouring key."""
    words = query.split()
    idx = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not idx:
        return None
    i = int(rng.choice(idx))
    w = words[i]
    pos = int(rng.integers(1, len(w) - 1))
    kind = int(rng.integers(0, 4))
    if kind == 0:
        new = w[:pos] + w[pos + 1:]
    elif kind == 1:
        new = w[:pos] + w[pos] + w[pos:]
    elif kind == 2:
        new = w[:pos] + w[pos + 1] + w[pos] + w[pos + 2:]
    else:
        row = next((r for r in KEYBOARD if w[pos] in r), None)
        if row is None:
            return None
        j = row.index(w[pos])
        neighbours = [row[x] for x in (j - 1, j + 1) if 0 <= x < len(row)]
        new = w[:pos] + str(rng.choice(neighbours)) + w[pos + 1:]
    if new == w:
        return None
    words[i] = new
    return " ".join(words)


def candidates(products: pd.DataFrame, min_support: int = 2) -> pd.DataFrame:
    """Every candidate query with its kind and support (number of products behind it)."""
    titles = products["title"].fillna("").astype(str).tolist()
    brand_col = products["brand"].fillna("").astype(str).str.strip().str.lower().tolist() if "brand" in products else [""] * len(titles)
    types_per = [product_types(t) for t in titles]
    type_count = Counter(t for ts in types_per for t in set(ts))
    types_ok = {t for t, n in type_count.items() if n >= (2 if " " in t else 3)}
    type_words = {w for t in types_ok for w in t.split()}
    brands = find_brands(titles, type_words)
    support: dict[tuple[str, str], int] = defaultdict(int)
    for title, ts, col_brand in zip(titles, types_per, brand_col):
        ts = [t for t in ts if t in types_ok]
        lead = _leading_word(title)
        brand = col_brand if col_brand else (lead if lead in brands else None)
        attrs = attributes_of(title)
        for t in ts:
            support[("type", t)] += 1
            if brand and brand not in t:
                support[("brand_type", f"{brand} {t}")] += 1
            for a in attrs:
                if not set(a.split()) & set(t.split()):
                    support[("attribute_type", f"{a} {t}")] += 1
        if brand:
            support[("brand", brand)] += 1
    rows = [(kind, q, n) for (kind, q), n in support.items()
            if n >= (min_support if kind in ("type", "brand") else 1)]
    return pd.DataFrame(rows, columns=["kind", "query", "support"])


def query_id_for(query: str) -> str:
    return "b-" + hashlib.sha1(query.encode("utf-8")).hexdigest()[:12]


def _pick_clean(cands: pd.DataFrame, quota: dict[str, int], rng: np.random.Generator) -> pd.DataFrame:
    """Catalog candidates drawn per kind by support ** 0.75 to fill `quota`, topped up from the rest, deduplicated."""
    picked = []
    leftover = 0
    for kind in quota:
        pool = cands[cands["kind"] == kind]
        want = quota[kind] + leftover
        take = min(want, len(pool))
        leftover = want - take
        if take:
            p = pool["support"].to_numpy(dtype=float) ** 0.75
            idx = rng.choice(len(pool), size=take, replace=False, p=p / p.sum())
            picked.append(pool.iloc[np.sort(idx)])
    if leftover:  # not enough candidates of some kind: top up from whatever was not taken
        rest = cands.drop(index=pd.concat(picked).index) if picked else cands
        take = min(leftover, len(rest))
        if take:
            p = rest["support"].to_numpy(dtype=float) ** 0.75
            picked.append(rest.iloc[np.sort(rng.choice(len(rest), size=take, replace=False, p=p / p.sum()))])
    clean = pd.concat(picked, ignore_index=True) if picked else pd.DataFrame(columns=["kind", "query", "support"])
    return clean.drop_duplicates("query").reset_index(drop=True)


def _zipf_frequencies(support: np.ndarray, rng: np.random.Generator, top_frequency: int, zipf_s: float) -> np.ndarray:
    """Zipf frequencies over the order of support with log-normal noise (the queries' popularity)."""
    popularity = support * rng.lognormal(0.0, 1.0, size=len(support))
    order = np.argsort(-popularity, kind="stable")
    freq = np.empty(len(support), dtype=np.int64)
    freq[order] = np.maximum(1, np.round(top_frequency / np.arange(1, len(support) + 1) ** zipf_s)).astype(np.int64)
    return freq


def _misspellings(clean: pd.DataFrame, n_typos: int, rng: np.random.Generator) -> tuple[list[tuple], set[str]]:
    """Up to `n_typos` new misspelt queries (kind, query, support, frequency) and every query seen so far."""
    typos = []
    seen = set(clean["query"])
    if n_typos and len(clean):
        sources = clean.sample(n=min(len(clean), n_typos * 3), random_state=int(rng.integers(2**31)), weights=clean["frequency"] ** 0.5)
        sources = pd.concat([sources, clean.drop(index=sources.index)])  # more sources if the first ones fail
        for _, row in sources.iterrows():
            if len(typos) >= n_typos:
                break
            q = misspell(row["query"], rng)
            if q and q not in seen:
                seen.add(q)
                f = max(1, int(round(row["frequency"] * rng.uniform(0.02, 0.1))))
                typos.append(("misspelling", q, int(row["support"]), f))
    return typos, seen


def build_query_log(products: pd.DataFrame, n_queries: int, seed: int = 13, mix: dict[str, float] | None = None,
                    zipf_s: float = 1.0, top_frequency: int = 20000) -> pd.DataFrame:
    """`n_queries` built queries: query_id ('b-<hash>'), query, frequency, kind, support."""
    columns = ["query_id", "query", "frequency", "kind", "support"]
    if n_queries <= 0 or products.empty:
        return pd.DataFrame(columns=columns)
    mix = dict(mix or DEFAULT_MIX)
    rng = np.random.default_rng(seed)
    cands = candidates(products)
    n_typos = int(round(n_queries * mix.get("misspelling", 0.0)))
    n_clean = n_queries - n_typos
    clean_kinds = [k for k in KINDS if k != "misspelling"]
    weights = np.array([mix.get(k, 0.0) for k in clean_kinds], dtype=float)
    weights = weights / weights.sum()
    quota = {k: int(round(w * n_clean)) for k, w in zip(clean_kinds, weights)}
    clean = _pick_clean(cands, quota, rng)
    # Popularity: support with log-normal noise; Zipf frequencies over that order.
    clean["frequency"] = _zipf_frequencies(clean["support"].to_numpy(dtype=float), rng, top_frequency, zipf_s)
    typos, seen = _misspellings(clean, n_typos, rng)
    extra = []
    short = n_queries - len(clean) - len(typos)
    if short > 0:  # too few misspellable queries: fill with unpicked catalog candidates, at the tail
        rest = cands[~cands["query"].isin(seen)].sort_values(["support", "query"], ascending=[False, True]).head(short)
        extra = [(k, q, int(n), 1) for k, q, n in rest.itertuples(index=False)]
    out = pd.concat([clean[["kind", "query", "support", "frequency"]],
                     pd.DataFrame(typos + extra, columns=["kind", "query", "support", "frequency"])], ignore_index=True)
    out["query_id"] = out["query"].map(query_id_for)
    out["frequency"] = out["frequency"].astype("int64")
    out["support"] = out["support"].astype("int64")
    return out.sort_values(["frequency", "query_id"], ascending=[False, True]).reset_index(drop=True)[columns]
