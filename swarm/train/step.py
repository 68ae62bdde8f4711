"""The reusable training step: forward, finiteness checks, backward, clip, AdamW step.

Solo training and every swarm peer's inner steps run through `Trainer.train_step`, so the
numerics of a swarm benchmark and of its solo baseline are the same code.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from swarm.train.optim import OptimConfig, lr_at


class NonFiniteLossError(RuntimeError):
    """A loss or gradient norm was NaN/inf; raised before the optimizer could apply it."""


@dataclass
class StepStats:
    """What one optimizer step did. `step` counts completed steps (1 after the first)."""

    step: int
    loss: float  # total loss that was backpropagated (LM + auxiliary)
    lm_loss: float  # LM cross-entropy, nats per byte
    grad_norm: float  # global L2 norm before clipping
    lr: float
    tokens: int  # tokens in this step's batch


def check_device_name(name: str) -> None:
    """Reject anything but auto, cpu, cuda, cuda:N (without asking whether a GPU is present)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {name!r}")


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available else cpu; 'cuda' without a GPU is an error."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA GPU")
    return torch.device(name)


def autocast_for(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA; plain fp32 on CPU (CPU bf16 is slow on most chips and less exact)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Trainer:
    """Owns the step counter and applies `lr_at(step)` before each AdamW step.

    `step` is public: a swarm peer may set it (e.g. to its global inner-step count) so the
    schedule follows the run rather than the process.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: OptimConfig,
        *,
        device: torch.device,
        step: int = 0,
    ) -> None:
        self.model, self.optimizer, self.cfg, self.device = model, optimizer, cfg, device
        self.step = step
        # Only trainable params count towards the norm; frozen experts have no grads anyway.
        self._params = [p for g in optimizer.param_groups for p in g["params"]]

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        """One optimizer step on a (B, T) batch. Raises NonFiniteLossError before any update."""
        self.model.train()
        inputs = inputs.to(self.device, non_blocking=True)  # (B, T)
        targets = targets.to(self.device, non_blocking=True)  # (B, T)
        with autocast_for(self.device):
            out = self.model(inputs, targets)
        loss, lm_loss = out.loss.detach().item(), out.lm_loss.detach().item()
        number = self.step + 1
        if not (math.isfinite(loss) and math.isfinite(lm_loss)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"non-finite loss at step {number}: loss={loss}, lm_loss={lm_loss}")
        out.loss.backward()
        grad_norm = self._clip_grad_norm()
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"non-finite gradient norm at step {number}: grad_norm={grad_norm} (loss={loss:.4f})")
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = number
        return StepStats(step=number, loss=loss, lm_loss=lm_loss, grad_norm=grad_norm, lr=lr, tokens=targets.numel())

    def _clip_grad_norm(self) -> float:
        params = [p for p in self._params if p.grad is not None]
        if not params:
            raise RuntimeError("no gradients after backward: does the loss depend on the trainable params?")
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device | None = None,
) -> float:
    """Token-weighted mean LM loss (nats per byte) over `batches`; restores train/eval mode."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for inputs, targets in batches:
            with autocast_for(device):
                out = model(inputs.to(device), targets.to(device))
            total += float(out.lm_loss) * targets.numel()
            count += targets.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate() got no batches")
    return total / count
