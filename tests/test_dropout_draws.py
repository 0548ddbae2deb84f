"""Dropout masks drawn by annomine/dropout_draws.py are PyTorch's own draws, and leave its generator where PyTorch
would."""

import pytest
import torch

from annomine import dropout_draws
from annomine.dropout_draws import bernoulli_mask, dropout_multiplier


@pytest.fixture
def torch_only(monkeypatch):
    monkeypatch.setitem(dropout_draws._CHECKED, "draw", None)


def _same_as_torch(shape, keep, seed):
    torch.manual_seed(seed)
    ours = bernoulli_mask(shape, keep)
    after_ours = torch.get_rng_state()
    torch.manual_seed(seed)
    theirs = torch.empty(shape).bernoulli_(keep)
    return torch.equal(ours.to(theirs.dtype), theirs) and torch.equal(after_ours, torch.get_rng_state())


def test_the_compiled_draws_are_built_and_agree_with_this_pytorch():
    assert dropout_draws._fast_draw() is not None


@pytest.mark.parametrize("shape,keep", [((1,), 0.9), ((7, 311), 0.9), ((64, 12, 55, 55), 0.9), ((3, 1001), 0.25)])
def test_masks_and_the_generator_after_them_are_pytorchs(shape, keep):
    assert _same_as_torch(shape, keep, seed=11)


def test_draws_in_turn_continue_pytorchs_stream():
    torch.manual_seed(5)
    ours = [bernoulli_mask((n,), 0.9) for n in (5, 700, 1, 624 * 3 + 1)] + [torch.rand(3)]
    torch.manual_seed(5)
    theirs = [torch.empty(n).bernoulli_(0.9) for n in (5, 700, 1, 624 * 3 + 1)] + [torch.rand(3)]
    assert all(torch.equal(a.to(b.dtype), b) for a, b in zip(ours, theirs))


def test_without_the_compiled_draws_masks_come_from_pytorch(torch_only):
    assert _same_as_torch((40, 50), 0.9, seed=2)


def test_a_draw_that_disagrees_with_pytorch_is_not_used():
    good = dropout_draws._compiled_draw()
    assert dropout_draws._agrees_with_torch(good)
    assert not dropout_draws._agrees_with_torch(lambda state, out, threshold: good(state, out, threshold - 2 ** 40))


def test_the_multiplier_is_what_functional_dropout_multiplies_by():
    x = torch.randn(30, 40)
    torch.manual_seed(9)
    expected = torch.nn.functional.dropout(x, 0.1, training=True)
    torch.manual_seed(9)
    assert torch.equal(x * dropout_multiplier(bernoulli_mask((30, 40), 0.9), 0.1, x.dtype), expected)
