"""One hostile volunteer among honest ones, end to end on 127.0.0.1 (tests/adversary/hostile.py).

Honest peers must keep training and stay bit-identical; the attacker is excluded where it can be
identified. Poisoned updates are judged by the figure that matters: the eval loss after a fixed
number of rounds with 1 attacker among 4 peers stays within 5% of the same run without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.cluster import LocalCluster, nano_run, wait_for

pytestmark = pytest.mark.slow
HOSTILE = ("-m", "tests.adversary.hostile")
ROUNDS = 6


def rows(cluster: LocalCluster) -> list[dict]:
    path = cluster.workdir / "coordinator" / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def final_loss(tmp: Path, attack: str | None) -> float:
    """Coordinator's eval loss after ROUNDS rounds of 3 honest peers (+ one attacker)."""
    # Robust aggregation needs three honest contributions in a round to outvote one attacker: every
    # round waits for 4 (or its timeout), as a run open to strangers should (docs/security.md).
    run = nano_run(num_shards=4, round_timeout_s=15.0, min_peers=4)
    with LocalCluster(tmp, run, coordinator_args=("--stop-after", str(ROUNDS))) as cluster:
        for i in range(3):
            cluster.add_peer(f"honest{i}", max_rounds=ROUNDS)
        if attack is not None:
            cluster.add_peer("attacker", max_rounds=ROUNDS, program=(*HOSTILE, attack))
        final = wait_for(lambda: [r for r in rows(cluster) if r.get("final")], 400, "the final evaluation", cluster)
        honest = {n for n in cluster.peer_names.values() if n.startswith("honest")}
        for r, by_peer in cluster.metrics_by_round().items():
            hashes = {row["hash"] for row in by_peer if cluster.peer_names.get(row["peer"]) in honest}
            assert len(hashes) <= 1, f"honest replicas differ after round {r}"
        return final[-1]["eval_loss"]


@pytest.mark.timeout(1200)  # two whole runs of 4 peers; on a loaded 2-core CI box 600 s was not always enough
def test_poisoned_updates_move_the_loss_by_less_than_5_percent(tmp_path):
    clean = final_loss(tmp_path / "clean", None)
    for attack in ("sign-flip", "noise", "zero"):
        attacked = final_loss(tmp_path / attack, attack)
        assert attacked <= clean * 1.05, f"{attack}: eval loss {attacked:.4f} vs {clean:.4f} without the attacker"


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


def test_free_delays_cost_the_swarm_at_most_two_rounds(tmp_path):
    """A peer that says it trains but never submits, and one that submits but never serves its
    payload: after two rounds the leader waits for neither (the first only by its round timeout,
    the second by a short fetch deadline), and honest training goes on."""
    from swarm.round.admission import ABSENT_ROUNDS, SHORT_FETCH_S

    with LocalCluster(tmp_path, nano_run(num_shards=4, round_timeout_s=25.0)) as cluster:
        for i in range(2):
            cluster.add_peer(f"honest{i}")
        for attack in ("idle", "slow-serve"):
            cluster.add_peer(attack, program=(*HOSTILE, attack))
        last = ABSENT_ROUNDS + 4
        wait_for(lambda: len(rows(cluster)) >= last, 400, f"{last} rounds", cluster)
        idler, slow = cluster.peer_id("idle")[-8:], cluster.peer_id("slow-serve")[-8:]
        log = cluster.log("coordinator").splitlines()
        waited = [line for line in log if "closed without" in line and idler in line]
        assert waited, "the idle peer was waited for at first"
        late = [r for r in rows(cluster) if r["round"] >= ABSENT_ROUNDS + 2]
        assert late and all(r["applied"] >= 2 for r in late), "honest payloads are in every round"
        short = [line for line in log if slow in line and f"within {SHORT_FETCH_S:.0f} s" in line]
        assert short, "the slow server's payload gets only the short deadline once it is not waited for"
        for r, by_peer in cluster.metrics_by_round().items():
            honest = {row["hash"] for row in by_peer if cluster.peer_names.get(row["peer"], "").startswith("honest")}
            assert len(honest) <= 1, f"honest replicas differ after round {r}"


def test_a_copier_is_caught_and_the_honest_peer_is_not_framed(tmp_path):
    with LocalCluster(tmp_path, nano_run(num_shards=4)) as cluster:
        cluster.add_peer("honest0")
        cluster.add_peer("honest1")
        cluster.add_peer("copier", program=(*HOSTILE, "copy"))
        wait_for(lambda: "[ban]" in cluster.log("coordinator"), 300, "the copier banned", cluster)
        copier, honest = cluster.peer_id("copier")[-8:], [cluster.peer_id(f"honest{i}")[-8:] for i in range(2)]
        log = cluster.log("coordinator").splitlines()
        struck = [line.split("payload from ")[1][:8] for line in log if "copies the payload" in line]
        assert struck and set(struck) == {copier}, "only the copier is struck as a copier"
        banned = [line for line in log if "[ban]" in line]
        assert all(copier in line for line in banned) and not any(h in line for h in honest for line in banned)
        start = max(cluster.metrics_by_round())
        wait_for(lambda: cluster.rounds_completed(2) > start + 1, 120, "rounds after the ban", cluster)


def test_stop_everything_and_resume_from_the_saved_state(tmp_path):
    cluster = LocalCluster(tmp_path, nano_run(), coordinator_args=("--save-every", "1"))
    with cluster:
        for i in range(2):
            cluster.add_peer(f"p{i}")
        meta_path = tmp_path / "coordinator" / "state" / "meta.json"
        wait_for(lambda: meta_path.exists() and json.loads(meta_path.read_text())["round"] >= 3, 240, "3 rounds saved", cluster)
        for name in list(cluster.procs):
            cluster.kill(name)  # SIGKILL: nothing gets to say goodbye, nobody holds a state any more
        meta = json.loads(meta_path.read_text())
        saved_round, saved_hash = meta["round"], meta["hash"]

        cluster.start_coordinator(["--save-every", "1"])
        for i in range(2):
            cluster.add_peer(f"q{i}")
        wait_for(lambda: "[resume]" in cluster.log("coordinator"), 120, "the coordinator resuming", cluster)
        resumed = wait_for(
            lambda: [r for r in rows(cluster) if "base_hash" in r and r["round"] >= saved_round], 240, "a round after", cluster
        )
        assert resumed[0]["round"] == saved_round and resumed[0]["base_hash"] == saved_hash
        wait_for(lambda: cluster.rounds_completed(2) > saved_round + 1, 240, "training going on", cluster)
