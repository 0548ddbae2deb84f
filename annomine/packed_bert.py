"""A BERT forward pass that computes the dense layers on real tokens only (training's forward).

A batch padded to its longest text spends a fifth to a third of its work on padding (product texts of 10 to 64
tokens, queries of 3 to 16; the judge's query-product pairs of 20 to 128, in batches bucketed by length). Every linear layer, layer norm and activation of BERT acts on each token alone, so
here they run on the batch's real tokens packed into one (tokens, width) matrix; only attention, which mixes the
tokens of a text, runs on the padded (batch, heads, length, head width) layout, through the model's own attention
function and mask. Dropout draws its masks on the padded shape, in the order the model's own forward draws them, so
for a given seed the packed forward drops the same units: its hidden states equal the model's own on every real
token, up to the rounding of matrix products of another height. Padding positions come back as zeros.

On CPU the masks come from annomine/dropout_draws.py (PyTorch's own draws, drawn faster), and attention with dropout
is computed as PyTorch's math kernel computes it (the kernel scaled-dot-product attention takes on CPU when dropout
is on), with the attention weights' mask from there too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from annomine.dropout_draws import bernoulli_mask, dropout_multiplier


class _Packing:
    """Moves a batch's per-token rows between the padded (batch * length, width) and the packed (tokens, width)
    layouts."""

    def __init__(self, attention_mask: torch.Tensor):
        self.batch, self.length = attention_mask.shape
        self.rows = attention_mask.reshape(-1).nonzero().squeeze(1)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        return padded.reshape(self.batch * self.length, -1).index_select(0, self.rows)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        padded = packed.new_zeros(self.batch * self.length, packed.size(-1))
        return padded.index_copy(0, self.rows, packed).view(self.batch, self.length, -1)

    def dropout(self, packed: torch.Tensor, module: nn.Dropout) -> torch.Tensor:
        """`module` applied as on the padded layout: the same random draws, kept for the real tokens."""
        if not module.training or module.p == 0:
            return packed
        if packed.device.type == "cpu":
            mask = bernoulli_mask((self.batch * self.length, packed.size(-1)), 1 - module.p)
            return packed * dropout_multiplier(mask.index_select(0, self.rows), module.p, packed.dtype)
        keep = module(torch.ones(self.batch * self.length, 1, dtype=packed.dtype, device=packed.device)
                      .expand(-1, packed.size(-1)).contiguous())
        return packed * keep.index_select(0, self.rows)


def supports_packing(encoder: nn.Module) -> bool:
    """Whether `encoder` is a plain BERT encoder (no decoder, no cross-attention) this module can run."""
    config = getattr(encoder, "config", None)
    return (config is not None and getattr(config, "model_type", None) == "bert" and not config.is_decoder
            and not getattr(config, "add_cross_attention", False) and hasattr(encoder, "embeddings"))


def last_hidden_state(encoder: nn.Module, tokens: dict, packed: bool = True) -> torch.Tensor:
    """`encoder(**tokens).last_hidden_state`: through `packed_last_hidden` while the encoder trains (grad enabled,
    a plain BERT, `packed`), else through the model's own padded forward."""
    if packed and encoder.training and torch.is_grad_enabled() and supports_packing(encoder):
        return packed_last_hidden(encoder, tokens["input_ids"], tokens["attention_mask"], tokens.get("token_type_ids"))
    return encoder(**tokens).last_hidden_state


