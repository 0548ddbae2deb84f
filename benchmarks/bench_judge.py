"""The tier-1 judge against sentence-transformers' CrossEncoder: training examples/s and grading pairs/s.

Training: `train_cross_encoder` (annomine) against sentence-transformers' CrossEncoder fit loop
(`CrossEncoder.old_fit`: `fit` and `CrossEncoderTrainer` need the `datasets` package, which this environment
lacks; `old_fit` is the same forward/backward/AdamW/linear-warm-up loop without it, given the fused AdamW that
`fit`'s trainer uses by default, as annomine's judge does) on `CrossEncoder(MiniLM,
num_labels=len(grades), max_length=...)` with cross-entropy (the user's pick): same base weights (the bundled
all-MiniLM-L6-v2), same pairs (product text cut to `--max-text-chars` for both), same max token length,
batch size, epochs, learning rate and warm-up share, same threads. annomine's figure is its training loop
(`history["train_seconds"]`: tokenisation included, the model load not); sentence-transformers' is the
`old_fit` call. The heads differ (annomine: mean pooling + linear head, cross-entropy + ordinal loss;
CrossEncoder: BERT pooler + classifier, cross-entropy), so training is compared on speed only.

Grading: the judge trained above, saved, graded by `CrossEncoderModel.ce_proba` (the path every caller of
the judge uses) and by `CrossEncoder.predict(apply_softmax=True)` on a CrossEncoder built from the same
weights with the same head (Transformer -> mean Pooling -> Dense(identity) as `scores`): same pairs,
batch size and max length. Compared: the largest absolute difference of the grade probabilities and of the
expected grade between the two, and the share of pairs whose arg-max grade agrees.

Rounds alternate the two sides (`--repeats`), so machine load hits both alike; the medians are reported
and each ratio is of the medians of the same run.

Both sides run in one process, under the OpenMP waits `annomine` sets (OMP_WAIT_POLICY=PASSIVE and
GOMP_SPINCOUNT=3000 unless set; benchmarks/bench_threads.py measures the policy on its own).

Pairs: demo-shop queries and products (grade from what query and product share), or with `--warehouse`
the human-labelled CrowdFlower pairs of a warehouse (Delta tables human_labels, queries, products).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import annomine  # noqa: E402,F401 - first: its OpenMP wait policy applies to torch in this process (both sides)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from annomine.bert import minilm_path  # noqa: E402
from annomine.demo_shop import generate_products  # noqa: E402
from annomine.judges.cross_encoder import CrossEncoderModel, CrossEncoderSettings, train_cross_encoder  # noqa: E402
from annomine.text import product_text  # noqa: E402
from common import Timer, emit  # noqa: E402

GRADES = [1, 2, 3, 4]


def demo_pairs(n: int, seed: int = 3) -> pd.DataFrame:
    """n (query, product text, grade) pairs: 4 the product the query names, 3 same type, 2 same brand, else 1."""
    products = generate_products(max(n // 4, 8), random.Random(seed), seed=seed)
    rng = random.Random(seed + 1)
    rows = []
    for _ in range(n):
        p, target = rng.choice(products), rng.choice(products)
        query = f"{target.brand.lower()} {target.ptype}"
        grade = 4 if p is target else 3 if p.ptype == target.ptype else 2 if p.brand == target.brand else 1
        rows.append((query, product_text(p.title, None, p.description), grade))
    return pd.DataFrame(rows, columns=["query", "text", "grade"])


def warehouse_pairs(warehouse: str, n: int, seed: int = 3) -> pd.DataFrame:
    """n human-labelled pairs (sampled with `seed`) from a warehouse's Delta tables."""
    from deltalake import DeltaTable

    base = Path(warehouse) / "annomine"
    labels = DeltaTable(str(base / "human_labels")).to_pandas(columns=["query_id", "product_id", "grade"])
    queries = DeltaTable(str(base / "queries")).to_pandas(columns=["query_id", "query"]).drop_duplicates("query_id")
    products = DeltaTable(str(base / "products")).to_pandas(columns=["product_id", "text"]).drop_duplicates("product_id")
    df = labels.merge(queries, on="query_id").merge(products, on="product_id")
    df = df.sample(min(n, len(df)), random_state=seed).reset_index(drop=True)
    return df.assign(grade=df["grade"].astype(int))[["query", "text", "grade"]]


def settings_of(args) -> CrossEncoderSettings:
    return CrossEncoderSettings(base_model="minilm", max_length=args.max_length, max_text_chars=args.max_text_chars,
                                epochs=args.epochs, batch_size=args.batch_size, threads=args.threads)


def train_annomine(df: pd.DataFrame, settings: CrossEncoderSettings) -> tuple[float, CrossEncoderModel]:
    """Training examples/s of the judge's training loop, and the trained judge."""
    model, history = train_cross_encoder(df, GRADES, settings, progress=False)
    return len(df) * settings.epochs / history["train_seconds"], model


