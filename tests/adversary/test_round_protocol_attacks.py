"""Attacks on the round protocol itself, all at once against a live coordinator: a usurper (its own
manifest every round, its flipped update beside a quorum of real ones), a staller (an empty
manifest every round), a junk-manifest spammer (signed manifests for 20 rounds ahead on made-up
states), a false coordinator (its heartbeats say it is one) and an equivocator (two different
signed manifests every round). Rounds are still closed by the coordinator with every honest
payload, replicas stay identical, and every honest node excludes the equivocator.

In the simulator (the production round code on virtual time, docs/simulation.md): the real-process
version of this test ran 8 nodes (24 processes) on 2 cores for minutes to show the same thing.
"""

from __future__ import annotations

from swarm.net.records import manifest_key
from swarm.sim.runner import SimConfig, Simulation

ATTACKS = ["usurp", "stall", "junk-manifests", "claim-coordinator", "equivocate"]
ROUNDS = 5


def test_round_protocol_attacks_change_nothing() -> None:
    sim = Simulation(SimConfig(seed=1, peers=2, rounds=ROUNDS, attackers=ATTACKS))
    sim.loop.run_until_complete(sim.main())
    result = sim.result()
    assert result.ok, result.violations  # replicas bit-identical, no second manifest, fairness, liveness
    honest = [p for p in sim.peers if p.honest]
    rounds = [a for a in sim.ledger.applied if a.node == "coordinator" and a.round < ROUNDS]
    assert len(rounds) == ROUNDS
    assert all(a.leader == sim.coordinator.peer_id for a in rounds), "only the coordinator closes rounds while it is live"
    assert all({p.peer_id for p in honest} <= set(a.entries) for a in rounds), "every honest payload is in every round"
    liar = sim.by_name("equivocate").peer_id
    for node in [sim.coordinator, *honest]:
        assert liar in node.agreement.witness.equivocators, f"{node.name} did not exclude the equivocator"
    wrote = {w for r in range(ROUNDS + 20) for w in sim.net.records.get(manifest_key(sim.run.run_id, r), {})}
    for name in ("usurp", "stall", "junk-manifests", "equivocate"):  # each attack happened: its manifests are out
        assert sim.by_name(name).peer_id in wrote, f"the {name} peer published no manifest"
    assert sim.by_name("claim-coordinator").node.status.is_coordinator


def test_endorsing_two_manifests_of_a_round_counts_for_neither() -> None:
    """With the coordinator gone, a peer-led manifest counts once most members with standing endorse
    it. Two usurpers (each its own manifest every round) that also endorse every peer-led manifest
    they see, switching among them, try to make two manifests of one round each look endorsed to
    different nodes. Honest replicas stay identical, every round closes, and the honest nodes that
    read two endorsements from one of them count neither."""
    from swarm.sim.faults import Fault

    sim = Simulation(
        SimConfig(
            seed=3,
            peers=4,
            rounds=6,
            attackers=["two-faced", "two-faced"],
            schedule=[Fault(25.0, "coordinator-leave", "coordinator", 0.0)],
        )
    )
    sim.loop.run_until_complete(sim.main())
    result = sim.result()
    assert result.ok, result.violations
    honest = [p for p in sim.peers if p.honest]
    assert all(p.agreement.state.round >= 6 for p in honest)
    peer_led = [a for a in sim.ledger.applied if a.leader != sim.coordinator.peer_id]
    assert peer_led, "peers led rounds after the coordinator left"
    caught = [p for p in honest if p.agreement._two_faced]
    assert caught, "no honest node saw a two-faced endorsement"


def test_hanging_relays_of_the_aggregate_cost_their_subtrees_a_wait_not_the_coordinators_uplink() -> None:
    """Two members that never answer a fetch hold places in the aggregate's relay trees (1B-size
    payloads, volunteers' links). Their children go one ancestor up once a fetch from them times
    out; every honest node applies every round, and the coordinator sends each round's aggregate
    under twice (members used to go up the whole tree at the first "not here": 6-9 copies a round
    from the coordinator's uplink in this swarm)."""
    from swarm.sim.runner import simulate

    cfg = SimConfig(
        seed=0,
        peers=10,
        rounds=3,
        attackers=["slow-serve", "slow-serve"],
        profile="volunteers",
        heartbeat_s=5,
        payload_bytes=int(20e6),
        round_timeout_s=300,
        aggregate_from=8,
    )
    result = simulate(cfg)
    assert result.ok and result.honest_done == result.honest_up == 10, result.violations
    aggregate = 4 * 20e6  # AGGREGATE_DENSITY payloads' bytes
    assert result.bytes_out["coordinator"] <= 2.5 * aggregate * result.rounds_closed
