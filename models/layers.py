"""Building blocks of the decoder: RMSNorm, rotary position embeddings, causal attention, SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain and no bias (parameter ``weight``, init 1)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: the mean of squares underflows/overflows easily in bf16/fp16.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE tables for positions ``0 .. max_seq_len-1``.

    Channel pair ``(2i, 2i+1)`` of a head is treated as the complex number ``x[2i] + j*x[2i+1]``
    and multiplied by ``exp(j * pos * theta**(-2i/head_dim))``. The tables are non-persistent
    buffers: they never enter ``state_dict`` (nothing to sync between peers) and follow ``.to()``.
    """

    cos: torch.Tensor  # (max_seq_len, head_dim/2), a buffer
    sin: torch.Tensor  # (max_seq_len, head_dim/2), a buffer

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (T, hd/2)
        # Angles in float64 so that large positions keep their precision before the cast.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``(seq_len, head_dim/2)``."""
        if seq_len > self.cos.shape[0]:
            raise ValueError(f"sequence length {seq_len} exceeds RoPE table size {self.cos.shape[0]}")
        return self.cos[:seq_len], self.sin[:seq_len]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(..., T, head_dim)`` by position; ``cos``/``sin`` are ``(T, head_dim/2)``."""
    xf = x.float()
    x_re, x_im = xf[..., 0::2], xf[..., 1::2]  # (..., T, hd/2) each
    out_re = x_re * cos - x_im * sin
    out_im = x_re * sin + x_im * cos
    return torch.stack((out_re, out_im), dim=-1).flatten(-2).type_as(x)  # re-interleave pairs


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with RoPE on queries and keys; no biases, no dropout.

    Parameters: ``qkv.weight`` (3*d_model, d_model) fused q/k/v, ``out.weight`` (d_model, d_model),
    the latter being a residual output projection.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.out(y)


class SwiGLU(nn.Module):
    """``w_down(silu(w_gate x) * w_up x)``; used both as the dense FFN and as one MoE expert.

    ``w_down`` is a residual output projection.
    """

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
