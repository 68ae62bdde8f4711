"""One operator, as many identities as there are honest peers: half the swarm colluding.

Under the geometric rules alone this won: three Sybils beside three honest peers made the honest
updates look like the ones pointing away, got them struck and banned, then owned the round
(issue "Trust for a permissionless swarm", attack 1). Now the coordinator scores every contribution
by what it does to the loss on data it draws (swarm/round/usefulness.py), so the number of keys
decides nothing: the honest work is applied, untouched, every round, and the Sybils' work never.

In the simulator with real training (`nano`, every peer a Replica on its own shard; the round code,
codec, scoring and outer step are production's), so the comparison with the honest-only run is
exact: the same seed gives bit-identical states when the defence holds.
"""

from __future__ import annotations

import pytest

from swarm.sim.hostile import Copy, Shrink
from swarm.sim.runner import Simulation
from tests.adversary.common import SMALL_TRAINING, run_attacked

ROUNDS = 4
BASE = {"seed": 3, "peers": 3, "rounds": ROUNDS, **SMALL_TRAINING}


def run(attackers: list[str]) -> Simulation:
    return run_attacked(BASE, attackers)


@pytest.fixture(scope="module")
def clean() -> Simulation:
    sim = run([])
    assert sim.result().ok
    return sim


# Three hostile identities beside three honest ones, in two mixes: what defeated the geometric rule
# (flip, evasion above the cosine cut, framing), and what a loss probe alone would let through
# (helpful × 0.01 updates that set the clip and dilute the mean, zeros), with framing; and noise,
# evasion and a free rider re-sending 80% of an honest payload's entries as its own (it earns no
# credit: the copy check refuses it after scoring, and a refused share is credited nothing).
@pytest.mark.parametrize("attackers", [["sign-flip", "evade", "frame"], ["shrink", "zero", "frame"], ["noise", "evade", "copy"]])
def test_half_the_identities_colluding_change_nothing_the_honest_peers_apply(attackers: list[str], clean: Simulation) -> None:
    sim = run(attackers)
    result = sim.result()
    assert result.ok, result.violations
    assert result.rounds_closed >= ROUNDS
    honest = {p.peer_id for p in sim.peers if p.honest}
    hostile = {p.peer_id for p in sim.peers if not p.honest}
    rounds = [a for a in sim.ledger.applied if a.node == "coordinator" and a.round < ROUNDS]
    assert len(rounds) == ROUNDS
    validator = sim.coordinator.agreement.validator
    assert not any(validator.strikes.get(p, 0) for p in honest), "an honest peer was struck"
    copiers = {p.peer_id: p for p in sim.peers if isinstance(p, Copy)}
    if "evade" in attackers and "noise" in attackers:
        # Beside noise, the evasion's share sometimes lowers the probe loss (it is measured, not
        # guessed): applied then, as useful work. The honest work is all in, the copy never.
        for applied in rounds:
            assert honest <= set(applied.entries) and not copiers.keys() & set(applied.entries), applied.entries
        baseline = clean.result().eval_loss
        assert result.eval_loss is not None and baseline is not None
        assert result.eval_loss <= 1.03 * baseline
    else:
        for applied in rounds:
            assert set(applied.entries) == honest, f"round {applied.round}: applied {applied.entries}"
        # A newcomer's near-zero update is refused without a strike (an honest newcomer's first
        # payload is near zero too): the shrinking Sybils are never applied and never earn standing.
        shrinkers = {p.peer_id for p in sim.peers if isinstance(p, Shrink)}
        assert all(validator.banned(p) for p in hostile - shrinkers), "a Sybil that hurt the loss every round is banned"
        assert not any(validator.standing(p) or validator.credit.get(p) for p in shrinkers)
        final = next(a for a in rounds if a.round == ROUNDS - 1)
        honest_final = next(a for a in clean.ledger.applied if a.node == "coordinator" and a.round == ROUNDS - 1)
        assert final.result == honest_final.result, "the honest peers' state differs from the honest-only run"
    assert all(len(p.copied) == ROUNDS for p in copiers.values()), "the free rider found a payload to copy every round"
    assert all(validator.banned(p) for p in copiers), "a copy in every round is a strike in every round"
    assert not any(validator.useful.get(p) or validator.credit.get(p) for p in copiers), "a copy earns nothing"
