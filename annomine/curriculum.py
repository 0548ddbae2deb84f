"""Pure DataFrame transforms of the curriculum stage: mined candidates + graded annotations -> per-stage
training rows.

Labels come from the judge's grades (grade >= positive_min_grade: positive, grade <= negative_max_grade:
negative, in between: ambiguous, dropped), not from the set logic alone; annotation errors, and grades
given for other content than the pair's current query and product text, are dropped and counted;
candidates without any (current) annotation take their set-logic label only for the classes listed
in `set_logic_fallback` (random negatives are usually not sent to the judge). Human-labelled dev and test
queries (`annomine.splits`) never reach a training set: their candidates get status `dev_query` / `test_query`.

A stage's `source` says where its rows come from: `mined` (the mined candidates labelled by the judge's
grades), `set_logic` (the mined candidates labelled by set logic alone: positive classes easy/hard positive)
or `human` (the human labels of the train queries, `human_label_rows`: a top-grade product as positive and a
product of the same query graded <= negative_max_grade as its hard negative, the sentence-transformers
recipe; candidate class `human_label`). A variant is data: a name and a list of stage names
(`resolve_variant`); `<stage>+<other>` mixes the rows of stage `<other>` into `<stage>` (one shuffled set of
both, kept or dropped as one by the dev check; `StageDef.blend`).

Row formats (`ROW_FORMATS`): `pointwise` (item + label), `pair` (positive item + a negative of the same
query when it has one), `triplet` (a pair whose negative is required), `list` (the query's graded items,
top grade first). `FORMAT_OF_LOSS` gives each curriculum loss its format; it is the only loss knowledge
here (core imports no torch). Each loss in `training.losses` declares its own `row_format`, and that
registry checks at import that it matches this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from annomine.bounds import bounded
from annomine.graded_content import content_hash
from annomine.vocabulary import CLASSES, POSITIVE_CLASSES, RANDOM_NEGATIVE

ROW_FORMATS = ("pointwise", "pair", "triplet", "list")
# Loss -> the format of its training rows (a new curriculum loss: its line here, and its training.losses module).
FORMAT_OF_LOSS = {"bce": "pointwise", "mnr": "pair", "triplet": "triplet", "roar": "list"}
LOSSES = tuple(FORMAT_OF_LOSS)
# Where a stage's rows come from: mined candidates labelled by the judge's grades, the same labelled by set
# logic alone, or the human labels of the train queries.
STAGE_SOURCES = ("mined", "set_logic", "human")
CANDIDATE_SOURCES = ("mined", "set_logic")  # the sources that read the mined candidates
BLEND = "+"  # in a variant's stage list, `hard+human`: the rows of stage `human` mixed into stage `hard`
HUMAN_LABEL = "human_label"  # candidate class of the rows of a `human` source stage

# Status of a labelled candidate: only 'ok' rows reach a training set; the rest are counted.
OK, ERROR, UNANNOTATED, AMBIGUOUS, DEV = "ok", "annotation_error", "unannotated", "ambiguous_grade", "dev_query"
TEST = "test_query"
# The grade was given for other content (the query or product text changed since): annotate grades it again.
STALE = "stale_annotation"


@dataclass
class StageDef:
    """One curriculum stage: its loss, where its positives and negatives come from, its size cap."""

    name: str
    loss: str
    positive_classes: list[str] = field(default_factory=list)
    negative_classes: list[str] = field(default_factory=list)
    max_examples: int = bounded(5000, ge=1)
    max_per_query: int = bounded(64, ge=1)
    epochs: int | None = bounded(None, ge=1)  # None: train.epochs_per_stage
    source: str = "mined"  # mined (judge-graded candidates) | set_logic (candidates by set logic) | human (human labels)
    blend: StageDef | None = None  # a second definition whose rows join this stage's (set by `resolve_variant`)
    lr: float | None = bounded(None, gt=0)  # this stage's learning rate (None: train.lr_by_loss, else train.lr)

    def reads(self, source: str) -> bool:
        """Whether this stage's rows come (in part) from `source`."""
        return self.source == source or (self.blend is not None and self.blend.reads(source))

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"stage {self.name!r}: loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if self.source not in STAGE_SOURCES:
            raise ValueError(f"stage {self.name!r}: source must be one of {list(STAGE_SOURCES)}, got {self.source!r}")
        known = CLASSES if self.source in CANDIDATE_SOURCES else (HUMAN_LABEL,)
        for c in self.positive_classes + self.negative_classes:
            if c not in known:
                raise ValueError(f"stage {self.name!r}: unknown candidate class {c!r}; known: {list(known)}")
        if not self.positive_classes:
            raise ValueError(f"stage {self.name!r}: positive_classes is empty")
        if FORMAT_OF_LOSS[self.loss] in ("pointwise", "triplet") and not self.negative_classes:
            raise ValueError(f"stage {self.name!r}: loss {self.loss} needs negative_classes")
        if self.blend is not None:
            self.blend.validate()
            if self.blend.loss != self.loss:
                raise ValueError(f"stage {self.name!r}: a blended stage needs the same loss ({self.blend.loss} != {self.loss})")


