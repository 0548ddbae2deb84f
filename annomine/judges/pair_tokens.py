"""(query, product text) pairs tokenised once, and padded batches cut from them.

The tier-1 judge tokenises its pairs in one tokenizer call (`PairTokens.of`: `[CLS] query [SEP] text [SEP]`,
the text truncated to the judge's max length) and builds each batch by padding only that batch's pairs to its
longest (`PairTokens.batch`), with the same tensors the tokenizer's own `padding=True` call gives for those
pairs. Training reuses the tokens in every epoch; grading orders the pairs by token count (`by_length`) so a
batch pads little.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PairTokens:
    """Per pair, its token ids (and token type ids), unpadded."""

    columns: dict[str, list[list[int]]]
    pad_id: int

    @classmethod
    def of(cls, tokenizer, queries: list[str], texts: list[str], max_length: int, max_text_chars: int = 0) -> "PairTokens":
        """Tokenise the pairs (texts cut to `max_text_chars` first when > 0) in one call."""
        if max_text_chars > 0:
            texts = [t[:max_text_chars] for t in texts]
        enc = tokenizer(list(queries), list(texts), truncation="only_second", max_length=max_length,
                        return_attention_mask=False)
        columns = {k: list(v) for k, v in enc.items()}
        return cls(columns, int(tokenizer.pad_token_id or 0))

    def __len__(self) -> int:
        return len(self.columns["input_ids"])

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(ids) for ids in self.columns["input_ids"]), dtype=np.int64, count=len(self))

    def by_length(self) -> np.ndarray:
        """Pair indices ordered by token count (ties in input order)."""
        return np.argsort(self.lengths(), kind="stable")

    def batch(self, idx) -> dict:
        """Tensors of the pairs `idx`, padded on the right to the longest of them, with the attention mask."""
        import torch

        rows = [self.columns["input_ids"][i] for i in idx]
        width = max(len(r) for r in rows)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        out = {}
        for name, column in self.columns.items():
            pad = self.pad_id if name == "input_ids" else 0
            arr = np.full((len(rows), width), pad, dtype=np.int64)
            for r, i in enumerate(idx):
                arr[r, : len(column[i])] = column[i]
            out[name] = torch.from_numpy(arr)
        for r, row in enumerate(rows):
            mask[r, : len(row)] = 1
        out["attention_mask"] = torch.from_numpy(mask)
        return out
