"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine learning rate."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class OptimConfig:
    """Inner optimizer settings; swarm peers use the same for their inner steps."""

    lr: float = 3e-3  # peak learning rate; byte-level models of a few M params tolerate 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear ramp from lr/warmup_steps to lr
    total_steps: int = 1000  # step at which the cosine reaches its floor; later steps stay there
    weight_decay: float = 0.1  # decoupled (AdamW), on >= 2-D non-embedding weights only
    betas: tuple[float, float] = (0.9, 0.95)  # beta2 0.95 reacts faster to loss spikes than 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad L2 norm; 0 disables clipping (the norm is still checked)

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"OptimConfig.lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError(
                f"OptimConfig needs warmup_steps >= 0 and total_steps >= 1, got {self.warmup_steps}, {self.total_steps}"
            )
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise ValueError("OptimConfig.weight_decay and grad_clip must be >= 0, eps > 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"OptimConfig.betas must be in [0, 1), got {self.betas}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimConfig:
        return cls(**{**data, "betas": tuple(data.get("betas", (0.9, 0.95)))})


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate for the optimizer step with 0-based index `step`.

    Linear warmup over `warmup_steps` (the first step already uses lr/warmup_steps, never 0),
    then a half cosine from lr down to lr*min_lr_ratio at `total_steps`, flat afterwards.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of trainable params exempt from weight decay: 1-D tensors (norm gains, biases) and
    embedding tables. Decaying an embedding pulls rare tokens' rows towards zero just because they
    get few gradient updates; decaying gains fights the normalisation. Matrices (attention, FFN,
    experts, router, untied head) are decayed."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {name for name, p in model.named_parameters() if p.requires_grad and (p.ndim < 2 or id(p) in embedding_ids)}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the params with requires_grad only, in two groups (decay, no decay).

    Frozen params (e.g. MoE experts owned by other peers) are left out entirely, so the optimizer
    never allocates moment buffers for them. Group order and in-group order follow
    `model.named_parameters()`, which checkpoints rely on.
    """
    skip = no_decay_parameter_names(model)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("model has no trainable parameters")
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr_at(0, cfg), betas=cfg.betas, eps=cfg.eps, foreach=None)
