"""Usefulness measured, not inferred from geometry: what each contribution does to the loss.

A leader that holds a probe (the coordinator: it does not train, so it has a model and cycles to
spare) scores every contribution that passed the checks on its own: the loss on a batch of data the
leader draws (from the held-out split, with a seed nobody else knows, so no one can fit it) at the
agreed weights, against the loss at the weights moved by that contribution's share of the round's
mean alone (θ − α · s ⊙ Δ / n, n the contributions covering each slot: what it would add to the
round). Both losses come from the same batch, so the difference is paired and its noise small:
honest shares lower the loss by 0.1-10% of it on `nano` (positive scores at every round measured),
a sign flip, a scaled flip that stays above any cosine cut, and noise raise it.

The score decides: a contribution that raises the loss by more than HURT_FRACTION of it is refused
and struck, whatever its cosine; honest work that helps is kept however it is oriented (pipeline
stages behind a compressed link, non-IID shards). A newcomer on probation must lower the loss to be
applied at all; every contribution that does counts as useful work in the ledger (admission.py),
and the ledger, not the number of keys, decides votes and leadership. The scores travel in the
leader's signed manifest: nobody recomputes them, so only the coordinator's count (its signed
judgement while it leads); a peer leading while it is away scores nothing and applies only work
from peers with standing.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from swarm.round.robust import Summary
from swarm.state import GlobalState

HURT_FRACTION = 1e-3  # a share must raise the probe loss by more than this fraction of it to hurt ...
HURT_SIGMAS = 3.0  # ... and by this many standard errors of the paired per-window differences
HELP_SIGMAS = 2.0  # a share counts as useful work when it lowers the loss by this many standard errors
# Contributions scored per round. Beyond it, a sample drawn with the leader's secret seed (newcomers
# first: their work is applied only when scored); the others are judged by geometry this round, and
# each knows it is scored with probability MAX_SCORED / R every round.
MAX_SCORED = 64


class Probe(Protocol):
    """The leader's loss on data of its choosing (blocking: runs in a worker thread)."""

    def losses(
        self, state: GlobalState, updates: Iterable[dict[str, torch.Tensor]], seed: int
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Loss per window of the batch `seed` draws, at `state` and at each `state − update`."""
        ...


@dataclass(frozen=True)
class Score:
    """What one share does to the probe loss: the mean of the paired per-window differences
    (L(θ) − L(θ − u), positive helps) as a fraction of L(θ), and its standard error."""

    gain: float
    error: float

    @property
    def hurts(self) -> bool:
        return self.gain < -HURT_FRACTION and self.gain < -HURT_SIGMAS * self.error

    @property
    def helps(self) -> bool:
        return self.gain > HELP_SIGMAS * self.error and self.gain > 0


def dense_delta(summary: Summary, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A contribution's tensors from its summary (sparse codecs keep positions and values)."""
    out = {}
    for name, values in summary.values.items():
        flat = torch.zeros(summary.numels[name], dtype=torch.float32)
        if name in summary.positions:
            flat[summary.positions[name]] = values.float()
        else:
            flat.copy_(values.reshape(-1))
        out[name] = flat.reshape(shapes[name])
    return out


def coverage(summaries: list[Summary]) -> dict[str, int]:
    """How many contributions of the round cover each slot (its mean divides by that)."""
    cover: dict[str, int] = {}
    for summary in summaries:
        for name in summary.values:
            cover[name] = cover.get(name, 0) + 1
    return cover


def shares(
    summaries: list[Summary],
    scales: list[dict[str, float]],
    shapes: dict[str, tuple[int, ...]],
    outer_lr: float,
    cover: dict[str, int] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Each contribution's part of the round's step, α · s ⊙ Δ / (contributions covering the slot:
    `cover`, by default these), built one at a time as the probe asks for it (memory: one dense
    update, whatever the count)."""
    cover = cover or coverage(summaries)
    for summary, scale in zip(summaries, scales):
        delta = dense_delta(summary, shapes)
        yield {n: t * (outer_lr * scale.get(n, 1.0) / cover[n]) for n, t in delta.items()}


def probe_seed(secret: bytes, round_no: int, base_hash: str) -> int:
    """The batch of a round: from the leader's secret, so no peer can know it in advance."""
    return int.from_bytes(hashlib.sha256(secret + f":{round_no}:{base_hash}".encode()).digest()[:8], "big")


def score_shares(probe: Probe, state: GlobalState, updates: Iterable[dict[str, torch.Tensor]], seed: int) -> list[Score]:
    """Each share's effect on the probe loss, with its standard error over the batch's windows."""
    base, losses = probe.losses(state, updates, seed)
    mean = float(base.mean())
    if not (mean > 0 and math.isfinite(mean)):
        return [Score(0.0, 0.0) for _ in updates]
    out = []
    for loss in losses:
        diff = (base - loss) / mean
        if not bool(torch.isfinite(diff).all()):
            out.append(Score(-1.0, 0.0))  # as bad as it gets
            continue
        error = float(diff.std()) / math.sqrt(diff.numel()) if diff.numel() > 1 else 0.0
        out.append(Score(float(diff.mean()), error))
    return out


def helps(gain: float) -> bool:
    """Whether a score recorded in a manifest counts as useful work: the leader records a share's
    gain only in units it already judged (the gain of a share that did not help is recorded as ≤ 0)."""
    return gain > 0