@dataclass
class LabelRules:
    positive_min_grade: int = 3
    negative_max_grade: int = 2
    set_logic_fallback: list[str] = field(default_factory=lambda: [RANDOM_NEGATIVE])
    use_annotations: bool = True


def _hash_order(seed: int, *cols: str):
    return F.xxhash64(F.lit(int(seed)), *[F.col(c) for c in cols])


def latest_annotations(annotations: DataFrame, judge_version: str | None = None) -> DataFrame:
    """One annotation per (query_id, product_id): the given judge version, else the newest one, with the
    content hash it was given for (null from a table written before hashes were recorded)."""
    if judge_version:
        annotations = annotations.filter(F.col("judge_version") == judge_version)
    if "content_hash" not in annotations.columns:
        annotations = annotations.withColumn("content_hash", F.lit(None).cast("string"))
    w = Window.partitionBy("query_id", "product_id").orderBy(F.col("annotated_at").desc_nulls_last(),
                                                             F.col("judge_version").desc_nulls_last())
    return (annotations.withColumn("_rn", F.row_number().over(w)).filter(F.col("_rn") == 1)
            .select("query_id", "product_id", "grade", F.col("error").alias("annotation_error"), "judge_version",
                    F.col("content_hash").alias("annotation_content_hash")))


def _mark_held_out(df: DataFrame, dev_query_ids, test_query_ids) -> DataFrame:
    """Status `dev_query` / `test_query` and a null label for the rows of held-out queries."""
    for ids, status in ((dev_query_ids, DEV), (test_query_ids, TEST)):
        if ids:
            held = F.col("query_id").isin(*ids)
            df = df.withColumn("status", F.when(held, F.lit(status)).otherwise(F.col("status")))
            df = df.withColumn("label", F.when(held, F.lit(None).cast("int")).otherwise(F.col("label")))
    return df


def label_candidates(mined: DataFrame, annotations: DataFrame | None, products: DataFrame,
                     dev_query_ids: list[str], rules: LabelRules, test_query_ids: list[str] = ()) -> DataFrame:
    """Mined candidates with `label` (1/0/null), `grade`, `item_text` and a `status` explaining drops.

    A grade given for other content than the candidate's current query and product text counts as no grade
    (status `stale_annotation`, or set logic for a fallback class). Candidates of `dev_query_ids` /
    `test_query_ids` get status `dev_query` / `test_query` and no label."""
    texts = products.select("product_id", F.col("text").alias("item_text"))
    cands = (mined.select("query_id", "query", "product_id", "candidate_class", F.col("level").cast("int").alias("level"))
             .join(texts, "product_id", "left"))
    set_label = F.when(F.col("candidate_class").isin(*POSITIVE_CLASSES), F.lit(1)).otherwise(F.lit(0))
    if rules.use_annotations and annotations is not None:
        cands = cands.join(annotations, ["query_id", "product_id"], "left")
        graded = F.col("judge_version").isNotNull()
        stale = graded & ~F.col("annotation_content_hash").eqNullSafe(content_hash(F.col("query"), F.col("item_text")))
        has_ann = graded & ~stale
        errored = has_ann & (F.col("annotation_error").isNotNull() | F.col("grade").isNull())
        fallback = F.col("candidate_class").isin(*rules.set_logic_fallback) if rules.set_logic_fallback else F.lit(False)
        status = (F.when(errored, F.lit(ERROR))
                  .when(stale & ~fallback, F.lit(STALE))
                  .when(~has_ann & ~fallback, F.lit(UNANNOTATED))
                  .when(has_ann & (F.col("grade") > rules.negative_max_grade) & (F.col("grade") < rules.positive_min_grade),
                        F.lit(AMBIGUOUS))
                  .otherwise(F.lit(OK)))
        label = (F.when(~has_ann, set_label)
                 .when(F.col("grade") >= rules.positive_min_grade, F.lit(1))
                 .when(F.col("grade") <= rules.negative_max_grade, F.lit(0)))
        cands = cands.withColumn("status", status).withColumn("label", F.when(status == OK, label))
        cands = cands.withColumn("grade", F.when((F.col("status") == OK) & has_ann, F.col("grade").cast("int")))
    else:
        cands = (cands.withColumn("grade", F.lit(None).cast("int")).withColumn("status", F.lit(OK))
                 .withColumn("label", set_label))
    cands = _mark_held_out(cands, dev_query_ids, test_query_ids)
    return cands.select("query_id", "query", "product_id", "item_text", F.col("label").cast("int").alias("label"),
                        "grade", "candidate_class", "level", "status")


