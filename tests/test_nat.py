"""Volunteers behind NAT, end to end on simulated home networks (launch/testbed.py).

A public coordinator, two public peers and two peers each behind its own masquerading router (no
port forwarding) that join through public peer "pub0" (their bootstrap and relay) and are told
nothing about their network: they find out by themselves, run as relayed clients, contribute to
every round with replicas bit-identical, the late one downloads the state from reachable donors,
and killing pub0 leaves them contributing.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from launch.cluster import LocalCluster, nano_run, wait_for
from launch.testbed import Host, Link, Testbed, nat_unavailable

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(nat_unavailable() is not None, reason=f"no NAT testbed here: {nat_unavailable()}"),
]
LINK = Link.parse("100mbit")
_ADDR = re.compile(r"listening on (/ip4/\S+/p2p/\S+)")
_STATE = re.compile(r"downloaded the state of round (\d+)")


def _contributors(cluster: LocalCluster, round_no: int) -> set[str]:
    """Names of the peers whose payload round r applied (as every peer that finished it reports)."""
    rows = cluster.metrics_by_round().get(round_no, [])
    names = cluster.peer_names
    return {names.get(row["peer"], row["peer"]) for row in rows if row.get("included")}


def _identical(cluster: LocalCluster) -> bool:
    return all(len({row["hash"] for row in rows}) == 1 for rows in cluster.metrics_by_round().values())


def _round_with(cluster: LocalCluster, names: set[str], after: int = -1) -> int | None:
    """The first round after `after` that applied a payload from each of `names`."""
    for r in sorted(cluster.metrics_by_round()):
        if r > after and names <= _contributors(cluster, r):
            return r
    return None


def _status(host: Host, url: str) -> dict:
    fetch = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
    return json.loads(host.run(sys.executable, "-c", fetch, url.rstrip("/") + "/api/all").stdout)


def test_nat_peers_join_contribute_and_survive_their_relay(tmp_path: Path) -> None:
    run = nano_run(round_timeout_s=15.0)
    with Testbed("nat") as bed:
        coord = bed.add_public("coord", LINK)
        hosts = {name: bed.add_public(name, LINK) for name in ("pub0", "pub1")}
        hosts |= {name: bed.add_nat(name, LINK) for name in ("nat0", "nat1")}
        with LocalCluster(tmp_path, run, status_port=0, coordinator_host=coord.ip, coordinator_prefix=coord.prefix) as cluster:
            for name in ("pub0", "pub1"):
                cluster.add_peer(name, host=hosts[name].ip, prefix=hosts[name].prefix)
            relay_address = _ADDR.search(cluster.wait_for_log("pub0", _ADDR)).group(1)  # type: ignore[union-attr]
            via_relay = ("--coordinator", cluster.address.rsplit("/p2p/", 1)[1])

            def add_nat(name: str) -> None:
                cluster.add_peer(name, host=hosts[name].ip, prefix=hosts[name].prefix, address=relay_address, extra=via_relay)

            # The NAT'd peers join a trained swarm (they used to be added at once, and on a loaded
            # machine both could join before the first round was applied, downloading θ(0)).
            cluster.wait_for_log("coordinator", re.compile(r"round \d+ closed by us \| [1-9]"), timeout_s=300)
            add_nat("nat0")
            add_nat("nat1")
            everyone = {"pub0", "pub1", "nat0", "nat1"}
            full = wait_for(lambda: _round_with(cluster, everyone), 300, "a round with all four", cluster)
            # both joined a trained swarm: each downloaded a state (from reachable donors only)
            assert max(int(_STATE.search(cluster.log(n)).group(1)) for n in ("nat0", "nat1")) >= 1  # type: ignore[union-attr]
            for name in ("nat0", "nat1"):
                assert "reachability probe: not reachable" in cluster.log(name), cluster.log(name)[-2000:]
            assert "reachability probe: reachable" in cluster.log("pub1")

            # the status page (served inside the coordinator's namespace) shows who is behind NAT
            page = _status(coord, cluster.status_url)
            peers = {p["name"]: p for p in page["peers"]}
            assert [peers[n]["reachable"] for n in sorted(everyone)] == [False, False, True, True], peers

            # pub0 (both NAT'd peers' bootstrap and relay) crashes: they keep contributing
            cluster.kill("pub0")
            survivors = {"pub1", "nat0", "nat1"}
            after = wait_for(lambda: _round_with(cluster, survivors, full + 1), 180, "a round without pub0", cluster)
            assert after > full
            assert _identical(cluster), "replicas diverged"
            nat_ids = {cluster.peer_id(name) for name in ("nat0", "nat1")}
            leaders = {row["leader"] for row in _status(coord, cluster.status_url)["history"]["rounds"]}
            assert leaders and not leaders & nat_ids, "a peer behind NAT led a round"
