"""Trust from measured work (swarm/round/usefulness.py, the ledger in swarm/round/admission.py):
contributions judged by what they do to the loss, probation, expiring bans, the peer-led rules, and
the guard that keeps a poisoned round off every honest node. No network: a probe whose loss is a
known linear function of the weights."""

from __future__ import annotations

import asyncio

import pytest
import torch

from swarm.modes import mode_for
from swarm.net.dht import Signed
from swarm.net.records import Manifest, ManifestEntry, Rejection
from swarm.round.admission import BAN_ROUNDS, CREDIT_CAP, CREDIT_DECAY, STRIKES_BEFORE_BAN, Validator, Verdict
from swarm.round.leadership import canonical_manifest
from swarm.round.robust import MAX_UPDATE_RATIO, check_update, summarise
from swarm.round.usefulness import HURT_FRACTION, shares
from swarm.run import AdmissionConfig, RunConfig
from swarm.state import GlobalState

SHAPES = {"w": (8, 8)}
GRADIENT = torch.linspace(-1.0, 1.0, 64).reshape(8, 8)  # the loss falls along −GRADIENT


class LinearProbe:
    """Per window j: L_j(θ − u) = L_j(θ) − ⟨GRADIENT, u⟩ (1 + noise_j): a share along the gradient
    helps, against it hurts, and `noise` spreads the windows' verdicts."""

    def __init__(self, noise: float = 0.1, windows: int = 8) -> None:
        self.noise = torch.linspace(-noise, noise, windows, dtype=torch.float64)

    def losses(self, state, updates, seed):
        base = torch.full_like(self.noise, 2.0)
        return base, [base - float((GRADIENT * u.get("w", torch.zeros(8, 8))).sum()) * (1 + self.noise) for u in updates]


class _Node:
    def __init__(self, probation: int = 2) -> None:
        self.run = RunConfig(coordinator="C", admission=AdmissionConfig(probation_rounds=probation))
        self.events: list[str] = []

    def log_event(self, kind: str, text: str) -> None:
        self.events.append(f"{kind}: {text}")


class _Store:
    shapes = SHAPES


def validator(probation: int = 2, probe: LinearProbe | None = None) -> Validator:
    node = _Node(probation)
    return Validator(node, _Store(), mode_for(node.run), probe=probe)  # type: ignore[arg-type]


def verdict(direction: torch.Tensor, scale: float = 1.0) -> Verdict:
    t = direction * scale
    t[t.abs() < 0.3 * t.abs().max()] = 0  # sparse, as SparseLoCo payloads are
    return Verdict(summary=summarise({"w": t}, sparse=True))


def state() -> GlobalState:
    return GlobalState(round=5, params={"w": torch.ones(8, 8)})


def credit(v: Validator, peer: str, rounds: int, start: int = 0) -> None:
    for r in range(start, start + rounds):
        v.record(Manifest(r, "C", "h", [ManifestEntry(peer, "d", 1)], [], 0.0, scores={peer: 0.01}))


def test_a_share_that_raises_the_loss_is_refused_and_struck_whatever_its_cosine():
    v = validator(probation=0, probe=LinearProbe())
    verdicts = {
        f"h{i}": verdict(GRADIENT + 0.1 * torch.randn(8, 8, generator=torch.Generator().manual_seed(i))) for i in range(3)
    }
    verdicts["flip"] = verdict(-GRADIENT)
    verdicts["evade"] = verdict(-0.85 * GRADIENT + 0.5 * GRADIENT.flip(0))  # mostly against, a little along the rest
    scores = asyncio.run(v._refuse_useless(state(), verdicts))
    assert all(verdicts[f"h{i}"].reason is None for i in range(3)) and all(scores[f"h{i}"] > 0 for i in range(3))
    for attacker in ("flip", "evade"):
        assert scores[attacker] < -HURT_FRACTION
        assert verdicts[attacker].fault and "raises the loss" in str(verdicts[attacker].reason)


