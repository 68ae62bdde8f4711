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
from typing import Protocol

import torch

from swarm.round.robust import Summary
from swarm.state import GlobalState

HURT_FRACTION = 1e-3  # a share raising the probe loss by more than this fraction of it hurts: refused, struck
HELP_FRACTION = 0.0  # a share must lower it by more than this fraction to count as useful work


class Probe(Protocol):
    """The leader's loss on data of its choosing (blocking: runs in a worker thread)."""

    def losses(self, state: GlobalState, updates: list[dict[str, torch.Tensor]], seed: int) -> tuple[float, list[float]]:
        """Loss at `state` and at each `state − update`, on the batch `seed` draws."""
        ...


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


def shares(
    summaries: list[Summary], scales: list[dict[str, float]], shapes: dict[str, tuple[int, ...]], outer_lr: float
) -> list[dict[str, torch.Tensor]]:
    """Each contribution's part of the round's step: α · s ⊙ Δ / (contributions covering the slot)."""
    cover: dict[str, int] = {}
    for summary in summaries:
        for name in summary.values:
            cover[name] = cover.get(name, 0) + 1
    out = []
    for summary, scale in zip(summaries, scales):
        delta = dense_delta(summary, shapes)
        out.append({n: t * (outer_lr * scale.get(n, 1.0) / cover[n]) for n, t in delta.items()})
    return out


def probe_seed(secret: bytes, round_no: int, base_hash: str) -> int:
    """The batch of a round: from the leader's secret, so no peer can know it in advance."""
    return int.from_bytes(hashlib.sha256(secret + f":{round_no}:{base_hash}".encode()).digest()[:8], "big")


def score_shares(
    probe: Probe, state: GlobalState, updates: list[dict[str, torch.Tensor]], seed: int
) -> tuple[float, list[float]]:
    """(loss at θ, each share's score as the fraction of that loss it removes: positive helps)."""
    base, losses = probe.losses(state, updates, seed)
    if not base > 0:
        return base, [0.0] * len(updates)
    return base, [(base - loss) / base if loss == loss else -1.0 for loss in losses]  # NaN: as bad as it gets


def hurts(score_: float) -> bool:
    return score_ < -HURT_FRACTION


def helps(score_: float) -> bool:
    return score_ > HELP_FRACTION