def packed_last_hidden(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """`encoder(input_ids, attention_mask, token_type_ids).last_hidden_state` on the real tokens (zeros elsewhere),
    the dense layers computed on real tokens only."""
    packing = _Packing(attention_mask)
    embeddings = encoder.embeddings
    types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
    hidden = embeddings.LayerNorm(embeddings.word_embeddings(input_ids) + embeddings.token_type_embeddings(types)
                                  + embeddings.position_embeddings(embeddings.position_ids[:, :input_ids.size(1)]))
    hidden = packing.pack(hidden)
    hidden = packing.dropout(hidden, embeddings.dropout)
    shape_only = hidden.new_zeros(()).expand(packing.batch, packing.length, hidden.size(1))  # what the mask reads
    mask = encoder._create_attention_masks(attention_mask=attention_mask, encoder_attention_mask=None,
                                           embedding_output=shape_only, encoder_hidden_states=None, cache=None,
                                           position_ids=None)[0]
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward

    attend = ALL_ATTENTION_FUNCTIONS.get_interface(encoder.config._attn_implementation, eager_attention_forward)
    if attend is sdpa_attention_forward and hidden.device.type == "cpu":
        attend = _CpuSdpaAttention(mask)
    for layer in encoder.encoder.layer:
        hidden = _layer(layer, hidden, mask, packing, attend)
    return packing.unpack(hidden)


def _layer(layer: nn.Module, hidden: torch.Tensor, mask, packing: _Packing, attend) -> torch.Tensor:
    """One BertLayer on packed tokens: self-attention (padded for the attention product, through the model's own
    attention function `attend`), then the feed-forward."""
    attention = layer.attention.self
    heads, head_width = attention.num_attention_heads, attention.attention_head_size

    def split_heads(packed: torch.Tensor) -> torch.Tensor:
        return packing.unpack(packed).view(packing.batch, packing.length, heads, head_width).transpose(1, 2)

    context, _ = attend(attention, split_heads(attention.query(hidden)), split_heads(attention.key(hidden)),
                        split_heads(attention.value(hidden)), mask,
                        dropout=attention.dropout.p if attention.training else 0.0, scaling=attention.scaling)
    context = packing.pack(context.reshape(packing.batch, packing.length, -1))
    out = layer.attention.output
    hidden = out.LayerNorm(packing.dropout(out.dense(context), out.dropout) + hidden)
    feed = layer.output
    return feed.LayerNorm(packing.dropout(feed.dense(layer.intermediate(hidden)), feed.dropout) + hidden)


class _CpuSdpaAttention:
    """transformers' scaled-dot-product attention on CPU, for the layers of one forward sharing `mask`. Without
    dropout: that function itself. With dropout: step for step as PyTorch's math kernel (the one it takes on CPU with
    dropout) computes it (query and key each scaled by the root of `scaling`, the mask added, a softmax that gives
    fully masked rows zeros), the dropout mask from `bernoulli_mask`; returned as the model's attention functions
    return it: (batch, length, heads, head width). The additive mask and its fully masked rows are worked out once
    per forward, not once per layer."""

    def __init__(self, mask: torch.Tensor | None):
        self.mask = mask
        self.additive = mask
        self.fully_masked = None  # rows whose every key is masked (the math kernel's softmax gives them zeros)
        if mask is None:
            return
        if mask.dtype == torch.bool:
            masked = mask.logical_not()
            self.additive = torch.zeros(mask.shape).masked_fill_(masked, float("-inf"))
        else:
            masked = torch.isneginf(mask)
        rows = masked.all(dim=-1, keepdim=True)
        if bool(rows.any()):
            self.fully_masked = rows

    def __call__(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 mask: torch.Tensor | None, dropout: float, scaling: float) -> tuple[torch.Tensor, None]:
        if mask is not self.mask:
            raise ValueError("_CpuSdpaAttention called with another mask than the one it was built for")
        if dropout == 0:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling)
        root = math.sqrt(scaling)
        scores = torch.matmul(query * root, key.transpose(-2, -1) * root)
        if self.additive is not None:
            scores.add_(self.additive.to(scores.dtype))
        # torch._safe_softmax(scores, -1), without looking for fully masked rows in every layer's scores: the
        # same softmax kernel, and zeros in the rows the mask masks whole
        weights = torch.softmax(scores, -1)
        if self.fully_masked is not None:
            weights = weights.masked_fill(self.fully_masked, 0.0)
        weights = weights * dropout_multiplier(bernoulli_mask(tuple(weights.shape), 1 - dropout), dropout, weights.dtype)
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), None
