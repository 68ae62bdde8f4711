"""A usurper once the coordinator is away (issue "Trust for a permissionless swarm", attack 2).

The attack that won before: a member that publishes its own manifest of every round at once, listing
only its own update × −1000 and marking every other member missing. Once the coordinator was gone,
every node counted those absence marks, stopped waiting for the honest peers and took the one-entry
manifest; the poison was applied in full and honest replicas forked. Now absence marks, strikes and
credit count only from the coordinator's manifests, a peer-led manifest needs a strict majority of
the members with standing, and a round that would move the weights by their own norm is refused by
every node alike.

Simulator with real training (`nano`), the coordinator leaving for good after the first rounds:
honest replicas stay identical, every round after it left is led by an honest peer and lists a
majority of honest contributions, and the loss stays within 3% of the same run without usurpers.
"""

from __future__ import annotations

import pytest

from swarm.round.leadership import peer_quorum
from swarm.sim.faults import Fault
from swarm.sim.runner import SimConfig, Simulation
from tests.adversary.common import SMALL_TRAINING

ROUNDS = 7
LEAVES_AT_S = 9.0  # virtual seconds: once two rounds were scored (the peers have standing)
BASE = {"seed": 5, "rounds": ROUNDS, **SMALL_TRAINING}


def run(peers: int, usurpers: int) -> Simulation:
    away = [Fault(LEAVES_AT_S, "coordinator-leave", "coordinator")]
    sim = Simulation(SimConfig(**BASE, peers=peers, attackers=["usurp"] * usurpers, schedule=away))  # type: ignore[arg-type]
    sim.loop.run_until_complete(sim.main())
    return sim


@pytest.mark.parametrize(("honest", "usurpers"), [(3, 1), (4, 2)])
def test_usurpers_cannot_decide_a_round_while_the_coordinator_is_away(honest: int, usurpers: int) -> None:
    clean = run(honest, 0).result()
    sim = run(honest, usurpers)
    result = sim.result()
    assert result.ok, result.violations  # honest replicas identical, rounds close
    honest_ids = {p.peer_id for p in sim.peers if p.honest}
    usurper_ids = {p.peer_id for p in sim.peers if not p.honest}
    coordinator = sim.coordinator.peer_id
    peer_led = {a.round: a for a in sim.ledger.applied if a.leader != coordinator and a.node != "coordinator"}
    assert len(peer_led) >= 5, f"only {len(peer_led)} rounds were led by peers"
    members = honest + usurpers
    for r, applied in sorted(peer_led.items()):
        assert applied.leader not in usurper_ids or len(set(applied.entries) & honest_ids) >= peer_quorum(members) - usurpers
        assert len(set(applied.entries) & honest_ids) >= peer_quorum(members) - usurpers, f"round {r}: {applied.entries}"
        assert len(applied.entries) >= peer_quorum(members), f"round {r} applied with {len(applied.entries)} of {members}"
    assert clean.eval_loss is not None and result.eval_loss is not None
    assert result.eval_loss <= clean.eval_loss * 1.03, f"{result.eval_loss:.4f} vs {clean.eval_loss:.4f} without usurpers"
