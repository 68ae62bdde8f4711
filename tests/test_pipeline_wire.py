"""Activation messages (swarm/pipeline/wire.py): round trip and strict rejection."""

from __future__ import annotations

import struct

import msgpack
import pytest
import torch

from swarm.pipeline.wire import ActivationError, MessageId, check, encode, parse

FWD = MessageId(round=3, step=1, micro=2, direction="fwd")
SHAPE = (2, 5, 8)


@pytest.mark.parametrize("dtype, atol", [("fp32", 0.0), ("fp16", 1e-3), ("bf16", 1e-2)])
def test_round_trip(dtype, atol):
    x = torch.randn(*SHAPE)
    msg = parse(encode(FWD, x, dtype, loss=None))
    y = check(msg, expect=FWD, shape=SHAPE, dtype=dtype)
    assert y.dtype == torch.float32 and y.shape == SHAPE
    assert torch.allclose(x, y, atol=atol * 4, rtol=atol)
    assert len(encode(FWD, x, dtype)) - len(encode(FWD, x[:1], dtype)) == SHAPE[1] * SHAPE[2] * {"fp32": 4}.get(dtype, 2)


def test_backward_carries_the_loss():
    bwd = MessageId(3, 1, 2, "bwd")
    assert parse(encode(bwd, torch.zeros(*SHAPE), "bf16", loss=2.5)).loss == 2.5


def test_wrong_shape_dtype_and_micro_batch_are_rejected():
    msg = parse(encode(FWD, torch.randn(*SHAPE), "bf16"))
    with pytest.raises(ActivationError, match="expected shape"):
        check(msg, expect=FWD, shape=(2, 5, 16), dtype="bf16")
    with pytest.raises(ActivationError, match="expected dtype fp32, got bf16"):
        check(msg, expect=FWD, shape=SHAPE, dtype="fp32")
    with pytest.raises(ActivationError, match="micro-batch 1, got fwd of round 3 step 1 micro-batch 2"):
        check(msg, expect=MessageId(3, 1, 1, "fwd"), shape=SHAPE, dtype="bf16")
    with pytest.raises(ActivationError, match="expected bwd"):
        check(msg, expect=MessageId(3, 1, 2, "bwd"), shape=SHAPE, dtype="bf16")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_rejected(bad):
    x = torch.randn(*SHAPE)
    x[1, 2, 3] = bad
    with pytest.raises(ActivationError, match="non-finite"):
        check(parse(encode(FWD, x, "fp16")), expect=FWD, shape=SHAPE, dtype="fp16")


def _frame(header: dict, body: bytes) -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack("!4sBI", b"SWAC", 1, len(packed)) + packed + body


GOOD = {"round": 0, "step": 0, "micro": 0, "dir": "fwd", "dtype": "fp32", "shape": [1, 2, 2], "loss": None}


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "shorter"),
        (b"XXXX" + bytes(20), "magic"),
        (struct.pack("!4sBI", b"SWAC", 9, 0), "version"),
        (struct.pack("!4sBI", b"SWAC", 1, 10**6), "header length"),
        (struct.pack("!4sBI", b"SWAC", 1, 3) + b"\xc1\xc1\xc1", "msgpack"),
        (_frame({**GOOD, "extra": 1}, bytes(16)), "keys"),
        (_frame({**GOOD, "micro": -1}, bytes(16)), "micro"),
        (_frame({**GOOD, "round": True}, bytes(16)), "round"),
        (_frame({**GOOD, "dir": "up"}, bytes(16)), "dir"),
        (_frame({**GOOD, "dtype": "pickle"}, bytes(16)), "unknown dtype"),
        (_frame({**GOOD, "shape": [1, 2]}, bytes(16)), "shape"),
        (_frame({**GOOD, "shape": [1, 0, 2]}, bytes(0)), "shape"),
        (_frame({**GOOD, "loss": float("nan")}, bytes(16)), "loss"),
        (_frame(GOOD, bytes(15)), "body has 15 bytes"),
        (_frame(GOOD, bytes(17)), "body has 17 bytes"),
    ],
)
def test_malformed_frames_are_rejected_with_a_reason(data, reason):
    with pytest.raises(ActivationError, match=reason):
        parse(data)
