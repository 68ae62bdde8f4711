"""The leader's checks on a round's set of contributions (swarm/round/admission.py), without a network."""

from __future__ import annotations

import torch

from swarm.round.admission import Validator, Verdict
from swarm.round.robust import summarise


def sparse(positions: list[int], sign: float = 1.0, seed: int = 0) -> Verdict:
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(64)
    t[torch.tensor(positions)] = sign * (1 + torch.rand(len(positions), generator=g))
    return Verdict(summary=summarise({"w": t.reshape(8, 8)}, sparse=True))


def test_zero_updates_are_refused_with_a_strike():
    verdicts = {"a": sparse([1, 2]), "z": Verdict(summary=summarise({"w": torch.zeros(8, 8)}, sparse=True))}
    Validator._refuse_zeros(verdicts)
    assert verdicts["a"].reason is None
    assert verdicts["z"].reason and "all-zero" in verdicts["z"].reason and verdicts["z"].fault


def test_the_later_of_two_copies_is_struck_and_a_tie_sits_out_without_strikes():
    verdicts = {"honest": sparse([1, 2, 3, 4]), "copier": sparse([1, 2, 3, 4], seed=1), "other": sparse([1, 2, 10, 11])}
    Validator._refuse_copies(verdicts, seen={"honest": 1, "copier": 2, "other": 1})
    assert verdicts["honest"].reason is None and verdicts["other"].reason is None
    assert verdicts["copier"].fault and "copies the payload" in str(verdicts["copier"].reason)
    tie = {"a": sparse([1, 2, 3, 4]), "b": sparse([1, 2, 3, 4], seed=2)}
    Validator._refuse_copies(tie, seen={"a": 3, "b": 3})
    assert all(v.reason and not v.fault for v in tie.values())


def test_a_contribution_pointing_against_the_others_is_left_out():
    common = list(range(0, 40))
    verdicts = {f"h{i}": sparse(common, seed=i) for i in range(3)}
    verdicts["flip"] = sparse(common, sign=-1.0, seed=9)
    Validator._refuse_misaligned(verdicts)
    assert all(verdicts[f"h{i}"].reason is None for i in range(3))
    assert verdicts["flip"].fault and "points away" in str(verdicts["flip"].reason)


class _Run:
    coordinator = "C"


class _Node:
    run = _Run()

    def log_event(self, kind: str, text: str) -> None:
        pass


def test_strikes_come_from_the_coordinators_manifests_applied_by_everyone():
    from swarm.net.records import Manifest, Rejection
    from swarm.round.admission import STRIKES_BEFORE_BAN

    validator = Validator(_Node(), None, None)  # type: ignore[arg-type]
    for r in range(STRIKES_BEFORE_BAN):
        validator.record(Manifest(r, "C", "h", [], [Rejection("bad", "zero", True), Rejection("slow", "stale")], 0.0))
        validator.record(Manifest(r, "peer", "h", [], [Rejection("honest", "framed", True)], 0.0))
    assert validator.banned("bad") and not validator.banned("slow") and not validator.banned("honest")


def test_a_peer_that_delivers_nothing_twice_is_no_longer_waited_for():
    from swarm.net.records import Manifest, ManifestEntry, Rejection
    from swarm.round.admission import ABSENT_ROUNDS, SHORT_FETCH_S

    class _SlowRun(_Run):
        round_timeout_s = 60.0

    node = _Node()
    node.run = _SlowRun()
    validator = Validator(node, None, None)  # type: ignore[arg-type]
    for r in range(ABSENT_ROUNDS):
        assert validator.waited_for("idler") and validator.fetch_deadline("idler") == 60.0
        validator.record(Manifest(r, "C", "h", [ManifestEntry("worker", "d", 1)], [], 0.0, missing=["idler"]))
        validator.record(Manifest(r, "P", "h", [ManifestEntry("worker", "d", 1)], [], 0.0, missing=["worker"]))
    assert not validator.waited_for("idler") and validator.fetch_deadline("idler") == SHORT_FETCH_S
    assert validator.waited_for("worker"), "a peer-led manifest's absence marks are not counted"
    assert not validator.banned("idler"), "an absence is no strike"
    validator.record(Manifest(9, "C", "h", [], [Rejection("idler", "late", False)], 0.0))
    assert validator.waited_for("idler"), "delivering again (even a rejected payload) restores the wait"


def test_a_sender_nobody_can_dial_is_absent_not_a_crash():
    """A peer that died after submitting: the leader's fetch fails to dial it. The round goes on
    without it (not delivered, no strike); the error must not escape and stop the leader."""
    import asyncio

    from swarm.net.records import Submission
    from swarm.net.transfer import TransferError
    from swarm.round.admission import NOT_DELIVERED

    class _Store:
        async def get(self, digest, holders):
            raise TransferError("all dials failed")

    class _Mode:
        inline_payload = False

    class _LiveRun(_Run):
        round_timeout_s = 5.0

    node = _Node()
    node.run = _LiveRun()
    validator = Validator(node, _Store(), _Mode())  # type: ignore[arg-type]
    sub = Submission("gone", 3, "d" * 64, 10, "h", 100, 1.0)
    verdict = asyncio.run(validator.check(3, "h", sub))
    assert verdict.reason and verdict.reason.startswith(NOT_DELIVERED) and not verdict.fault
