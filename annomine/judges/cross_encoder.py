"""Tier 1: a cross-encoder judge fine-tuned from all-MiniLM-L6-v2 on human-graded pairs.

The pair `[CLS] query [SEP] product text [SEP]` goes through BERT; the attention-masked mean of
the last hidden states feeds a linear head over the grades. The loss is cross-entropy plus an
ordinal term (squared error of the expected grade, in grade units), so the distribution is both a
classifier and respects the order of grades, which is what quadratic weighted kappa rewards. The
decision rule (arg-max class, rounded expected grade, or the expected grade against cut-points fitted
for QWK) is picked on the calibration split (query-disjoint from training).

Saved artefacts (`<warehouse>/judges/<version>/`): `encoder/` (BERT + tokenizer, HF layout),
`head.pt`, `judge.json` (grades, max_length, max_text_chars, decision rule, cut-points, version, metrics).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from annomine.bert import TINY, build_encoder, load_bert, mean_pool, per_process  # noqa: F401 - TINY: the judge's API
from annomine.bounds import bounded
from annomine.errors import DamagedInputError
from annomine.judges.pair_tokens import PairTokens
from annomine.optim import adamw
from annomine.progress import progress as progress_bar, progress_iter

log = logging.getLogger(__name__)


@dataclass
class CrossEncoderSettings:
    base_model: str = "minilm"
    max_length: int = bounded(128, ge=8)
    epochs: int = bounded(3, ge=1)
    batch_size: int = bounded(16, ge=1)
    learning_rate: float = bounded(4e-5, gt=0)
    head_learning_rate: float = bounded(1e-3, gt=0)
    warmup_share: float = bounded(0.1, ge=0, lt=1)
    ordinal_weight: float = bounded(0.5, ge=0)
    weight_by_variance: bool = True
    max_train_pairs: int | None = bounded(None, ge=1)
    seed: int = 13
    threads: int = bounded(2, ge=1)
    # Freeze the embeddings and the first N transformer layers (faster on CPU; -1: train everything).
    freeze_layers: int = bounded(-1, ge=-1)
    # With frozen layers: compute their output once per pair and train the top layers on it.
    cache_frozen: bool = True
    # Product text cut to this many characters before tokenising (title | description snippet; 0: whole
    # text). Stored with the model, so annotation sees the same text as training. Shorter is faster.
    max_text_chars: int = bounded(0, ge=0)
    # Decision rule: `auto` (the best on the calibration split of argmax / expected / cutpoints, cut-points
    # scored out-of-fold by query), or one of them outright.
    decision: str = "auto"
    # What the cut-points (and `auto`) maximise: qwk, exact, or qwk+exact.
    cutpoint_objective: str = "qwk"
    # A stacked tier 1: a logistic regression over the cross-encoder's grade distribution plus cheap per-pair
    # evidence (query-term coverage of the title and text, bi-encoder cosine), fitted on the calibration split
    # (annomine/judges/stack.py). Its distribution is what the decision rule and the calibration see.
    stack: bool = False
    stack_columns: list[str] | None = None   # default: stack.JUDGE_FEATURES
    stack_biencoder: str = "minilm"          # the bi-encoder of the cosine feature (zero-shot)
    stack_c: float = bounded(0.3, gt=0)                    # inverse L2 strength of the logistic regression
    # Batches of similar length (sorted within random windows of 50 batches, then shuffled): less padding.
    length_bucketing: bool = True


def _torch():
    import torch

    return torch


class CrossEncoderModel:
    """BERT + linear head; `predict_proba(queries, texts)` -> (n, n_grades) probabilities."""

    # Training's forward runs BERT's dense layers on real tokens only (annomine/packed_bert.py); False: the padded one.
    packed_training = True

    def __init__(self, tokenizer, bert, grades: list[int], max_length: int = 128, decision: str = "argmax",
                 version: str | None = None, meta: dict | None = None, max_text_chars: int = 0,
                 cutpoints: list[float] | None = None):
        torch = _torch()
        self.tokenizer = tokenizer
        self.bert = bert
        self.grades = list(grades)
        self.head = torch.nn.Linear(bert.config.hidden_size, len(self.grades))
        self.max_length = max_length
        self.decision = decision
        self.version = version
        self.meta = meta or {}
        self.max_text_chars = int(max_text_chars or 0)
        # Thresholds on the expected grade for the `cutpoints` rule (len(grades) - 1, ascending).
        self.cutpoints = [float(c) for c in cutpoints] if cutpoints else None
        self.stack = None       # stack.LogisticStack: the distribution over grades from the features below
        self.biencoder = None   # stack.BiEncoder: the cosine feature
        self._lock = threading.Lock()

    # ---- forward -----------------------------------------------------------------------
    def tokens(self, queries: list[str], texts: list[str]) -> PairTokens:
        """The pairs tokenised once, as the judge reads them (text cut to max_text_chars, max_length tokens)."""
        return PairTokens.of(self.tokenizer, queries, texts, self.max_length, self.max_text_chars)

    def logits(self, enc):
        """Grade logits of a batch of pair tensors; in training, BERT's dense layers run on real tokens only
        (annomine/packed_bert.py: the same hidden states as the padded forward)."""
        from annomine.packed_bert import last_hidden_state

        hidden = last_hidden_state(self.bert, enc, self.packed_training)
        return self.head(mean_pool(hidden, enc["attention_mask"]))

    def remember_text_vectors(self, texts: list, vectors) -> int:
        """Give the stack's bi-encoder these texts' vectors (the ANN channel's of the same model and token limit,
        `stack.judge_vector_key`), so they are not encoded; how many it had not cached (0 without a stack)."""
        if self.stack is None or self.biencoder is None:
            return 0
        return self.biencoder.remember(texts, vectors)

    def predict_proba(self, queries: list[str], texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """(n, n_grades) probabilities: the cross-encoder's, or the stack's over them when there is one."""
        probs = self.ce_proba(queries, texts, batch_size, progress)
        if self.stack is None or not len(queries):
            return probs
        from annomine.judges.stack import pair_features

        with self._lock:
            feats = pair_features(list(queries), list(texts), probs, self.grades, self.biencoder, self.stack.columns)
        return self.stack.predict_proba(feats, self.grades)

    def ce_proba(self, queries: list[str], texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """The cross-encoder's own grade distribution: the pairs tokenised once, graded in batches of similar
        token counts (each padded to its longest), returned in input order."""
        torch = _torch()
        out = np.zeros((len(queries), len(self.grades)), dtype=np.float64)
        if not len(queries):
            return out
        tokens = self.tokens(queries, texts)
        order = tokens.by_length()
        starts = range(0, len(order), batch_size)
        if progress:
            starts = progress_iter(starts, desc="tier1 grading", unit="batch")
        with self._lock, torch.inference_mode():
            self.bert.eval()
            for s in starts:
                idx = order[s:s + batch_size]
                out[idx] = torch.softmax(self.logits(tokens.batch(idx)).float(), dim=-1).numpy()
        return out

    def decide(self, probs: np.ndarray, rule: str | None = None, cutpoints: list[float] | None = None) -> np.ndarray:
        """Grades from probabilities with the model's decision rule: `argmax` (the most probable grade),
        `expected` (the rounded expected grade) or `cutpoints` (the expected grade against fitted cut-points)."""
        rule = rule or self.decision
        grades = np.asarray(self.grades)
        if rule == "cutpoints":
            from annomine.judges.calibration import apply_cutpoints

            cuts = cutpoints if cutpoints is not None else self.cutpoints
            if not cuts:
                raise ValueError("decision rule 'cutpoints' but the judge has no cut-points")
            return apply_cutpoints(probs @ grades, cuts, self.grades)
        if rule == "expected":
            expected = probs @ grades
            return np.clip(np.rint(expected), grades.min(), grades.max()).astype(int)
        return grades[probs.argmax(axis=1)]

    # ---- persistence --------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        torch = _torch()
        folder = Path(folder)
        (folder / "encoder").mkdir(parents=True, exist_ok=True)
        self.bert.save_pretrained(str(folder / "encoder"))
        self.tokenizer.save_pretrained(str(folder / "encoder"))
        torch.save(self.head.state_dict(), folder / "head.pt")
        stack = None
        if self.stack is not None:
            (folder / "stack.json").write_text(json.dumps(self.stack.to_dict(), indent=1))
            stack = {"file": "stack.json", "biencoder": self.biencoder.save(folder / "biencoder") if self.biencoder else None}
        meta = dict(self.meta, grades=self.grades, max_length=self.max_length, decision=self.decision, version=self.version,
                    cutpoints=self.cutpoints, max_text_chars=self.max_text_chars, stack=stack,
                    kind="stacked-cross-encoder" if stack else "cross-encoder")
        (folder / "judge.json").write_text(json.dumps(meta, indent=2, default=str))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "CrossEncoderModel":
        torch = _torch()
        folder = Path(folder)
        meta_path = folder / "judge.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"not a judge folder (no judge.json): {folder}")
        meta = json.loads(meta_path.read_text())
        tokenizer, bert = load_bert(str(folder / "encoder"))
        model = cls(tokenizer, bert, meta["grades"], meta["max_length"], meta.get("decision", "argmax"), meta.get("version"), meta,
                    meta.get("max_text_chars", 0), meta.get("cutpoints"))
        model.head.load_state_dict(torch.load(folder / "head.pt", map_location="cpu"))
        bert.eval()
        if meta.get("stack"):
            from annomine.judges.stack import BiEncoder, LogisticStack

            model.stack = LogisticStack.from_dict(json.loads((folder / meta["stack"]["file"]).read_text()))
            if meta["stack"].get("biencoder"):
                model.biencoder = BiEncoder.load(meta["stack"]["biencoder"], folder)
        return model


ENCODER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _read_weights(path: Path) -> None:
    """Read every tensor's header of a weights file (a truncated file fails here; the model is not built)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_slice(key).get_shape()
    else:
        _torch().load(path, map_location="cpu", weights_only=True, mmap=True)


