"""Hostile peers for the simulator: the attacks of tests/adversary/, at sizes real processes cannot reach.

Each is a `SimPeer` that deviates in one way. The round code they run against is the production
one, so what an attack gets in the simulator is what it gets in a real swarm, up to the network
model. `ATTACKS` maps the names used by `swarm-sim --attack NAME` and `SimConfig.attackers`.
"""

from __future__ import annotations

import torch

from swarm.sim.peer import SimPeer


class Idle(SimPeer):
    """Says it trains (heartbeats at the round) but never submits: a free delay for every leader
    that waits for it."""

    honest = False

    async def one_round(self) -> None:
        node, r = self.node, self.agreement.state.round
        node.status.round, node.status.param_hash, node.status.phase = r, self.agreement.state.hash, "training"
        await node.publish_heartbeat()
        await self.settle(r)


class SlowServe(SimPeer):
    """Submits, then never delivers its payload: a fetch from it hangs until the fetcher gives up."""

    honest = False

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.network.hanging.add(self.peer_id)


class SignFlip(SimPeer):
    """Sends its honest update times −1000."""

    honest = False

    def work(self, r: int) -> dict[str, torch.Tensor] | None:
        return {n: t.mul(-1000.0) for n, t in self.pseudo_gradient(r).items()}


class Noise(SimPeer):
    """Sends noise a thousand times the size of an honest update."""

    honest = False

    def work(self, r: int) -> dict[str, torch.Tensor] | None:
        g = torch.Generator().manual_seed(self.rng.getrandbits(62))
        return {n: torch.randn(t.shape, generator=g).mul_(1.0) for n, t in self.pseudo_gradient(r).items()}


class Zero(SimPeer):
    """A free rider: sends nothing useful (all zeros)."""

    honest = False

    def work(self, r: int) -> dict[str, torch.Tensor] | None:
        return {n: torch.zeros_like(t) for n, t in self.pseudo_gradient(r).items()}


ATTACKS: dict[str, type[SimPeer]] = {
    "idle": Idle,
    "slow-serve": SlowServe,
    "sign-flip": SignFlip,
    "noise": Noise,
    "zero": Zero,
}
