"""Shared-seed SPSA: each peer sends one byte per directional-derivative estimate.

A peer measures K two-point estimates ĝ = (L(θ+εz) − L(θ−εz))/2ε along directions z that everyone
can regenerate from (run, round, peer, sample) (swarm/modes/spsa/seeds.py), and sends only the K bytes of
their quantized values (swarm/modes/spsa/scalar.py) inside its signed submission record: no payload
transfer, no gradients, no optimizer state. Everyone, the sender included, decodes the manifest's
bytes, clips them to a multiple of the round's median magnitude and replays
θ ← θ − lr·(1/N)·Σ ĝ_i·z_i in manifest order on the CPU (swarm/modes/spsa/replay.py), so replicas stay
bit-identical and a joiner can rebuild any later state from an earlier one and the manifests.
Maths, byte layout and when to use it: docs/modes/spsa.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from swarm.modes.base import TrainingMode, Worker
from swarm.modes.spsa.replay import RoundScalars, apply_scalars, clip_scalars
from swarm.modes.spsa.scalar import decode_scalars
from swarm.net.records import MAX_INLINE_BYTES, Role

if TYPE_CHECKING:
    from swarm.data.corpus import Corpus
    from swarm.state import GlobalState


@dataclass
class SpsaOptions:
    """The estimator, the byte codec's scale, and the replayed update."""

    samples: int = 16  # K: two-point estimates (= payload bytes) per peer per round
    eps: float = 1e-3  # ε of θ ± εz (MeZO's value)
    lr: float = 3e-3  # of θ ← θ − lr·(1/N)Σ ĝ z (nano fine-tuning: 3e-3 beat 3e-4 and 3e-5, see docs)
    scalar_scale: float = 8.0  # |ĝ| of the top byte level; the levels reach 2^-15.75 of it
    clip_multiple: float = 5.0  # each round's |ĝ| are clipped to this multiple of their median (3.4σ of a Gaussian)
    weight_decay: float = 0.0  # decoupled, on matrices (not norms or embeddings), applied with the update

    def __post_init__(self) -> None:
        if not 1 <= self.samples <= MAX_INLINE_BYTES:
            raise ValueError(f"samples must be in [1, {MAX_INLINE_BYTES}] (one byte each in the record), got {self.samples}")
        for name in ("eps", "lr", "scalar_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        if not (math.isfinite(self.clip_multiple) and self.clip_multiple >= 1):
            raise ValueError(f"clip_multiple must be >= 1, got {self.clip_multiple}")
        if not 0 <= self.weight_decay * self.lr < 1:
            raise ValueError(f"weight_decay must be >= 0 with lr·weight_decay < 1, got {self.weight_decay}")


class SpsaMode(TrainingMode):
    name = "spsa"
    Options = SpsaOptions
    inline_payload = True

    def describe_role(self, role: Role) -> str:
        return f"spsa shard {role.data_shard}, {self.options.samples} estimates/round"

    def make_worker(self, role: Role, device: torch.device, corpus: Corpus | None = None) -> Worker:
        from swarm.modes.spsa.worker import SpsaWorker

        o = self.options
        return SpsaWorker(
            self.run,
            peer_id=role.peer_id,
            shard=role.data_shard,
            device=device,
            samples=o.samples,
            eps=o.eps,
            scalar_scale=o.scalar_scale,
            corpus=corpus,
            prepare_model=self.prepare_model,
        )

    def contribution_names(self, role: Role, names: list[str]) -> list[str]:
        return []  # no tensor is ever sent

    def check_inline(self, data: bytes) -> str | None:
        if len(data) != self.options.samples:
            return f"{len(data)} scalars, the run sends {self.options.samples} per peer"
        return None  # every byte is a well-formed value

    def round_scalars(self, round_no: int, contributions: list[tuple[str, bytes]]) -> RoundScalars:
        """The round's dequantized, clipped scalars in manifest order."""
        o = self.options
        decoded = [decode_scalars(data, o.scalar_scale) for _, data in contributions]
        clipped = iter(clip_scalars([g for values in decoded for g in values], o.clip_multiple))
        per_peer = [(peer, [next(clipped) for _ in values]) for (peer, _), values in zip(contributions, decoded)]
        return RoundScalars(self.run.run_id, round_no, per_peer)

    def apply_inline(self, state: GlobalState, round_no: int, contributions: list[tuple[str, bytes]]) -> None:
        o = self.options
        scalars = self.round_scalars(round_no, contributions)
        apply_scalars(state.params, scalars, lr=o.lr, weight_decay=o.weight_decay, no_decay=self._no_decay)
        state.invalidate_hash()
        state.advance_without_update()

    @cached_property
    def _no_decay(self) -> frozenset[str]:
        if not self.options.weight_decay:
            return frozenset()
        from models import build_model
        from swarm.modes.replica import model_config
        from swarm.train.optim import no_decay_parameter_names

        return frozenset(no_decay_parameter_names(build_model(model_config(self.run), seed=self.run.seed)))

    def round_metrics(self, contributions: list[tuple[str, bytes]]) -> dict[str, float | int]:
        scalars = sum(len(data) for _, data in contributions)
        return {"scalars": scalars, "scalar_bytes": scalars}  # one byte each, record overhead apart


MODE = SpsaMode
