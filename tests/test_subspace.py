"""Subspace compression maths (models/subspace.py): exactness, determinism, gradients."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from models import LanguageModel, ModelConfig, build_model, get_preset, split_stages
from models.subspace import Subspace, SubspaceConfig, _orthonormal_columns, constrained_names, writer_names


def _setup(ratio: int = 4, seed: int = 3, fold: bool = False) -> tuple[ModelConfig, LanguageModel, Subspace]:
    cfg = get_preset("nano")
    model = build_model(cfg, seed=seed).double()
    sub = Subspace(SubspaceConfig(cfg.d_model, cfg.vocab_size, ratio, seed=seed, fold_embedding=fold))
    # float64 throughout (U re-orthonormalised in float64) so exactness is checked to 1e-10
    sub.U, sub.T_fixed = _orthonormal_columns(sub.U.double()), sub.T_fixed.double()
    sub.attach(model)
    return cfg, model, sub


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        out[name] = p.grad.clone()
    return out


def test_u_is_orthonormal_and_t_fixed_has_the_configured_scale():
    sub = Subspace(SubspaceConfig(d_model=128, vocab_size=260, ratio=8, seed=1))
    assert sub.U.shape == (128, 16) and sub.T_fixed.shape == (260, 128)
    assert torch.allclose(sub.U.T @ sub.U, torch.eye(16), atol=1e-6)
    assert 0.015 < sub.T_fixed.std().item() < 0.025


def test_round_trip_is_exact_in_span_u_and_lossy_outside():
    sub = Subspace(SubspaceConfig(d_model=64, vocab_size=50, ratio=4, seed=0))
    tokens = torch.randint(0, 50, (2, 7))
    inside = torch.randn(2, 7, sub.k) @ sub.U.T + sub.T_fixed[tokens]  # (B, T, d)
    c = sub.compress(inside, tokens)
    assert c.shape == (2, 7, 16)
    assert torch.allclose(sub.expand(c, tokens), inside, atol=1e-5)
    outside = inside + torch.randn(2, 7, 64)
    assert not torch.allclose(sub.expand(sub.compress(outside, tokens), tokens), outside, atol=1e-2)


def test_projected_model_equals_stage_composed_compressed_forward():
    cfg, model, sub = _setup()
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    first, second = split_stages(model, [2])
    unprojected = model(tokens).logits
    h = first(tokens)
    composed_before = second(sub.expand(sub.compress(h, tokens), tokens))
    assert not torch.allclose(composed_before, unprojected, atol=1e-6)  # the constraint is what makes it exact
    sub.project_model_(model, cfg.n_layers)
    full = model(tokens).logits
    composed = second(sub.expand(sub.compress(first(tokens), tokens), tokens))
    assert torch.allclose(full, composed, atol=1e-10)


def test_a_folded_embedding_keeps_its_off_span_part_and_the_link_stays_exact():
    cfg, model, sub = _setup(fold=True)
    e = model.tok_emb.weight
    before = e.detach().clone()
    sub.begin_round(e)
    sub.project_model_(model, cfg.n_layers)  # the writers move into span(U); E keeps its off-span part
    assert torch.allclose(e, before, atol=1e-12)
    assert (before - (before @ sub.U) @ sub.U.T).abs().max() > 1e-3  # E is not in span(U) at all
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    first, second = split_stages(model, [2])
    composed = second(sub.expand(sub.compress(first(tokens), tokens), tokens))
    assert torch.allclose(model(tokens).logits, composed, atol=1e-10)
    with torch.no_grad():  # a stage's optimizer step moves E anywhere; only its in-span change is kept
        e.add_(torch.randn_like(e) * 0.1)
    sub.project_model_(model, cfg.n_layers)
    assert sub.drift is not None
    assert torch.allclose(e - (e @ sub.U) @ sub.U.T, sub.drift, atol=1e-12)
    composed = second(sub.expand(sub.compress(first(tokens), tokens), tokens))
    assert torch.allclose(model(tokens).logits, composed, atol=1e-10)


def test_projection_touches_exactly_the_writers_before_the_last_block():
    cfg, model, sub = _setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sub.project_model_(model, cfg.n_layers)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(constrained_names(cfg.n_layers))
    assert f"blocks.{cfg.n_layers - 1}.attn.out.weight" not in changed
    again = {n: p.detach().clone() for n, p in model.named_parameters()}
    sub.project_model_(model, cfg.n_layers)  # idempotent
    assert all(torch.allclose(p, again[n], atol=1e-12) for n, p in model.named_parameters())


def test_a_full_replica_holding_only_its_writers_keeps_its_embedding_free():
    cfg, model, sub = _setup(fold=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sub.project_writers_(model, cfg.n_layers)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(writer_names(cfg.n_layers))  # E is not touched, in span(U) or out of it
    u = sub.U
    for name in writer_names(cfg.n_layers):
        w = dict(model.named_parameters())[name]
        assert torch.allclose(w, u @ (u.T @ w), atol=1e-12), name


def test_gradients_through_the_compressed_link_equal_the_composed_model():
    cfg, model, sub = _setup()
    sub.project_model_(model, cfg.n_layers)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    targets = torch.randint(0, cfg.vocab_size, (2, 12))
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(tokens).logits.flatten(0, 1), targets.flatten()).backward()  # all float64
    reference = _grads(model)
    model.zero_grad()
    first, second = split_stages(model, [2])
    c = sub.compress(first(tokens), tokens)  # stage 0 sends c
    received = c.detach().requires_grad_(True)  # stage 1 receives it as a leaf
    logits = second(sub.expand(received, tokens))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    assert received.grad is not None and received.grad.shape == (2, 12, sub.k)  # k numbers per token go back
    c.backward(received.grad)
    # The link carries only the span(U) part of dL/dh; inside a block that is all a gradient sees
    # (W^T U U^T = W^T for a constrained writer), so only the residual path to the writers differs,
    # by a part orthogonal to span(U) that the projection after each step removes anyway.
    constrained = set(constrained_names(cfg.n_layers))
    raw = _grads(model)
    grads = {n: t.clone() for n, t in raw.items()}
    sub.project_(grads, cfg.n_layers)
    sub.project_(reference, cfg.n_layers)
    for name in raw:
        assert torch.allclose(grads[name], reference[name], atol=1e-12), name
        if name not in constrained:
            assert torch.equal(grads[name], raw[name]), name


def test_u_and_t_fixed_are_identical_across_processes():
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from models.subspace import Subspace, SubspaceConfig\n"
        "print(Subspace(SubspaceConfig(384, 260, 32, seed=7)).digest())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    here = Subspace(SubspaceConfig(384, 260, 32, seed=7)).digest()
    assert other.stdout.strip() == here
    assert Subspace(SubspaceConfig(384, 260, 32, seed=8)).digest() != here


@pytest.mark.parametrize("ratio", [0, 129])
def test_config_rejects_impossible_ratios(ratio):
    with pytest.raises(ValueError):
        SubspaceConfig(d_model=128, vocab_size=10, ratio=ratio)
