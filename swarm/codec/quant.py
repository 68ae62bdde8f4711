"""Low-bit quantisation of the selected values: 2^b bins over +-3 sigma, decoded to bin means.

Scope is per tensor (one table of 2^b bin means for all selected values of a tensor), not per
chunk. Why: a per-chunk table of four fp16 means costs 64 bits per 64 values, i.e. +1
bit/value on top of ~10, which alone would pull the ratio vs fp32 from ~205x to ~186x. Per
tensor the table is 16 bytes per tensor, negligible. The price is precision in tensors whose
chunks differ a lot in scale; error feedback carries the quantisation error to the next
round, so it is delayed, not lost.

Binning: shift = mean of the selected values, sigma = their RMS deviation from it; the range
[shift - 3 sigma, shift + 3 sigma] is cut into 2^b equal bins and values beyond it land in the
edge bins. Each bin decodes to the mean of its members (computed in fp64, stored as fp32);
an empty bin decodes to its centre. With sigma == 0 every value goes to bin 0.
Codes are a b-bit MSB-first stream (for b = 2: four codes per byte, the first in the top bits).
"""

from __future__ import annotations

import numpy as np

from swarm.codec.base import MAX_ABS_VALUE, PayloadError
from swarm.codec.bitpack import nbytes_for_bits, pack_fields, unpack_fields

VALUE_BITS_CHOICES = (1, 2, 4, 8)
RANGE_SIGMAS = 3.0


def table_nbytes(value_bits: int) -> int:
    """Bytes of the bin-mean table: 2^b little-endian fp32."""
    return 4 << value_bits


def codes_nbytes(count: int, value_bits: int) -> int:
    return nbytes_for_bits(count * value_bits)


def quantize(values: np.ndarray, value_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin `values` (N,) into 2^b bins; returns (codes (N,) uint8, table (2^b,) fp32).

    numpy on purpose: these arrays are ~1.5% of the tensor, and torch's thread pool costs
    more than the work at this size on a busy CPU.
    """
    if value_bits not in VALUE_BITS_CHOICES:
        raise ValueError(f"value_bits must be one of {VALUE_BITS_CHOICES}, got {value_bits}")
    n_bins = 1 << value_bits
    if values.size == 0:
        return np.zeros(0, dtype=np.uint8), np.zeros(n_bins, dtype=np.float32)
    v = np.asarray(values, dtype=np.float64).reshape(-1)  # (N,)
    if not np.isfinite(v).all():
        raise ValueError("cannot quantise non-finite values")
    shift = v.mean()
    sigma = np.sqrt(np.square(v - shift).mean())
    low = shift - RANGE_SIGMAS * sigma
    width = 2 * RANGE_SIGMAS * sigma / n_bins
    if width > 0:
        codes = np.clip(np.floor((v - low) / width), 0, n_bins - 1).astype(np.int64)
    else:
        codes = np.zeros(v.size, dtype=np.int64)
    sums = np.bincount(codes, weights=v, minlength=n_bins)
    counts = np.bincount(codes, minlength=n_bins)
    centres = low + (np.arange(n_bins) + 0.5) * width
    table = np.where(counts > 0, sums / np.maximum(counts, 1), centres).astype(np.float32)
    return codes.astype(np.uint8), table


def pack_codes(codes: np.ndarray, value_bits: int) -> bytes:
    return pack_fields(codes.astype(np.int64), value_bits)


def unpack_codes(data: bytes | memoryview, count: int, value_bits: int) -> np.ndarray:
    """`count` codes as int64; raises PayloadError on a wrong length or padding."""
    return unpack_fields(data, value_bits, count, "value codes")


def table_to_bytes(table: np.ndarray) -> bytes:
    return np.asarray(table, dtype="<f4").tobytes()


def table_from_bytes(data: bytes | memoryview, value_bits: int, max_abs: float = MAX_ABS_VALUE) -> np.ndarray:
    """Parse and check the bin-mean table: finite and within +-max_abs."""
    if len(data) != table_nbytes(value_bits):
        raise PayloadError(f"quantisation table: {len(data)} bytes, expected {table_nbytes(value_bits)}")
    table = np.frombuffer(data, dtype="<f4").astype(np.float32)  # (2^b,)
    if not np.isfinite(table).all():
        raise PayloadError("quantisation table holds NaN or inf")
    if np.abs(table).max() > max_abs:
        raise PayloadError(f"quantisation table value {np.abs(table).max():.3g} exceeds {max_abs:g}")
    return table
