"""What must hold in every simulated run, checked after every round any honest node settles.

* safety: two honest nodes never settle different states for the same round (among the nodes that
  applied a manifest on the agreed base; a node that reloaded settled nothing of its own);
* one manifest per round: an honest node applies at most one manifest per round unless it
  reloaded in between;
* liveness: once no fault is active, every round whose first submission is older than the bound
  (`liveness_bound_s`) has been settled by some honest node;
* bounds: the records a run keeps stay bounded (expired ones are dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swarm.run import RunConfig
    from swarm.sim.actors import Ledger
    from swarm.sim.network import SimNetwork

MAX_RECORDS_PER_NODE = 64  # heartbeats, capacities, roles, events, the ledger, evidence
# A round's records (submissions, manifests) are kept a while after it (manifests for hours: joiners
# replay rounds from them), so they are bounded per round and per node, not in total.
MAX_ROUND_RECORDS_PER_NODE = 2  # a submission, and a manifest when it leads (an equivocator's second is the excess)


@dataclass(frozen=True)
class Violation:
    kind: str  # safety | one-manifest | liveness | bounds
    round: int
    text: str

    def __str__(self) -> str:
        return f"{self.kind} violation at round {self.round}: {self.text}"


def liveness_bound_s(run: RunConfig) -> float:
    """How long a round may stay open after its first submission: the coordinator's deadline, the
    followers' view timeout, and room for a manifest's payload fetches."""
    return run.round_timeout_s + run.leader_timeout_s + 60.0


def check(ledger: Ledger, net: SimNetwork, run: RunConfig, *, disturbed_until: float, nodes: int) -> list[Violation]:
    """Every invariant over what happened so far; `disturbed_until`: when the last fault healed."""
    return [
        *_safety(ledger),
        *_one_manifest(ledger),
        *_liveness(ledger, net.now(), liveness_bound_s(run), disturbed_until),
        *_bounds(net, nodes),
    ]


def _safety(ledger: Ledger) -> list[Violation]:
    settled: dict[int, dict[str, str]] = {}  # round -> result -> first node
    found = []
    for a in ledger.applied:
        if a.reloaded:
            continue
        results = settled.setdefault(a.round, {})
        results.setdefault(a.result, a.node)
        if len(results) > 1:
            nodes = ", ".join(f"{n} -> {h[:8]}" for h, n in results.items())
            found.append(Violation("safety", a.round, f"honest nodes settled different states: {nodes}"))
            break
    return found


def _one_manifest(ledger: Ledger) -> list[Violation]:
    seen: dict[str, set[int]] = {}
    for a in ledger.applied:
        rounds = seen.setdefault(a.node, set())
        if a.reloaded:
            rounds.clear()
            continue
        if a.round in rounds:
            return [Violation("one-manifest", a.round, f"{a.node} applied a second manifest without reloading")]
        rounds.add(a.round)
    return []


def _liveness(ledger: Ledger, now: float, bound: float, disturbed_until: float) -> list[Violation]:
    if now < disturbed_until + bound:
        return []
    settled = {a.round for a in ledger.applied}
    for r, first in sorted(ledger.first_submission.items()):
        if r not in settled and now - max(first, disturbed_until) > bound:
            return [Violation("liveness", r, f"open {now - first:.0f}s after its first submission (bound {bound:.0f}s)")]
    return []


def _bounds(net: SimNetwork, nodes: int) -> list[Violation]:
    limit = MAX_RECORDS_PER_NODE * nodes
    count = net.record_count()
    if count > limit:
        return [Violation("bounds", -1, f"{count} records live besides manifests, more than {limit}")]
    held, keys = net.record_count(per_round=True), net.round_keys()
    if held > MAX_ROUND_RECORDS_PER_NODE * nodes * max(keys, 1):
        return [Violation("bounds", -1, f"{held} versions of per-round records under {keys} keys")]
    return []
