"""Which random direction an estimate stands for, derived by hashing, so nobody sends a seed.

A direction is z ~ N(0, I) over every parameter tensor. Its seed is the first 63 bits of
sha256 over (run id, round, peer id, sample index), each field length-prefixed so no two tuples
share an encoding (a string concatenation like "1" + "23" = "12" + "3" cannot collide here).
Each tensor then draws its slice of z from its own CPU `torch.Generator`, seeded by hashing the
direction seed with the tensor's name: tensors can be generated in any order, one at a time,
and the values are the same on every machine (CPU generator; moved to a device afterwards).
"""

from __future__ import annotations

import hashlib
import struct

import torch

_SEED_DOMAIN = b"swarm-spsa/direction/1"
_TENSOR_DOMAIN = b"swarm-spsa/tensor/1"
_SEED_MASK = (1 << 63) - 1  # torch generators take any 64-bit seed; 63 bits keep it a positive int64


def _field(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def direction_seed(run_id: str, round_no: int, peer_id: str, sample: int) -> int:
    """The seed of estimate `sample` that `peer_id` computes in round `round_no` of run `run_id`."""
    if round_no < 0 or sample < 0:
        raise ValueError(f"round and sample must be >= 0, got {round_no}, {sample}")
    h = hashlib.sha256(_SEED_DOMAIN)
    h.update(_field(run_id.encode()))
    h.update(struct.pack(">QQ", round_no, sample))
    h.update(_field(peer_id.encode()))
    return int.from_bytes(h.digest()[:8], "big") & _SEED_MASK


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of one tensor's slice of direction `seed`."""
    h = hashlib.sha256(_TENSOR_DOMAIN)
    h.update(struct.pack(">Q", seed))
    h.update(_field(name.encode()))
    return int.from_bytes(h.digest()[:8], "big") & _SEED_MASK


def direction(seed: int, name: str, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """z's slice for tensor `name`: standard normal fp32 on the CPU, the same on every machine."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(tensor_seed(seed, name))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
