"""One byte per directional-derivative estimate: sign + 7-bit log magnitude against the run's scale.

Byte b = s·128 + m (s = 1 for negative). m = 0 is zero; m in 1..127 stands for
    |ĝ| = scale · 2^((m − 127)/8)
so the top level is `scale` and the range spans 126/8 = 15.75 octaves below it, 8 levels per
octave (each level 9% above the one below; rounding to the nearest level in log2 is within 4.4%).
Values beyond `scale` saturate; those under half a level below the smallest become zero. Decoding
multiplies `scale` by a power of two (exact) and one of eight constants written out in hex, so every
machine turns a byte into the same float; the dequantized value is what everyone applies, the sender
included. Every byte decodes to a finite value: a hostile byte can only be an extreme one.
"""

from __future__ import annotations

import math

LEVELS_PER_OCTAVE = 8
TOP = 127
# 2^(r/8) for r = 0..7, as exact binary64 constants (no libm pow: identical on every platform).
_ROOTS = tuple(
    float.fromhex(h)
    for h in (
        "0x1.0000000000000p+0",
        "0x1.172b83c7d517bp+0",
        "0x1.306fe0a31b715p+0",
        "0x1.4bfdad5362a27p+0",
        "0x1.6a09e667f3bcdp+0",
        "0x1.8ace5422aa0dbp+0",
        "0x1.ae89f995ad3adp+0",
        "0x1.d5818dcfba487p+0",
    )
)


def check_scale(scale: float) -> None:
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the scalar scale must be a positive finite number, got {scale}")


def level_value(m: int, scale: float) -> float:
    """|ĝ| of magnitude level m (0 = zero)."""
    if m == 0:
        return 0.0
    octave, step = divmod(m - TOP, LEVELS_PER_OCTAVE)  # m − 127 = 8·octave + step, step in 0..7
    return math.ldexp(scale * _ROOTS[step], octave)


def encode_scalar(value: float, scale: float) -> int:
    """The byte standing for `value` (nearest level in log2). ValueError on a non-finite value."""
    if not math.isfinite(value):
        raise ValueError(f"cannot encode a non-finite estimate ({value})")
    sign = 128 if value < 0 else 0
    magnitude = abs(value)
    if magnitude == 0:
        return 0
    level = TOP + LEVELS_PER_OCTAVE * math.log2(magnitude / scale)
    if level < 0.5:
        return 0  # below half a level under the smallest: zero (never a negative zero byte)
    return sign | min(TOP, math.floor(level + 0.5))


def decode_scalar(byte: int, scale: float) -> float:
    if not 0 <= byte <= 255:
        raise ValueError(f"not a byte: {byte}")
    value = level_value(byte & 127, scale)
    return -value if byte & 128 and value else value


def encode_scalars(values: list[float], scale: float) -> bytes:
    check_scale(scale)
    return bytes(encode_scalar(v, scale) for v in values)


def decode_scalars(data: bytes, scale: float) -> list[float]:
    check_scale(scale)
    return [decode_scalar(b, scale) for b in data]