def train_sentence_transformers(df: pd.DataFrame, settings: CrossEncoderSettings) -> float:
    """Training examples/s of `CrossEncoder.old_fit` (the `fit` loop that needs no `datasets` package:
    DataLoader of InputExamples, the model's collate, cross-entropy, AdamW, linear warm-up) on
    CrossEncoder(MiniLM, num_labels=len(grades))."""
    from sentence_transformers import InputExample
    from sentence_transformers.cross_encoder import CrossEncoder
    from torch.utils.data import DataLoader

    torch.manual_seed(settings.seed)
    model = CrossEncoder(str(minilm_path()), num_labels=len(GRADES), max_length=settings.max_length, device="cpu",
                         local_files_only=True)
    examples = [InputExample(texts=[q, t], label=GRADES.index(int(g)))
                for q, t, g in zip(df["query"], cut(df["text"], settings), df["grade"])]
    loader = DataLoader(examples, shuffle=True, batch_size=settings.batch_size)
    steps = len(loader) * settings.epochs
    with Timer() as t:
        model.old_fit(loader, epochs=settings.epochs, warmup_steps=int(steps * settings.warmup_share),
                      optimizer_params={"lr": settings.learning_rate, "fused": True}, weight_decay=0.01, max_grad_norm=1.0,
                      show_progress_bar=False)
    return len(df) * settings.epochs / t.seconds


def cut(texts, settings: CrossEncoderSettings) -> list[str]:
    """The product texts as the judge sees them (cut to max_text_chars)."""
    return [t[: settings.max_text_chars] if settings.max_text_chars else t for t in texts]


def same_weights_cross_encoder(folder: Path, judge: CrossEncoderModel):
    """A sentence-transformers CrossEncoder with the judge's encoder and head: Transformer -> mean Pooling ->
    Dense(identity) as `scores`."""
    from sentence_transformers.base.modules import Dense, Transformer
    from sentence_transformers.cross_encoder import CrossEncoder
    from sentence_transformers.sentence_transformer.modules import Pooling

    transformer = Transformer(str(folder / "encoder"), transformer_task="feature-extraction", max_seq_length=judge.max_length,
                              model_kwargs={"add_pooling_layer": False})
    dim = judge.bert.config.hidden_size
    head = Dense(dim, len(judge.grades), activation_function=torch.nn.Identity(), module_output_name="scores")
    head.linear.load_state_dict(judge.head.state_dict())
    return CrossEncoder(modules=[transformer, Pooling(dim, pooling_mode="mean"), head], device="cpu")


def grading_rounds(judge: CrossEncoderModel, ce, df: pd.DataFrame, settings: CrossEncoderSettings, args) -> dict:
    """Pairs/s of both sides over alternating rounds, and both sides' probabilities of the last round."""
    queries, texts = df["query"].tolist(), df["text"].tolist()
    pairs = list(zip(queries, cut(texts, settings)))
    ours, theirs = [], []
    for _ in range(args.repeats):
        with Timer() as t:
            p_ours = judge.ce_proba(queries, texts, batch_size=args.grade_batch_size)
        ours.append(len(df) / t.seconds)
        with Timer() as t:
            p_st = ce.predict(pairs, batch_size=args.grade_batch_size, apply_softmax=True, show_progress_bar=False)
        theirs.append(len(df) / t.seconds)
    return {"ours": ours, "theirs": theirs, "p_ours": p_ours, "p_st": np.asarray(p_st, dtype=np.float64)}


def training_rounds(df: pd.DataFrame, settings: CrossEncoderSettings, args) -> dict:
    """Alternating rounds of the judge's training and CrossEncoder.fit, then once more the judge's training with
    BERT's own padded forward (`CrossEncoderModel.packed_training = False`) for the packed forward's share."""
    ours, theirs, judge = [], [], None
    for _ in range(args.repeats):
        speed, judge = train_annomine(df, settings)
        ours.append(speed)
        theirs.append(train_sentence_transformers(df, settings))
    CrossEncoderModel.packed_training = False
    try:
        padded_speed, padded_judge = train_annomine(df, settings)
    finally:
        CrossEncoderModel.packed_training = True
    return {"ours": ours, "theirs": theirs, "judge": judge, "padded": padded_speed, "padded_judge": padded_judge}


