"""Free delays, in the simulator: a peer that says it trains but never submits, and one that submits
but never serves its payload. After ABSENT_ROUNDS rounds the leader waits for neither (the first only
by its round timeout, the second by a short fetch deadline), every round holds the honest payloads,
and honest replicas stay identical. Protocol timing only, so it runs on virtual time (it took a
real 4-peer swarm 200 s; here about 5 s) through the same round code."""

from __future__ import annotations

from swarm.round.admission import ABSENT_ROUNDS, SHORT_FETCH_S
from swarm.sim.runner import SimConfig, Simulation


def test_free_delays_cost_the_swarm_at_most_two_rounds():
    cfg = SimConfig(seed=3, peers=2, rounds=ABSENT_ROUNDS + 4, round_timeout_s=25.0, attackers=["idle", "slow-serve"])
    sim = Simulation(cfg)
    sim.loop.run_until_complete(sim.main())
    result = sim.result()
    assert result.ok, result.violations
    idler, slow = sim.by_name("idle").peer_id[-8:], sim.by_name("slow-serve").peer_id[-8:]
    events = [e.text for e in sim.coordinator.node.events]
    waited = [t for t in events if "closed without" in t and idler in t]
    assert waited and all(f"round {r} " in " ".join(waited) for r in range(ABSENT_ROUNDS)), (
        "the idle peer was waited for at first"
    )
    assert not any(f"round {r} closed without" in t and idler in t for t in events for r in range(ABSENT_ROUNDS, cfg.rounds))
    short = [t for t in events if slow in t and f"within {SHORT_FETCH_S:.0f} s" in t]
    assert short, "the slow server's payload gets only the short deadline once it is not waited for"
    honest = {sim.by_name(f"peer{i}").peer_id for i in range(2)}
    late = [a for a in sim.ledger.applied if a.round >= ABSENT_ROUNDS + 1 and a.node == "coordinator"]
    assert late and all(honest <= set(a.entries) for a in late), "honest payloads are in every round"
    # Once neither is waited for, a round closes in well under the round timeout it cost at first.
    assert max(result.close_s[ABSENT_ROUNDS + 1 :]) < min(result.close_s[:ABSENT_ROUNDS])
