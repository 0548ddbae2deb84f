"""Each loss against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from annomine.curriculum import FORMAT_OF_LOSS
from annomine.two_tower import TwoTower
from training.losses import (REGISTRY, BCELoss, BCEParams, MNRLoss, ROARLoss, TripletLoss, TripletParams, build_loss,
                             false_negative_mask)


def unit(*rows):
    t = torch.tensor(rows, dtype=torch.float32)
    return F.normalize(t, dim=-1)


def test_bce_hand_computed_and_temperature_learns():
    q = unit([1, 0], [0, 1])
    d = unit([1, 0], [1, 0])  # cos = 1 and 0
    loss = BCELoss(init_temperature=20.0)
    # logits 20*1 = 20 (label 1) and 20*0 = 0 (label 0)
    expected = (-math.log(1 / (1 + math.exp(-20.0))) - math.log(1 - 0.5)) / 2
    value = loss(q, d, torch.tensor([1, 0]))
    assert value.item() == pytest.approx(expected, rel=1e-5)
    # the temperature gets a gradient: d/dt mean BCE = mean((sigmoid(t*c + b) - y) * c); with t = 2 on
    # pairs (cos 1, label 0) and (cos 0.6, label 1): ((sigmoid(2) - 0) * 1 + (sigmoid(1.2) - 1) * 0.6) / 2
    warm = BCELoss(init_temperature=2.0)
    d2 = torch.stack([q[0], 0.6 * q[1] + 0.8 * q[0]])
    warm(q, d2, torch.tensor([0, 1])).backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert warm.temperature.grad.item() == pytest.approx((sig(2.0) + (sig(1.2) - 1) * 0.6) / 2, rel=1e-5)
    assert warm.bias.grad.item() == pytest.approx((sig(2.0) + sig(1.2) - 1) / 2, rel=1e-5)
    frozen = BCELoss(learn_bias=False)
    assert not frozen.bias.requires_grad


def test_mnr_without_mask_is_in_batch_softmax():
    q = unit([1, 0, 0], [0, 1, 0])
    pos = unit([1, 0, 0], [0, 1, 0])
    neg = unit([0, 0, 1])
    loss = MNRLoss(scale=2.0, margin_delta=None)
    # row 0 scores: [1, 0, 0] * 2; row 1: [0, 1, 0] * 2
    ce = -math.log(math.exp(2) / (math.exp(2) + 1 + 1))
    assert loss(q, pos, neg).item() == pytest.approx(ce, rel=1e-5)


def test_margin_mask_removes_exactly_the_masked_negatives():
    # query 0: its positive scores 0.5, candidate 1 scores 0.9 (> 0.5 + 0.1: masked), candidate 2 0.55 (kept)
    scores = torch.tensor([[0.5, 0.9, 0.55], [0.2, 0.3, 0.35]])
    mask = false_negative_mask(scores, torch.tensor([0, 1]), delta=0.1)
    assert mask.tolist() == [[False, True, False], [False, False, False]]
    # a positive is never masked even when another candidate equals it
    assert not false_negative_mask(torch.tensor([[0.9, 0.9]]), torch.tensor([0]), 0.0)[0, 0]

    q = unit([1.0, 0.0])
    pos = torch.tensor([[0.5, math.sqrt(1 - 0.25)]])          # cos 0.5
    neg = torch.tensor([[0.9, math.sqrt(1 - 0.81)], [0.55, math.sqrt(1 - 0.55 ** 2)]])  # cos 0.9 (masked), 0.55
    loss = MNRLoss(scale=10.0, margin_delta=0.1)
    value = loss(q, pos, neg).item()
    expected = -math.log(math.exp(5.0) / (math.exp(5.0) + math.exp(5.5)))
    assert value == pytest.approx(expected, rel=1e-4)
    assert loss.last_masked == 1
    unmasked = MNRLoss(scale=10.0, margin_delta=None)(q, pos, neg).item()
    assert unmasked == pytest.approx(-math.log(math.exp(5.0) / (math.exp(5.0) + math.exp(9.0) + math.exp(5.5))), rel=1e-4)


def test_triplet_hand_computed():
    q = unit([1, 0], [1, 0])
    pos = unit([1, 0], [0, 1])     # cos 1, 0
    neg = unit([0, 1], [1, 1])     # cos 0, 0.7071
    loss = TripletLoss(margin=0.3)
    expected = (max(0.0, 0.3 - 1 + 0) + max(0.0, 0.3 - 0 + math.sqrt(0.5))) / 2
    assert loss(q, pos, neg).item() == pytest.approx(expected, rel=1e-5)


def test_roar_hand_computed():
    tau, beta = 0.5, 0.1
    q = unit([1, 0], [0, 1])
    # query 0 list: grades [4, 3, 3, 1]; query 1 list: grades [4, 2, pad]
    items = torch.zeros(2, 4, 2)
    items[0] = unit([1, 0], [1, 1], [0, 1], [-1, 0])       # cos to q0: 1, .7071, 0, -1
    items[1] = unit([0, 1], [1, 0], [1, 0], [1, 0])        # cos to q1: 1, 0, (pad)
    grades = torch.tensor([[4, 3, 3, 1], [4, 2, 0, 0]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    loss = ROARLoss(beta=beta, tau=tau, margin_delta=None)
    value = loss(q, items, grades, valid).item()
    # contrast: tops are items[0,0]=(1,0), items[1,0]=(0,1): scores identity -> CE with logits [2,0] / [0,2]
    contrast = -math.log(math.exp(2) / (math.exp(2) + 1))
    # align: query 0 pairs (4 vs 3): 1 - mean(.7071, 0); (3 vs 1): mean(.7071, 0) - (-1); query 1: (4 vs 2): 1 - 0
    s = math.sqrt(0.5)
    margins = [(1 - s / 2) / tau, (s / 2 + 1) / tau, 1 / tau]
    align = sum(math.log1p(math.exp(-m)) for m in margins) / 3
    assert value == pytest.approx(contrast + beta * align, rel=1e-5)


def test_build_loss_refuses_unknown():
    assert isinstance(build_loss("triplet", {"margin": 0.2}), TripletLoss)
    assert build_loss("triplet", TripletParams(margin=0.2)).margin == 0.2
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("hinge")


def test_every_curriculum_loss_is_registered_with_the_curriculum_row_format_and_its_params():
    assert set(REGISTRY) >= set(FORMAT_OF_LOSS)
    for name, fmt in FORMAT_OF_LOSS.items():
        assert REGISTRY[name].row_format == fmt and build_loss(name).params == REGISTRY[name].Params()
    # the params dataclass holds the defaults; keyword overrides replace single fields
    assert BCELoss().params == BCEParams() and BCELoss(learn_bias=False).params == BCEParams(learn_bias=False)
    assert BCELoss(BCEParams(init_temperature=5.0)).temperature.item() == 5.0


def test_each_format_collates_only_its_columns():
    model = TwoTower.tiny()
    row = {"query": "red shoe", "item_text": "shoe", "label": 1, "neg_text": None,
           "group_texts": ["a", "b", "c"], "group_grades": [4, 2, 1]}
    short = {**row, "neg_text": "lamp", "group_texts": ["a", "b"], "group_grades": [3, 1]}
    bce = build_loss("bce").collate([row, short], model)
    assert sorted(bce) == ["item", "label", "query"] and bce["label"].tolist() == [1.0, 1.0]
    pair = build_loss("mnr").collate([row, short], model)
    assert sorted(pair) == ["item", "neg", "query"] and pair["neg"]["input_ids"].size(0) == 1  # negatives present only
    assert build_loss("mnr").collate([row], model)["neg"] is None
    lists = build_loss("roar").collate([row, short], model)
    assert lists["grades"].tolist() == [[4, 2, 1], [3, 1, 0]] and lists["valid"].tolist() == [[True] * 3, [True, True, False]]
    assert lists["group"]["input_ids"].size(0) == 6
    for name in FORMAT_OF_LOSS:
        cols = set(REGISTRY[name].columns)
        batch = build_loss(name).collate([{k: v for k, v in r.items() if k in cols} for r in (row, short)], model)
        assert batch.keys() == build_loss(name).collate([row, short], model).keys()
