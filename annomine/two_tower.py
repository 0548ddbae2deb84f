"""The two-tower retriever: BERT encoder(s), attention-masked mean pooling, L2-normalised output.

`TwoTower.from_base("minilm")` starts from the bundled all-MiniLM-L6-v2 (offline); `TwoTower.tiny()`
is a small random BERT with MiniLM's tokenizer for tests. Towers are shared (one encoder for queries
and items) or separate, by config. `save(dir)` / `TwoTower.load(dir)` round-trip a folder:

    <dir>/twotower.json     {"shared", "query_max_len", "item_max_len", "base"}
    <dir>/tokenizer/        Hugging Face tokenizer files
    <dir>/query/            query tower (BertModel, no pooler)
    <dir>/item/             item tower (only when towers are separate)

The evaluation stage uses `encode_queries` / `encode_items` (float32, L2-normalised numpy; through ONNX
Runtime when loaded with `backend="auto"`, one export per tower); training (`training.runner`) uses
`tokenize` and `embed` (differentiable). Core, not `training/`: the model is inference and persistence
only (torch, no training logic), so evaluation can load it without an upward import. `torch` is
imported here at module level: import this module lazily from torch-free core code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from annomine.encoders import MINILM, encode_sorted, load_bert, mean_pool, onnx_or_none, resolve_backend, resolve_model_path
from annomine.packed_bert import last_hidden_state

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

META_FILE = "twotower.json"


def _tiny_bert(hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0):
    """A random BertModel (no pooler) with MiniLM's vocabulary: fast enough for unit tests."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM), local_files_only=True)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=hidden * 2, max_position_embeddings=128)
    torch.manual_seed(seed)
    return tokenizer, BertModel(config, add_pooling_layer=False)


