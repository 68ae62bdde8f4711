"""Dense fp32/fp16 codecs of the DiLoCo baseline."""

import numpy as np
import pytest
import torch

from swarm.codec.base import DENSE_FP16, DENSE_FP32, PayloadError
from swarm.codec.dense import decode_dense, decode_encoded, dense_section_nbytes, encode_dense


def test_fp32_round_trip_is_exact():
    x = torch.randn(33, 17)
    encoded = encode_dense(x, DENSE_FP32)
    assert encoded.sections[0] == x.numpy().astype("<f4").tobytes()
    assert torch.equal(decode_encoded(encoded), x)
    assert [len(s) for s in encoded.sections] == dense_section_nbytes((33, 17), DENSE_FP32) == [33 * 17 * 4]


def test_fp16_round_trip_within_half_precision():
    x = torch.randn(1000) * 1e-2
    encoded = encode_dense(x, DENSE_FP16)
    assert len(encoded.sections[0]) == 2000
    decoded = decode_encoded(encoded)
    assert decoded.dtype == torch.float32
    # round to nearest: half an ulp of a 10-bit mantissa, or of the subnormal spacing 2^-24
    assert ((decoded - x).abs() <= torch.clamp(x.abs() * 2.0**-11, min=2.0**-25)).all()


def test_scalars_and_empty_tensors():
    assert decode_encoded(encode_dense(torch.tensor(1.5), DENSE_FP16)).item() == 1.5
    assert decode_encoded(encode_dense(torch.zeros(0, 3), DENSE_FP32)).shape == (0, 3)


@pytest.mark.parametrize("kind", [DENSE_FP32, DENSE_FP16])
def test_encode_rejects_non_finite_and_absurd(kind):
    for bad in (float("nan"), float("inf"), 1e5):
        with pytest.raises(ValueError):
            encode_dense(torch.tensor([0.0, bad]), kind)


@pytest.mark.parametrize("kind, dtype", [(DENSE_FP32, "<f4"), (DENSE_FP16, "<f2")])
def test_decode_rejects_bad_bytes(kind, dtype):
    for bad in (np.nan, np.inf, 2e4):
        raw = np.array([0.0, bad], dtype=dtype).tobytes()
        with pytest.raises(PayloadError, match=kind):
            decode_dense((2,), (raw,), kind)
    with pytest.raises(PayloadError, match="section lengths"):
        decode_dense((3,), (np.zeros(2, dtype=dtype).tobytes(),), kind)
