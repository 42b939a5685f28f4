"""Reward model: the Bradley-Terry loss and accuracy equal their formulas; bad input fails clearly."""
import math
import pytest
import torch
from qwen_edu.reward import bt_loss, preference_accuracy


def test_bt_loss_matches_formula_and_gradient():
    g = torch.Generator().manual_seed(0)
    c = (torch.randn(10, generator=g) * 3).requires_grad_(); r = torch.randn(10, generator=g) * 3
    loss = bt_loss(c, r)
    assert abs(loss.item() - sum(math.log1p(math.exp(-(a - b))) for a, b in zip(c.tolist(), r.tolist())) / 10) < 1e-5
    loss.backward()
    assert torch.allclose(c.grad, -torch.sigmoid(r - c.detach()) / 10, atol=1e-6)


def test_accuracy():
    assert preference_accuracy(torch.tensor([1., 1, 3, 0]), torch.tensor([0., 1, 2, 5])) == 0.5  # ties count as wrong


def test_bad_inputs():
    with pytest.raises(ValueError, match='same shape'): bt_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match='non-empty'): preference_accuracy(torch.zeros(0), torch.zeros(0))