def check_weights(folder: str | Path) -> None:
    """An error naming the weights file of judge `folder` (head.pt, the encoder's) that is missing or unreadable."""
    folder = Path(folder)
    encoder = [folder / "encoder" / name for name in ENCODER_WEIGHTS if (folder / "encoder" / name).is_file()]
    if not encoder:
        raise DamagedInputError(f"{folder / 'encoder'}: the judge's encoder has no weights file ({' or '.join(ENCODER_WEIGHTS)}); "
                                "train the judge again (annomine judge train) or set cascade.judge to another version")
    for path in [folder / "head.pt", *encoder]:
        try:
            _read_weights(path)
        except Exception as exc:  # noqa: BLE001 - torch and safetensors raise many kinds for a damaged file
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DamagedInputError(f"{path}: the judge's weights cannot be read ({reason}); train the judge again "
                                    "(annomine judge train) or set cascade.judge to another version") from exc


def load_cached(folder: str | Path) -> CrossEncoderModel:
    """One model per judge folder per process (pandas-UDF workers call this once per batch)."""
    return per_process(("judge", str(Path(folder).resolve())), lambda: _load_for_workers(folder))


def _load_for_workers(folder: str | Path) -> CrossEncoderModel:
    """`CrossEncoderModel.load` with torch held to at most 2 threads (several workers share a machine)."""
    t0 = time.time()
    torch = _torch()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model = CrossEncoderModel.load(folder)
    log.info("tier-1 judge loaded from %s in %.1fs (pid %d)", folder, time.time() - t0, __import__("os").getpid())
    return model