def test_a_member_may_spend_the_gains_it_was_measured_for_on_a_share_that_hurts_but_never_more():
    """Honest work sometimes raises the loss on the leader's batch; a member with credit (measured
    gains, decayed and capped) has such a share applied and debited, while the same share from a
    peer without credit, beyond the credit left, or beyond the round's net gain is refused."""
    v = validator(probation=0, probe=LinearProbe())
    credit(v, "h0", 3)  # 0.01 a round, decayed: capped at CREDIT_CAP
    assert v.credit == {"h0": CREDIT_CAP}

    def round_with(hurting: dict[str, float], honest: int = 3) -> dict[str, Verdict]:
        verdicts = {
            f"h{i}": verdict(GRADIENT + 0.1 * torch.randn(8, 8, generator=torch.Generator().manual_seed(i)), 1e-2)
            for i in range(1, honest + 1)
        }
        verdicts.update({p: verdict(-GRADIENT, scale) for p, scale in hurting.items()})
        return verdicts

    verdicts = round_with({"h0": 3e-3, "stranger": 3e-3})  # each raises the loss by 0.65%
    scores = asyncio.run(v._refuse_useless(state(), verdicts))
    assert verdicts["h0"].reason is None and "raises the loss" in (verdicts["stranger"].reason or "")
    assert verdicts["stranger"].fault and not verdicts["h0"].fault
    entries = [ManifestEntry(p, "d", 1) for p in ("h0", "h1", "h2", "h3")]
    v.record(Manifest(5, "C", "h", entries, [Rejection("stranger", "hurts", True)], 0.0, scores=scores))
    assert v.credit["h0"] == pytest.approx(CREDIT_DECAY * CREDIT_CAP + scores["h0"])  # debited
    assert v.strikes["h0"] == 0
    # Spent until its credit no longer covers the harm: never more than it had.
    spent = -scores["h0"]
    for r in range(6, 9):
        verdicts = round_with({"h0": 3e-3})
        scores = asyncio.run(v._refuse_useless(state(), verdicts))
        if verdicts["h0"].reason is not None:
            break
        spent -= scores["h0"]
        v.record(Manifest(r, "C", "h", [ManifestEntry(p, "d", 1) for p in ("h0", "h1", "h2", "h3")], [], 0.0, scores=scores))
    assert "raises the loss" in (verdicts["h0"].reason or "") and spent <= CREDIT_CAP
    # The first harm its credit cannot cover is deferred (no strike) and spends what is left of it;
    # the next one is refused and struck.
    assert (verdicts["h0"].reason or "").startswith("deferred") and not verdicts["h0"].fault
    rejected = [Rejection("h0", verdicts["h0"].reason or "", False)]
    v.record(Manifest(9, "C", "h", [ManifestEntry(p, "d", 1) for p in ("h1", "h2", "h3")], rejected, 0.0, scores=scores))
    assert "h0" not in v.credit
    verdicts = round_with({"h0": 3e-3})
    asyncio.run(v._refuse_useless(state(), verdicts))
    assert verdicts["h0"].fault and not (verdicts["h0"].reason or "").startswith("deferred")
    # A harm above MAX_PAID_HARM is refused whatever the credit, and so is one the round's net gain
    # does not cover (one helping share of 2%, a harm of 1.3%... twice).
    rich = validator(probation=0, probe=LinearProbe())
    credit(rich, "a", 3)
    credit(rich, "b", 3)
    verdicts = round_with({"a": 6e-3, "b": 6e-3}, honest=1)
    asyncio.run(rich._refuse_useless(state(), verdicts))
    assert sum(verdicts[p].reason is None for p in ("a", "b")) <= 1
    verdicts = round_with({"a": 1e-2}, honest=3)
    asyncio.run(rich._refuse_useless(state(), verdicts))
    assert "raises the loss" in (verdicts["a"].reason or ""), "above MAX_PAID_HARM"


