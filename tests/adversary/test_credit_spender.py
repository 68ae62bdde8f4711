"""A member that earns credit by real work and then spends it on harmful shares.

Credit lets a member's honest share that happens to hurt the probe loss be applied (paid from what
its earlier shares were measured to gain; swarm/round/admission.py). An attacker can use it on
purpose: work honestly until it has standing and credit, then send its update flipped and scaled
so that the measured harm just fits (`swarm.sim.hostile.SpendCredit`). What it gets: its harm is
applied and debited, never struck, but it can never hurt more in all than it was measured to help:
the running sum of its applied shares' scores never goes below zero, the honest peers are never
struck, and the run ends near the one without it (docs/security.md has the figures at 25% and 50%
of the identities).
"""

from __future__ import annotations

from itertools import accumulate

from swarm.sim.hostile import SpendCredit
from swarm.sim.runner import Simulation
from tests.adversary.common import SMALL_TRAINING, run_attacked

ROUNDS = 12
BASE = {"seed": 0, "peers": 3, "rounds": ROUNDS, **SMALL_TRAINING}


def run(attackers: list[str]) -> Simulation:
    return run_attacked(BASE, attackers)


def test_a_member_spending_its_credit_never_hurts_more_than_it_helped() -> None:
    clean, sim = run([]), run(["spend-credit"])
    result = sim.result()
    assert clean.result().ok and result.ok, result.violations
    spender = next(p for p in sim.peers if isinstance(p, SpendCredit))
    applied = [score for _, score, listed in spender.scores if listed]  # as the coordinator's manifests scored them
    harmful = [s for s in applied if s < 0]
    assert spender.spent and harmful, f"the attack never got a harmful share applied (spent in {spender.spent}, scores {applied})"
    assert min(accumulate(applied)) >= 0, f"its applied shares' scores sum below zero: {applied}"
    validator = sim.coordinator.agreement.validator
    assert not any(validator.strikes.get(p.peer_id, 0) for p in sim.peers if p.honest), "an honest peer was struck"
    baseline = clean.result().eval_loss
    assert result.eval_loss is not None and baseline is not None and result.eval_loss <= 1.03 * baseline
