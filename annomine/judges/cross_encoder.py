"""Tier 1: a cross-encoder judge fine-tuned from all-MiniLM-L6-v2 on human-graded pairs.

The pair `[CLS] query [SEP] product text [SEP]` goes through BERT; the attention-masked mean of
the last hidden states feeds a linear head over the grades. The loss is cross-entropy plus an
ordinal term (squared error of the expected grade, in grade units), so the distribution is both a
classifier and respects the order of grades, which is what quadratic weighted kappa rewards. The
decision rule (arg-max class or rounded expected grade) is picked on the validation split.

Saved artefacts (`<warehouse>/judges/<version>/`): `encoder/` (BERT + tokenizer, HF layout),
`head.pt`, `judge.json` (grades, max_length, decision rule, version, metrics).
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

log = logging.getLogger(__name__)

TINY = "tiny"  # a small random BERT for tests (the MiniLM tokenizer, 2 layers of width 32)


@dataclass
class CrossEncoderSettings:
    base_model: str = "minilm"
    max_length: int = 128
    epochs: int = 3
    batch_size: int = 16
    learning_rate: float = 4e-5
    head_learning_rate: float = 1e-3
    warmup_share: float = 0.1
    ordinal_weight: float = 0.5
    weight_by_variance: bool = True
    max_train_pairs: int | None = None
    seed: int = 13
    threads: int = 2
    # Freeze the embeddings and the first N transformer layers (faster on CPU; -1: train everything).
    freeze_layers: int = -1
    # With frozen layers: compute their output once per pair and train the top layers on it.
    cache_frozen: bool = True


def _torch():
    import torch

    return torch


def build_encoder(base_model: str):
    """(tokenizer, BertModel) for 'minilm', a local HF folder, or 'tiny' (random, for tests)."""
    from annomine.encoders import load_bert, minilm_path

    if base_model == TINY:
        from transformers import AutoTokenizer, BertConfig, BertModel

        tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=256)
        return tokenizer, BertModel(config, add_pooling_layer=False)
    return load_bert(base_model)


class CrossEncoderModel:
    """BERT + linear head; `predict_proba(queries, texts)` -> (n, n_grades) probabilities."""

    def __init__(self, tokenizer, bert, grades: list[int], max_length: int = 128, decision: str = "argmax",
                 version: str | None = None, meta: dict | None = None):
        torch = _torch()
        self.tokenizer = tokenizer
        self.bert = bert
        self.grades = list(grades)
        self.head = torch.nn.Linear(bert.config.hidden_size, len(self.grades))
        self.max_length = max_length
        self.decision = decision
        self.version = version
        self.meta = meta or {}
        self._lock = threading.Lock()

    # ---- forward -----------------------------------------------------------------------
    def _encode(self, queries: list[str], texts: list[str]):
        return self.tokenizer(list(queries), list(texts), padding=True, truncation="only_second",
                              max_length=self.max_length, return_tensors="pt")

    def logits(self, enc):
        from annomine.encoders import mean_pool

        hidden = self.bert(**enc).last_hidden_state
        return self.head(mean_pool(hidden, enc["attention_mask"]))

    def predict_proba(self, queries: list[str], texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        torch = _torch()
        out = np.zeros((len(queries), len(self.grades)), dtype=np.float64)
        if not len(queries):
            return out
        # Sort by length so batches pad little; restore the order at the end.
        order = np.argsort([len(q) + len(t) for q, t in zip(queries, texts)])
        starts = range(0, len(order), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="tier1", unit="batch", mininterval=5)
        with self._lock, torch.inference_mode():
            self.bert.eval()
            for s in starts:
                idx = order[s:s + batch_size]
                enc = self._encode([queries[i] for i in idx], [texts[i] for i in idx])
                probs = torch.softmax(self.logits(enc).float(), dim=-1).numpy()
                out[idx] = probs
        return out

    def decide(self, probs: np.ndarray, rule: str | None = None) -> np.ndarray:
        """Grades from probabilities with the model's decision rule."""
        rule = rule or self.decision
        grades = np.asarray(self.grades)
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
        meta = dict(self.meta, grades=self.grades, max_length=self.max_length, decision=self.decision, version=self.version,
                    kind="cross-encoder")
        (folder / "judge.json").write_text(json.dumps(meta, indent=2, default=str))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "CrossEncoderModel":
        torch = _torch()
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        meta_path = folder / "judge.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"not a judge folder (no judge.json): {folder}")
        meta = json.loads(meta_path.read_text())
        tokenizer = AutoTokenizer.from_pretrained(str(folder / "encoder"), local_files_only=True)
        bert = AutoModel.from_pretrained(str(folder / "encoder"), local_files_only=True, add_pooling_layer=False)
        model = cls(tokenizer, bert, meta["grades"], meta["max_length"], meta.get("decision", "argmax"), meta.get("version"), meta)
        model.head.load_state_dict(torch.load(folder / "head.pt", map_location="cpu"))
        bert.eval()
        return model


_CACHE: dict[str, CrossEncoderModel] = {}
_CACHE_LOCK = threading.Lock()


