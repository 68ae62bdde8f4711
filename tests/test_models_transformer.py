"""LanguageModel: shapes, causality, losses, init, naming."""

import math

import pytest
import torch
import torch.nn.functional as F

from models import IGNORE_INDEX, LanguageModel, ModelOutput, build_model, get_preset
from models.layers import SwiGLU
from models.transformer import Block


def _tokens(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 260, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["nano", "moe-nano"])
def test_shapes_and_losses(name: str) -> None:
    model = build_model(get_preset(name), seed=0)
    tokens = _tokens(2, 16)
    out = model(tokens)
    assert isinstance(out, ModelOutput) and out.logits.shape == (2, 16, 260)
    assert out.loss is None and out.lm_loss is None
    out = model(tokens, tokens)
    assert out.loss is not None and out.lm_loss is not None
    for value in (out.loss, out.lm_loss, out.balance_loss, out.z_loss):
        assert value.dim() == 0 and torch.isfinite(value)
    cfg = model.cfg
    expected = out.lm_loss + cfg.balance_loss_coef * out.balance_loss + cfg.z_loss_coef * out.z_loss
    assert torch.allclose(out.loss, expected)
    if cfg.is_moe:
        assert out.balance_loss >= 1.0 - 1e-5 and out.z_loss > 0  # balance loss is >= 1 by construction
    else:
        assert out.balance_loss == 0 and out.z_loss == 0 and torch.equal(out.loss, out.lm_loss)


def test_initial_loss_near_uniform() -> None:
    out = build_model(get_preset("nano"), seed=0)(_tokens(4, 64), _tokens(4, 64, seed=1))
    assert out.lm_loss is not None and abs(out.lm_loss.item() - math.log(260)) < 0.1


@pytest.mark.parametrize("name", ["nano", "moe-nano"])
def test_causality(name: str) -> None:
    model = build_model(get_preset(name), seed=0)
    tokens = _tokens(2, 32)
    changed = tokens.clone()
    changed[:, 20:] = _tokens(2, 12, seed=5)
    a, b = model(tokens).logits, model(changed).logits
    assert torch.allclose(a[:, :20], b[:, :20], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_ignore_index() -> None:
    model = build_model(get_preset("nano"), seed=0)
    tokens, targets = _tokens(2, 16), _tokens(2, 16, seed=1)
    targets[0, :10] = IGNORE_INDEX
    targets[1, 3] = IGNORE_INDEX
    out = model(tokens, targets)
    keep = targets != IGNORE_INDEX
    expected = F.cross_entropy(out.logits[keep], targets[keep])
    assert out.lm_loss is not None and torch.allclose(out.lm_loss, expected)
    other = targets.clone()
    other[0, :10] = IGNORE_INDEX  # unchanged ignore mask, so the loss must not move
    assert out.lm_loss is not None and torch.equal(model(tokens, other).lm_loss, out.lm_loss)


def test_init_scheme() -> None:
    cfg = get_preset("tiny", n_layers=8)
    model = build_model(cfg, seed=0)
    resid = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    block = model.blocks[0]
    assert isinstance(block, Block) and isinstance(block.ffn, SwiGLU)
    for weight, std in [
        (model.tok_emb.weight, cfg.init_std),
        (block.attn.qkv.weight, cfg.init_std),
        (block.ffn.w_gate.weight, cfg.init_std),
        (block.attn.out.weight, resid),
        (block.ffn.w_down.weight, resid),
    ]:
        assert abs(weight.std().item() / std - 1) < 0.05
        assert abs(weight.mean().item()) < std / 10
    assert torch.equal(block.attn_norm.weight, torch.ones(cfg.d_model))
    assert torch.equal(model.norm.weight, torch.ones(cfg.d_model))


def test_seeded_init_is_deterministic() -> None:
    cfg = get_preset("moe-nano")
    a, b, c = build_model(cfg, seed=1), build_model(cfg, seed=1), build_model(cfg, seed=2)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
        if name.endswith("norm.weight"):
            continue
        assert not torch.equal(pa, pc), name


def test_names_untied_and_tied() -> None:
    untied = build_model(get_preset("nano", tie_embeddings=False))
    assert "head.weight" in untied.state_dict()
    assert not any("rope" in k for k in untied.state_dict())  # RoPE tables are not persistent
    tied = build_model(get_preset("nano", tie_embeddings=True))
    names = [n for n, _ in tied.named_parameters()]
    assert "head.weight" not in names and "head.weight" not in tied.state_dict()
    assert names.count("tok_emb.weight") == 1 and tied.head_weight is tied.tok_emb.weight
    assert list(tied.state_dict()) == names  # no duplicate or extra tensors
    assert sorted(untied.state_dict()) == sorted([*names, "head.weight"])


def test_tied_head_gets_gradient_from_both_uses() -> None:
    model = build_model(get_preset("nano", tie_embeddings=True), seed=0)
    model(_tokens(1, 8), _tokens(1, 8, seed=1)).loss.backward()
    grad = model.tok_emb.weight.grad
    assert grad is not None
    unused = torch.ones(260, dtype=torch.bool)
    unused[_tokens(1, 8).flatten()] = False
    assert grad[unused].abs().sum() > 0  # rows never embedded still get gradient through the head


def test_bad_inputs() -> None:
    model = build_model(get_preset("nano", max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(_tokens(1, 17))
    with pytest.raises(ValueError, match="long"):
        model(_tokens(1, 8).int())
    with pytest.raises(ValueError, match="targets shape"):
        model(_tokens(1, 8), _tokens(1, 7))


@pytest.mark.parametrize("name", ["nano", "moe-nano"])
def test_a_few_steps_fit_a_fixed_batch(name: str) -> None:
    torch.manual_seed(0)
    model: LanguageModel = build_model(get_preset(name, max_seq_len=32), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = _tokens(4, 33)
    losses = []
    for _ in range(15):
        out = model(tokens[:, :-1], tokens[:, 1:])
        assert out.loss is not None and torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item() if out.lm_loss is not None else math.nan)
    assert losses[-1] < losses[0] - 1.0
