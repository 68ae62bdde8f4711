"""The two-point estimate of a directional derivative, with the fp32 master weights never touched.

MeZO perturbs the weights in place (θ += εz, θ −= 2εz, θ += εz), which does not give back θ bit for
bit in floating point, let alone in bf16. Here the master weights stay put: the model's parameters
are a working copy, overwritten with θ + εz, then θ − εz, then θ again, all computed from the
master, so the restored weights are exactly θ. z is drawn one tensor at a time (seeds.py), so the
extra memory is one tensor, not a model. A CUDA model may compute its losses under bf16 autocast;
its parameters stay fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from swarm.modes.spsa.seeds import direction


@torch.no_grad()
def load_perturbed(model: nn.Module, master: dict[str, torch.Tensor], seed: int, scale: float) -> None:
    """Model parameters ← master + scale·z(seed) (scale 0: the master itself, exactly)."""
    for name, param in model.named_parameters():
        base = master[name]
        if scale == 0:
            param.copy_(base)
            continue
        z = direction(seed, name, base.shape)
        param.copy_(base.add(z, alpha=scale))  # computed in fp32 on the CPU, then moved


@torch.no_grad()
def two_point(
    model: nn.Module, master: dict[str, torch.Tensor], seed: int, eps: float, loss_fn: Callable[[], float]
) -> tuple[float, float, float]:
    """(ĝ, L+, L−): ĝ = (L(θ+εz) − L(θ−εz)) / 2ε on the batch `loss_fn` evaluates, which must be the
    same batch both times and deterministic (dropout off). Leaves the model holding θ exactly."""
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    try:
        load_perturbed(model, master, seed, eps)
        plus = loss_fn()
        load_perturbed(model, master, seed, -eps)
        minus = loss_fn()
    finally:
        load_perturbed(model, master, seed, 0.0)
    return (plus - minus) / (2 * eps), plus, minus