def test_honest_work_the_cosine_rule_would_refuse_is_kept_when_it_lowers_the_loss():
    """A pipeline stage's payload points its own way (cosine ~0.01 with the replicas') yet helps."""
    along = GRADIENT.clone()
    stage = torch.zeros(8, 8)
    stage[:2] = GRADIENT[:2] * 3  # only its blocks, far from the others' direction as a whole
    verdicts = {f"r{i}": verdict(along + 0.05 * i) for i in range(3)} | {"stage": verdict(stage)}
    v = validator(probation=0, probe=LinearProbe())
    scores = asyncio.run(v._refuse_useless(state(), verdicts))
    assert verdicts["stage"].reason is None and scores["stage"] > 0


def test_a_newcomer_must_lower_the_loss_a_member_with_standing_only_must_not_raise_it():
    probe = LinearProbe()
    v = validator(probation=2, probe=probe)
    credit(v, "old", 2)
    assert v.standing("old") and not v.standing("new")
    flat = torch.zeros(8, 8)
    flat[0, 0], flat[7, 7] = 1e-6, 1e-6  # lowers the loss by next to nothing (GRADIENT is ±1 there)
    verdicts = {"old": verdict(flat), "new": verdict(flat.clone()), "good": verdict(GRADIENT)}
    v.useful["good"] = 0
    asyncio.run(v._refuse_useless(state(), verdicts))
    assert verdicts["old"].reason is None, "a member's flat share is kept (noise in the probe is no fault)"
    assert "on probation" in str(verdicts["new"].reason) and not verdicts["new"].fault
    assert verdicts["good"].reason is None, "a newcomer's useful share is applied and counts"


def test_a_share_whose_effect_is_within_the_probes_noise_is_neither_refused_nor_credited():
    """The windows disagree (one says it helps, another that it hurts): no strike, no credit."""
    v = validator(probation=0, probe=LinearProbe(noise=3.0))
    verdicts = {"a": verdict(-GRADIENT * 0.01), "b": verdict(GRADIENT)}
    scores = asyncio.run(v._refuse_useless(state(), verdicts))
    assert verdicts["a"].reason is None and scores["a"] <= 0
    v = validator(probation=0, probe=LinearProbe(noise=0.1))
    verdicts = {"a": verdict(-GRADIENT * 0.01), "b": verdict(GRADIENT)}
    asyncio.run(v._refuse_useless(state(), verdicts))
    assert verdicts["a"].fault, "the same share, measured without the noise, hurts"


def test_useful_work_counts_only_from_the_coordinators_manifests():
    v = validator(probation=2)
    for r in range(5):
        v.record(Manifest(r, "peer", "h", [ManifestEntry("friend", "d", 1)], [], 0.0, scores={"friend": 0.5}))
    assert not v.standing("friend"), "a peer leader cannot promote its friends"
    credit(v, "worker", 2)
    v.record(Manifest(9, "C", "h", [], [Rejection("idle", "on probation", False)], 0.0, scores={"idle": -0.0001}))
    assert v.standing("worker") and not v.standing("idle")


def test_without_a_scorer_only_work_from_peers_with_standing_is_applied():
    v = validator(probation=2)
    credit(v, "old", 3)
    verdicts = {"old": verdict(GRADIENT), "new": verdict(GRADIENT * 1.1)}
    v._refuse_unproven(verdicts)
    assert verdicts["old"].reason is None
    assert "on probation" in str(verdicts["new"].reason) and not verdicts["new"].fault


def test_a_mode_whose_work_is_not_scored_has_no_probation():
    node = _Node(probation=5)
    node.run = RunConfig(coordinator="C", mode="spsa", outer=node.run.outer, admission=AdmissionConfig(probation_rounds=5))
    v = Validator(node, _Store(), mode_for(node.run))  # type: ignore[arg-type]
    assert v.probation_rounds == 0 and v.standing("anyone")


