"""Router, aux losses, MoE layer, expert naming and freezing."""

import math

import pytest
import torch

from models import (
    build_model,
    dense_parameter_names,
    expert_parameters,
    expert_prefix,
    freeze_experts,
    get_preset,
    is_expert_parameter,
    load_balancing_loss,
    route,
    router_z_loss,
)
from models.moe import MoELayer


def test_route_top_k_and_renormalised_weights() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]])
    weights, indices, probs = route(logits, top_k=2)
    assert indices.tolist() == [[0, 1], [2, 3]]
    e = math.e
    expected = torch.tensor([[e / (e + 1), 1 / (e + 1)], [e**2 / (e**2 + 1), 1 / (e**2 + 1)]])
    assert torch.allclose(weights, expected, atol=1e-6)
    assert torch.allclose(weights.sum(-1), torch.ones(2))
    assert torch.allclose(probs, torch.softmax(logits, -1))


def test_balance_loss_uniform_routing_is_minimum_one() -> None:
    probs = torch.full((4, 4), 0.25)
    top1 = torch.tensor([[0], [1], [2], [3]])
    assert torch.allclose(load_balancing_loss(probs, top1, 4), torch.tensor(1.0))
    top2 = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    assert torch.allclose(load_balancing_loss(probs, top2, 4), torch.tensor(1.0))


def test_balance_loss_all_to_one_expert() -> None:
    indices = torch.zeros(6, 1, dtype=torch.long)
    one_hot = torch.zeros(6, 4)
    one_hot[:, 0] = 1.0
    assert torch.allclose(load_balancing_loss(one_hot, indices, 4), torch.tensor(4.0))  # the maximum, E
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(6, 1)
    assert torch.allclose(load_balancing_loss(skewed, indices, 4), torch.tensor(4 * 0.7))


def test_balance_loss_gradient_flows_through_probs_only() -> None:
    logits = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    _, indices, probs = route(logits, top_k=2)
    load_balancing_loss(probs, indices, 4).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_z_loss_hand_made() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    expected = (math.log(4) ** 2 + (1 + math.log(4)) ** 2) / 2
    assert torch.allclose(router_z_loss(logits), torch.tensor(expected))


def _moe_layer() -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(get_preset("moe-nano", d_model=32, n_heads=2, expert_d_ff=16, n_experts=4))


def test_moe_layer_matches_per_token_reference() -> None:
    layer = _moe_layer()
    x = torch.randn(2, 5, 32)
    y, (balance, z) = layer(x)
    assert y.shape == x.shape and balance.dim() == 0 and z.dim() == 0
    flat = x.view(-1, 32)
    weights, indices, _ = route(layer.router(flat), layer.top_k)
    for t in range(flat.shape[0]):
        ref = sum(w * layer.experts[int(e)](flat[t]) for w, e in zip(weights[t], indices[t]))
        assert torch.allclose(y.view(-1, 32)[t], ref, atol=1e-6)


def test_moe_layer_token_output_independent_of_batch() -> None:
    layer = _moe_layer()
    x = torch.randn(1, 6, 32)
    y, _ = layer(x)
    y_half, _ = layer(x[:, :3])
    assert torch.allclose(y[:, :3], y_half, atol=1e-6)


def test_expert_names() -> None:
    model = build_model(get_preset("moe-nano"))
    assert expert_prefix(3, 5) == "blocks.3.ffn.experts.5."
    assert is_expert_parameter("blocks.3.ffn.experts.5.w_down.weight") == (3, 5)
    assert is_expert_parameter("blocks.12.ffn.experts.10.w_gate.weight") == (12, 10)
    for name in ("blocks.0.ffn.router.weight", "tok_emb.weight", "xblocks.0.ffn.experts.1.w_up.weight"):
        assert is_expert_parameter(name) is None
    params = expert_parameters(model, 1, 2)
    assert sorted(params) == [f"blocks.1.ffn.experts.2.{w}.weight" for w in ("w_down", "w_gate", "w_up")]
    assert params["blocks.1.ffn.experts.2.w_up.weight"] is model.get_parameter("blocks.1.ffn.experts.2.w_up.weight")
    with pytest.raises(KeyError):
        expert_parameters(model, 0, 99)


def test_dense_and_expert_names_partition_the_model() -> None:
    model = build_model(get_preset("moe-nano"))
    dense = dense_parameter_names(model)
    assert "blocks.0.ffn.router.weight" in dense and "head.weight" in dense
    experts = [n for n, _ in model.named_parameters() if is_expert_parameter(n)]
    assert len(experts) == 4 * 8 * 3
    assert sorted(dense + experts) == sorted(n for n, _ in model.named_parameters())


def test_freeze_experts_no_state_and_bit_identical() -> None:
    torch.manual_seed(0)
    model = build_model(get_preset("moe-nano", max_seq_len=64))
    trainable = {(0, 1), (2, 5), (3, 0)}
    freeze_experts(model, trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, 260, (4, 64))
    model(tokens, tokens).loss.backward()
    opt.step()
    frozen_ids = set()
    for name, param in model.named_parameters():
        key = is_expert_parameter(name)
        if key is not None and key not in trainable:
            frozen_ids.add(id(param))
            assert not param.requires_grad and param.grad is None
            assert torch.equal(param, before[name]), name
        else:
            assert param.requires_grad
            assert not torch.equal(param, before[name]), name  # dense, router and trainable experts moved
    assert frozen_ids.isdisjoint(id(p) for p in opt.state)
    assert len(opt.state) == len([p for p in model.parameters() if p.requires_grad])


def test_freeze_experts_reassigns_and_rejects_unknown() -> None:
    model = build_model(get_preset("moe-nano"))
    freeze_experts(model, [(0, 0)])
    freeze_experts(model, [(1, 1)])
    assert not any(p.requires_grad for p in expert_parameters(model, 0, 0).values())
    assert all(p.requires_grad for p in expert_parameters(model, 1, 1).values())
    with pytest.raises(ValueError, match="no such"):
        freeze_experts(model, [(0, 0), (9, 0)])
    assert all(p.requires_grad for p in expert_parameters(model, 1, 1).values())  # left unchanged
