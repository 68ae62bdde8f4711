"""One-step-delayed outer updates: a peer trains round r+1 while round r's payloads travel.

Without overlap a round is: H inner steps from θ(r), submit Δ_r, wait for the manifest, apply it,
and only then start round r+1, so every second spent exchanging and settling is a second the
device idles. With overlap the peer starts round r+1 as soon as it has submitted Δ_r, from

    b(r+1) = θ(r) − Δ_r                       (the agreed state plus our own unsynced progress)

and by the time its inner steps end, the manifest of round r has normally been applied, giving
θ(r+1) = θ(r) − α·mean(Δ̂_r). Its pseudo-gradient is measured from where the inner steps started,

    Δ_{r+1} = b(r+1) − θ_local,

and submitted as round r+1's payload on θ(r+1); the next base is b(r+2) = θ(r+1) − Δ_{r+1}. So
every local model is re-anchored to the agreed state each round, one round late: the inner steps of
round r+1 never see the swarm's update of round r, only the peer's own Δ_r in its place. The agreed
state itself is computed exactly as without overlap (the manifest's payloads, in its order, on
θ(r+1)), so replicas stay bit-identical; only what the payloads contain changes.

Error feedback: the peer learns whether its payload of round r was applied before it encodes
round r+1 (it waits for the manifest after its inner steps), so an excluded payload's error buffer
is restored first, exactly as without overlap.
"""

from __future__ import annotations

import torch

from swarm.state import GlobalState


def next_base(state: GlobalState, delta: dict[str, torch.Tensor]) -> GlobalState:
    """b(r+1) = θ(r) − Δ_r on the tensors Δ covers, θ(r) elsewhere: new tensors throughout, so the
    agreed state can be advanced in place while the next round trains from this copy. Its round is
    r+1, the round whose inner steps (and learning-rate schedule) start from it."""
    params = {name: (t - delta[name]) if name in delta else t.clone() for name, t in state.params.items()}
    return GlobalState(round=state.round + 1, params=params)