def padding_figures(df: pd.DataFrame, settings: CrossEncoderSettings, grade_batch_size: int) -> None:
    """Padded tokens per real token: training batches bucketed by character length (what the judge trains on)
    and by token count, and grading batches in character-length and in token-count order."""
    from annomine.bert import build_encoder
    from annomine.judges.cross_encoder import _batches

    tokenizer, bert = build_encoder("minilm")
    judge = CrossEncoderModel(tokenizer, bert, GRADES, settings.max_length, max_text_chars=settings.max_text_chars)
    tokens = judge.tokens(df["query"].tolist(), df["text"].tolist())
    n_tokens = tokens.lengths()
    chars = np.array([len(q) + len(t) for q, t in zip(df["query"], cut(df["text"], settings))])

    def padded(batches) -> float:
        return round(sum(len(b) * int(n_tokens[b].max()) for b in batches) / int(n_tokens.sum()), 3)

    for key, lengths, bucketing in (("drawn at random (CrossEncoder.old_fit's shuffled DataLoader)", chars, False),
                                    ("bucketed by characters (the judge's training)", chars, True),
                                    ("bucketed by tokens", n_tokens, True)):
        batches = _batches(np.random.default_rng(settings.seed), lengths, settings.batch_size, bucketing)
        emit(f"training batches of {settings.batch_size} {key}, {len(df)} pairs: padded tokens per real token",
             padded(batches), "x")
    for key, order in (("character-length order (CrossEncoder.predict)", np.argsort(chars, kind="stable")),
                       ("token-count order (the judge's grading)", tokens.by_length())):
        batches = [order[s:s + grade_batch_size] for s in range(0, len(order), grade_batch_size)]
        emit(f"grading batches of {grade_batch_size} in {key}, {len(df)} pairs: padded tokens per real token", padded(batches), "x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-pairs", type=int, default=200)
    parser.add_argument("--grade-pairs", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size")
    parser.add_argument("--grade-batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-text-chars", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds per comparison (medians reported)")
    parser.add_argument("--warehouse", help="take human-labelled pairs from this warehouse's Delta tables")
    parser.add_argument("--padding-only", action="store_true", help="only the padding figures (no model is run)")
    args = parser.parse_args()
    settings = settings_of(args)
    torch.set_num_threads(args.threads)
    n = args.train_pairs + args.grade_pairs
    df = warehouse_pairs(args.warehouse, n) if args.warehouse else demo_pairs(n)
    if args.padding_only:
        return padding_figures(df, settings, args.grade_batch_size)
    train_df, grade_df = df.iloc[: args.train_pairs].reset_index(drop=True), df.iloc[args.train_pairs:].reset_index(drop=True)
    source = "CrowdFlower pairs" if args.warehouse else "demo-shop pairs"
    with tempfile.TemporaryDirectory(prefix="bench-judge-") as tmp:
        train = training_rounds(train_df, settings, args)
        judge = train["judge"]
        judge.save(Path(tmp) / "judge")
        graded = grading_rounds(judge, same_weights_cross_encoder(Path(tmp) / "judge", judge), grade_df, settings, args)
    padded_probs = train["padded_judge"].ce_proba(grade_df["query"].tolist(), grade_df["text"].tolist())
    report(train, graded, args, source)
    emit(f"tier-1 judge training with BERT's own padded forward, batch {args.batch_size}, {args.train_pairs} pairs, "
         "one round", round(train["padded"], 2), "examples/s")
    emit("tier-1 judge training speed, real tokens only / padded forward (same run)",
         round(statistics.median(train["ours"]) / train["padded"], 2), "x")
    emit("tier-1 judges trained with the packed and the padded forward: max |grade probability difference|",
         float(f"{np.abs(graded['p_ours'] - padded_probs).max():.3g}"), "")


def report(train: dict, graded: dict, args, source: str) -> None:
    shape = (f"MiniLM, {source}, {args.max_length} tokens, text cut at {args.max_text_chars} chars, "
             f"{args.threads} threads, {args.repeats} alternating rounds (median)")
    ours, st = statistics.median(train["ours"]), statistics.median(train["theirs"])
    emit(f"tier-1 judge training, batch {args.batch_size}, {args.epochs} epochs, {args.train_pairs} pairs, {shape}",
         round(ours, 2), "examples/s", rounds=[round(x, 2) for x in train["ours"]])
    emit(f"CrossEncoder.fit training (old_fit, cross-entropy), batch {args.batch_size}, {args.epochs} epochs, "
         f"{args.train_pairs} pairs, {shape}", round(st, 2), "examples/s", rounds=[round(x, 2) for x in train["theirs"]])
    emit("tier-1 judge / CrossEncoder.fit training speed ratio (same run)", round(ours / st, 2), "x")
    ours, st = statistics.median(graded["ours"]), statistics.median(graded["theirs"])
    emit(f"tier-1 judge grading (ce_proba), batch {args.grade_batch_size}, {args.grade_pairs} pairs, {shape}",
         round(ours, 1), "pairs/s", rounds=[round(x, 1) for x in graded["ours"]])
    emit(f"CrossEncoder.predict grading, same weights and head, batch {args.grade_batch_size}, {args.grade_pairs} pairs, "
         f"{shape}", round(st, 1), "pairs/s", rounds=[round(x, 1) for x in graded["theirs"]])
    emit("tier-1 judge / CrossEncoder.predict grading speed ratio (same run)", round(ours / st, 2), "x")
    p_ours, p_st = graded["p_ours"], graded["p_st"]
    expected = np.abs(p_ours @ np.asarray(GRADES, float) - p_st @ np.asarray(GRADES, float)).max()
    emit("tier-1 judge vs CrossEncoder.predict: max |grade probability difference|", float(f"{np.abs(p_ours - p_st).max():.2e}"), "")
    emit("tier-1 judge vs CrossEncoder.predict: max |expected grade difference|", float(f"{expected:.2e}"), "grades")
    emit("tier-1 judge vs CrossEncoder.predict: arg-max grade agreement", round(float((p_ours.argmax(1) == p_st.argmax(1)).mean()), 4),
         "share of pairs")


if __name__ == "__main__":
    main()