def load_cached(folder: str | Path) -> CrossEncoderModel:
    """One model per judge folder per process (pandas-UDF workers call this once per batch)."""
    key = str(Path(folder).resolve())
    with _CACHE_LOCK:
        if key not in _CACHE:
            t0 = time.time()
            torch = _torch()
            torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
            _CACHE[key] = CrossEncoderModel.load(folder)
            log.info("tier-1 judge loaded from %s in %.1fs (pid %d)", folder, time.time() - t0, __import__("os").getpid())
        return _CACHE[key]


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
    order = np.argsort([len(q) + len(t) for q, t in zip(queries, texts)])
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="frozen layers", unit="batch", mininterval=10)
    model.bert.eval()
    try:
        model.bert.encoder.layer = torch.nn.ModuleList(list(layers)[:n_layers])
        with torch.inference_mode():
            for s in starts:
                idx = order[s:s + batch_size]
                enc = model._encode([queries[i] for i in idx], [texts[i] for i in idx])
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
    from annomine.encoders import mean_pool

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


def train_cross_encoder(train_df, grades: list[int], settings: CrossEncoderSettings, valid_df=None,
                        progress: bool = True) -> tuple[CrossEncoderModel, dict]:
    """Fine-tune on `train_df` (query, text, grade[, variance]); pick the decision rule on `valid_df`.

    Returns the model and a history dict (loss per epoch, pairs/s, validation metrics per rule).
    """
    torch = _torch()

    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    torch.set_num_threads(settings.threads)
    tokenizer, bert = build_encoder(settings.base_model)
    model = CrossEncoderModel(tokenizer, bert, grades, settings.max_length)
    df = train_df.reset_index(drop=True)
    if settings.max_train_pairs and len(df) > settings.max_train_pairs:
        df = df.sample(settings.max_train_pairs, random_state=settings.seed).reset_index(drop=True)
    index = {g: i for i, g in enumerate(grades)}
    labels = torch.tensor([index[int(g)] for g in df["grade"]])
    if settings.weight_by_variance and "variance" in df.columns:
        var = df["variance"].astype(float).fillna(0.0).to_numpy()
        weights = torch.tensor(1.0 / (1.0 + var), dtype=torch.float32)
    else:
        weights = torch.ones(len(df))
    grade_values = torch.tensor([float(g) for g in grades])
    span = float(max(grades) - min(grades)) or 1.0
    if settings.freeze_layers >= 0:
        for p in model.bert.embeddings.parameters():
            p.requires_grad_(False)
        for layer in model.bert.encoder.layer[:settings.freeze_layers]:
            for p in layer.parameters():
                p.requires_grad_(False)
    params = [
        {"params": [p for p in model.bert.parameters() if p.requires_grad], "lr": settings.learning_rate},
        {"params": list(model.head.parameters()), "lr": settings.head_learning_rate},
    ]
    optimizer = torch.optim.AdamW(params, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(df) / settings.batch_size)
    total = max(1, steps_per_epoch * settings.epochs)
    warmup = int(total * settings.warmup_share)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    queries, texts = df["query"].tolist(), df["text"].tolist()
    started = time.time()
    frozen = settings.freeze_layers if settings.freeze_layers > 0 and settings.cache_frozen else 0
    cached = _frozen_outputs(model, queries, texts, frozen, progress=progress) if frozen else None
    history: dict = {"epochs": [], "train_pairs": len(df)}
    rng = np.random.default_rng(settings.seed)
    step = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="train tier1", unit="step", mininterval=10)
    for epoch in range(settings.epochs):
        model.bert.train()
        perm = rng.permutation(len(df))
        losses = []
        for s in range(0, len(perm), settings.batch_size):
            idx = perm[s:s + settings.batch_size]
            if cached is not None:
                logits = _top_logits(model, [cached[i] for i in idx], frozen)
            else:
                enc = model._encode([queries[i] for i in idx], [texts[i] for i in idx])
                logits = model.logits(enc)
            y = labels[idx]
            w = weights[idx]
            ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
            probs = torch.softmax(logits, dim=-1)
            expected = probs @ grade_values
            ordinal = ((expected - grade_values[y]) / span) ** 2
            loss = ((ce + settings.ordinal_weight * ordinal) * w).sum() / w.sum()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.bert.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses[-50:]):.3f}")
        history["epochs"].append({"epoch": epoch + 1, "loss": float(np.mean(losses))})
        log.info("epoch %d: loss %.4f", epoch + 1, np.mean(losses))
    if bar is not None:
        bar.close()
    elapsed = time.time() - started
    history["train_seconds"] = elapsed
    history["train_pairs_per_s"] = len(df) * settings.epochs / max(elapsed, 1e-9)
    model.bert.eval()
    if valid_df is not None and len(valid_df):
        probs = model.predict_proba(valid_df["query"].tolist(), valid_df["text"].tolist(), progress=progress)
        history.update(select_decision(model, probs, valid_df["grade"]))
    return model, history


def select_decision(model: CrossEncoderModel, probs: np.ndarray, truth) -> dict:
    """Set the model's decision rule (arg-max or rounded expected grade) to the one with the best
    quadratic weighted kappa on held-out pairs; return the comparison."""
    from annomine.judges.data import grading_metrics

    per_rule = {rule: grading_metrics(truth, model.decide(probs, rule), model.grades) for rule in ("argmax", "expected")}
    best = max(per_rule, key=lambda r: (per_rule[r]["quadratic_weighted_kappa"], per_rule[r]["exact_agreement"]))
    model.decision = best
    return {"validation": {r: {k: v for k, v in m.items() if k != "confusion_matrix"} for r, m in per_rule.items()},
            "decision": best}