def human_label_rows(human_labels: DataFrame, queries: DataFrame, products: DataFrame, dev_query_ids: list[str],
                     test_query_ids: list[str], positive_min_grade: int, negative_max_grade: int) -> DataFrame:
    """Human labels as labelled candidates (the columns of `label_candidates`, class `human_label`):
    grade >= positive_min_grade positive, <= negative_max_grade negative, in between `ambiguous_grade`;
    the labels of dev and test queries get status `dev_query` / `test_query` (never a training row)."""
    grade = F.col("grade").cast("int")
    rows = (human_labels.select("query_id", "product_id", grade.alias("grade"))
            .join(queries.select("query_id", "query"), "query_id")
            .withColumn("candidate_class", F.lit(HUMAN_LABEL)).withColumn("level", F.lit(None).cast("int")))
    status = F.when((grade > negative_max_grade) & (grade < positive_min_grade), F.lit(AMBIGUOUS)).otherwise(F.lit(OK))
    label = F.when(grade >= positive_min_grade, F.lit(1)).when(grade <= negative_max_grade, F.lit(0))
    rows = rows.withColumn("status", status).withColumn("label", F.when(status == OK, label).cast("int"))
    rows = _mark_held_out(rows, dev_query_ids, test_query_ids)
    texts = products.select("product_id", F.col("text").alias("item_text"))
    return (rows.join(texts, "product_id", "left")
            .select("query_id", "query", "product_id", "item_text", F.col("label").cast("int").alias("label"),
                    "grade", "candidate_class", "level", "status"))


def status_counts(labelled: DataFrame) -> dict[str, int]:
    return {r["status"]: int(r["count"]) for r in labelled.groupBy("status").count().collect()}


_NEG_COLS = ("neg_product_id", "neg_text", "neg_grade", "neg_class", "neg_level")
_LIST_COLS = ("group_product_ids", "group_texts", "group_grades")


def _null_cols(df: DataFrame, names) -> DataFrame:
    types = {"neg_grade": "int", "neg_level": "int", "group_product_ids": "array<string>",
             "group_texts": "array<string>", "group_grades": "array<int>"}
    for n in names:
        df = df.withColumn(n, F.lit(None).cast(types.get(n, "string")))
    return df


STAGE_COLUMNS = ["query_id", "query", "product_id", "item_text", "label", "grade", "candidate_class", "level",
                 *_NEG_COLS, *_LIST_COLS]


def _cap(df: DataFrame, max_examples: int, seed: int, *cols: str) -> DataFrame:
    return df.withColumn("_h", _hash_order(seed, *cols)).orderBy("_h").limit(max_examples).drop("_h")


def pointwise_rows(ok: DataFrame, stage: StageDef, seed: int) -> DataFrame:
    pos = ok.filter((F.col("label") == 1) & F.col("candidate_class").isin(*stage.positive_classes))
    neg = ok.filter((F.col("label") == 0) & F.col("candidate_class").isin(*stage.negative_classes))
    rows = pos.unionByName(neg)
    w = Window.partitionBy("query_id").orderBy(_hash_order(seed, "product_id"))
    rows = rows.withColumn("_k", F.row_number().over(w)).filter(F.col("_k") <= stage.max_per_query).drop("_k")
    rows = _null_cols(rows, _NEG_COLS + _LIST_COLS)
    return _cap(rows, stage.max_examples, seed, "query_id", "product_id").select(*STAGE_COLUMNS)