def test_useful_work_forgives_a_strike():
    v = validator(probation=0)
    for r in range(2 * STRIKES_BEFORE_BAN):  # hurt, help, hurt, help, ...: never banned
        if r % 2:
            credit(v, "unlucky", 1, start=r)
        else:
            v.record(Manifest(r, "C", "h", [], [Rejection("unlucky", "hurts", True)], 0.0))
    assert not v.banned("unlucky") and v.strikes["unlucky"] == 0


def test_bans_expire_and_the_peer_starts_over_on_probation():
    v = validator(probation=1)
    credit(v, "bad", 1)
    for r in range(STRIKES_BEFORE_BAN):
        v.record(Manifest(10 + r, "C", "h", [], [Rejection("bad", "hurts", True)], 0.0))
    last = 10 + STRIKES_BEFORE_BAN - 1
    assert v.banned("bad") and not v.standing("bad")
    v.record(Manifest(last + BAN_ROUNDS - 1, "C", "h", [], [], 0.0))
    assert v.banned("bad"), "the ban lasts BAN_ROUNDS rounds"
    v.record(Manifest(last + BAN_ROUNDS, "C", "h", [], [], 0.0))
    assert not v.banned("bad") and v.strikes.get("bad", 0) == 0
    assert not v.standing("bad"), "after a ban a peer is a newcomer again"
    assert any("expired" in e for e in v.node.events)  # type: ignore[attr-defined]


def test_strikes_and_absences_from_a_peer_led_manifest_are_not_counted():
    v = validator(probation=0)
    for r in range(5):
        v.record(Manifest(r, "usurper", "h", [], [Rejection("honest", "framed", True)], 0.0, missing=["honest"]))
    assert not v.banned("honest") and v.waited_for("honest")


def _signed(manifest: Manifest) -> Signed[Manifest]:
    return Signed(manifest.leader, manifest, 0.0)


def test_a_peer_led_manifest_needs_a_leader_and_entries_with_standing():
    entries = [ManifestEntry(p, "d", 1) for p in ("a", "b", "sybil")]
    by_member = Manifest(3, "a", "h", entries[:2], [], 0.0)
    with_sybil = Manifest(3, "b", "h", entries, [], 0.0)
    by_sybil = Manifest(3, "sybil", "h", entries[:2], [], 0.0)
    standing = {"a", "b"}.__contains__
    found = [_signed(by_member), _signed(with_sybil), _signed(by_sybil)]
    assert canonical_manifest(found, 3, "C", "h", quorum=2, standing=standing) == by_member
    assert canonical_manifest([_signed(with_sybil), _signed(by_sybil)], 3, "C", "h", quorum=2, standing=standing) is None


def test_shares_divide_by_the_contributions_covering_each_slot():
    a = summarise({"w": torch.ones(8, 8), "v": torch.ones(4)}, sparse=False)
    b = summarise({"w": torch.ones(8, 8)}, sparse=False)
    out = list(shares([a, b], [{}, {"w": 0.5}], {"w": (8, 8), "v": (4,)}, outer_lr=2.0))
    assert torch.equal(out[0]["w"], torch.ones(8, 8)) and torch.equal(out[0]["v"], 2 * torch.ones(4))
    assert torch.equal(out[1]["w"], 0.5 * torch.ones(8, 8))


def test_a_round_that_is_not_finite_or_moves_the_weights_by_their_norm_is_refused():
    params = {"w": torch.ones(8, 8)}  # norm 8
    assert check_update(params, {"w": torch.full((8, 8), 0.01)}, outer_lr=2.0) is None
    assert "not finite" in str(check_update(params, {"w": torch.full((8, 8), float("nan"))}, outer_lr=1.0))
    huge = torch.full((8, 8), MAX_UPDATE_RATIO * 0.6)  # α · 0.6 · 8 = 9.6 > 8
    assert "more than" in str(check_update(params, {"w": huge}, outer_lr=2.0))
    assert "more than" in str(check_update(params, {"w": torch.full((8, 8), 3e38)}, outer_lr=2.0))


