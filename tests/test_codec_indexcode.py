"""Index coding: round trips, bits per index, and rejection of malformed streams."""

import math

import numpy as np
import pytest

from swarm.codec.base import PayloadError
from swarm.codec.bitpack import pack_fields, pack_positions
from swarm.codec.indexcode import (
    ELIAS_FANO,
    FIXED,
    bit_width,
    decode_indices,
    encode_indices,
    floor_log2,
    section_bits,
)

CODINGS = [ELIAS_FANO, FIXED]


def _random_sets(sizes, ks, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([np.sort(rng.choice(n, k, replace=False)) for n, k in zip(sizes, ks)])


@pytest.mark.parametrize("coding", CODINGS)
def test_round_trip_mixed_chunk_sizes(coding):
    sizes = np.array([4096, 4096, 512, 128, 16, 1, 904, 7])
    ks = np.array([64, 64, 8, 2, 1, 1, 15, 7])  # includes k == n and a 1-value chunk
    idx = _random_sets(sizes, ks)
    sections = encode_indices(idx, sizes, ks, coding)
    chunk_of, decoded = decode_indices(sections, sizes, ks, coding)
    assert np.array_equal(decoded, idx)
    assert np.array_equal(chunk_of, np.repeat(np.arange(sizes.size), ks))
    expected_bytes = [(b + 7) // 8 for b in section_bits(sizes, ks, np.ones_like(sizes), coding)]
    assert [len(s) for s in sections] == expected_bytes


def test_bits_per_index_for_64_of_4096():
    sizes, ks, one = np.array([4096]), np.array([64]), np.array([1])
    ef_bits = sum(section_bits(sizes, ks, one, ELIAS_FANO)) / 64
    fixed_bits = sum(section_bits(sizes, ks, one, FIXED)) / 64
    bound = (math.lgamma(4097) - math.lgamma(65) - math.lgamma(4033)) / math.log(2) / 64
    assert fixed_bits == 12.0
    assert ef_bits == 8.0  # fixed whatever the data, so sizes follow a formula
    assert 7.3 < bound < 7.5 and ef_bits - bound < 0.7
    many = np.full(100, 4096)
    idx = _random_sets(many, np.full(100, 64), seed=1)
    sections = encode_indices(idx, many, np.full(100, 64), ELIAS_FANO)
    assert 8 * sum(len(s) for s in sections) / idx.size == 8.0


def test_floor_log2_and_bit_width_are_exact():
    x = np.arange(1, 1 << 17)
    assert np.array_equal(floor_log2(x), np.array([int(v).bit_length() - 1 for v in x]))
    big = np.array([(1 << 40) - 1, 1 << 40, (1 << 40) + 1])
    assert floor_log2(big).tolist() == [39, 40, 40]
    assert bit_width(np.array([1, 2, 3, 4, 4096, 4097])).tolist() == [0, 1, 2, 2, 12, 13]


def _ef_sections(high_ones, total_high, low, low_bits):
    return [pack_fields(np.array(low), low_bits), pack_positions(np.array(high_ones), total_high)]


# one chunk of n=100, k=2: l = floor(log2(50)) = 5, HIGH = 2 + (99 >> 5) + 1 = 6 bits
SIZES, KS = np.array([100]), np.array([2])


def test_ef_rejects_too_many_and_too_few_indices():
    with pytest.raises(PayloadError, match="holds 3 indices, expected 2"):
        decode_indices(_ef_sections([0, 1, 2], 6, [1, 2], 5), SIZES, KS, ELIAS_FANO)
    with pytest.raises(PayloadError, match="holds 1 indices, expected 2"):
        decode_indices(_ef_sections([0], 6, [1, 2], 5), SIZES, KS, ELIAS_FANO)


def test_ef_rejects_wrong_count_per_chunk():
    sizes, ks = np.array([100, 100]), np.array([2, 2])
    sections = _ef_sections([0, 1, 2, 6], 12, [1, 2, 3, 4], 5)  # 3 in chunk 0, 1 in chunk 1
    with pytest.raises(PayloadError, match="chunk 0 holds 3 indices, expected 2"):
        decode_indices(sections, sizes, ks, ELIAS_FANO)


def test_ef_rejects_out_of_range_and_duplicates():
    # high 3 with low 31 -> index 127 >= 100
    with pytest.raises(PayloadError, match="out of range"):
        decode_indices(_ef_sections([0, 4], 6, [1, 31], 5), SIZES, KS, ELIAS_FANO)
    with pytest.raises(PayloadError, match="duplicate"):
        decode_indices(_ef_sections([0, 1], 6, [7, 7], 5), SIZES, KS, ELIAS_FANO)
    with pytest.raises(PayloadError, match="duplicate or unsorted"):
        decode_indices(_ef_sections([0, 1], 6, [9, 7], 5), SIZES, KS, ELIAS_FANO)


def test_fixed_rejects_out_of_range_duplicates_and_unsorted():
    for idx, reason in (([5, 100], "out of range"), ([5, 5], "duplicate"), ([9, 3], "unsorted")):
        with pytest.raises(PayloadError, match=reason):
            decode_indices([pack_fields(np.array(idx), 7)], SIZES, KS, FIXED)


@pytest.mark.parametrize("coding", CODINGS)
def test_rejects_overrun_and_short_streams(coding):
    sections = encode_indices(np.array([3, 70]), SIZES, KS, coding)
    longer = [s + b"\x00" for s in sections]
    with pytest.raises(PayloadError, match="bytes, expected"):
        decode_indices(longer, SIZES, KS, coding)
    shorter = [s[:-1] for s in sections]
    with pytest.raises(PayloadError, match="bytes, expected"):
        decode_indices(shorter, SIZES, KS, coding)


def test_rejects_nonzero_padding_bits():
    low, high = encode_indices(np.array([3, 70]), SIZES, KS, ELIAS_FANO)
    with pytest.raises(PayloadError, match="padding"):
        decode_indices([low, bytes([high[0] | 1])], SIZES, KS, ELIAS_FANO)
