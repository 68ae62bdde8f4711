"""Coding of the selected positions of every chunk of one tensor.

Positions are compact chunk-local indices (see chunking.py), ascending inside each chunk,
chunks in order. Two codings:

* "elias-fano" (default): chunk c with n_c positions and k_c picks uses l_c =
  floor(log2(n_c / k_c)) low bits per index (the LOW stream, all chunks concatenated) and a
  bit vector of k_c + ((n_c - 1) >> l_c) + 1 bits per chunk (the HIGH stream) with the j-th
  index's one bit at (index >> l_c) + j. The size is fixed by (n_c, k_c) alone, whatever the
  data: 512 bits = 8.0 bits/index for 64 of 4096 (information bound ~7.4), so payload sizes
  follow a formula and a peer cannot inflate them. Decoding is a bit scan, fully vectorised.
* "fixed": ceil(log2(n_c)) bits per index (12 for a 4096 chunk), the published baseline.

Decoders reject wrong counts per chunk, indices >= n_c, and duplicates / unsorted runs, so
a decoded chunk always has exactly k_c distinct in-range positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from swarm.codec.base import PayloadError
from swarm.codec.bitpack import (
    nbytes_for_bits,
    pack_fields,
    pack_positions,
    unpack_fields,
    unpack_positions,
)

ELIAS_FANO = "elias-fano"
FIXED = "fixed"
INDEX_CODINGS = (ELIAS_FANO, FIXED)


def floor_log2(x: np.ndarray) -> np.ndarray:
    """Exact floor(log2(x)) of positive integers (float log2 corrected by one step)."""
    x = np.asarray(x, dtype=np.int64)
    guess = np.floor(np.log2(x)).astype(np.int64)
    guess -= (np.left_shift(1, guess) > x).astype(np.int64)
    guess += (np.left_shift(1, guess + 1) <= x).astype(np.int64)
    return guess


def bit_width(sizes: np.ndarray) -> np.ndarray:
    """Bits of a fixed-width index into a chunk of `sizes` values (0 for a 1-value chunk)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return np.where(sizes > 1, floor_log2(np.maximum(sizes - 1, 1)) + 1, 0)


def _ef_params(sizes: np.ndarray, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per chunk: low bits l_c and HIGH segment length in bits."""
    low = floor_log2(sizes // ks)
    return low, ks + ((sizes - 1) >> low) + 1


def section_bits(sizes: np.ndarray, ks: np.ndarray, counts: np.ndarray, coding: str) -> list[int]:
    """Bits of each index section for `counts[i]` chunks of size sizes[i] with ks[i] picks."""
    sizes, ks, counts = (np.asarray(a, dtype=np.int64) for a in (sizes, ks, counts))
    if coding == ELIAS_FANO:
        low, high = _ef_params(sizes, ks)
        return [int((counts * ks * low).sum()), int((counts * high).sum())]
    if coding == FIXED:
        return [int((counts * ks * bit_width(sizes)).sum())]
    raise ValueError(f"unknown index coding {coding!r}")


def section_nbytes(sizes: np.ndarray, ks: np.ndarray, counts: np.ndarray, coding: str) -> list[int]:
    return [nbytes_for_bits(b) for b in section_bits(sizes, ks, counts, coding)]


def _uniform(widths: np.ndarray) -> np.ndarray | int:
    """A scalar width when all are equal, for the fast fixed-width pack path."""
    if widths.size and widths.min() == widths.max():
        return int(widths[0])
    return widths


def encode_indices(idx: np.ndarray, sizes: np.ndarray, ks: np.ndarray, coding: str) -> list[bytes]:
    """Sections for ascending compact indices `idx` (sum(ks),) of chunks with `sizes`."""
    if coding not in INDEX_CODINGS:
        raise ValueError(f"unknown index coding {coding!r}")
    chunk_of = np.repeat(np.arange(sizes.size), ks)  # (N,)
    if coding == FIXED:
        return [pack_fields(idx, _widths(bit_width(sizes), chunk_of))]
    low_bits, seg_len = _ef_params(sizes, ks)
    widths = _widths(low_bits, chunk_of)
    low = idx & (np.left_shift(1, low_bits[chunk_of]) - 1)
    seg_start = np.cumsum(seg_len) - seg_len
    rank = np.arange(idx.size) - np.repeat(np.cumsum(ks) - ks, ks)
    ones = seg_start[chunk_of] + (idx >> low_bits[chunk_of]) + rank
    return [pack_fields(low, widths), pack_positions(ones, int(seg_len.sum()))]


def _widths(per_chunk: np.ndarray, chunk_of: np.ndarray) -> np.ndarray | int:
    uniform = _uniform(per_chunk)
    return uniform if isinstance(uniform, int) else per_chunk[chunk_of]


def decode_indices(
    sections: Sequence[bytes | memoryview], sizes: np.ndarray, ks: np.ndarray, coding: str
) -> tuple[np.ndarray, np.ndarray]:
    """(chunk id, compact index) per selected value, validated; raises PayloadError."""
    total = int(ks.sum())
    chunk_of = np.repeat(np.arange(sizes.size), ks)  # (N,)
    if coding == FIXED:
        idx = unpack_fields(sections[0], _widths(bit_width(sizes), chunk_of), total, "indices")
    else:
        low_bits, seg_len = _ef_params(sizes, ks)
        seg_start = np.cumsum(seg_len) - seg_len
        ones = unpack_positions(sections[1], int(seg_len.sum()), "index high bits")
        if ones.size != total:
            raise PayloadError(f"index stream holds {ones.size} indices, expected {total}")
        per_chunk = np.diff(np.searchsorted(ones, np.append(seg_start, seg_len.sum())))
        if not np.array_equal(per_chunk, ks):
            bad = int(np.flatnonzero(per_chunk != ks)[0])
            raise PayloadError(f"chunk {bad} holds {per_chunk[bad]} indices, expected {ks[bad]}")
        rank = np.arange(total) - np.repeat(np.cumsum(ks) - ks, ks)
        high = ones - seg_start[chunk_of] - rank
        low = unpack_fields(sections[0], _widths(low_bits, chunk_of), total, "index low bits")
        idx = (high << low_bits[chunk_of]) | low
    _check_indices(idx, chunk_of, sizes)
    return chunk_of, idx


def _check_indices(idx: np.ndarray, chunk_of: np.ndarray, sizes: np.ndarray) -> None:
    if idx.size and (idx >= sizes[chunk_of]).any():
        bad = int(np.flatnonzero(idx >= sizes[chunk_of])[0])
        raise PayloadError(f"index {idx[bad]} out of range for a chunk of {sizes[chunk_of[bad]]}")
    same_chunk = chunk_of[1:] == chunk_of[:-1]
    if (np.diff(idx)[same_chunk] <= 0).any():
        raise PayloadError("duplicate or unsorted index within a chunk")
