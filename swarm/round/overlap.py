"""One-step-delayed outer updates: a peer trains round r+1 while round r's payloads travel.

Without overlap a round is: H inner steps from θ(r), submit Δ_r, wait for the manifest, apply it,
and only then start round r+1, so every second spent exchanging and settling is a second the
device idles. With overlap the peer starts round r+1 as soon as it has submitted Δ_r, from its
best guess of θ(r+1): the mode's outer step applied to a copy of θ(r) with its own decoded
payload Δ̂_r standing in for the round's mean,

    b(r+1) = outer_step(θ(r), Δ̂_r)          e.g. θ(r) − α·Δ̂_r for SparseLoCo

and by the time its inner steps end the manifest of round r has normally been applied, giving the
real θ(r+1) = outer_step(θ(r), mean Δ̂). Its pseudo-gradient is measured from where the inner steps
started, Δ_{r+1} = b(r+1) − θ_local, and submitted as round r+1's payload on θ(r+1). The agreed
state itself is computed exactly as without overlap (the manifest's payloads, in its order), so
replicas stay bit-identical; only what the payloads contain changes: gradients taken one outer
step early, at a point that differs from θ(r+1) only by how far our payload is from the mean.

Why not start from θ(r) − Δ_r (our whole local progress)? With SparseLoCo only ~1.5% of Δ_r
reaches the agreed state each round, so that start would be far ahead of θ(r+1) and every
pseudo-gradient would be one taken late in training, applied to weights that never had the
earlier progress; measured, it lost loss (docs/performance.md).

Error feedback: the peer learns whether its payload of round r was applied before it encodes
round r+1 (it waits for the manifest after its inner steps), so an excluded payload's error buffer
is restored first, exactly as without overlap.
"""

from __future__ import annotations

import torch

from swarm.modes.base import TrainingMode
from swarm.state import GlobalState


def next_base(state: GlobalState, own: dict[str, torch.Tensor], mode: TrainingMode, weight: float = 1.0) -> GlobalState:
    """b(r+1): a copy of θ(r) (and its outer momentum) advanced by the mode's outer step with
    `weight` × our own decoded payload as the round's mean. New tensors throughout, so the agreed
    state can be advanced in place while the next round trains from this copy; its round is r+1."""
    base = state.copy()
    mode.outer_step(base, {name: t * weight for name, t in own.items()})
    return base
