"""The swarm's view of hivemind's DHT: signed typed records in, validated typed records out."""

from __future__ import annotations

import functools
import os
import signal
import threading
from dataclasses import dataclass, replace
from typing import Generic, Literal, TypeVar

import hivemind
from hivemind.utils import get_dht_time

from swarm.log import get_logger
from swarm.net import reachability
from swarm.net.identity import Identity, peer_id_from_owner_marker, split_subkey, tagged_subkey
from swarm.net.schema import SchemaError, decode_record, encode_record
from swarm.net.validator import RecordTypes, SwarmRecordValidator

logger = get_logger(__name__)
T = TypeVar("T")


@dataclass
class Signed(Generic[T]):
    """A record together with the peer id that signed it and when it expires."""

    signer: str
    record: T
    expires_at: float
    owner: bytes = b""  # the signer's '[owner:...]' subkey: its public key


@dataclass
class DHTOptions:
    """Where a node listens and whom it knows. Addresses are libp2p multiaddrs."""

    initial_peers: tuple[str, ...] = ()
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    announce_maddrs: tuple[str, ...] = ()
    use_relay: bool = True
    use_auto_relay: bool = False
    client_mode: bool = False  # a node behind NAT that cannot accept connections
    # "auto": a joiner asks a peer it joined through to dial it back, and runs as a client behind
    # relays if nobody can (swarm/net/reachability.py); "public": skip the probe; "private": client.
    reachability: Literal["auto", "public", "private"] = "auto"

    def __post_init__(self) -> None:
        if self.reachability not in ("auto", "public", "private"):
            raise ValueError(f"reachability must be auto, public or private, got {self.reachability!r}")
        if self.reachability == "private" and not self.client_mode:
            self.client_mode = self.use_auto_relay = True

    @property
    def should_probe(self) -> bool:
        """A joiner that was told nothing about its reachability and announces no address of its own."""
        return self.reachability == "auto" and not self.client_mode and not self.announce_maddrs and bool(self.initial_peers)


