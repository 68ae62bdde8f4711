# mypy: disable-error-code="method-assign,union-attr"
"""A misbehaving volunteer for end-to-end fault tests: `python tests/hostile_peer.py FAULT ADDRESS ...`.

FAULT is one of:
  malformed  each round send a differently broken payload (truncated, unknown version, NaN or
             absurd quantisation table, out-of-range indices, wrong shape), cycling
  diverge    after the first round it applies, silently perturb our copy of the global weights
The remaining arguments are join-swarm's.
"""

from __future__ import annotations

import struct
import sys

import torch

from launch import join
from swarm import exchange, rounds
from swarm.codec import PayloadMeta, SparseLoCoCompressor, encode_payload, payload_digest
from swarm.net.records import Manifest

FAULTS = ["truncated", "version", "nan-table", "huge-table", "bad-index", "wrong-shape"]


def corrupt(self: exchange.PayloadEncoder, delta: dict[str, torch.Tensor], round_no: int) -> exchange.Encoded:
    fault = FAULTS[round_no % len(FAULTS)]
    good = original_encode(self, delta, round_no)
    if fault == "truncated":
        data = good.data[: len(good.data) // 2]
    elif fault == "version":
        data = good.data[:3] + bytes([99]) + good.data[4:]
    else:
        meta = PayloadMeta.for_sparseloco(self.compressor.config, run_id=self.run.run_id, round=round_no, sender=self.sender)
        fresh = SparseLoCoCompressor(self.compressor.config)
        tensors = {n: fresh.compress(n, d) for n, d in delta.items()}
        name = sorted(tensors)[0]
        t = tensors[name]
        if fault == "nan-table":
            sections = (struct.pack("<4f", *([float("nan")] * 4)), *t.sections[1:])
        elif fault == "huge-table":
            sections = (struct.pack("<4f", *([1e30] * 4)), *t.sections[1:])
        elif fault == "bad-index":
            sections = (*t.sections[:-1], b"\xff" * len(t.sections[-1]))
        else:  # wrong-shape: a tensor of another shape under a real name
            wrong = fresh.compress("x", torch.randn(3, 5))
            sections, t = wrong.sections, wrong
        tensors[name] = type(t)(t.codec, t.shape, sections, t.params)
        data = encode_payload(meta, tensors)
    print(f"hostile: round {round_no}: sending a {fault} payload", file=sys.stderr, flush=True)
    return exchange.Encoded(data, payload_digest(data))


async def diverge(self: rounds.RoundAgreement, manifest: Manifest) -> int:
    applied = await original_apply(self, manifest)
    if not perturbed:  # once, after the first round we apply (whenever we joined)
        perturbed.append(manifest.round)
        with torch.no_grad():
            next(iter(self.state.params.values())).add_(1e-3)
        self.state.invalidate_hash()
        print("hostile: perturbed our global weights", file=sys.stderr, flush=True)
    return applied


perturbed: list[int] = []
original_encode = exchange.PayloadEncoder.encode
original_apply = rounds.RoundAgreement.apply

if __name__ == "__main__":
    fault, args = sys.argv[1], sys.argv[2:]
    if fault == "malformed":
        exchange.PayloadEncoder.encode = corrupt
    elif fault == "diverge":
        rounds.RoundAgreement.apply = diverge
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    sys.exit(join.main(args))