def pair_rows(ok: DataFrame, stage: StageDef, seed: int, require_negative: bool) -> DataFrame:
    """Each positive of a query paired with one of its negatives, cycling through the negatives."""
    pos = ok.filter((F.col("label") == 1) & F.col("candidate_class").isin(*stage.positive_classes))
    neg = ok.filter((F.col("label") == 0) & F.col("candidate_class").isin(*stage.negative_classes))
    pw = Window.partitionBy("query_id").orderBy(_hash_order(seed, "product_id"))
    pos = pos.withColumn("_pk", F.row_number().over(pw)).filter(F.col("_pk") <= stage.max_per_query)
    nw = Window.partitionBy("query_id").orderBy(_hash_order(seed + 1, "product_id"))
    neg = neg.withColumn("_nk", F.row_number().over(nw))
    n_neg = neg.groupBy("query_id").agg(F.max("_nk").alias("_nn"))
    neg = neg.select("query_id", "_nk", F.col("product_id").alias("neg_product_id"), F.col("item_text").alias("neg_text"),
                     F.col("grade").alias("neg_grade"), F.col("candidate_class").alias("neg_class"),
                     F.col("level").alias("neg_level"))
    pairs = (pos.join(n_neg, "query_id", "left")
             .withColumn("_nk", F.when(F.col("_nn") > 0, F.pmod(F.col("_pk") - 1, F.col("_nn")) + 1))
             .join(neg, ["query_id", "_nk"], "left"))
    if require_negative:
        pairs = pairs.filter(F.col("neg_product_id").isNotNull())
    pairs = _null_cols(pairs, _LIST_COLS)
    return _cap(pairs, stage.max_examples, seed, "query_id", "product_id").select(*STAGE_COLUMNS)


_GROUP_SCHEMA = T.StructType([
    T.StructField("query_id", T.StringType()), T.StructField("query", T.StringType()),
    T.StructField("product_id", T.StringType()), T.StructField("item_text", T.StringType()),
    T.StructField("grade", T.IntegerType()), T.StructField("candidate_class", T.StringType()),
    T.StructField("level", T.IntegerType()),
    T.StructField("group_product_ids", T.ArrayType(T.StringType())),
    T.StructField("group_texts", T.ArrayType(T.StringType())),
    T.StructField("group_grades", T.ArrayType(T.IntegerType())),
])


def group_items(pdf: pd.DataFrame, max_group_size: int, seed: int) -> pd.DataFrame:
    """One query's graded candidates -> one list row: top grade first, then the rest by grade (pure)."""
    pdf = pdf[pdf["grade"].notna()].copy()
    if pdf.empty or (pdf["label"] == 1).sum() == 0 or pdf["grade"].nunique() < 2:
        return pd.DataFrame(columns=[f.name for f in _GROUP_SCHEMA.fields])
    pdf["_tie"] = pd.util.hash_pandas_object(pdf["product_id"].astype(str) + f":{seed}", index=False).astype("uint64")
    pdf = pdf.sort_values(["grade", "_tie"], ascending=[False, True])
    # keep the top item and spread the rest over grades: round-robin by grade so small groups survive the cap
    top, rest = pdf.iloc[:1], pdf.iloc[1:]
    rounds = rest.groupby("grade").cumcount() + (rest["grade"] == top["grade"].iloc[0]).astype(int)
    rest = rest.assign(_r=rounds).sort_values(["_r", "grade"], ascending=[True, False])
    chosen = pd.concat([top, rest.iloc[:max_group_size - 1]]).sort_values(["grade", "_tie"], ascending=[False, True])
    head = chosen.iloc[0]
    return pd.DataFrame([{
        "query_id": head["query_id"], "query": head["query"], "product_id": head["product_id"],
        "item_text": head["item_text"], "grade": int(head["grade"]), "candidate_class": head["candidate_class"],
        "level": int(head["level"]) if pd.notna(head["level"]) else None,
        "group_product_ids": [str(x) for x in chosen["product_id"]],
        "group_texts": [str(x) if isinstance(x, str) else "" for x in chosen["item_text"]],
        "group_grades": [int(x) for x in chosen["grade"]],
    }])


