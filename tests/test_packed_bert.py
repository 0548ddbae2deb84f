"""The packed forward (annomine/packed_bert.py) gives the model's own hidden states and gradients, dropout included."""

import pytest
import torch

from annomine import dropout_draws
from annomine.bert import mean_pool
from annomine.packed_bert import packed_last_hidden, supports_packing
from annomine.two_tower import TwoTower

TEXTS = ["red running shoes", "a waterproof hiking jacket with a hood and two zipped pockets", "usb cable",
         "noise cancelling over-ear headphones, black, with a carrying case and a long description of it"]


def _pooled_and_grads(model, encoder, tokens, packed: bool):
    torch.manual_seed(7)
    model.packed_training = packed
    pooled = model.embed(tokens, "item")
    (pooled * torch.arange(pooled.size(1), dtype=pooled.dtype)).sum().backward()
    grads = {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}
    model.zero_grad()
    return pooled.detach(), grads


def _packs_like_own(encoder, tokens, seed):
    """Whether the packed forward gives the model's own hidden states (zeros at padding) for the same seed."""
    torch.manual_seed(seed)
    own = encoder(**tokens).last_hidden_state
    torch.manual_seed(seed)
    packed = packed_last_hidden(encoder, tokens["input_ids"], tokens["attention_mask"], tokens.get("token_type_ids"))
    real = tokens["attention_mask"].unsqueeze(-1).bool()
    return torch.equal(own.masked_fill(~real, 0), packed)


@pytest.mark.parametrize("train,compiled_draws", [(True, True), (True, False), (False, True)])
def test_packed_hidden_states_equal_the_models_own(train, compiled_draws, monkeypatch):
    if not compiled_draws:  # dropout masks from PyTorch's own kernel (annomine/dropout_draws.py's fallback)
        monkeypatch.setitem(dropout_draws._CHECKED, "draw", None)
    model = TwoTower.tiny(item_max_len=32)
    encoder = model.query_encoder.train(train)
    tokens = model.tokenize(TEXTS, "item")
    assert tokens["attention_mask"].float().mean() < 0.8  # the batch carries padding
    assert _packs_like_own(encoder, tokens, seed=3)


def test_training_forward_packs_and_keeps_pooled_vectors_and_gradients():
    model = TwoTower.tiny(item_max_len=32).train()
    encoder = model.query_encoder
    assert supports_packing(encoder)
    tokens = model.tokenize(TEXTS, "item")
    padded, padded_grads = _pooled_and_grads(model, encoder, tokens, packed=False)
    packed, packed_grads = _pooled_and_grads(model, encoder, tokens, packed=True)
    assert torch.equal(padded, packed)
    assert padded_grads.keys() == packed_grads.keys() and len(padded_grads) > 10
    for name, grad in padded_grads.items():
        assert torch.allclose(grad, packed_grads[name], rtol=1e-5, atol=1e-6), name
    # dropout is live: another seed gives other vectors
    torch.manual_seed(8)
    assert not torch.equal(model.embed(tokens, "item").detach(), packed)


def test_pooling_ignores_padding_rows_that_come_back_as_zeros():
    model = TwoTower.tiny(item_max_len=32).eval()
    tokens = model.tokenize(TEXTS, "item")
    hidden = packed_last_hidden(model.query_encoder, tokens["input_ids"], tokens["attention_mask"])
    assert torch.count_nonzero(hidden[~tokens["attention_mask"].bool()]) == 0
    assert torch.allclose(mean_pool(hidden, tokens["attention_mask"]),
                          mean_pool(model.query_encoder(**tokens).last_hidden_state, tokens["attention_mask"]), atol=1e-6)


def test_pairs_with_token_types_pack_like_the_models_own_forward():
    from annomine.bert import build_encoder

    tokenizer, encoder = build_encoder("tiny")
    encoder.train()
    pairs = tokenizer(["running shoes", "usb cable"], TEXTS[:2], padding=True, return_tensors="pt")
    assert pairs["token_type_ids"].max() == 1
    assert _packs_like_own(encoder, pairs, seed=4)


def test_a_batch_without_padding_packs_like_the_models_own_forward():
    model = TwoTower.tiny(item_max_len=32)
    encoder = model.query_encoder.train()
    tokens = model.tokenize(["red running shoes", "blue hiking boots"], "item")
    assert bool(tokens["attention_mask"].all())  # no padding: the model's attention runs without a mask
    assert _packs_like_own(encoder, tokens, seed=6)


def test_eager_attention_packs_like_the_models_own_forward():
    """A model on transformers' eager attention keeps it (its own dropout), and still matches its own forward."""
    model = TwoTower.tiny(item_max_len=32)
    encoder = model.query_encoder.train()
    encoder.config._attn_implementation = "eager"
    assert _packs_like_own(encoder, model.tokenize(TEXTS, "item"), seed=12)


def test_cpu_attention_gives_fully_masked_rows_zeros_as_pytorchs_math_kernel_does():
    from annomine.packed_bert import _CpuSdpaAttention

    gen = torch.Generator().manual_seed(5)
    query, key, value = (torch.randn(2, 2, 5, 4, generator=gen) for _ in range(3))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[0, :, :, 3:] = False  # padding keys
    mask[1, :, 2, :] = False   # a row whose every key is masked
    attend = _CpuSdpaAttention(mask)
    assert attend.fully_masked is not None and int(attend.fully_masked.sum()) == 1  # one row, for every head
    torch.manual_seed(11)
    ours, _ = attend(torch.nn.Module(), query, key, value, mask, dropout=0.2, scaling=0.5)
    torch.manual_seed(11)
    theirs = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.2, scale=0.5)
    assert torch.equal(ours, theirs.transpose(1, 2))
    assert torch.equal(ours[1, 2], torch.zeros(2, 4))
    with pytest.raises(ValueError, match="another mask"):
        attend(torch.nn.Module(), query, key, value, mask.clone(), dropout=0.2, scaling=0.5)
