"""What must hold in every simulated run, checked after every round any honest node settles.

* safety: two honest nodes never settle different states for the same round (among the nodes that
  applied a manifest on the agreed base; a node that reloaded settled nothing of its own). A state
  that only nodes leaving for good within the view timeout of settling it ever held does not count:
  nobody builds on it (a leader that fetched a payload, applied, and left with its sender, both gone
  before anyone else could fetch it: seed 3012 of `--faults all`);
* one manifest per round: an honest node applies at most one manifest per round unless it
  reloaded in between;
* liveness: once no fault is active, every round whose first submission is older than the bound
  (`liveness_bound_s`) has been settled by some honest node;
* fairness: an honest payload that an honest leader could see when it stopped waiting (submitted
  `FAIR_SLACK_S` before the leader's last read of the round's submissions, neither of them down or
  cut off in between, the sender a member in the leader's view) is in the manifest, or the manifest says why not with a reason
  that is not the sender's doing: it could not be delivered, the sender is a newcomer on probation,
  or its share was deferred (docs/security.md);
* bounds: the records a run keeps stay bounded (expired ones are dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from swarm.round.admission import NOT_DELIVERED

if TYPE_CHECKING:
    from swarm.run import RunConfig
    from swarm.sim.actors import Ledger
    from swarm.sim.network import SimNetwork

FAIR_SLACK_S = 6.0  # a submission record's delay (at most 2.2 s on `volunteers`), with room
EXCUSED = (NOT_DELIVERED, "on probation", "deferred")  # refusals of honest work the trust rules allow
MAX_RECORDS_PER_NODE = 64  # heartbeats, capacities, roles, events, the ledger, evidence
# A round's records (submissions, manifests) are kept a while after it (manifests for hours: joiners
# replay rounds from them), so they are bounded per round and per node, not in total.
MAX_ROUND_RECORDS_PER_NODE = 3  # a submission, its endorsement of a peer-led manifest, and a manifest when it leads


@dataclass(frozen=True)
class Violation:
    kind: str  # safety | one-manifest | fairness | liveness | bounds
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
        *_safety(ledger, run.leader_timeout_s),
        *_one_manifest(ledger),
        *_fairness(ledger),
        *_liveness(ledger, net.now(), liveness_bound_s(run), disturbed_until),
        *_bounds(net, nodes),
    ]


def _safety(ledger: Ledger, grace_s: float) -> list[Violation]:
    settled: dict[int, dict[str, list[str]]] = {}  # round -> result -> nodes, first first
    for a in ledger.applied:
        if not a.reloaded:
            settled.setdefault(a.round, {}).setdefault(a.result, []).append(a.node)
    for r, results in sorted(settled.items()):
        lasting = {h: nodes for h, nodes in results.items() if not all(_left_soon(ledger, n, r, h, grace_s) for n in nodes)}
        if len(lasting) > 1:
            text = ", ".join(f"{nodes[0]} -> {h[:8]}" for h, nodes in lasting.items())
            return [Violation("safety", r, f"honest nodes settled different states: {text}")]
    return []


def _left_soon(ledger: Ledger, node: str, round_no: int, result: str, grace_s: float) -> bool:
    """Whether `node` left for good within grace_s of settling round r as `result`."""
    left = ledger.departed.get(node)
    if left is None:
        return False
    at = next(a.at for a in ledger.applied if a.node == node and a.round == round_no and a.result == result)
    return at <= left <= at + grace_s


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


def _fairness(ledger: Ledger) -> list[Violation]:
    checked: set[tuple[int, str, float]] = set()
    for a in ledger.applied:
        if a.reloaded or a.leader not in ledger.honest or (a.round, a.leader, a.closed_at) in checked:
            continue
        checked.add((a.round, a.leader, a.closed_at))
        reasons = dict(a.rejected)
        for (r, peer), sent in ledger.submitted.items():
            last_read, members = ledger.polled.get((r, a.leader), (a.closed_at, None))  # when the leader stopped waiting
            if r != a.round or peer not in ledger.honest or peer in a.entries or sent > last_read - FAIR_SLACK_S:
                continue
            if members is not None and peer not in members:
                continue  # not admitted (yet, or again): only members' work counts
            if any(p in (peer, a.leader) and start < a.closed_at and sent < until for p, start, until in ledger.cut_off):
                continue  # the sender or the leader was down or cut off meanwhile: it may never have reached it
            reason = reasons.get(peer)
            if reason is None or not reason.startswith(EXCUSED):
                why = f"refused: {reason}" if reason else "neither listed nor refused"
                return [
                    Violation("fairness", r, f"{peer[-8:]}'s payload, sent {a.closed_at - sent:.1f}s before the manifest, {why}")
                ]
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