def list_rows(ok: DataFrame, stage: StageDef, seed: int, max_group_size: int) -> DataFrame:
    classes = sorted(set(stage.positive_classes) | set(stage.negative_classes))
    pool = ok.filter(F.col("candidate_class").isin(*classes) & F.col("grade").isNotNull())
    pool = pool.select("query_id", "query", "product_id", "item_text", "label", "grade", "candidate_class", "level")

    def per_query(pdf: pd.DataFrame) -> pd.DataFrame:
        return group_items(pdf, max_group_size, seed)

    rows = pool.groupBy("query_id").applyInPandas(per_query, schema=_GROUP_SCHEMA)
    rows = rows.withColumn("label", F.lit(1).cast("int"))
    rows = _null_cols(rows, _NEG_COLS)
    return _cap(rows, stage.max_examples, seed, "query_id").select(*STAGE_COLUMNS)


def stage_rows(labelled: DataFrame, stage: StageDef, seed: int, max_group_size: int = 8) -> DataFrame:
    """Training rows of one stage: the labelled candidates' rows of status 'ok' with text."""
    ok = labelled.filter((F.col("status") == OK) & F.col("label").isNotNull() & F.col("item_text").isNotNull())
    fmt = FORMAT_OF_LOSS[stage.loss]
    if fmt == "pointwise":
        return pointwise_rows(ok, stage, seed)
    if fmt in ("pair", "triplet"):
        return pair_rows(ok, stage, seed, require_negative=fmt == "triplet")
    return list_rows(ok, stage, seed, max_group_size)


def rows_by_source(rows: pd.DataFrame) -> dict[str, int]:
    """A stage's rows by where they came from: `human` (class human_label) and `mined` (the rest)."""
    human = int((rows["candidate_class"] == HUMAN_LABEL).sum())
    return {"mined": int(len(rows)) - human, "human": human}


def composition(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows by difficulty level, class and grade (positive side and, for pairs, negative side)."""
    parts = [rows.assign(side="item").groupby(["side", "candidate_class", "level", "grade", "label"], dropna=False)
             .size().rename("rows").reset_index()]
    negs = rows[rows["neg_product_id"].notna()]
    if len(negs):
        parts.append(negs.assign(side="negative", label=0)
                     .groupby(["side", "neg_class", "neg_level", "neg_grade", "label"], dropna=False).size()
                     .rename("rows").reset_index()
                     .rename(columns={"neg_class": "candidate_class", "neg_level": "level", "neg_grade": "grade"}))
    lists = rows[rows["group_grades"].notna()]
    if len(lists):
        grades = pd.Series([g for gs in lists["group_grades"] for g in gs], dtype="Int64")
        parts.append(grades.value_counts().rename("rows").rename_axis("grade").reset_index()
                     .assign(side="list_item", candidate_class=None, level=None, label=None))
    return pd.concat(parts, ignore_index=True)


def resolve_variant(name: str, stage_names: list[str], definitions: list[StageDef]) -> list[StageDef]:
    """Variant `name`'s stages, in order, from their names among `definitions`; `a+b` is stage `a` with stage
    `b`'s rows mixed in (`blended`). One clear error for an empty list, an unknown name, or a variant that
    labels the mined candidates both by the judge's grades and by set logic."""
    if not stage_names:
        raise ValueError(f"variants.{name}: an empty list of stages; name at least one of {[d.name for d in definitions]}")
    by_name = {d.name: d for d in definitions}
    stages = []
    for ref in stage_names:
        parts = str(ref).split(BLEND)
        unknown = [p for p in parts if p not in by_name]
        if unknown or len(parts) > 2:
            raise ValueError(f"variants.{name}: unknown stage {ref!r}; stages: {list(by_name)} "
                             f"(`a{BLEND}b` mixes stage b's rows into stage a)")
        stages.append(by_name[parts[0]] if len(parts) == 1 else blended(by_name[parts[0]], by_name[parts[1]]))
    labels = {src for st in stages for src in CANDIDATE_SOURCES if st.reads(src)}
    if len(labels) > 1:
        raise ValueError(f"variants.{name}: mixes stages of sources {sorted(labels)}; a variant labels the mined "
                         "candidates one way")
    return stages


def blended(stage: StageDef, extra: StageDef) -> StageDef:
    """`stage` with `extra`'s rows mixed in (named `<stage>_with_<extra>`); both need the same loss."""
    if stage.loss != extra.loss:
        raise ValueError(f"stage {stage.name!r} and {extra.name!r}: a blended stage needs the same loss "
                         f"({extra.loss} != {stage.loss})")
    if stage.blend is not None or extra.blend is not None:
        raise ValueError(f"stage {stage.name!r}{BLEND}{extra.name!r}: one blend per stage")
    return replace(stage, name=f"{stage.name}_with_{extra.name}", blend=extra)
