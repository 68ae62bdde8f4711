"""Vectorised MSB-first bit streams: fixed- or variable-width fields and sparse bit vectors.

Every stream in a payload is a sequence of bits written most-significant-bit first, packed
into bytes first-bit-in-the-high-bit (numpy's `packbits` order), and padded with zero bits to
a whole byte. Readers insist on the exact byte length and on zero padding, so one logical
content has exactly one byte encoding (payload digests then identify content).
"""

from __future__ import annotations

import numpy as np

from swarm.codec.base import PayloadError


def nbytes_for_bits(total_bits: int) -> int:
    """Bytes needed to hold `total_bits` bits."""
    return (total_bits + 7) // 8


def _as_bits(data: bytes | memoryview, total_bits: int, what: str) -> np.ndarray:
    """Unpack `data` to a 0/1 uint8 array after checking its length and zero padding."""
    expected = nbytes_for_bits(total_bits)
    if len(data) != expected:
        raise PayloadError(f"{what}: {len(data)} bytes, expected {expected}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))  # (8 * bytes,)
    if bits[total_bits:].any():
        raise PayloadError(f"{what}: non-zero padding bits")
    return bits[:total_bits]


def pack_fields(values: np.ndarray, widths: np.ndarray | int) -> bytes:
    """Concatenate `values[i]` as `widths[i]`-bit fields. Values must fit their widths."""
    values = np.asarray(values, dtype=np.int64)
    if np.isscalar(widths) or np.ndim(widths) == 0:
        width = int(widths)
        if width == 0 or values.size == 0:
            return b""
        bits = np.empty((values.size, width), dtype=np.uint8)  # (N, width)
        for b in range(width):  # one column at a time keeps temporaries at N, not N * width
            bits[:, b] = (values >> (width - 1 - b)) & 1
        return np.packbits(bits.reshape(-1)).tobytes()
    widths = np.asarray(widths, dtype=np.int64)
    starts = np.cumsum(widths) - widths
    flat = np.zeros(int(widths.sum()), dtype=np.uint8)  # (sum of widths,)
    for b in range(int(widths.max(initial=0))):
        sel = widths > b
        flat[starts[sel] + b] = (values[sel] >> (widths[sel] - 1 - b)) & 1
    return np.packbits(flat).tobytes()


def unpack_fields(data: bytes | memoryview, widths: np.ndarray | int, count: int, what: str) -> np.ndarray:
    """Inverse of `pack_fields`: `count` fields as int64. Raises PayloadError on bad length."""
    if np.isscalar(widths) or np.ndim(widths) == 0:
        width = int(widths)
        bits = _as_bits(data, count * width, what)
        fields = bits.reshape(count, width)  # (count, width)
        values = np.zeros(count, dtype=np.int64)
        for b in range(width):
            values = (values << 1) | fields[:, b]
        return values
    widths = np.asarray(widths, dtype=np.int64)
    bits = _as_bits(data, int(widths.sum()), what)
    starts = np.cumsum(widths) - widths
    values = np.zeros(count, dtype=np.int64)
    for b in range(int(widths.max(initial=0))):
        sel = widths > b
        values[sel] = (values[sel] << 1) | bits[starts[sel] + b]
    return values


def pack_positions(positions: np.ndarray, total_bits: int) -> bytes:
    """A `total_bits`-long bit vector with ones exactly at `positions`."""
    bits = np.zeros(total_bits, dtype=np.uint8)
    bits[positions] = 1
    return np.packbits(bits).tobytes()


def unpack_positions(data: bytes | memoryview, total_bits: int, what: str) -> np.ndarray:
    """Ascending positions of the one bits of a `total_bits`-long bit vector."""
    return np.flatnonzero(_as_bits(data, total_bits, what)).astype(np.int64)
