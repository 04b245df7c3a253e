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


def test_bce_is_per_expert_binary_cross_entropy_summed_over_experts():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # sigmoid = [0.5, 0.75]
    target = torch.tensor([[1.0, 0.0]])
    want = -math.log(0.5) - math.log(0.25)
    assert float(loss_fn(logits, target, "bce")) == pytest.approx(want, rel=1e-6)


def test_stacked_heads_give_the_mean_of_their_losses():
    members = torch.tensor([[[0.0, 0.0]], [[0.0, math.log(3.0)]]])  # (heads, n, experts)
    target = torch.tensor([[0.5, 0.5]])
    want = (float(loss_fn(members[0], target)) + float(loss_fn(members[1], target))) / 2
    assert float(loss_fn(members, target)) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("sigmoid", [False, True])
def test_an_ensemble_routes_by_the_mean_probability_of_its_heads(sigmoid):
    from cluster.router import RouterHead

    torch.manual_seed(0)
    head = RouterHead(4, 3, head_hidden=5, heads=4, sigmoid=sigmoid).eval()
    x = torch.randn(6, 4)
    members = head(x, members=True)
    assert members.shape == (4, 6, 3)
    each = torch.sigmoid(members) if sigmoid else torch.softmax(members, -1)
    want = each.mean(0) / each.mean(0).sum(-1, keepdim=True)
    torch.testing.assert_close(torch.softmax(head(x), -1), want)
    assert set(head.state_dict()) >= {"heads.0.0.weight", "heads.3.3.bias"}


def test_one_head_keeps_the_keys_and_logits_of_routers_saved_before_ensembles():
    from cluster.router import RouterHead

    torch.manual_seed(0)
    head = RouterHead(4, 3, head_hidden=5).eval()
    assert set(head.state_dict()) == {"head.0.weight", "head.0.bias", "head.3.weight", "head.3.bias"}
    x = torch.randn(2, 4)
    torch.testing.assert_close(head(x), head.head(x))  # raw logits, as before


def test_validation_reward_is_the_routed_experts_reward_averaged_over_tags():
    import polars as pl
    from torch.utils.data import DataLoader, TensorDataset

    from cluster.router import RouterHead
    from cluster.train import _routed_reward, _validate

    rows = pl.DataFrame({"rewards": [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], "tags": [["x"], ["x"], ["y"]]})
    choice = torch.tensor([0, 0, 1])  # rewards 1, 0 (tag x: 0.5) and 1 (tag y: 1)
    assert _routed_reward(rows, choice) == pytest.approx(0.75)
    assert _routed_reward(rows.drop("tags"), choice) == pytest.approx(2 / 3)
    assert _routed_reward(rows.drop("rewards"), choice) is None
    head = RouterHead(2, 2, heads=2).eval()
    with torch.no_grad():
        for h in head.heads:  # every head routes a feature vector to the expert of its larger coordinate
            h.weight.copy_(torch.eye(2))
            h.bias.zero_()
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    m = _validate(head, DataLoader(TensorDataset(x, torch.tensor(rows["rewards"].to_list())), batch_size=2), "bce",
                  rows)
    assert m["val_reward"] == pytest.approx(0.75) and m["val_top1"] == pytest.approx(2 / 3)
