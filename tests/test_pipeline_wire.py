"""Activation messages (swarm/modes/pipeline/wire.py): round trip and strict rejection."""

from __future__ import annotations

import struct

import msgpack
import pytest
import torch

from swarm.modes.pipeline.wire import ActivationError, MessageId, check, encode, parse, round_trip

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


def test_int8_keeps_each_token_to_half_a_step_of_its_own_scale_in_w_plus_2_bytes():
    x = torch.randn(*SHAPE)
    x[0, 0] *= 1e-9  # gradients can be tiny: the bf16 scale keeps fp32's range
    x[1, 4] = 0.0  # an all-zero token
    y = check(parse(encode(FWD, x, "int8")), expect=FWD, shape=SHAPE, dtype="int8")
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    assert (y - x).abs().le(step * 0.51 + 1e-30).all()
    assert torch.equal(y[1, 4], torch.zeros(SHAPE[2])) and y[0, 0].abs().max() > 0
    assert torch.equal(y, round_trip(x, "int8"))  # what the benchmark simulates is what the link carries
    assert len(encode(FWD, x, "int8")) - len(encode(FWD, x[:1], "int8")) == SHAPE[1] * (SHAPE[2] + 2)


def _int8_body(scales: torch.Tensor, values: torch.Tensor) -> bytes:
    return scales.to(torch.bfloat16).view(torch.uint8).numpy().tobytes() + values.to(torch.int8).numpy().tobytes()


@pytest.mark.parametrize(
    "scale, value, reason",
    [(-1.0, 1, "negative or non-finite scale"), (float("inf"), 1, "non-finite scale"), (1.0, -128, "-128")],
)
def test_malformed_int8_is_rejected(scale, value, reason):
    header = dict(GOOD, dtype="int8", shape=[1, 2, 2])
    msg = parse(_frame(header, _int8_body(torch.tensor([1.0, scale]), torch.tensor([1, 2, value, 3]))))
    with pytest.raises(ActivationError, match=reason):
        check(msg, expect=MessageId(0, 0, 0, "fwd"), shape=(1, 2, 2), dtype="int8")
    with pytest.raises(ActivationError, match="body has"):  # int8 bodies are measured with their scales
        parse(_frame(header, _int8_body(torch.ones(2), torch.ones(4))[:-1]))


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
