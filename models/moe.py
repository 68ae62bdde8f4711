"""Mixture-of-experts FFN: top-k softmax router, SwiGLU experts, auxiliary router losses, and the
helpers that name, select and freeze expert parameters (SPES shards experts over peers by name).

Expert parameter names are stable and always of the form::

    blocks.{layer}.ffn.experts.{expert}.{w_gate|w_up|w_down}.weight

The router of a layer is ``blocks.{layer}.ffn.router.weight`` and counts as a dense parameter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.layers import SwiGLU

_EXPERT_NAME = re.compile(r"^blocks\.(\d+)\.ffn\.experts\.(\d+)\.")


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k softmax routing of ``logits`` (N, E).

    Softmax over all E experts, keep the k largest probabilities, renormalise them to sum to 1.
    Returns ``(weights (N, k), indices (N, k) long, probs (N, E))``; ``probs`` feeds the balance loss.
    """
    probs = F.softmax(logits.float(), dim=-1)  # (N, E)
    top_probs, indices = probs.topk(top_k, dim=-1)  # (N, k) each, sorted descending
    weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
    return weights, indices, probs


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch/GShard balance loss ``E * sum_i f_i * P_i``.

    ``f_i``: fraction of the N*k token-slots sent to expert i (not differentiable);
    ``P_i``: mean router probability of expert i (carries the gradient).
    Perfectly uniform routing gives the minimum 1; all slots on one expert with probability 1 gives E.
    """
    counts = torch.bincount(indices.flatten(), minlength=n_experts).to(probs.dtype)  # (E,)
    fraction = counts / indices.numel()
    mean_prob = probs.mean(dim=0)  # (E,)
    return n_experts * (fraction * mean_prob).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)**2``; keeps logits small."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class MoELayer(nn.Module):
    """``n_experts`` SwiGLU experts behind a top-k router; a drop-in for the dense FFN.

    No capacity limit and no token dropping: every token reaches its k experts, so a token's output
    never depends on other tokens (the model stays causal). Experts that receive no token in a batch
    get no gradient (``.grad`` stays None).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not cfg.is_moe:
            raise ValueError("MoELayer needs cfg.n_experts > 0")
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg.d_model, cfg.expert_hidden) for _ in range(cfg.n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``x`` (B, T, C) -> ``(y (B, T, C), (balance_loss, z_loss))`` with 0-dim float32 losses."""
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C)
        logits = self.router(flat)  # (N, E)
        weights, indices, probs = route(logits, self.top_k)  # (N, k), (N, k), (N, E)
        # Each (token, slot) pair is written exactly once, then the k slots are summed in a fixed
        # order: unlike index_add_ (atomic adds on GPU) this forward is bit-reproducible.
        slots = flat.new_zeros(B * T, self.top_k, C)  # (N, k, C)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(indices == e)  # tokens that picked e, and in which slot
            if token_idx.numel() == 0:
                continue
            y = expert(flat[token_idx]) * weights[token_idx, slot].unsqueeze(-1)  # (n_e, C)
            slots[token_idx, slot] = y.to(slots.dtype)
        aux = (load_balancing_loss(probs, indices, len(self.experts)), router_z_loss(logits))
        return slots.sum(dim=1).view(B, T, C), aux


def expert_prefix(layer: int, expert: int) -> str:
    """Name prefix shared by every parameter of one expert, e.g. ``blocks.3.ffn.experts.5.``."""
    return f"blocks.{layer}.ffn.experts.{expert}."


def is_expert_parameter(name: str) -> tuple[int, int] | None:
    """``(layer, expert)`` if ``name`` is a full expert parameter name, else None."""
    match = _EXPERT_NAME.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def expert_parameters(model: nn.Module, layer: int, expert: int) -> dict[str, nn.Parameter]:
    """``{full name: parameter}`` of one expert of ``model`` (a LanguageModel or a Stage)."""
    prefix = expert_prefix(layer, expert)
    params = {n: p for n, p in model.named_parameters() if n.startswith(prefix)}
    if not params:
        raise KeyError(f"model has no expert (layer={layer}, expert={expert})")
    return params


def dense_parameter_names(model: nn.Module) -> list[str]:
    """Names of every non-expert parameter (embeddings, attention, norms, routers, head)."""
    return [n for n, _ in model.named_parameters() if is_expert_parameter(n) is None]


def freeze_experts(model: nn.Module, trainable: Iterable[tuple[int, int]]) -> None:
    """Make exactly the ``(layer, expert)`` pairs in ``trainable`` trainable among the experts.

    Every other expert gets ``requires_grad=False`` and its ``.grad`` cleared: it stays resident and
    is still routed to (the router is not masked, as in the SPES reference), but receives no
    gradient and, if the optimizer is built over ``requires_grad`` parameters, no optimizer state.
    Experts in ``trainable`` get ``requires_grad=True``, so calling again reassigns. Dense
    parameters are left as they are. Unknown pairs in ``trainable`` are a ValueError.
    """
    wanted = {(int(layer), int(expert)) for layer, expert in trainable}
    experts: list[tuple[nn.Parameter, tuple[int, int]]] = []
    for name, param in model.named_parameters():
        key = is_expert_parameter(name)
        if key is not None:
            experts.append((param, key))
    missing = sorted(wanted - {key for _, key in experts})
    if missing:  # checked before touching anything, so a typo leaves the model unchanged
        raise ValueError(f"freeze_experts: no such (layer, expert) pairs in the model: {missing}")
    for param, key in experts:
        param.requires_grad_(key in wanted)
        if key not in wanted:
            param.grad = None
