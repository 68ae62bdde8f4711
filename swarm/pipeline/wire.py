"""The activation message: one micro-batch's activations (forward) or their gradient (backward).

Layout (docs/wire-format.md, "Activation messages"), big-endian:

    magic   4 bytes  b"SWAC"
    version u8       1
    hlen    u32      length of the header
    header  hlen     msgpack map {round, step, micro, dir, dtype, shape, loss}
    body             shape[0]*shape[1]*shape[2] values of dtype, little-endian, C order

`parse` checks the frame on arrival (sizes, known dtype, bounded shape, body length); `check` then
holds it against what the receiver expects at that point of its schedule (message id, shape, dtype,
finite values). Both raise ActivationError naming the problem; nothing is ever unpickled.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Literal

import msgpack
import torch

MAGIC = b"SWAC"
VERSION = 1
MAX_HEADER_BYTES = 1024
MAX_MESSAGE_BYTES = 256 << 20
_PREFIX = struct.Struct("!4sBI")
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
Direction = Literal["fwd", "bwd"]
_HEADER_KEYS = {"round", "step", "micro", "dir", "dtype", "shape", "loss"}


class ActivationError(ValueError):
    """A malformed or unexpected activation message."""


@dataclass(frozen=True)
class MessageId:
    """Which micro-batch of which inner step of which round, and which way it travels."""

    round: int
    step: int
    micro: int
    direction: Direction


@dataclass
class Message:
    id: MessageId
    dtype: str
    shape: tuple[int, int, int]  # (micro-batch rows, tokens, width)
    body: bytes
    loss: float | None = None  # backward only: the last stage's LM loss of this micro-batch


def encode(msg_id: MessageId, tensor: torch.Tensor, dtype: str, loss: float | None = None) -> bytes:
    """Frame a (b, T, width) tensor, cast to the wire dtype."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown wire dtype {dtype!r}; choices: {', '.join(DTYPES)}")
    if tensor.dim() != 3:
        raise ValueError(f"activations are (b, T, width), got {tuple(tensor.shape)}")
    data = tensor.detach().to("cpu", DTYPES[dtype]).contiguous()
    body = data.view(torch.uint8).numpy().tobytes() if dtype == "bf16" else data.numpy().tobytes()
    header = {
        "round": msg_id.round,
        "step": msg_id.step,
        "micro": msg_id.micro,
        "dir": msg_id.direction,
        "dtype": dtype,
        "shape": list(data.shape),
        "loss": loss,
    }
    packed = msgpack.packb(header, use_bin_type=True)
    return _PREFIX.pack(MAGIC, VERSION, len(packed)) + packed + body


def parse(data: bytes) -> Message:
    """The frame and header of a message, structurally checked; the body is not yet interpreted."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ActivationError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    if len(data) < _PREFIX.size:
        raise ActivationError("message shorter than its prefix")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ActivationError("not an activation message (bad magic)")
    if version != VERSION:
        raise ActivationError(f"unsupported activation message version {version}")
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > len(data):
        raise ActivationError(f"header length {hlen} is out of bounds")
    try:
        header = msgpack.unpackb(data[_PREFIX.size : _PREFIX.size + hlen], raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many types on hostile bytes
        raise ActivationError(f"header is not valid msgpack ({type(e).__name__})") from None
    msg_id, dtype, shape, loss = _check_header(header)
    body = data[_PREFIX.size + hlen :]
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if len(body) != expected:
        raise ActivationError(f"body has {len(body)} bytes, shape {list(shape)} of {dtype} needs {expected}")
    return Message(msg_id, dtype, shape, bytes(body), loss)


def _check_header(header: object) -> tuple[MessageId, str, tuple[int, int, int], float | None]:
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        raise ActivationError(f"header must be a map with keys {sorted(_HEADER_KEYS)}")
    for key in ("round", "step", "micro"):
        value = header[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**40:
            raise ActivationError(f"header {key} must be a non-negative integer, got {value!r:.40}")
    if header["dir"] not in ("fwd", "bwd"):
        raise ActivationError(f"header dir must be 'fwd' or 'bwd', got {header['dir']!r:.40}")
    if header["dtype"] not in DTYPES:
        raise ActivationError(f"unknown dtype {header['dtype']!r:.40}; choices: {', '.join(DTYPES)}")
    shape = header["shape"]
    if not isinstance(shape, list) or len(shape) != 3 or not all(type(n) is int and 0 < n <= 1 << 20 for n in shape):
        raise ActivationError(f"shape must be 3 positive integers, got {shape!r:.60}")
    loss = header["loss"]
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss)):
        raise ActivationError(f"loss must be a finite number or null, got {loss!r:.40}")
    msg_id = MessageId(header["round"], header["step"], header["micro"], header["dir"])
    return msg_id, header["dtype"], (shape[0], shape[1], shape[2]), None if loss is None else float(loss)


def check(msg: Message, *, expect: MessageId, shape: tuple[int, int, int], dtype: str) -> torch.Tensor:
    """The message's tensor (float32), if it is exactly what the schedule expects next."""
    if msg.id != expect:
        raise ActivationError(
            f"expected {expect.direction} of round {expect.round} step {expect.step} micro-batch {expect.micro}, "
            f"got {msg.id.direction} of round {msg.id.round} step {msg.id.step} micro-batch {msg.id.micro}"
        )
    if msg.dtype != dtype:
        raise ActivationError(f"expected dtype {dtype}, got {msg.dtype}")
    if msg.shape != tuple(shape):
        raise ActivationError(f"expected shape {list(shape)}, got {list(msg.shape)}")
    raw = torch.frombuffer(bytearray(msg.body), dtype=torch.uint8)
    tensor = raw.view(DTYPES[dtype]).reshape(shape).to(torch.float32)
    if not torch.isfinite(tensor).all():
        raise ActivationError(f"{msg.id.direction} of micro-batch {msg.id.micro} holds non-finite values")
    return tensor
