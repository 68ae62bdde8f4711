"""Model configuration, the preset zoo, and analytic parameter counts.

A ``ModelConfig`` is plain data (ints, floats, bools) so that it can travel inside a signed run
description (msgpack/JSON) and be rebuilt bit-for-bit by every peer with ``ModelConfig.from_dict``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Fields that must be strictly positive integers / floats, checked in __post_init__.
_POSITIVE_INTS = ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "d_ff", "top_k")
_POSITIVE_FLOATS = ("rope_theta", "norm_eps", "init_std")
_NON_NEGATIVE_FLOATS = ("balance_loss_coef", "z_loss_coef")


@dataclass
class ModelConfig:
    """Shape and training-loss knobs of a decoder-only LM (dense or mixture-of-experts).

    Defaults describe the ``nano`` model so that ``ModelConfig()`` is a valid, CPU-sized model.
    """

    vocab_size: int = 260  # byte tokenizer: 256 byte values + 4 specials (pad, bos, eos, unk)
    max_seq_len: int = 256  # context length in tokens (= bytes); sizes the RoPE tables
    d_model: int = 128  # residual stream width
    n_layers: int = 4
    n_heads: int = 4  # head dim = d_model / n_heads, must be even for RoPE
    d_ff: int = 384  # SwiGLU hidden width of the dense FFN (about 8/3 * d_model keeps FLOPs ~ a 4x GELU MLP)
    tie_embeddings: bool = True  # share the token embedding with the output head
    rope_theta: float = 10000.0  # RoPE base; larger stretches the slowest rotation for long contexts
    norm_eps: float = 1e-5
    init_std: float = 0.02  # std of every linear/embedding weight at init (GPT-2 value)
    n_experts: int = 0  # experts per MoE layer; 0 = dense model (every layer uses the SwiGLU FFN)
    top_k: int = 2  # experts each token is sent to (MoE only)
    expert_d_ff: int = 0  # SwiGLU hidden width of one expert; 0 -> d_ff
    balance_loss_coef: float = 0.01  # weight of the load-balancing loss (SPES reference value)
    z_loss_coef: float = 0.001  # weight of the router z-loss (SPES reference value)

    def __post_init__(self) -> None:
        self._check_types()
        for name in _POSITIVE_INTS + _POSITIVE_FLOATS:
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in (*_NON_NEGATIVE_FLOATS, "n_experts", "expert_d_ff"):
            if getattr(self, name) < 0:
                raise ValueError(f"ModelConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head dim d_model/n_heads = {self.head_dim} must be even: RoPE rotates pairs of channels")
        if self.is_moe and self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts})")

    def _check_types(self) -> None:
        # Run descriptions arrive as msgpack/JSON, where 1e4 may come back as the int 10000: accept
        # ints for float fields, but refuse bools posing as ints and floats posing as ints.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"ModelConfig.{f.name} must be a bool, got {value!r}")
            elif f.type == "int":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"ModelConfig.{f.name} must be an int, got {value!r}")
            elif f.type == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"ModelConfig.{f.name} must be a number, got {value!r}")
                setattr(self, f.name, float(value))

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def expert_hidden(self) -> int:
        """SwiGLU hidden width of one expert (``expert_d_ff``, or ``d_ff`` when that is 0)."""
        return self.expert_d_ff or self.d_ff

    def to_dict(self) -> dict[str, Any]:
        """Plain ``{name: int | float | bool}``, safe for JSON and msgpack."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``. Missing keys take their defaults; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)


# The zoo. Every preset uses untied embeddings: with a 260-symbol byte vocabulary the head is a
# tiny fraction of the model (<4% for nano, <0.1% for 1b), and an untied head keeps the first and
# last pipeline stages free of a shared tensor. Widths are multiples of 64 (128 from small up) so
# matmuls tile well on GPUs.
_DENSE_NANO = dict(d_model=128, n_layers=4, n_heads=4, d_ff=384, max_seq_len=256)
_DENSE_TINY = dict(d_model=384, n_layers=6, n_heads=6, d_ff=1024, max_seq_len=512)
# 24 layers split evenly into 2, 3, 4, 6 or 8 pipeline stages.
_DENSE_SMALL = dict(d_model=768, n_layers=24, n_heads=12, d_ff=2304, max_seq_len=1024)
# 20 layers of width 2048 with head dim 128 (FlashAttention's sweet spot); splits into 2, 4, 5 stages.
_DENSE_1B = dict(d_model=2048, n_layers=20, n_heads=16, d_ff=5632, max_seq_len=2048)
# MoE twins keep the dense shape and use 8 experts of half the dense FFN width, top-2: the compute
# per token (active parameters) matches the dense twin while total parameters grow ~2.5-3x.
# 8 experts per layer shard evenly over 1, 2, 4 or 8 SPES peers.
_MOE = dict(n_experts=8, top_k=2)

PRESETS: dict[str, ModelConfig] = {
    "nano": ModelConfig(**_DENSE_NANO, tie_embeddings=False),  # ~0.9M: unit tests on CPU
    "tiny": ModelConfig(**_DENSE_TINY, tie_embeddings=False),  # ~11M: CPU demos, local clusters
    "small": ModelConfig(**_DENSE_SMALL, tie_embeddings=False),  # ~184M: one consumer GPU
    "1b": ModelConfig(**_DENSE_1B, tie_embeddings=False),  # ~1.0B: the swarm-scale target
    "moe-nano": ModelConfig(**_DENSE_NANO, **_MOE, expert_d_ff=192, tie_embeddings=False),
    "moe-tiny": ModelConfig(**_DENSE_TINY, **_MOE, expert_d_ff=512, tie_embeddings=False),
    "moe-small": ModelConfig(**_DENSE_SMALL, **_MOE, expert_d_ff=1152, tie_embeddings=False),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A fresh copy of preset ``name`` with ``overrides`` applied (and validated)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name].to_dict(), **overrides})


def _block_parameters(cfg: ModelConfig, experts_used: int) -> int:
    """Parameters of one transformer block, counting ``experts_used`` experts if MoE."""
    d = cfg.d_model
    attention = 4 * d * d  # fused q/k/v (3 d*d) + output projection (d*d), no biases
    norms = 2 * d  # two RMSNorm gains
    if not cfg.is_moe:
        return attention + norms + 3 * d * cfg.d_ff  # SwiGLU: gate, up, down
    router = d * cfg.n_experts
    return attention + norms + router + experts_used * 3 * d * cfg.expert_hidden


def _count(cfg: ModelConfig, experts_used: int) -> int:
    embedding = cfg.vocab_size * cfg.d_model
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    final_norm = cfg.d_model
    return embedding + cfg.n_layers * _block_parameters(cfg, experts_used) + final_norm + head


def count_parameters(cfg: ModelConfig) -> int:
    """Exact number of parameters of ``LanguageModel(cfg)`` (a tied head counted once)."""
    return _count(cfg, cfg.n_experts)


def count_active_parameters(cfg: ModelConfig) -> int:
    """Parameters one token passes through: all but the ``n_experts - top_k`` unpicked experts
    per layer. Equals ``count_parameters`` for a dense model."""
    return _count(cfg, cfg.top_k if cfg.is_moe else 0)
