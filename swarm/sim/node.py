"""A simulated node: the real `SwarmNode` logic (heartbeats, roster, members, events) over the
simulated network's records instead of hivemind's DHT.

Records are stored encoded, exactly as the DHT carries them (msgpack, schema-checked on every read),
so a hostile record reaches the round code as it would over the wire. Each node has a real RSA
identity (derived from its position, so the same in every process): manifests are signed and
checked as in production.
"""

from __future__ import annotations

import functools
import math
import os
import random
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from swarm.net.dht import DHTOptions, Signed
from swarm.net.identity import Identity, tagged_subkey
from swarm.net.schema import SchemaError, decode_record, encode_record
from swarm.node import RECORD_TYPES, SwarmNode
from swarm.run import RunConfig
from swarm.sim.network import SimNetwork

T = TypeVar("T")
IDENTITY_VERSION = 1  # bump if derived_identity ever changes: its cache is then a new folder
EPOCH = 1.7e9  # virtual wall clock = EPOCH + loop time (records carry plausible timestamps)


@functools.cache
def _identity_pool(index: int) -> tuple[Identity, bytes]:
    """The simulated node at position `index` has the same RSA identity in every process (so a seed
    replays anywhere, peer ids and their order included); derived once per process and reused by
    every seed, since deriving keys and owner markers is costly."""
    cached = _identity_cache() / f"{index}.key"
    try:
        key = serialization.load_der_private_key(cached.read_bytes(), None, unsafe_skip_rsa_key_validation=True)
        assert isinstance(key, rsa.RSAPrivateKey)
        identity = Identity(key)  # our own derived key: checking it again is most of the load's cost
    except Exception:  # missing, or damaged (a parse error of any kind): derive it
        identity = derived_identity(index)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(identity.private_key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption()))
            tmp.replace(cached)
        except OSError:
            pass  # a read-only home: derive again next time
    return identity, identity.owner_marker


def _identity_cache() -> Path:
    """Where derived identities are kept between processes (deriving 1,000 takes about 100 s; reading
    them, well under 1 s). They are a pure function of the index, so a stale file cannot exist; a
    damaged one fails to parse and is derived again. Only the simulator's keys, never a real peer's."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "swarm" / f"sim-identities-v{IDENTITY_VERSION}"


def derived_identity(index: int, bits: int = 1024) -> Identity:
    """A deterministic RSA key for simulation only (never a real peer's): its primes come from a
    PRNG seeded with `index`. 1,024 bits, not production's 2,048 (`Identity.generate`): deriving
    primes in Python costs ~0.1 s a key this way (1,000 peers in a few minutes of one process
    instead of ten), and signing and checking cost a quarter; records and code paths are the same."""
    rng = random.Random(f"swarm-sim identity {index}")
    e = 65537
    while True:
        p, q = _prime(rng, bits // 2, e), _prime(rng, bits // 2, e)
        if p != q:
            break
    d = pow(e, -1, (p - 1) * (q - 1))
    public = rsa.RSAPublicNumbers(e, p * q)
    numbers = rsa.RSAPrivateNumbers(p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q), public)
    return Identity(numbers.private_key())


_SMALL_PRIMES_PRODUCT = math.prod(n for n in range(3, 2000, 2) if all(n % k for k in range(3, int(n**0.5) + 1, 2)))


def _prime(rng: random.Random, bits: int, e: int) -> int:
    """A `bits`-bit prime with its top two bits set (so p·q has exactly 2·bits bits) and p − 1 prime
    to e: trial division by small primes, then Miller-Rabin with bases from `rng` (for random
    candidates of this size a few rounds leave a negligible chance of a composite)."""
    while True:
        candidate = rng.getrandbits(bits) | (3 << (bits - 2)) | 1
        if math.gcd(candidate, _SMALL_PRIMES_PRODUCT) != 1 or (candidate - 1) % e == 0:
            continue
        if _probably_prime(candidate, rng):
            return candidate


def _probably_prime(n: int, rng: random.Random, rounds: int = 12) -> bool:
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(rounds):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


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
        if self.network.groups:  # a partition: each side reads its own
            return self._signed(self.network.get(self.peer_id, key), cls)
        # Whole: every reader sees the same records until one changes; the list is built once for all.
        view = self.network.latest(key)
        cached = self.network.signed_views.get((key, cls.__name__))
        if cached is None or cached[0] is not view:
            cached = self.network.signed_views[(key, cls.__name__)] = (view, self._signed(view, cls))
        return list(cached[1])

    def _signed(self, records: dict[str, object], cls: type[T]) -> list[Signed[T]]:
        found = []
        for writer, stored in records.items():
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