def test_scores_travel_in_the_manifest_and_only_for_listed_or_rejected_peers():
    Manifest(1, "C", "h", [ManifestEntry("a", "d", 1)], [Rejection("b", "x")], 0.0, scores={"a": 0.1, "b": -0.2})
    with pytest.raises(ValueError, match="scores only"):
        Manifest(1, "C", "h", [ManifestEntry("a", "d", 1)], [], 0.0, scores={"ghost": 0.1})
    with pytest.raises(ValueError, match="finite"):
        Manifest(1, "C", "h", [ManifestEntry("a", "d", 1)], [], 0.0, scores={"a": float("inf")})


def test_the_ledger_carries_standing_strikes_and_bans_to_a_node_that_was_not_there():
    v = validator(probation=2)
    credit(v, "worker", 3)
    for r in range(STRIKES_BEFORE_BAN):
        v.record(Manifest(3 + r, "C", "h", [], [Rejection("bad", "hurts", True)], 0.0, missing=["idler"]))
    record = v.ledger()
    assert record.round == 3 + STRIKES_BEFORE_BAN and record.useful == {"worker": 2}
    joiner = validator(probation=2)
    assert joiner.adopt(record) and not joiner.adopt(record), "only a ledger ahead of ours is taken"
    assert joiner.standing("worker") and joiner.banned("bad") and not joiner.waited_for("idler")
    assert joiner.credit == v.credit == {"worker": CREDIT_CAP}
    for bad in (float("nan"), -0.01, float("inf")):
        with pytest.raises(ValueError):
            type(record)(round=1, credit={"x": bad})
    joiner.record(Manifest(4, "C", "h", [], [Rejection("worker", "hurts", True)], 0.0))
    assert joiner.strikes.get("worker", 0) == 0, "a manifest the adopted ledger already counts is not counted twice"


def test_a_follower_finds_a_flip_at_an_honest_size_in_a_round_nobody_scored():
    from swarm.round.robust import against_the_rest, clip_scales

    g = torch.Generator().manual_seed(0)
    honest = [GRADIENT + 0.3 * torch.randn(8, 8, generator=g) for _ in range(2)]
    flip = -(GRADIENT + 0.3 * torch.randn(8, 8, generator=g))
    summaries = [summarise({"w": t}, sparse=False) for t in [*honest, flip]]
    assert 2 in against_the_rest(summaries, clip_scales(summaries))
    assert against_the_rest(summaries[:2], clip_scales(summaries[:2])) == []
    v = validator(probation=0)
    verdicts = {"a": verdict(honest[0]), "b": verdict(honest[1]), "c": verdict(GRADIENT), "usurper": verdict(flip)}
    v._refuse_misaligned(verdicts)
    assert [p for p, x in verdicts.items() if x.reason] == ["usurper"]


def test_beyond_max_scored_a_seeded_sample_is_scored_newcomers_first_the_rest_by_geometry(monkeypatch):
    from swarm.round import admission

    monkeypatch.setattr(admission, "MAX_SCORED", 4)
    probe = LinearProbe()
    v = validator(probation=1, probe=probe)
    g = torch.Generator().manual_seed(1)
    verdicts = {f"m{i}": verdict(GRADIENT + 0.2 * torch.randn(8, 8, generator=g)) for i in range(6)}
    for i in range(6):
        credit(v, f"m{i}", 1, start=i)
    verdicts["new0"] = verdict(GRADIENT)
    verdicts["new1"] = verdict(GRADIENT * 1.01)
    verdicts["flip"] = verdict(-GRADIENT)
    v.useful["flip"] = 1  # a member gone bad
    scores = asyncio.run(v._refuse_useless(state(), verdicts))
    assert len(scores) == 4 and {"new0", "new1"} <= set(scores), "newcomers are scored first"
    assert verdicts["flip"].fault, "scored or not, a flipped update is refused (by loss or by geometry)"
    assert all(verdicts[f"m{i}"].reason is None for i in range(6)), "honest members are kept either way"


