"""A simulated node: the real `SwarmNode` logic (heartbeats, roster, members, events) over the
simulated network's records instead of hivemind's DHT.

Records are stored encoded, exactly as the DHT carries them (msgpack, schema-checked on every read),
so a hostile record reaches the round code as it would over the wire. Each node has a real RSA
identity: manifests are signed and checked as in production.
"""

from __future__ import annotations

import functools
from typing import TypeVar

from swarm.net.dht import DHTOptions, Signed
from swarm.net.identity import Identity, tagged_subkey
from swarm.net.schema import SchemaError, decode_record, encode_record
from swarm.node import RECORD_TYPES, SwarmNode
from swarm.run import RunConfig
from swarm.sim.network import SimNetwork

T = TypeVar("T")
EPOCH = 1.7e9  # virtual wall clock = EPOCH + loop time (records carry plausible timestamps)


@functools.cache
def _identity_pool(index: int) -> tuple[Identity, bytes]:
    """Identities are costly to make (RSA) and their owner markers to derive; a run of many seeds
    reuses them by position."""
    identity = Identity.generate()
    return identity, identity.owner_marker


class Wire:
    """A record as the DHT holds it: its type tag and encoded bytes. Every reader decodes the same
    bytes to the same record, so the decoded value is kept (the simulator's own cost, not the
    swarm's: a real node decodes what it reads)."""

    __slots__ = ("_decoded", "data", "signed", "tag")

    def __init__(self, tag: str, data: bytes) -> None:
        self.tag, self.data = tag, data
        self._decoded: object = _UNDECODED
        self.signed: Signed | None = None  # what readers get, made once

    def decoded(self, cls: type[T]) -> T | None:
        if self._decoded is _UNDECODED:
            try:
                self._decoded = decode_record(cls, self.data)
            except (SchemaError, TypeError):
                self._decoded = None
        return self._decoded  # type: ignore[return-value]


_UNDECODED = object()


class SimRecords:
    """`swarm.round.world.Records` over the simulated network, for one node."""

    def __init__(self, network: SimNetwork, identity: Identity) -> None:
        self.network = network
        self.identity = identity
        self.peer_id = str(identity.peer_id)
        self.reachable = True
        self.stored: dict[str, bytes] = {}  # key -> our last value (for the bounds invariant)

    def visible_maddrs(self) -> list[str]:
        return []

    def shutdown(self) -> None:
        """Nothing to stop: the network is memory."""

    async def put(self, key: str, record: object, ttl_s: float) -> bool:
        tag = RECORD_TYPES.tag(record)
        return self.network.put(self.peer_id, key, Wire(tag, encode_record(record)), ttl_s)

    async def get_all(self, key: str, cls: type[T], *, latest: bool = True) -> list[Signed[T]]:
        found = []
        for writer, stored in self.network.get(self.peer_id, key).items():
            assert isinstance(stored, Wire)
            if stored.tag != cls.__name__:
                continue
            if stored.signed is None:
                record = stored.decoded(cls)
                if record is None:  # fails its schema: dropped, as SwarmDHT.get_all drops it
                    continue
                stored.signed = Signed(writer, record, 0.0, tagged_subkey(self.network.markers[writer], stored.tag))
            found.append(stored.signed)
        return found

    async def get_from(self, key: str, cls: type[T], signer: str) -> Signed[T] | None:
        for item in await self.get_all(key, cls):
            if item.signer == signer:
                return item
        return None


class SimNode(SwarmNode):
    """A SwarmNode whose DHT is the simulated network and whose clocks are the virtual loop's."""

    def __init__(self, network: SimNetwork, run: RunConfig, *, name: str, index: int) -> None:
        super().__init__(identity_path="", dht_options=DHTOptions(), name=name)
        identity, marker = _identity_pool(index)
        self.network = network
        self._dht = SimRecords(network, identity)  # type: ignore[assignment]
        network.markers[str(identity.peer_id)] = marker
        network.add_node(str(identity.peer_id))
        self.run = run

    @property
    def peer_id(self) -> str:
        return str(self._dht.peer_id) if self._dht is not None else ""

    def wall_time(self) -> float:
        return EPOCH + self.network.now()
