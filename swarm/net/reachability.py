"""Whether others can dial us, found by asking: a dial-back probe, and staying reachable without it.

A joining node asks a peer it already knows (the coordinator, or whichever address it joined
through) over `/swarm/dialback/1`: "open a TCP connection to my listening ports at the address you
see me coming from". The answer says whether the swarm can connect to us. Behind a NAT without
port forwarding it cannot: the node then runs as a libp2p client (DHT client mode, auto relay
through the public peers it joined through) and says `reachable: false` in its heartbeat, so that
nobody picks it to lead a round or donate state. It still contributes: it keeps a connection open to
each reachable member (`keep_connected`), and a leader opens its fetch stream over that connection
(libp2p reuses an open connection whoever dialled it), or over a relay when there is none.

Only the address the request came from is ever dialled (never one the requester names), at most
MAX_PORTS ports, one TCP handshake each and closed at once, a few probes at a time: a peer cannot
use the probe to make others connect anywhere but back to itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import struct
from collections.abc import Iterable
from typing import Any

import msgpack
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.utils.multiaddr import Multiaddr

from swarm.log import get_logger

logger = get_logger(__name__)

PROTOCOL = "/swarm/dialback/1"
MAX_PORTS = 4
MAX_REQUEST_BYTES = 256
DIAL_TIMEOUT_S = 3.0
PROBE_TIMEOUT_S = 15.0
CONCURRENT_PROBES = 4
_LEN = struct.Struct("!H")
_IP_TCP = re.compile(r"^/ip([46])/([^/]+)/tcp/(\d+)")


class ProbeError(ValueError):
    """A dial-back request that is malformed."""


def tcp_ports(maddrs: Iterable[str]) -> list[int]:
    """The TCP ports of our listening multiaddrs (relay addresses left out), at most MAX_PORTS."""
    ports = []
    for addr in maddrs:
        match = _IP_TCP.match(str(addr))
        if match and "p2p-circuit" not in str(addr) and int(match.group(3)) not in ports:
            ports.append(int(match.group(3)))
    return ports[:MAX_PORTS]


def observed_ip(addr: object) -> str | None:
    """The IP a stream came from, or None when it came through a relay or over something else."""
    text = str(addr)
    match = _IP_TCP.match(text)
    if match is None or "p2p-circuit" in text:
        return None
    try:
        return str(ipaddress.ip_address(match.group(2)))
    except ValueError:
        return None


def parse_request(raw: bytes) -> list[int]:
    """The ports of a dial-back request; ProbeError if it is anything but {"ports": [1..4 ports]}."""
    try:
        request = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:
        raise ProbeError(f"not msgpack: {type(e).__name__}") from None
    if not isinstance(request, dict) or set(request) != {"ports"}:
        raise ProbeError("expected a map with exactly one key, 'ports'")
    ports = request["ports"]
    if not isinstance(ports, list) or not 1 <= len(ports) <= MAX_PORTS:
        raise ProbeError(f"'ports' must be a list of 1 to {MAX_PORTS} ports")
    if not all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in ports):
        raise ProbeError("ports must be integers in 1..65535")
    return sorted(set(ports))


async def can_connect(ip: str, port: int, timeout_s: float = DIAL_TIMEOUT_S) -> bool:
    """Whether a TCP handshake with ip:port completes (the connection is closed at once)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout=timeout_s)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


async def serve(p2p: P2P) -> None:
    """Answer dial-back probes on this node's libp2p host, a few at a time."""
    probes = asyncio.Semaphore(CONCURRENT_PROBES)

    async def handle(info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _handle(info, reader, writer, probes)

    await p2p.add_binary_stream_handler(PROTOCOL, handle)


async def _handle(
    info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, probes: asyncio.Semaphore
) -> None:
    who = str(info.peer_id)[-8:]
    try:
        (length,) = _LEN.unpack(await asyncio.wait_for(reader.readexactly(_LEN.size), timeout=10))
        if length > MAX_REQUEST_BYTES:
            raise ProbeError(f"request of {length} bytes, limit {MAX_REQUEST_BYTES}")
        ports = parse_request(await asyncio.wait_for(reader.readexactly(length), timeout=10))
        ip = observed_ip(info.addr)
        reachable = False
        if ip is not None:
            async with probes:
                reachable = any(await asyncio.gather(*(can_connect(ip, port) for port in ports)))
        logger.debug("dial-back to %s at %s ports %s: %s", who, ip, ports, reachable)
        writer.write(bytes([1 if reachable else 0]))
        await writer.drain()
    except ProbeError as e:
        logger.warning("rejecting a dial-back request from %s: %s", who, e)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def ask(p2p: P2P, prober: str, ports: list[int], timeout_s: float = PROBE_TIMEOUT_S) -> bool | None:
    """Ask `prober` to dial us back; True/False, or None if it could not answer (old or gone)."""

    async def go() -> bool | None:
        _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(prober), PROTOCOL)
        try:
            body = msgpack.packb({"ports": ports}, use_bin_type=True)
            writer.write(_LEN.pack(len(body)) + body)
            await writer.drain()
            answer = await reader.read(1)
            return answer == b"\x01" if answer in (b"\x00", b"\x01") else None
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(go(), timeout=timeout_s)
    except Exception as e:
        logger.info("dial-back probe through %s failed: %s", prober[-8:], e)
        return None


async def probe_in_dht_process(_dht: Any, node: Any, probers: tuple[str, ...]) -> bool | None:
    """Run by the DHT process (hivemind's `run_coroutine`): ask each prober in turn until one answers."""
    ports = tcp_ports(str(a) for a in await node.p2p.get_visible_maddrs())
    if not ports:
        return None
    for prober in probers:
        verdict = await ask(node.p2p, prober, ports)
        if verdict is not None:
            return verdict
    return None


async def keep_connected(p2p: P2P, peers: dict[str, list[str]]) -> int:
    """Open (or keep) a connection to each peer (id -> multiaddrs); returns how many are connected.

    A node nobody can dial stays reachable this way: streams to it travel over connections it opened."""
    connected = 0
    for peer_id, addrs in peers.items():
        try:
            maddrs = [Multiaddr(a.split("/p2p/")[0]) for a in addrs if "p2p-circuit" not in a]
            await asyncio.wait_for(p2p._client.connect(PeerID.from_base58(peer_id), maddrs), timeout=10)
            connected += 1
        except Exception as e:  # a peer gone or unreachable right now: try again next time
            logger.debug("could not connect to %s: %s", peer_id[-8:], e)
    return connected
