"""What the round code needs from the world, and nothing more.

The round protocol (agreement.py, admission.py, evidence.py) decides; it does no I/O of its own. It
reads and writes signed records with expiry, fetches payload bytes by digest from peers that hold
them, asks which members are live, and reads two clocks. `World` names exactly that. In
production a `SwarmNode` is the world (hivemind's DHT, libp2p streams, the real clocks); in the
simulator (swarm/sim/) an in-memory network with per-node links and a virtual clock is, so the same
decisions run over both.

Clocks: `monotonic()` is the running event loop's clock (time.monotonic in production, virtual in
the simulator) for deadlines and timeouts; `World.wall_time()` is the clock records are stamped
with (the DHT's).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from swarm.net.dht import Signed
    from swarm.net.identity import Identity
    from swarm.net.records import Heartbeat
    from swarm.node import NodeStatus
    from swarm.run import RunConfig

T = TypeVar("T")

# Fetch one blob from one peer: (peer id, request, most bytes accepted, timeout) -> the bytes, or
# None if that peer does not have them; a TransferError when the transfer fails.
Fetch = Callable[[str, dict, int, float], Awaitable["bytes | None"]]


def monotonic() -> float:
    """The clock of deadlines: the running loop's (virtual in the simulator; time.monotonic in
    production, which is also the answer outside a loop)."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


async def put_surely(records: Records, key: str, record: object, ttl_s: float, tries: int = 3) -> bool:
    """A write that matters for the round (a submission, a manifest): tried again when no node
    stored it (a lost store would leave the work out of the round unseen). True once stored."""
    for _ in range(tries):
        if await records.put(key, record, ttl_s):
            return True
    return False


class Records(Protocol):
    """Signed records with expiry, as the DHT keeps them: each writer has its own slot under a key."""

    identity: Identity  # this node's signing key (manifests are signed with it)
    reachable: bool  # whether other nodes can dial this one

    async def get_all(self, key: str, cls: type[T]) -> list[Signed[T]]:
        """Every valid, unexpired record of type `cls` under `key`, with its signer."""
        ...

    async def get_from(self, key: str, cls: type[T], signer: str) -> Signed[T] | None:
        """The record `signer` wrote under `key`, if it is there and valid."""
        ...

    async def put(self, key: str, record: object, ttl_s: float) -> bool:
        """Write our record under `key` for `ttl_s` seconds; True if some node stored it."""
        ...


class World(Protocol):
    """A node as the round code sees it."""

    @property
    def peer_id(self) -> str: ...

    @property
    def run(self) -> RunConfig: ...

    @property
    def dht(self) -> Records: ...

    status: NodeStatus  # what this node reports (its eval loss goes into the manifests it leads)

    async def members(self) -> set[str]:
        """Peer ids the coordinator admitted (its signed roster), the coordinator included."""
        ...

    async def member_peers(self) -> list[Heartbeat]:
        """The live heartbeats of admitted members."""
        ...

    def log_event(self, kind: str, text: str) -> None:
        """Log a line and keep it in the node's event log (the status page shows it)."""
        ...

    def wall_time(self) -> float:
        """The clock records are stamped with."""
        ...
