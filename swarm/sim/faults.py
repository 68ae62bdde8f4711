"""Faults the simulator injects: crashes and restarts, partitions that open and heal, slow peers,
late joiners, peers that leave for good, a coordinator that goes away.

A fault is data (when, what, whom, for how long), so a schedule prints and replays exactly.
`draw_faults` turns a seed into a random schedule of the kinds asked for.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from swarm.sim.actors import Actor, Ledger
    from swarm.sim.clock import VirtualLoop
    from swarm.sim.network import SimNetwork


class Target(Protocol):
    """What a fault acts on: the simulation (swarm.sim.runner.Simulation)."""

    net: SimNetwork
    loop: VirtualLoop
    disturbed_until: float  # when the last fault heals
    background: set[asyncio.Future[None]]
    ledger: Ledger

    def by_name(self, name: str) -> Actor: ...

    def log(self, text: str) -> None: ...


KINDS = ("crash", "partition", "slow", "leave", "coordinator-crash", "coordinator-leave")


@dataclass(frozen=True)
class Fault:
    at: float  # virtual seconds from the start
    kind: str
    target: str = ""  # a node name ("peer3", "coordinator"); partitions: the names cut off, comma-separated
    duration_s: float = 0.0  # how long it lasts (0: for good)

    def __str__(self) -> str:
        lasting = f" for {self.duration_s:.0f}s" if self.duration_s else ""
        return f"{self.kind} {self.target}{lasting} at {self.at:.1f}s"

    async def apply(self, sim: Target) -> None:
        if self.kind in ("crash", "leave", "coordinator-crash", "coordinator-leave"):
            # The restart waits in the background: a crash must not hold back the schedule's later
            # faults (it did: a 50 s coordinator outage delayed every fault due meanwhile by up to 50 s).
            sim.background.add(asyncio.ensure_future(_crash(sim, self.target, self.duration_s)))
        elif self.kind == "partition":
            names = self.target.split(",")
            for name in names:
                sim.net.groups[sim.by_name(name).peer_id] = 1
                sim.ledger.cut_off.append((sim.by_name(name).peer_id, self.at, sim.loop.time() + self.duration_s))
            sim.disturbed_until = max(sim.disturbed_until, self.at + self.duration_s)
            sim.background.add(asyncio.ensure_future(_heal(sim, names, self.duration_s)))
        elif self.kind == "slow":
            peer = sim.by_name(self.target)
            before = peer.step_s  # type: ignore[attr-defined]
            peer.step_s = before * 10  # type: ignore[attr-defined]
            sim.background.add(asyncio.ensure_future(_restore_speed(peer, before, self.duration_s)))
        else:
            raise ValueError(f"unknown fault kind {self.kind!r} (kinds: {', '.join(KINDS)})")


async def _crash(sim: Target, name: str, duration_s: float) -> None:
    """The node stops dead (no goodbye); with a duration it restarts from what it held (its disk)."""
    actor = sim.by_name(name)
    if actor.peer_id in sim.net.down:  # already down (an earlier crash of it still lasts): nothing more to stop
        sim.log(f"{name} is down already; this fault does nothing")
        return
    sim.net.down.add(actor.peer_id)
    if actor.task is not None:
        actor.task.cancel()
    await actor.node.stop(announce_leave=False)
    sim.disturbed_until = max(sim.disturbed_until, sim.loop.time() + (duration_s or float("inf")))
    if not duration_s:
        sim.ledger.departed[name] = sim.loop.time()
    sim.ledger.cut_off.append((actor.peer_id, sim.loop.time(), sim.loop.time() + (duration_s or float("inf"))))
    if duration_s:
        await asyncio.sleep(duration_s)
        sim.net.down.discard(actor.peer_id)
        sim.log(f"{name} restarts from its saved state (round {actor.agreement.state.round})")
        actor.node._tasks.clear()
        actor.task = asyncio.ensure_future(actor.restart())


async def _heal(sim: Target, names: list[str], duration_s: float) -> None:
    await asyncio.sleep(duration_s)
    for name in names:
        sim.net.groups.pop(sim.by_name(name).peer_id, None)
    sim.log(f"partition of {','.join(names)} healed")


async def _restore_speed(peer: object, step_s: float, duration_s: float) -> None:
    await asyncio.sleep(duration_s)
    peer.step_s = step_s  # type: ignore[attr-defined]


def draw_faults(rng: random.Random, asked: list[str], peers: list[str], *, span_s: float, round_timeout_s: float) -> list[Fault]:
    """A random schedule of the kinds asked for ("all": every kind) within the run's first `span_s` seconds."""
    kinds = list(KINDS) if "all" in asked else list(asked)
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r} (kinds: {', '.join(KINDS)}, or all)")
    if not kinds or not peers:
        return []
    faults = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(kinds)
        at = rng.uniform(0.1, 0.7) * span_s
        duration = rng.uniform(5, 3 * round_timeout_s)
        if kind == "partition":
            cut = rng.sample(peers, max(1, len(peers) // 3))
            faults.append(Fault(at, kind, ",".join(sorted(cut)), duration))
        elif kind in ("coordinator-crash", "coordinator-leave"):
            faults.append(Fault(at, kind, "coordinator", duration if kind == "coordinator-crash" else 0.0))
        else:
            faults.append(Fault(at, kind, rng.choice(peers), 0.0 if kind == "leave" else duration))
    return faults
