"""Low-bit value quantisation: bins over +-3 sigma, bin means, packing, table checks."""

import numpy as np
import pytest

from swarm.codec.base import PayloadError
from swarm.codec.quant import (
    pack_codes,
    quantize,
    table_from_bytes,
    table_nbytes,
    table_to_bytes,
    unpack_codes,
)


def _reference(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Straightforward per-value loop of the documented rule."""
    n_bins = 2**bits
    v = values.astype(np.float64)
    shift = v.mean()
    sigma = np.sqrt(((v - shift) ** 2).mean())
    low, width = shift - 3 * sigma, 6 * sigma / n_bins
    codes = np.array([min(max(int(np.floor((x - low) / width)), 0), n_bins - 1) for x in v])
    table = np.array([v[codes == b].mean() if (codes == b).any() else low + (b + 0.5) * width for b in range(n_bins)]).astype(
        np.float32
    )
    return codes, table


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_bins_and_bin_means_match_reference(bits):
    rng = np.random.default_rng(bits)
    values = np.concatenate([rng.standard_normal(300) * 0.01, [0.2, -0.25]]).astype(np.float32)  # outliers clamp
    codes, table = quantize(values, bits)
    ref_codes, ref_table = _reference(values, bits)
    assert np.array_equal(codes, ref_codes)
    np.testing.assert_allclose(table, ref_table, rtol=1e-6)  # fp64 sums in another order
    assert table.dtype == np.float32 and table.shape == (2**bits,)


def test_two_bit_bins_decode_to_member_means_and_empty_bins_to_centres():
    values = np.array([-1.0, -1.0, 1.0, 1.0, 1.0, 1.0], dtype=np.float32)  # bins 1 and 2 only (+-1 sigma)
    codes, table = quantize(values, 2)
    shift, sigma = 1 / 3, (8 / 9) ** 0.5
    width = 6 * sigma / 4
    assert codes.tolist() == [1, 1, 2, 2, 2, 2]
    assert table[1] == -1.0 and table[2] == 1.0
    assert table[0] == pytest.approx(shift - 3 * sigma + 0.5 * width)
    assert table[3] == pytest.approx(shift - 3 * sigma + 3.5 * width)


def test_constant_and_empty_inputs():
    codes, table = quantize(np.full(5, 0.25, dtype=np.float32), 2)
    assert codes.tolist() == [0] * 5 and table.tolist() == [0.25] * 4
    codes, table = quantize(np.zeros(0, dtype=np.float32), 2)
    assert codes.size == 0 and table.tolist() == [0.0] * 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_rejected(bad):
    with pytest.raises(ValueError):
        quantize(np.array([1.0, bad], dtype=np.float32), 2)


@pytest.mark.parametrize("bits, count", [(1, 13), (2, 7), (2, 8), (4, 3), (8, 5)])
def test_code_packing_round_trip(bits, count):
    codes = np.random.default_rng(0).integers(0, 2**bits, count)
    data = pack_codes(codes, bits)
    assert len(data) == (count * bits + 7) // 8
    assert np.array_equal(unpack_codes(data, count, bits), codes)


def test_two_bit_codes_are_msb_first_four_per_byte():
    assert pack_codes(np.array([3, 0, 1, 2, 1]), 2) == bytes([0b11000110, 0b01000000])


def test_code_stream_rejects_bad_length_and_padding():
    with pytest.raises(PayloadError, match="bytes, expected"):
        unpack_codes(b"\x00\x00", 3, 2)
    with pytest.raises(PayloadError, match="padding"):
        unpack_codes(bytes([0b00000001]), 3, 2)


def test_table_round_trip_and_validation():
    table = np.array([-0.5, -0.1, 0.1, 0.5], dtype=np.float32)
    assert np.array_equal(table_from_bytes(table_to_bytes(table), 2), table)
    assert len(table_to_bytes(table)) == table_nbytes(2) == 16
    for bad in (float("nan"), float("inf"), 1e5):
        raw = table_to_bytes(np.array([0.0, 0.0, 0.0, bad]))
        with pytest.raises(PayloadError, match="quantisation table"):
            table_from_bytes(raw, 2)
    with pytest.raises(PayloadError):
        table_from_bytes(b"\x00" * 15, 2)
