"""Learning-rate schedule and optimizer construction."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from models import build_model, freeze_experts, get_preset
from swarm.train.optim import OptimConfig, build_optimizer, lr_at, no_decay_parameter_names


def test_warmup_then_cosine_to_floor() -> None:
    cfg = OptimConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, total_steps=110)
    lrs = [lr_at(s, cfg) for s in range(130)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in itertools.pairwise(lrs[:10]))  # rising warmup
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))  # then never rising
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # half way down the cosine
    assert lrs[110] == pytest.approx(1e-4) and lrs[129] == pytest.approx(1e-4)
    assert min(lrs) > 0


def test_no_warmup_starts_at_peak() -> None:
    assert lr_at(0, OptimConfig(lr=2e-3, warmup_steps=0, total_steps=5)) == pytest.approx(2e-3)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="lr"):
        OptimConfig(lr=0)
    with pytest.raises(ValueError, match="betas"):
        OptimConfig(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimConfig(warmup_steps=-1)
    assert OptimConfig.from_dict(OptimConfig(lr=1e-2).to_dict()) == OptimConfig(lr=1e-2)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.proj(self.norm(self.emb(x)))).square().mean()


def test_decay_only_on_trainable_matrices() -> None:
    model = _Tiny()
    assert no_decay_parameter_names(model) == {"emb.weight", "norm.weight", "norm.bias", "proj.bias"}
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [model.proj.weight.shape]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4


def test_frozen_params_get_no_optimizer_state() -> None:
    model = _Tiny()
    opt = build_optimizer(model, OptimConfig())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.frozen.weight) not in in_opt and id(model.frozen.bias) not in in_opt
    model(torch.arange(6)).backward()
    opt.step()
    assert len(opt.state) == 5 and model.frozen.weight not in opt.state


def test_moe_frozen_experts_are_left_out() -> None:
    cfg = get_preset("moe-nano", d_model=32, n_heads=2, n_layers=2, d_ff=64, expert_d_ff=32, max_seq_len=32)
    model = build_model(cfg, seed=0)
    freeze_experts(model, [(0, 0), (1, 3)])
    opt = build_optimizer(model, OptimConfig())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == trainable
    assert trainable < sum(p.numel() for p in model.parameters())


def test_lr_is_finite_everywhere() -> None:
    cfg = OptimConfig(warmup_steps=0, total_steps=1)
    assert all(math.isfinite(lr_at(s, cfg)) for s in range(5))
