"""Identities that claim to be past the round (issue "Trust for a permissionless swarm").

A node that is behind must not lead a round the swarm already settled (that forked the swarm in the
simulator: docs/simulation.md), so heartbeats saying "most trainers are past round r" now carry
weight. Four hostile identities beside three honest peers say exactly that, every heartbeat, with
made-up states. What they get: nothing they could use. Honest peers do not believe trainers while
the coordinator is live; the coordinator waits one view timeout for the manifest they claim, then
leads the round and stops counting them. Nobody reloads their state, every round closes.
"""

from __future__ import annotations

from swarm.sim.runner import SimConfig, Simulation


def test_identities_claiming_to_be_ahead_delay_the_coordinator_once_and_move_nobody() -> None:
    sim = Simulation(SimConfig(seed=1, peers=3, rounds=4, attackers=["ahead"] * 4))
    sim.loop.run_until_complete(sim.main())
    result = sim.result()
    assert result.ok, result.violations
    assert result.rounds_closed >= 4
    assert not any(a.reloaded for a in sim.ledger.applied), "an honest node reloaded on the hostile claims"
    overruled = [e for e in sim.coordinator.node.events if "most peers say they are past it" in e.text]
    assert len(overruled) == 1, overruled
    led = {a.round: a.leader for a in sim.ledger.applied if a.node == "coordinator"}
    assert all(led[r] == sim.coordinator.peer_id for r in range(4)), "the coordinator led every round"
