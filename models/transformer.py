"""The decoder-only language model (dense or MoE), nanoGPT-style.

Parameter names (what peers use to identify tensors)::

    tok_emb.weight                                   (V, C)
    blocks.{i}.attn_norm.weight                      (C,)
    blocks.{i}.attn.qkv.weight                       (3C, C)
    blocks.{i}.attn.out.weight                       (C, C)     residual output projection
    blocks.{i}.ffn_norm.weight                       (C,)
    dense:  blocks.{i}.ffn.{w_gate|w_up}.weight      (F, C)
            blocks.{i}.ffn.w_down.weight             (C, F)     residual output projection
    MoE:    blocks.{i}.ffn.router.weight             (E, C)
            blocks.{i}.ffn.experts.{e}.{w_gate|w_up|w_down}.weight
    norm.weight                                      (C,)
    head.weight                                      (V, C)     only when tie_embeddings=False

With ``tie_embeddings=True`` there is no ``head`` module at all: the logits are computed with
``tok_emb.weight``, so the tied matrix appears exactly once in ``named_parameters()`` and
``state_dict()`` (safetensors-friendly, no aliasing). The RoPE tables are non-persistent buffers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig, count_parameters
from models.layers import CausalSelfAttention, RMSNorm, RotaryEmbedding, SwiGLU
from models.moe import MoELayer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # target value excluded from the LM loss (F.cross_entropy's default)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None  # lm + balance_loss_coef*balance + z_loss_coef*z; None without targets
    lm_loss: torch.Tensor | None  # mean cross-entropy over non-ignored targets; None without targets
    balance_loss: torch.Tensor  # 0-dim, mean over MoE layers; 0 for dense models
    z_loss: torch.Tensor  # 0-dim, mean over MoE layers; 0 for dense models


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + ffn(norm(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn: nn.Module = MoELayer(cfg) if cfg.is_moe else SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``x`` (B, T, C) -> ``(x, (balance, z) or None for a dense block)``."""
        x = x + self.attn(self.attn_norm(x), cos, sin)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoELayer):
            y, aux = self.ffn(h)
            return x + y, aux
        return x + self.ffn(h), None


def run_blocks(
    blocks: Iterable[nn.Module], x: torch.Tensor, rope: RotaryEmbedding, n_layers: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply ``blocks`` in order to ``x`` (B, T, C); also return their summed aux losses / n_layers.

    Dividing by the model's total layer count (not the number of blocks given) makes the aux losses
    of pipeline stages add up to the whole model's. Shared by the model and its stages so that
    composing the stages runs exactly the same operations.
    """
    cos, sin = rope(x.shape[1])
    balance = x.new_zeros((), dtype=torch.float32)
    z = x.new_zeros((), dtype=torch.float32)
    for block in blocks:
        x, aux = block(x, cos, sin)
        if aux is not None:
            balance = balance + aux[0]
            z = z + aux[1]
    return x, balance / n_layers, z / n_layers


class LanguageModel(nn.Module):
    """Token embedding, ``n_layers`` blocks, final RMSNorm, linear head (tied or not).

    Init (``init_weights``): every Linear and Embedding weight ~ N(0, init_std), except residual
    output projections (``attn.out`` and every ``w_down``, experts' included), which use
    init_std / sqrt(2 * n_layers) so the residual stream's variance does not grow with depth
    (GPT-2). Norm gains are 1. There are no biases. ``seed`` makes init independent of the global
    RNG (identical on every peer that builds on the same device type).
    """

    def __init__(self, cfg: ModelConfig, *, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.tok_emb.weight.device).manual_seed(seed)
        self.init_weights(generator)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        resid_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_resid = name.endswith(("attn.out", "w_down"))
                std = resid_std if is_resid else self.cfg.init_std
                nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    @property
    def head_weight(self) -> torch.Tensor:
        """The (V, C) output matrix: ``head.weight``, or ``tok_emb.weight`` when tied."""
        return self.tok_emb.weight if self.head is None else self.head.weight

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        """``tokens`` (B, T) long -> logits (B, T, V); with ``targets`` (B, T) also the losses."""
        check_tokens(tokens, self.cfg)
        x = self.tok_emb(tokens)  # (B, T, C)
        x, balance, z = run_blocks(self.blocks, x, self.rope, self.cfg.n_layers)
        logits = F.linear(self.norm(x), self.head_weight)  # (B, T, V)
        if targets is None:
            return ModelOutput(logits, None, None, balance, z)
        if targets.shape != tokens.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != tokens shape {tuple(tokens.shape)}")
        lm_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        loss = lm_loss + self.cfg.balance_loss_coef * balance + self.cfg.z_loss_coef * z
        return ModelOutput(logits, loss, lm_loss, balance, z)


def check_tokens(tokens: torch.Tensor, cfg: ModelConfig) -> None:
    """Raise a clear ValueError for token batches the model cannot take."""
    if tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(f"tokens must be a (B, T) long tensor, got {tuple(tokens.shape)} {tokens.dtype}")
    if tokens.shape[1] > cfg.max_seq_len:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len {cfg.max_seq_len}")


def build_model(cfg: ModelConfig, *, seed: int | None = None) -> LanguageModel:
    """``LanguageModel(cfg)``, logging its size."""
    model = LanguageModel(cfg, seed=seed)
    logger.info("built model: %.2fM parameters", count_parameters(cfg) / 1e6)
    return model
