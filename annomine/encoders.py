"""Offline BERT text encoders: batched inference over the weights and pooling of `annomine.bert`.

Shared by the ANN channel, the zero-shot baseline, the cross-encoder judge and the two-tower
towers; `shared_encoder` keeps one `TextEncoder` per (model, max_length) per process.

Inference (`TextEncoder`, the two-tower's `encode_*`) runs length-sorted batches (`encode_sorted`)
through ONNX Runtime (`annomine.onnx_encoder`) on CPU and through torch otherwise or when asked
(`resolve_backend`); training keeps torch. Both give the same vectors (cosine >= 0.9999).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from annomine.bert import MINILM, load_bert, mean_pool, minilm_path, per_process, resolve_model_path  # noqa: F401 - the encoders' API
from annomine.progress import progress as progress_bar

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnx", "torch")
# Overrides what 'auto' means for the whole process ('onnx' or 'torch'), e.g. to rule ONNX Runtime out.
BACKEND_ENV = "ANNOMINE_ENCODER_BACKEND"
# Texts tokenized and length-sorted together (bounds the token lists held at once).
SORT_WINDOW = 8192


# ---- length-sorted batching ----------------------------------------------------------------
def length_sorted_batches(tokenizer, texts: list[str], max_length: int, batch_size: int):
    """Yield (positions, input_ids, attention_mask) with texts grouped by token count.

    Catalog texts vary in length, so batches in input order carry much padding (29% of the tokens at
    64 tokens, measured). Each window of SORT_WINDOW texts is tokenized once, ordered by length, then cut into
    batches padded to their own longest text; `positions` say where each row belongs in `texts`.
    """
    pad_id = tokenizer.pad_token_id or 0
    pad_left = getattr(tokenizer, "padding_side", "right") == "left"
    for offset in range(0, len(texts), SORT_WINDOW):
        window = texts[offset:offset + SORT_WINDOW]
        ids = tokenizer(window, truncation=True, max_length=max_length, padding=False,
                        return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
            attention_mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                n = len(ids[i])
                cols = slice(width - n, width) if pad_left else slice(0, n)
                input_ids[r, cols] = ids[i]
                attention_mask[r, cols] = 1
            yield np.asarray(rows, dtype=np.int64) + offset, input_ids, attention_mask


def encode_sorted(tokenizer, run_batch, texts: list[str], dim: int, max_length: int, batch_size: int,
                  progress: bool = False, desc: str = "encode") -> np.ndarray:
    """texts -> run_batch(input_ids, attention_mask) per length-sorted batch, rows back in input order."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    bar = None
    if progress:
        bar = progress_bar(len(texts), desc=desc, unit="text")
    try:
        for positions, input_ids, attention_mask in length_sorted_batches(tokenizer, texts, max_length, batch_size):
            out[positions] = run_batch(input_ids, attention_mask)
            if bar is not None:
                bar.update(len(positions))
    finally:
        if bar is not None:
            bar.close()
    return out


# ---- backend choice ------------------------------------------------------------------------
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def resolve_backend(requested: str, device) -> str:
    """'auto' | 'onnx' | 'torch' -> the backend to run: ONNX Runtime for CPU inference when it imports.

    On CUDA the model stays in torch (this ONNX Runtime build is CPU only). A requested or default ONNX
    path that cannot run falls back to torch with one warning line per reason and process.
    $ANNOMINE_ENCODER_BACKEND, when set, replaces 'auto'.
    """
    if requested == "auto":
        requested = os.environ.get(BACKEND_ENV) or "auto"
    if requested not in BACKENDS:
        raise ValueError(f"encoder backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "torch":
        return "torch"
    if str(device).startswith("cuda"):
        if requested == "onnx":
            _warn_once(f"encoder backend 'onnx' runs on the CPU only; the model is on {device}: encoding with torch")
        return "torch"
    from annomine.onnx_encoder import runtime_available

    ok, why = runtime_available()
    if not ok:
        _warn_once(f"onnxruntime is not usable ({why}): encoding with torch (slower)")
        return "torch"
    return "onnx"


def onnx_or_none(model, threads: int | None = None):
    """The ONNX Runtime tower of `model`, or None (one warning line) when export or loading fails."""
    from annomine.onnx_encoder import onnx_tower

    try:
        return onnx_tower(model, threads)
    except Exception as exc:  # noqa: BLE001 - the torch path still works: fall back, loudly once
        _warn_once(f"ONNX export of {type(model).__name__} failed ({type(exc).__name__}: {exc}): encoding with torch (slower)")
        return None


class TextEncoder:
    """Batched inference: texts -> L2-normalised float32 embeddings (numpy).

    backend: 'auto' (ONNX Runtime on CPU when it imports, else torch), 'onnx' or 'torch'. Both run the
    same length-sorted batches; `self.model` (torch) stays loaded, for the export and as the fallback.
    threads: ONNX Runtime's intra-op threads (default: torch's thread count).
    """

    def __init__(self, name_or_path: str = MINILM, max_length: int = 64, batch_size: int = 128, device: str | None = None,
                 backend: str = "auto", threads: int | None = None):
        import torch

        self.tokenizer, self.model = load_bert(name_or_path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self.name = name_or_path
        self.onnx = onnx_or_none(self.model, threads) if resolve_backend(backend, self.device) == "onnx" else None

    @property
    def backend(self) -> str:
        return "onnx" if self.onnx is not None else "torch"

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def _run_torch(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        import torch

        ids = torch.from_numpy(input_ids).to(self.device)
        mask = torch.from_numpy(attention_mask).to(self.device)
        with torch.inference_mode():
            hidden = self.model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
            return torch.nn.functional.normalize(mean_pool(hidden, mask), dim=-1).float().cpu().numpy()

    def encode(self, texts: list[str], progress: bool = False, desc: str = "encode") -> np.ndarray:
        run = self.onnx if self.onnx is not None else self._run_torch
        return encode_sorted(self.tokenizer, run, list(texts), self.dim, self.max_length, self.batch_size, progress, desc)


def shared_encoder(name: str, max_length: int) -> TextEncoder:
    """One TextEncoder per (model, max_length) per process."""
    return per_process(("text-encoder", name, int(max_length)), lambda: TextEncoder(name, max_length=max_length))