def version_id(settings: CrossEncoderSettings, grades: list[int], train_keys: list[tuple]) -> str:
    """`ce-<hash>` of the settings, grade scale and training data (pairs and grades)."""
    h = hashlib.sha256()
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())
    h.update(json.dumps(grades).encode())
    for key in sorted(train_keys):
        h.update(repr(key).encode())
    return "ce-" + h.hexdigest()[:12]


def _additive_mask(attention_mask):
    torch = _torch()
    return (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def _frozen_outputs(model: CrossEncoderModel, queries: list[str], texts: list[str], n_layers: int,
                    batch_size: int = 64, progress: bool = False) -> list:
    """Per pair, the hidden states after the embeddings and the first `n_layers` layers (unpadded)."""
    torch = _torch()
    layers = model.bert.encoder.layer
    out: list = [None] * len(queries)
    tokens = model.tokens(queries, texts)
    order = tokens.by_length()
    starts = range(0, len(order), batch_size)
    if progress:
        starts = progress_iter(starts, desc="tier1 frozen layers", unit="batch")
    model.bert.eval()
    try:
        model.bert.encoder.layer = torch.nn.ModuleList(list(layers)[:n_layers])
        with torch.inference_mode():
            for s in starts:
                idx = order[s:s + batch_size]
                enc = tokens.batch(idx)
                hidden = model.bert(**enc).last_hidden_state
                lengths = enc["attention_mask"].sum(dim=1).tolist()
                for row, i in enumerate(idx):
                    out[i] = hidden[row, : int(lengths[row])].clone()
    finally:
        model.bert.encoder.layer = layers
    return out


def _top_logits(model: CrossEncoderModel, cached: list, n_layers: int):
    """Logits from cached frozen-layer outputs through the trainable top layers and the head."""
    torch = _torch()

    length = max(int(h.shape[0]) for h in cached)
    dim = int(cached[0].shape[1])
    hidden = torch.zeros(len(cached), length, dim)
    mask = torch.zeros(len(cached), length, dtype=torch.long)
    for i, h in enumerate(cached):
        hidden[i, : h.shape[0]] = h
        mask[i, : h.shape[0]] = 1
    ext = _additive_mask(mask)
    for layer in list(model.bert.encoder.layer)[n_layers:]:
        out = layer(hidden, attention_mask=ext)
        hidden = out[0] if isinstance(out, tuple) else out
    return model.head(mean_pool(hidden, mask))


def _batches(rng, lengths: np.ndarray, batch_size: int, bucketing: bool, window: int = 50) -> list[np.ndarray]:
    """One epoch's batches: a random permutation; with `bucketing`, sorted by length within windows of
    `window` batches and the batches shuffled, so a batch pads to similar lengths."""
    perm = rng.permutation(len(lengths))
    if not bucketing:
        return [perm[s:s + batch_size] for s in range(0, len(perm), batch_size)]
    out = []
    for w in range(0, len(perm), batch_size * window):
        chunk = perm[w:w + batch_size * window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out.extend(chunk[s:s + batch_size] for s in range(0, len(chunk), batch_size))
    return [out[i] for i in rng.permutation(len(out))]


def _seed(settings: CrossEncoderSettings) -> None:
    """Seed torch, random and numpy and set torch's thread count from the settings."""
    torch = _torch()
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    torch.set_num_threads(settings.threads)


def _training_pairs(train_df, settings: CrossEncoderSettings):
    """The pairs trained on: `train_df`, sampled down to `max_train_pairs` when set."""
    df = train_df.reset_index(drop=True)
    if settings.max_train_pairs and len(df) > settings.max_train_pairs:
        df = df.sample(settings.max_train_pairs, random_state=settings.seed).reset_index(drop=True)
    return df


def _targets(df, grades: list[int], settings: CrossEncoderSettings) -> tuple:
    """The class index and the loss weight of each pair (1 / (1 + variance) when weighted by variance, else 1)."""
    torch = _torch()
    index = {g: i for i, g in enumerate(grades)}
    labels = torch.tensor([index[int(g)] for g in df["grade"]])
    if settings.weight_by_variance and "variance" in df.columns:
        var = df["variance"].astype(float).fillna(0.0).to_numpy()
        weights = torch.tensor(1.0 / (1.0 + var), dtype=torch.float32)
    else:
        weights = torch.ones(len(df))
    return labels, weights


def _freeze(model: CrossEncoderModel, freeze_layers: int) -> None:
    """Freeze the embeddings and the first `freeze_layers` encoder layers (nothing when negative)."""
    if freeze_layers >= 0:
        for p in model.bert.embeddings.parameters():
            p.requires_grad_(False)
        for layer in model.bert.encoder.layer[:freeze_layers]:
            for p in layer.parameters():
                p.requires_grad_(False)


def _optimizer(model: CrossEncoderModel, settings: CrossEncoderSettings, total: int) -> tuple:
    """AdamW over the trainable encoder and the head, and its linear warm-up then decay schedule over `total` steps."""
    torch = _torch()
    params = [
        {"params": [p for p in model.bert.parameters() if p.requires_grad], "lr": settings.learning_rate},
        {"params": list(model.head.parameters()), "lr": settings.head_learning_rate},
    ]
    optimizer = adamw(params, weight_decay=0.01)
    warmup = int(total * settings.warmup_share)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    return optimizer, scheduler


def _batch_loss(logits, y, w, grade_values, span: float, ordinal_weight: float):
    """The weighted cross-entropy plus ordinal (squared expected-grade error) loss of one batch."""
    torch = _torch()
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    probs = torch.softmax(logits, dim=-1)
    expected = probs @ grade_values
    ordinal = ((expected - grade_values[y]) / span) ** 2
    return ((ce + ordinal_weight * ordinal) * w).sum() / w.sum()


def train_cross_encoder(train_df, grades: list[int], settings: CrossEncoderSettings, valid_df=None,
                        progress: bool = True) -> tuple[CrossEncoderModel, dict]:
    """Fine-tune on `train_df` (query, text, grade[, variance]); pick the decision rule on `valid_df`.

    Returns the model and a history dict (loss per epoch, pairs/s, validation metrics per rule).
    """
    _seed(settings)
    tokenizer, bert = build_encoder(settings.base_model)
    model = CrossEncoderModel(tokenizer, bert, grades, settings.max_length, max_text_chars=settings.max_text_chars)
    df = _training_pairs(train_df, settings)
    _freeze(model, settings.freeze_layers)
    history = _fit(model, df, grades, settings, progress)
    model.bert.eval()
    if valid_df is not None and len(valid_df):
        probs = model.predict_proba(valid_df["query"].tolist(), valid_df["text"].tolist(), progress=progress)
        groups = valid_df["query_id"] if "query_id" in valid_df.columns else None
        history.update(select_decision(model, probs, valid_df["grade"], groups, settings.decision, settings.cutpoint_objective))
    return model, history


def _fit(model: CrossEncoderModel, df, grades: list[int], settings: CrossEncoderSettings, progress: bool) -> dict:
    """The training loop over `df`'s pairs: tokenised once (or their frozen layers run once), then per epoch
    length-bucketed batches, each padded to its longest pair. Returns the history (loss per epoch, pairs/s)."""
    torch = _torch()
    labels, weights = _targets(df, grades, settings)
    grade_values = torch.tensor([float(g) for g in grades])
    span = float(max(grades) - min(grades)) or 1.0
    total = max(1, math.ceil(len(df) / settings.batch_size) * settings.epochs)
    optimizer, scheduler = _optimizer(model, settings, total)
    queries, texts = df["query"].tolist(), df["text"].tolist()
    started = time.time()
    frozen = settings.freeze_layers if settings.freeze_layers > 0 and settings.cache_frozen else 0
    cached = _frozen_outputs(model, queries, texts, frozen, progress=progress) if frozen else None
    tokens = None if cached is not None else model.tokens(queries, texts)
    history: dict = {"epochs": [], "train_pairs": len(df)}
    rng = np.random.default_rng(settings.seed)
    bar = progress_bar(total, desc="train tier1", unit="step", mininterval=10) if progress else None
    lengths = np.array([len(q) + min(len(t), settings.max_text_chars or len(t)) for q, t in zip(queries, texts)])
    for epoch in range(settings.epochs):
        model.bert.train()
        losses = []
        for idx in _batches(rng, lengths, settings.batch_size, settings.length_bucketing):
            logits = _top_logits(model, [cached[i] for i in idx], frozen) if cached is not None else model.logits(tokens.batch(idx))
            loss = _batch_loss(logits, labels[idx], weights[idx], grade_values, span, settings.ordinal_weight)
            _step(model, optimizer, scheduler, loss)
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses[-50:]):.3f}")
        history["epochs"].append({"epoch": epoch + 1, "loss": float(np.mean(losses))})
        log.info("epoch %d: loss %.4f", epoch + 1, np.mean(losses))
    if bar is not None:
        bar.close()
    history["train_seconds"] = time.time() - started
    history["train_pairs_per_s"] = len(df) * settings.epochs / max(history["train_seconds"], 1e-9)
    return history


