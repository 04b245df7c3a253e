"""The router's loss against hand-computed values."""

import math

import pytest
import torch

from cluster.router import loss_fn


def test_kl_forward_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = [0.25, 0.75]
    target = torch.tensor([[0.5, 0.5]])
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(loss_fn(logits, target, "kl")) == pytest.approx(want, rel=1e-6)


def test_kl_forward_handles_zero_target_mass():
    logits = torch.tensor([[0.0, 0.0]])  # p = [0.5, 0.5]
    target = torch.tensor([[1.0, 0.0]])
    assert float(loss_fn(logits, target, "kl")) == pytest.approx(math.log(2.0), rel=1e-6)


def test_kl_reverse_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    target = torch.tensor([[0.5, 0.5]])
    want = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert float(loss_fn(logits, target, "kl_reverse")) == pytest.approx(want, rel=1e-6)


def test_hard_is_cross_entropy_on_argmax():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    target = torch.tensor([[0.2, 0.8], [0.9, 0.1]])
    want = (-math.log(0.75) - math.log(0.5)) / 2
    assert float(loss_fn(logits, target, "hard")) == pytest.approx(want, rel=1e-6)


def test_batch_mean_and_zero_at_optimum():
    target = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    assert float(loss_fn(target.log(), target, "kl")) == pytest.approx(0.0, abs=1e-6)


def test_unknown_loss_names_choices():
    with pytest.raises(ValueError, match="kl_reverse"):
        loss_fn(torch.zeros(1, 2), torch.ones(1, 2) / 2, "mse")
