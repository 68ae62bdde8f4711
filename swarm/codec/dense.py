"""Dense codecs for the DiLoCo baseline: every value, little-endian fp32 or fp16, one section.

No error feedback: fp32 is exact and fp16's rounding error is tiny next to the pseudo-gradient
itself. Values must be finite and within +-MAX_ABS_VALUE on both ends.
"""

from __future__ import annotations

import numpy as np
import torch

from swarm.codec.base import DENSE_FP16, DENSE_FP32, MAX_ABS_VALUE, EncodedTensor, PayloadError, numel_of

_WIRE_DTYPES: dict[str, np.dtype] = {DENSE_FP32: np.dtype("<f4"), DENSE_FP16: np.dtype("<f2")}


def dense_section_nbytes(shape: tuple[int, ...], kind: str) -> list[int]:
    """The single section's length: numel * 4 (fp32) or numel * 2 (fp16)."""
    return [numel_of(shape) * _WIRE_DTYPES[kind].itemsize]


def encode_dense(tensor: torch.Tensor, kind: str) -> EncodedTensor:
    """Encode all values; raises ValueError on non-finite or out-of-range input."""
    if kind not in _WIRE_DTYPES:
        raise ValueError(f"unknown dense codec {kind!r}")
    values = tensor.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(values).all():
        raise ValueError("cannot encode a tensor with NaN or inf")
    if values.numel() and values.abs().max() > MAX_ABS_VALUE:
        raise ValueError(f"value {values.abs().max():.3g} exceeds {MAX_ABS_VALUE:g}")
    raw = values.numpy().astype(_WIRE_DTYPES[kind]).tobytes()
    return EncodedTensor(kind, tuple(values.shape), (raw,), {})


def decode_dense(
    shape: tuple[int, ...],
    sections: tuple[bytes | memoryview, ...],
    kind: str,
    max_abs: float = MAX_ABS_VALUE,
) -> torch.Tensor:
    """fp32 tensor of `shape` from the section; raises PayloadError on any malformed input."""
    expected = dense_section_nbytes(shape, kind)
    lengths = [len(s) for s in sections]
    if lengths != expected:
        raise PayloadError(f"{kind} section lengths {lengths}, expected {expected}")
    values = np.frombuffer(sections[0], dtype=_WIRE_DTYPES[kind]).astype(np.float32)
    if not np.isfinite(values).all():
        raise PayloadError(f"{kind} values hold NaN or inf")
    if values.size and np.abs(values).max() > max_abs:
        raise PayloadError(f"{kind} value {np.abs(values).max():.3g} exceeds {max_abs:g}")
    return torch.from_numpy(values).reshape(shape)


def decode_encoded(encoded: EncodedTensor, max_abs: float = MAX_ABS_VALUE) -> torch.Tensor:
    if encoded.params:
        raise PayloadError(f"{encoded.codec} takes no params, got {sorted(encoded.params)}")
    return decode_dense(encoded.shape, encoded.sections, encoded.codec, max_abs)
