"""RMSNorm, RoPE, attention and SwiGLU building blocks."""

import cmath

import torch

from models import ModelConfig
from models.layers import CausalSelfAttention, RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary


def test_rmsnorm_unit_rms_and_ones_init() -> None:
    norm = RMSNorm(16)
    assert torch.equal(norm.weight, torch.ones(16))
    y = norm(torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0)) * 7)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(3, 5), atol=1e-4)


def test_rope_buffers_are_not_persistent() -> None:
    rope = RotaryEmbedding(8, 32)
    assert dict(rope.state_dict()) == {}
    cos, sin = rope(10)
    assert cos.shape == sin.shape == (10, 4)


def test_rope_preserves_norm() -> None:
    rope = RotaryEmbedding(16, 64)
    x = torch.randn(2, 3, 64, 16, generator=torch.Generator().manual_seed(1))  # (B, H, T, hd)
    y = apply_rotary(x, *rope(64))
    assert torch.allclose(x.norm(dim=-1), y.norm(dim=-1), atol=1e-5)


def _rotate_at(x: torch.Tensor, pos: int, rope: RotaryEmbedding) -> torch.Tensor:
    """Rotate one head vector x (hd,) as if it sat at position ``pos``."""
    cos, sin = rope(pos + 1)
    return apply_rotary(x.view(1, -1), cos[pos : pos + 1], sin[pos : pos + 1]).view(-1)


def test_rope_dot_product_depends_only_on_relative_position() -> None:
    rope = RotaryEmbedding(16, 128)
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)
    base = _rotate_at(q, 7, rope) @ _rotate_at(k, 3, rope)
    for offset in (1, 20, 100):
        shifted = _rotate_at(q, 7 + offset, rope) @ _rotate_at(k, 3 + offset, rope)
        assert torch.allclose(base, shifted, atol=1e-4)
    assert not torch.allclose(base, _rotate_at(q, 9, rope) @ _rotate_at(k, 3, rope), atol=1e-3)


def test_rope_matches_explicit_complex_rotation() -> None:
    head_dim, seq_len, theta = 8, 12, 10000.0
    rope = RotaryEmbedding(head_dim, seq_len, theta)
    x = torch.randn(seq_len, head_dim, generator=torch.Generator().manual_seed(3))
    got = apply_rotary(x, *rope(seq_len))
    # Pair (2i, 2i+1) is the complex number x[2i] + j x[2i+1], turned by pos * theta^(-2i/hd).
    for pos in range(seq_len):
        for i in range(head_dim // 2):
            angle = pos * theta ** (-2 * i / head_dim)
            z = complex(x[pos, 2 * i].item(), x[pos, 2 * i + 1].item()) * cmath.exp(1j * angle)
            assert abs(got[pos, 2 * i].item() - z.real) < 1e-5
            assert abs(got[pos, 2 * i + 1].item() - z.imag) < 1e-5
    # The same check, vectorised with torch's complex view.
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)  # (T, hd/2)
    turns = torch.polar(torch.ones_like(angles), angles)  # exp(j * angle), complex128
    turned = torch.view_as_complex(x.double().view(seq_len, -1, 2)) * turns
    assert torch.allclose(got.double(), torch.view_as_real(turned).flatten(-2), atol=1e-5)


def test_attention_shape_and_causality() -> None:
    cfg = ModelConfig(d_model=32, n_heads=4, max_seq_len=16)
    torch.manual_seed(0)
    attn, rope = CausalSelfAttention(cfg), RotaryEmbedding(cfg.head_dim, 16)
    x = torch.randn(2, 10, 32)
    y = attn(x, *rope(10))
    assert y.shape == (2, 10, 32)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, 32)
    assert torch.allclose(attn(x2, *rope(10))[:, :6], y[:, :6], atol=1e-6, rtol=0)


def test_swiglu_formula() -> None:
    torch.manual_seed(0)
    ffn = SwiGLU(8, 12)
    x = torch.randn(5, 8)
    hidden = torch.nn.functional.silu(x @ ffn.w_gate.weight.T) * (x @ ffn.w_up.weight.T)
    expected = hidden @ ffn.w_down.weight.T
    assert torch.allclose(ffn(x), expected, atol=1e-6)