class SwarmDHT:
    """One hivemind DHT node (its own process) plus typed helpers that sign and validate records."""

    def __init__(self, identity: Identity, dht: hivemind.DHT, types: RecordTypes, *, reachable: bool = True):
        self.identity = identity
        self.dht = dht
        self.reachable = reachable  # whether other peers can dial us (False: client mode, relays)
        self.peer_id = str(identity.peer_id)
        self.types = types
        self._marker = identity.owner_marker
        self._maddrs: list[str] | None = None

    @classmethod
    def start(cls, identity_path: str, options: DHTOptions, types: RecordTypes) -> SwarmDHT:
        """Start the DHT process (and its p2pd daemon); `types` are the records it stores and accepts.

        Call it from the main thread before an event loop installs signal handlers: the DHT process
        is forked and inherits them. It is started with SIGINT ignored, so a terminal's Ctrl+C
        reaches only our process, which then announces its leaving through a DHT still alive.
        """
        identity = Identity.load_or_create(identity_path)
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
        try:
            dht = cls._start_dht(identity, identity_path, options, types)
            if options.should_probe and cls._probe(dht, options) is False:
                logger.warning(
                    "other peers cannot connect to this node (behind NAT or a firewall?): "
                    "restarting as a client reached through relays; nothing for you to do"
                )
                cls._stop(dht)
                options = replace(options, client_mode=True, use_auto_relay=True)
                dht = cls._start_dht(identity, identity_path, options, types, check_identity=False)  # ours a second ago
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)
        if str(dht.peer_id) != str(identity.peer_id):
            raise RuntimeError("the DHT's peer id does not match the identity key")
        return cls(identity, dht, types, reachable=not options.client_mode)

    @staticmethod
    def _probe(dht: hivemind.DHT, options: DHTOptions) -> bool | None:
        """Ask the peers we joined through to dial us back (None: none could answer)."""
        probers = tuple(dict.fromkeys(a.rsplit("/p2p/", 1)[1].strip("/") for a in options.initial_peers if "/p2p/" in a))
        try:
            verdict = dht.run_coroutine(functools.partial(reachability.probe_in_dht_process, probers=probers))
        except Exception as e:
            logger.warning("could not check whether others can reach us: %s", e)
            return None
        logger.info("reachability probe: %s", {True: "reachable", False: "not reachable", None: "no answer"}[verdict])
        return verdict

    @staticmethod
    def _start_dht(
        identity: Identity, identity_path: str, options: DHTOptions, types: RecordTypes, *, check_identity: bool = True
    ) -> hivemind.DHT:
        return hivemind.DHT(
            initial_peers=list(options.initial_peers) or None,
            start=True,
            identity_path=identity_path,
            host_maddrs=list(options.host_maddrs),
            announce_maddrs=list(options.announce_maddrs) or None,
            use_relay=options.use_relay,
            use_auto_relay=options.use_auto_relay,
            client_mode=options.client_mode,
            record_validators=[identity.validator(), SwarmRecordValidator(types)],
            startup_timeout=60,
            check_if_identity_free=check_identity,
        )

    def visible_maddrs(self) -> list[str]:
        """Our listening addresses (asked once: the call blocks on the DHT process)."""
        if self._maddrs is None:
            self._maddrs = [str(a) for a in self.dht.get_visible_maddrs()]
        return self._maddrs

    async def put(self, key: str, record: object, ttl_s: float) -> bool:
        """Store a record under our own signed subkey; True if at least one node accepted it."""
        value = encode_record(record)
        subkey = tagged_subkey(self._marker, self.types.tag(record))
        future = self.dht.store(key, value, get_dht_time() + ttl_s, subkey=subkey, return_future=True)
        try:
            return bool(await future)
        except Exception as e:  # a DHT hiccup must not kill the caller's loop
            logger.warning("DHT store of %s failed: %s", key, e)
            return False

    async def get_all(self, key: str, cls: type[T], *, latest: bool = True) -> list[Signed[T]]:
        """Every valid record under key, one per signer; invalid ones are logged and dropped."""
        try:
            found = await self.dht.get(key, latest=latest, return_future=True)
        except Exception as e:
            logger.warning("DHT get of %s failed: %s", key, e)
            return []
        if found is None or not isinstance(found.value, dict):
            return []
        result = []
        for subkey, item in found.value.items():
            signer = peer_id_from_owner_marker(subkey) if isinstance(subkey, (bytes, str)) else None
            if signer is None or not hasattr(item, "value"):
                logger.warning("ignoring unsigned record under %s", key)
                continue
            tag = split_subkey(subkey)[1]
            if tag != cls.__name__:
                logger.warning(
                    "ignoring a %s record under %s from %s (expected %s)", tag or "untagged", key, str(signer)[-8:], cls.__name__
                )
                continue
            try:
                record = decode_record(cls, item.value)
            except (SchemaError, TypeError) as e:
                logger.warning("rejecting record under %s from %s: %s", key, str(signer)[-8:], e)
                continue
            owner = subkey.encode() if isinstance(subkey, str) else bytes(subkey)
            result.append(Signed(str(signer), record, item.expiration_time, owner))
        return result

    async def get_from(self, key: str, cls: type[T], signer: str) -> Signed[T] | None:
        """The record under key signed by one particular peer, if any."""
        for item in await self.get_all(key, cls):
            if item.signer == signer:
                return item
        return None

    def shutdown(self) -> None:
        self._stop(self.dht)

    @staticmethod
    def _stop(dht: hivemind.DHT) -> None:
        try:
            dht.shutdown()
            dht.join(10)
        except Exception as e:
            logger.debug("DHT shutdown: %s", e)
        if dht.is_alive():  # never leave a DHT process (and its p2pd) behind
            logger.warning("DHT process did not exit; killing it")
            os.kill(dht.pid, signal.SIGKILL)
            dht.join(5)