def parse_tiny(name: str) -> dict | None:
    """'tiny' or 'tiny:128x2' (hidden x layers) -> kwargs of `TwoTower.tiny`, else None."""
    if not name.startswith("tiny"):
        return None
    spec = name.partition(":")[2]
    if not spec:
        return {}
    hidden, _, layers = spec.partition("x")
    heads = 2 if int(hidden) < 128 else max(2, int(hidden) // 64)
    return {"hidden": int(hidden), "layers": int(layers or 2), "heads": heads}


class TwoTower(nn.Module):
    """Query and item towers over BERT, returning unit vectors (cosine = dot product)."""

    # Training's forward runs BERT's dense layers on real tokens only (annomine/packed_bert.py): the same hidden
    # states as the padded forward, a quarter to a third less work. False: the model's own padded forward.
    packed_training = True

    def __init__(self, tokenizer, query_encoder: nn.Module, item_encoder: nn.Module | None = None, *,
                 query_max_len: int = 16, item_max_len: int = 64, base: str = MINILM, backend: str = "torch",
                 onnx_threads: int | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.query_encoder = query_encoder
        # None: shared towers (the item tower is the query tower).
        self.item_encoder = item_encoder
        self.query_max_len = int(query_max_len)
        self.item_max_len = int(item_max_len)
        self.base = base
        # Inference backend of encode_queries / encode_items ('auto', 'onnx', 'torch'; see
        # annomine.encoders.resolve_backend). 'torch' by default: a model being trained changes its weights
        # every step; loaders of a finished model for inference ask for 'auto'.
        self.backend = backend
        self.onnx_threads = onnx_threads
        self._onnx_towers: dict[int, tuple] = {}  # id(tower) -> (weights stamp, OnnxTower or None)

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_base(cls, name_or_path: str = MINILM, shared: bool = True, query_max_len: int = 16,
                  item_max_len: int = 64) -> TwoTower:
        """Towers initialised from 'minilm' (bundled weights), a local HF folder, or 'tiny[:HxL]' (random)."""
        tiny = parse_tiny(name_or_path)
        if tiny is not None:
            return cls.tiny(shared=shared, query_max_len=query_max_len, item_max_len=item_max_len, **tiny)
        tokenizer, query = load_bert(name_or_path)
        item = None if shared else load_bert(name_or_path)[1]
        return cls(tokenizer, query, item, query_max_len=query_max_len, item_max_len=item_max_len, base=name_or_path)

    @classmethod
    def tiny(cls, shared: bool = True, query_max_len: int = 16, item_max_len: int = 64, hidden: int = 32,
             layers: int = 2, heads: int = 2, seed: int = 0) -> TwoTower:
        tokenizer, query = _tiny_bert(hidden, layers, heads, seed)
        item = None if shared else _tiny_bert(hidden, layers, heads, seed + 1)[1]
        return cls(tokenizer, query, item, query_max_len=query_max_len, item_max_len=item_max_len,
                   base=f"tiny:{hidden}x{layers}")

    @property
    def shared(self) -> bool:
        return self.item_encoder is None

    @property
    def dim(self) -> int:
        return int(self.query_encoder.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def fingerprint(self) -> str:
        """A hash of what the model's vectors depend on: each tower's config and weights, the token limits, the
        inference backend and the device."""
        import hashlib

        from annomine.onnx_encoder import weights_key

        settings = {"shared": self.shared, "query_max_len": self.query_max_len, "item_max_len": self.item_max_len,
                    "backend": self.backend, "device": str(self.device)}
        towers = [weights_key(encoder) for encoder in (self.query_encoder, self.item_encoder) if encoder is not None]
        return hashlib.sha256(json.dumps([settings, towers], sort_keys=True).encode()).hexdigest()[:32]

    # ---- persistence ---------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out / "tokenizer")
        self.query_encoder.save_pretrained(out / "query", safe_serialization=True)
        if self.item_encoder is not None:
            self.item_encoder.save_pretrained(out / "item", safe_serialization=True)
        meta = {"shared": self.shared, "query_max_len": self.query_max_len, "item_max_len": self.item_max_len,
                "base": self.base, "dim": self.dim}
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | None = None, backend: str = "torch") -> TwoTower:
        """A saved model; backend='auto' encodes through ONNX Runtime on CPU (inference), 'torch' for training."""
        from transformers import AutoTokenizer, BertModel

        src = Path(directory)
        meta_path = src / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{src} is not a TwoTower folder (no {META_FILE})")
        meta = json.loads(meta_path.read_text())
        tokenizer = AutoTokenizer.from_pretrained(src / "tokenizer", local_files_only=True)
        query = BertModel.from_pretrained(src / "query", local_files_only=True, add_pooling_layer=False)
        item = None if meta["shared"] else BertModel.from_pretrained(src / "item", local_files_only=True, add_pooling_layer=False)
        model = cls(tokenizer, query, item, query_max_len=meta["query_max_len"], item_max_len=meta["item_max_len"],
                    base=meta.get("base", MINILM), backend=backend)
        if device:
            model.to(device)
        return model.eval()

    # ---- forward -------------------------------------------------------------------------
    def tokenize(self, texts: list[str], side: str) -> dict[str, torch.Tensor]:
        max_len = self.query_max_len if side == "query" else self.item_max_len
        return dict(self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt"))

    def _encoder(self, side: str) -> nn.Module:
        if side == "query" or self.item_encoder is None:
            return self.query_encoder
        return self.item_encoder

    def embed(self, tokens: dict[str, torch.Tensor], side: str) -> torch.Tensor:
        """Token tensors -> L2-normalised embeddings (float32), differentiable."""
        device = self.device
        tokens = {k: v.to(device) for k, v in tokens.items()}
        hidden = last_hidden_state(self._encoder(side), tokens, self.packed_training)
        pooled = mean_pool(hidden.float(), tokens["attention_mask"])
        return nn.functional.normalize(pooled, dim=-1)

    def forward(self, query_tokens: dict[str, torch.Tensor], item_tokens: dict[str, torch.Tensor]):
        return self.embed(query_tokens, "query"), self.embed(item_tokens, "item")

    # ---- inference -----------------------------------------------------------------------
    def __getstate__(self):
        """Pickles (MLflow's pyfunc, Spark) without the ONNX Runtime sessions: they are rebuilt on first use."""
        state = dict(self.__dict__)
        state["_onnx_towers"] = {}
        return state

    def _onnx_tower(self, side: str):
        """The ONNX Runtime session of this side's tower, rebuilt when its weights changed since (else None)."""
        encoder = self._encoder(side)
        # parameters' in-place version counters move with every optimizer step or load_state_dict
        stamp = tuple((p.data_ptr(), p._version) for p in encoder.parameters())
        cached = self._onnx_towers.get(id(encoder))
        if cached is None or cached[0] != stamp:
            cached = (stamp, onnx_or_none(encoder, self.onnx_threads))
            self._onnx_towers[id(encoder)] = cached
        return cached[1]

    def _encode(self, texts, side: str, batch_size: int, progress: bool) -> np.ndarray:
        texts = [t if isinstance(t, str) else "" for t in texts]
        max_len = self.query_max_len if side == "query" else self.item_max_len
        desc = f"encode {side}s"
        tower = self._onnx_tower(side) if resolve_backend(self.backend, self.device) == "onnx" else None
        if tower is not None:
            return encode_sorted(self.tokenizer, tower, texts, self.dim, max_len, batch_size, progress, desc)
        was_training = self.training
        self.eval()
        device = self.device
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

        def run_torch(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
            tokens = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
            return self.embed(tokens, side).float().cpu().numpy()

        try:
            with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                return encode_sorted(self.tokenizer, run_torch, texts, self.dim, max_len, batch_size, progress, desc)
        finally:
            self.train(was_training)

    def encode_queries(self, texts, batch_size: int = 256, progress: bool = False) -> np.ndarray:
        return self._encode(list(texts), "query", batch_size, progress)

    def encode_items(self, texts, batch_size: int = 256, progress: bool = False) -> np.ndarray:
        return self._encode(list(texts), "item", batch_size, progress)
