"""The activation message: one micro-batch's activations (forward) or their gradient (backward).

Layout (docs/wire-format.md, "Activation messages"), big-endian:

    magic   4 bytes  b"SWAC"
    version u8       1
    hlen    u32      length of the header
    header  hlen     msgpack map {round, step, micro, dir, dtype, shape, loss}
    body             shape[0]*shape[1]*shape[2] values of dtype, little-endian, C order; for int8,
                     first one bf16 scale per (row, token), then the int8 values

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
FLOAT_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# int8: each token's w values as round(x / s) in [-127, 127] with one bf16 scale s = max|x| / 127
# per (row, token), so a token costs w + 2 bytes (bf16 keeps fp32's range: gradients are tiny).
DTYPES: tuple[str, ...] = (*FLOAT_DTYPES, "int8")
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


def bytes_per_token(width: int, dtype: str) -> int:
    """Body bytes one token's vector of ``width`` values takes on the wire."""
    return width + 2 if dtype == "int8" else width * FLOAT_DTYPES[dtype].itemsize


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bf16 scales (..., 1), int8 values (..., w)) with x ≈ values * scales, one scale per vector."""
    x = x.detach().float()
    # bf16 keeps 8 mantissa bits: scale up by 2^-7 first so the rounded scale never falls below max|x|/127
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127 * (1 + 2**-7)).to(torch.bfloat16)
    s = scale.float()
    q = torch.where(s > 0, x / torch.where(s > 0, s, 1.0), 0.0).round().clamp(-127, 127).to(torch.int8)
    return scale, q


def round_trip(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """What the receiver gets for ``tensor`` (float32): the wire's rounding without the framing."""
    if dtype == "int8":
        scale, q = quantize_int8(tensor)
        return q.float() * scale.float()
    return tensor.detach().to(FLOAT_DTYPES[dtype]).float()


def encode(msg_id: MessageId, tensor: torch.Tensor, dtype: str, loss: float | None = None) -> bytes:
    """Frame a (b, T, width) tensor, cast to the wire dtype."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown wire dtype {dtype!r}; choices: {', '.join(DTYPES)}")
    if tensor.dim() != 3:
        raise ValueError(f"activations are (b, T, width), got {tuple(tensor.shape)}")
    if dtype == "int8":
        scale, q = quantize_int8(tensor.to("cpu"))
        body = scale.contiguous().view(torch.uint8).numpy().tobytes() + q.contiguous().numpy().tobytes()
        shape = list(q.shape)
    else:
        data = tensor.detach().to("cpu", FLOAT_DTYPES[dtype]).contiguous()
        body = data.view(torch.uint8).numpy().tobytes()
        shape = list(data.shape)
    header = {
        "round": msg_id.round,
        "step": msg_id.step,
        "micro": msg_id.micro,
        "dir": msg_id.direction,
        "dtype": dtype,
        "shape": shape,
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
    expected = shape[0] * shape[1] * bytes_per_token(shape[2], dtype)
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
    if dtype == "int8":
        tokens = shape[0] * shape[1]
        scale = raw[: 2 * tokens].view(torch.bfloat16).reshape(shape[0], shape[1], 1).float()
        q = raw[2 * tokens :].view(torch.int8).reshape(shape)
        if not torch.isfinite(scale).all() or (scale < 0).any():
            raise ActivationError(f"{msg.id.direction} of micro-batch {msg.id.micro} has a negative or non-finite scale")
        if (q == -128).any():
            raise ActivationError(f"{msg.id.direction} of micro-batch {msg.id.micro} holds int8 -128 (values are in -127..127)")
        tensor = q.float() * scale
    else:
        tensor = raw.view(FLOAT_DTYPES[dtype]).reshape(shape).to(torch.float32)
    if not torch.isfinite(tensor).all():
        raise ActivationError(f"{msg.id.direction} of micro-batch {msg.id.micro} holds non-finite values")
    return tensor
