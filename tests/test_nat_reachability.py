"""Dial-back probes and what an unreachable peer may not do (lead a round, donate state)."""

from __future__ import annotations

import asyncio
import socket

import msgpack
import pytest
from hivemind.p2p import P2P

from swarm.net import reachability
from swarm.net.dht import DHTOptions
from swarm.net.records import Heartbeat
from swarm.processes.statesync import pick_donors
from swarm.round.leadership import should_lead


def beat(peer_id: str, *, reachable: bool = True, round_no: int = 3, phase: str = "idle", param_hash: str = "h") -> Heartbeat:
    return Heartbeat(
        peer_id=peer_id,
        name=peer_id,
        role="replica",
        device="cpu",
        phase=phase,  # type: ignore[arg-type]
        round=round_no,
        tokens_per_s=0.0,
        loss=None,
        bytes_sent=0,
        bytes_received=0,
        param_hash=param_hash,
        version="0",
        time=0.0,
        reachable=reachable,
    )


def test_request_validation() -> None:
    ok = msgpack.packb({"ports": [4001, 4001, 5001]})
    assert reachability.parse_request(ok) == [4001, 5001]
    bad = [
        b"\xc1",  # not msgpack
        msgpack.packb([4001]),
        msgpack.packb({"ports": [4001], "ip": "203.0.113.9"}),  # may not name where to dial
        msgpack.packb({"ports": []}),
        msgpack.packb({"ports": [1, 2, 3, 4, 5]}),
        msgpack.packb({"ports": [0]}),
        msgpack.packb({"ports": [70000]}),
        msgpack.packb({"ports": [True]}),
        msgpack.packb({"ports": ["80"]}),
    ]
    for raw in bad:
        with pytest.raises(reachability.ProbeError):
            reachability.parse_request(raw)


def test_addresses() -> None:
    maddrs = ["/ip4/10.0.0.2/tcp/4001/p2p/Qm1", "/ip4/1.2.3.4/tcp/5/p2p/QmR/p2p-circuit/p2p/Qm1", "/ip6/::1/tcp/4001"]
    assert reachability.tcp_ports(maddrs) == [4001]
    assert reachability.observed_ip("/ip4/10.77.0.9/tcp/51234") == "10.77.0.9"
    assert reachability.observed_ip("/ip4/10.77.0.9/tcp/5/p2p/QmR/p2p-circuit") is None  # relayed: nothing to dial
    assert reachability.observed_ip("/ip4/not-an-ip/tcp/5") is None


def test_options() -> None:
    peers = ("/ip4/1.2.3.4/tcp/5/p2p/QmCoord",)
    assert DHTOptions(initial_peers=peers).should_probe
    assert not DHTOptions().should_probe  # the coordinator: nobody to ask, must be public anyway
    assert not DHTOptions(initial_peers=peers, announce_maddrs=("/ip4/1.2.3.5/tcp/6",)).should_probe
    private = DHTOptions(initial_peers=peers, reachability="private")
    assert private.client_mode and private.use_auto_relay and not private.should_probe
    with pytest.raises(ValueError):
        DHTOptions(reachability="sometimes")  # type: ignore[arg-type]


def test_unreachable_peers_never_lead_or_donate() -> None:
    beats = [beat("coord"), beat("nat-a", reachable=False), beat("pub-b"), beat("nat-c", reachable=False)]
    leaders = [p for p in ("nat-a", "pub-b", "nat-c") if should_lead(p, 3, beats, "h", "coord", True)]
    assert leaders == ["pub-b"]
    only_nat = [beat("coord", round_no=2), beat("nat-a", reachable=False), beat("nat-c", reachable=False)]
    assert not any(should_lead(p, 3, only_nat, "h", "coord", True) for p in ("nat-a", "nat-c"))
    picked = pick_donors(beats, exclude="joiner")
    assert picked is not None and set(picked[2]) == {"coord", "pub-b"}
    fallback = pick_donors([beat("nat-a", reachable=False)], exclude="joiner")  # better a relayed donor than none
    assert fallback is not None and fallback[2] == ["nat-a"]


def test_can_connect() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        assert asyncio.run(reachability.can_connect("127.0.0.1", port))
    assert not asyncio.run(reachability.can_connect("127.0.0.1", port))  # closed now


def test_dial_back_over_libp2p() -> None:
    """A prober dials the asker back at the address the request came from: an open port is found,
    a closed one is not; a prober that does not serve the protocol gives no verdict."""
    asyncio.run(_dial_back())


async def _dial_back() -> None:
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server.get_visible_maddrs())
    mute = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        await reachability.serve(server)
        ports = reachability.tcp_ports(str(a) for a in await client.get_visible_maddrs())
        assert ports
        assert await reachability.ask(client, str(server.peer_id), ports) is True
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        assert await reachability.ask(client, str(server.peer_id), [closed]) is False
        mute_addrs = [str(a) for a in await mute.get_visible_maddrs()]
        assert await reachability.keep_connected(client, {str(mute.peer_id): mute_addrs}) == 1
        assert await reachability.ask(client, str(mute.peer_id), ports, timeout_s=5) is None
    finally:
        await asyncio.gather(server.shutdown(), client.shutdown(), mute.shutdown())
