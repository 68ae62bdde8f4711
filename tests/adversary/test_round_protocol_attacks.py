"""Attacks on the round protocol itself, all at once against a live coordinator (usurper, staller,
junk manifests, a false coordinator, an equivocator): rounds are still closed by the coordinator
with every honest payload, and every honest node excludes the equivocator."""

from __future__ import annotations

import pytest

from launch.cluster import LocalCluster, nano_run, wait_for
from tests.adversary.common import HOSTILE, rows

pytestmark = pytest.mark.slow


def test_round_protocol_attacks_change_nothing(tmp_path):
    """A usurper, a staller, a junk-manifest spammer, a false coordinator and an equivocator at once:
    every round is still closed by the coordinator, with every honest payload in it, and every
    honest node excludes the equivocator (from what it saw itself or from a proof it checked)."""
    attacks = ("usurp", "stall", "junk-manifests", "claim-coordinator", "equivocate")
    # 8 nodes (24 processes) on 2 cores: the attackers submit at once, and the round closes
    # round_timeout_s after the first submission, so give loaded honest peers room to make it.
    with LocalCluster(tmp_path, nano_run(num_shards=8, round_timeout_s=45.0)) as cluster:
        for i in range(2):
            cluster.add_peer(f"honest{i}")
        for attack in attacks:
            cluster.add_peer(attack, program=(*HOSTILE, attack))
        wait_for(lambda: len(rows(cluster)) >= 5, 480, "5 rounds", cluster)
        coordinator = cluster.address.rsplit("/p2p/", 1)[1]
        assert {r["leader"] for r in rows(cluster)} == {coordinator}, "only the coordinator closes rounds while it is live"
        assert all(r["applied"] >= 2 for r in rows(cluster) if r["round"] >= 2), "honest payloads are in every round"
        for attack in attacks:
            assert "hostile:" in cluster.log(attack), f"the {attack} peer never attacked"
        liar = cluster.peer_id("equivocate")[-8:]

        def excluded(name: str) -> bool:
            return any("[equivocation]" in line and f"{liar} " in line for line in cluster.log(name).splitlines())

        for name in ("coordinator", "honest0", "honest1"):
            wait_for(lambda: excluded(name), 120, f"{name} excluding the equivocator", cluster)  # noqa: B023
        for r, by_peer in cluster.metrics_by_round().items():
            assert len({row["hash"] for row in by_peer}) == 1, f"replicas differ after round {r}"