def _step(model: CrossEncoderModel, optimizer, scheduler, loss) -> None:
    """One optimiser step on `loss` (gradients of the trainable encoder clipped to norm 1)."""
    optimizer.zero_grad()
    loss.backward()
    _torch().nn.utils.clip_grad_norm_([p for p in model.bert.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    scheduler.step()


DECISION_RULES = ("argmax", "expected", "cutpoints")


def select_decision(model: CrossEncoderModel, probs: np.ndarray, truth, groups=None, rule: str = "auto",
                    objective: str = "qwk") -> dict:
    """Fit the cut-points on held-out pairs (the calibration split) and set the model's decision rule:
    `rule` itself, or with `auto` the rule with the best `objective` there (tie: exact agreement). The
    cut-points are scored out-of-fold by query (`groups`), so that they do not win by being fitted on the
    pairs they are scored on; without groups, in-sample. Returns the comparison."""
    from annomine.judges.calibration import cross_validated_cutpoints, cutpoint_objective, fit_cutpoints
    from annomine.judges.data import grading_metrics

    if rule not in ("auto", *DECISION_RULES):
        raise ValueError(f"unknown decision rule {rule!r}; use auto, argmax, expected or cutpoints")
    truth = np.asarray(list(truth)).astype(int)
    expected = probs @ np.asarray(model.grades, dtype=float)
    model.cutpoints = fit_cutpoints(expected, truth, model.grades, objective)
    preds = {"argmax": model.decide(probs, "argmax"), "expected": model.decide(probs, "expected")}
    if groups is not None and len(set(groups)) >= 2:
        preds["cutpoints"] = cross_validated_cutpoints(expected, truth, groups, model.grades, objective)
    else:
        preds["cutpoints"] = model.decide(probs, "cutpoints")
    per_rule = {r: grading_metrics(truth, p, model.grades) for r, p in preds.items()}
    score = {r: (cutpoint_objective(truth, p, model.grades, objective), per_rule[r]["exact_agreement"]) for r, p in preds.items()}
    best = max(DECISION_RULES, key=lambda r: score[r]) if rule == "auto" else rule
    model.decision = best
    return {"validation": {r: {k: v for k, v in m.items() if k != "confusion_matrix"} for r, m in per_rule.items()},
            "decision": best, "cutpoints": model.cutpoints, "cutpoint_objective": objective,
            "cutpoints_scored": "out-of-fold by query" if groups is not None and len(set(groups)) >= 2 else "in-sample"}


def attach_stack(model: CrossEncoderModel, df, ce_probs: np.ndarray, settings: CrossEncoderSettings, weights=None,
                 known_vectors: dict | None = None) -> dict:
    """Fit the stack on held-out pairs (`df`: the calibration split, with the cross-encoder's `ce_probs` on it)
    and attach it to `model`. `known_vectors`: {text: vector} of the stack's bi-encoder model and token limit (the
    ANN channel's, `stack.shared_vector_key`), cached so those texts are not encoded. Returns the out-of-fold
    stacked probabilities (by query), the fitted stack's own on `df` (what `predict_proba` gives these pairs) and
    the fit's figures."""
    from annomine.judges.stack import JUDGE_FEATURES, BiEncoder, fit_logistic_stack, pair_features

    columns = list(settings.stack_columns or JUDGE_FEATURES)
    model.biencoder = BiEncoder(settings.stack_biencoder) if "cosine" in columns else None
    if model.biencoder is not None and known_vectors:
        model.biencoder.remember(list(known_vectors), list(known_vectors.values()))
    started = time.time()
    feats = pair_features(df["query"].tolist(), df["text"].tolist(), ce_probs, model.grades, model.biencoder, columns)
    stack, oof = fit_logistic_stack(feats, df["grade"], df["query_id"], model.grades, columns, weights, seed=settings.seed,
                                    C=settings.stack_c)
    model.stack = stack
    return {"oof_probs": oof, "fitted_probs": stack.predict_proba(feats, model.grades), "columns": columns,
            "features_seconds": time.time() - started,
            "coefficients": dict(zip(columns, np.round(np.asarray(stack.coef)[-1] - np.asarray(stack.coef)[0], 4).tolist()))}