def test_a_pipeline_groups_stages_are_scored_as_one_update():
    """A stage sends its blocks of one replica's update: alone, a newcomer stage's part barely moves
    the loss and would never pass probation (and its whole group's work sat out with it). Scored
    together, the group's summed share decides; when it hurts, only the stage whose own part hurts
    is struck."""
    top, bottom = torch.zeros(8, 8), torch.zeros(8, 8)
    top[:4], bottom[4:] = 1.0, 1.0
    along = GRADIENT.clone()
    along[along.abs() < 0.5] = 0  # the rows near the middle move the loss least
    v = validator(probation=2, probe=LinearProbe())
    credit(v, "s0", 2)
    group = [["s0", "s1"]]
    idle = torch.zeros(8, 8)  # s1, a newcomer: a part of its blocks that moves the loss by nothing measurable
    idle[4, 0], idle[4, 1] = GRADIENT[4, 1], -GRADIENT[4, 0]
    for together, passes in (((), False), (group, True)):
        verdicts = {"s0": verdict(along * top), "s1": verdict(idle)}
        scores = asyncio.run(v._refuse_useless(state(), verdicts, together))
        assert (verdicts["s1"].reason is None) is passes, verdicts["s1"].reason
        if passes:
            assert verdicts["s0"].reason is None and scores["s0"] == scores["s1"] > 0  # the gain, split
    credit(v, "s1", 2)
    verdicts = {"s0": verdict(along * top), "s1": verdict(-GRADIENT * bottom, 30.0)}  # s1 turned: its part hurts
    asyncio.run(v._refuse_useless(state(), verdicts, group))
    assert verdicts["s1"].fault and "raises the loss" in (verdicts["s1"].reason or "")
    assert not verdicts["s0"].fault and "its pipeline group's update raises the loss" in (verdicts["s0"].reason or "")


def test_a_stage_that_has_just_joined_is_sized_with_its_group():
    """A newcomer stage's first update is far smaller than its partners' (their error buffers have
    built up): alone it falls under a tenth of the round's median and would be refused as a free
    rider, and its whole group's work with it; sized with its group, it is not."""
    top, bottom = torch.zeros(8, 8), torch.zeros(8, 8)
    top[:4], bottom[4:] = 1.0, 1.0
    for together, refused in (((), True), ([["s0", "s1"]], False)):
        verdicts = {f"r{i}": verdict(GRADIENT) for i in range(2)}
        verdicts |= {"s0": verdict(GRADIENT * top), "s1": verdict(GRADIENT * bottom, 0.01)}
        Validator._refuse_zeros(verdicts, together)
        assert (verdicts["s1"].reason is not None) is refused
        assert all(verdicts[p].reason is None for p in ("r0", "r1", "s0"))
    verdicts = {f"r{i}": verdict(GRADIENT) for i in range(2)} | {"s0": verdict(GRADIENT * top, 0.01)}
    verdicts["s1"] = verdict(GRADIENT * bottom, 0.01)
    Validator._refuse_zeros(verdicts, [["s0", "s1"]])  # a group whose whole update is near zero is still refused
    assert verdicts["s0"].fault and verdicts["s1"].fault


def test_a_newcomers_near_zero_update_is_refused_without_a_strike():
    """A newcomer's first SparseLoCo payload (its error buffer empty) is far smaller than the
    others': refused (it would dilute the mean), but not struck; a member's is struck."""
    v = validator(probation=2)
    credit(v, "member", 2)
    verdicts = {f"r{i}": verdict(GRADIENT) for i in range(2)}
    verdicts |= {"newcomer": verdict(GRADIENT, 0.01), "member": verdict(GRADIENT, 0.01)}
    Validator._refuse_zeros(verdicts, (), v.standing)
    assert verdicts["newcomer"].reason is not None and not verdicts["newcomer"].fault
    assert verdicts["member"].reason is not None and verdicts["member"].fault
