"""The status page's bookkeeping rules, without a swarm: liveness, events, rounds, untrusted values."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import pytest

from swarm.net.dht import Signed
from swarm.net.records import Event, Heartbeat, Manifest, ManifestEntry, Phase, Rejection, Submission
from swarm.round.leadership import canonical_manifest
from swarm.status.book import (
    BookConfig,
    EventMerger,
    PeerBook,
    PeerCounts,
    RoundHistory,
    clean_number,
    clean_text,
    round_row,
)

TTL = 4.0


def beat(peer: str, t: float, *, phase: Phase = "training", name: str = "p", loss: float | None = 1.0, rnd: int = 3) -> Heartbeat:
    return Heartbeat(
        peer_id=peer,
        name=name,
        role="replica shard 0",
        device="cpu",
        phase=phase,
        round=rnd,
        tokens_per_s=10.0,
        loss=loss,
        bytes_sent=1,
        bytes_received=2,
        param_hash="h",
        version="0.1.0",
        time=t,
    )


def book() -> PeerBook:
    return PeerBook(BookConfig(heartbeat_ttl_s=TTL, departed_after_s=30.0))


def test_peer_goes_live_stale_departed_and_events_say_so():
    b = book()
    assert b.update([beat("A", 100.0)], now=100.5) == []
    assert b.peers["A"].state == "live"
    events = b.update([], now=100.0 + TTL + 0.1)  # silent past the TTL
    assert b.peers["A"].state == "stale" and [e.kind for e in events] == ["stale"]
    events = b.update([], now=131.0)
    assert b.peers["A"].state == "departed" and [e.kind for e in events] == ["departed"]


def test_stale_peer_that_comes_back_is_live_again():
    b = book()
    b.update([beat("A", 100.0)], now=100.0)
    b.update([], now=106.0)
    events = b.update([beat("A", 106.5)], now=107.0)
    assert b.peers["A"].state == "live" and [e.kind for e in events] == ["back"]


def test_leaving_peer_is_departed_without_a_synthetic_event():
    b = book()
    b.update([beat("A", 100.0)], now=100.0)
    events = b.update([beat("A", 101.0, phase="leaving")], now=101.0)
    assert b.peers["A"].state == "departed" and events == []  # the peer logs its own 'leave'


def test_older_heartbeat_does_not_replace_newer_one():
    b = book()
    b.update([beat("A", 100.0, rnd=5)], now=100.0)
    b.update([beat("A", 99.0, rnd=4)], now=100.5)
    assert b.peers["A"].beat.round == 5


def test_future_and_nonfinite_heartbeat_times_are_tamed():
    b = book()
    b.update([beat("F", 1e12), beat("N", math.nan)], now=100.0)
    assert "N" not in b.peers
    assert b.peers["F"].beat.time == 100.0  # clamped: it goes stale like anyone once silent
    b.update([], now=100.0 + TTL + 1)
    assert b.peers["F"].state == "stale"


def test_counts_exclude_coordinator_and_round_hint_resists_a_liar():
    b = book()
    coord = beat("C", 100.0, rnd=9)
    coord.is_coordinator = True
    b.update([coord, beat("A", 100.0, rnd=9), beat("B", 90.0, rnd=20), beat("L", 100.0, rnd=10**9)], now=100.0)
    assert b.counts() == {"live": 2, "stale": 1, "departed": 0}
    assert b.round_hint() == 9  # neither the stale peer's round nor the liar's counts


def test_peer_json_is_strict_json_even_with_nan_loss_and_hostile_name():
    b = book()
    hostile = "<img src=x onerror=alert(1)>" + "x" * 500
    b.update([beat("A", 100.0, loss=math.nan, name=hostile)], now=100.0)
    (row,) = b.to_json(now=101.0)
    json.dumps(row, allow_nan=False)
    assert row["loss"] is None and row["heartbeat_age_s"] == 1.0
    assert row["name"].startswith("<img src=x onerror=alert(1)>") and len(row["name"]) == 100


def test_clean_helpers():
    assert clean_text("short") == "short"
    assert clean_text("y" * 10, limit=5) == "yyyy…"
    assert clean_number(math.inf) is None and clean_number(2.5) == 2.5 and clean_number(None) is None


def manifest(
    rnd: int,
    leader: str,
    entries: list[tuple[str, int]],
    rejected: Sequence[tuple[str, str]] = (),
    eval_loss: float | None = None,
) -> Manifest:
    return Manifest(
        round=rnd,
        leader=leader,
        base_hash="h",
        entries=[ManifestEntry(p, "d" + p, size) for p, size in entries],
        rejected=[Rejection(p, why) for p, why in rejected],
        closed_at=50.0,
        eval_loss=eval_loss,
    )


def test_round_row_counts_bytes_dense_equivalent_and_losses():
    m = manifest(4, "L", [("A", 100), ("B", 300)], rejected=[("X", "bad")], eval_loss=3.5)
    subs = {"A": Submission("A", 4, "dA", 100, "h", tokens=640, loss=2.0), "B": Submission("B", 4, "dB", 300, "h", 640, 4.0)}
    row = round_row(m, subs, parameters=1000, tokens_per_payload=999)
    assert (row.payloads, row.rejected, row.payload_bytes) == (2, 1, 400)
    assert row.dense_bytes == 4 * 1000 * 2
    assert row.train_loss == 3.0 and row.tokens == 1280 and not row.tokens_estimated
    assert row.to_json()["leader_short"] == "L" and row.to_json()["eval_loss"] == 3.5


def test_round_row_estimates_tokens_when_submissions_expired():
    row = round_row(manifest(4, "L", [("A", 100)]), {}, parameters=10, tokens_per_payload=320)
    assert row.tokens == 320 and row.tokens_estimated and row.train_loss is None


def test_history_keeps_most_recent_rounds():
    h = RoundHistory(max_rounds=3)
    for r in range(5):
        h.add(round_row(manifest(r, "L", [("A", 1)], eval_loss=float(r)), {}, parameters=1, tokens_per_payload=1))
    assert [row.round for row in h.ordered()] == [2, 3, 4] and 1 not in h
    assert h.latest_eval_loss() == 4.0


def test_events_merge_dedup_and_order():
    m = EventMerger(max_events=3)
    rejection = manifest(7, "L", [], rejected=[("PEERXXXXXXXX", "malformed payload: nan")])
    text = "round 7: payload from XXXXXXXX rejected: malformed payload: nan"
    m.add("L", [Event(49.0, "reject", text), Event(10.0, "join", "hi")], now=100.0)
    m.add("L", [Event(10.0, "join", "hi")], now=100.0)  # the same log read again
    m.add_rejections(rejection, now=100.0)  # and the same rejection from the manifest
    events = m.to_json({"L": "leader"})
    assert [e["kind"] for e in events] == ["reject", "join"]
    assert events[0]["name"] == "leader" and events[0]["text"] == text
    m.add("B", [Event(1e12, "join", "from the future"), Event(60.0, "x", "a"), Event(70.0, "x", "b")], now=100.0)
    events = m.to_json({})
    assert len(events) == 3 and events[0]["time"] == 100.0  # bounded; future times clamped to now


def test_long_rejection_reason_from_log_and_manifest_is_one_event():
    m = EventMerger(max_events=10)
    reason = "payload not delivered: " + "z" * 400
    m.add(
        "L", [Event(49.5, "reject", f"round 8: payload from XXXXXXXX rejected: {reason}"[:300])], now=100.0
    )  # as node.log_event cuts it
    m.add_rejections(manifest(8, "L", [], rejected=[("PEERXXXXXXXX", reason)]), now=100.0)
    assert len(m.to_json({})) == 1


def test_peer_counts_sample_on_change_and_periodically():
    c = PeerCounts(max_samples=3, sample_every_s=10.0)
    for t, live in [(0, 1), (1, 1), (2, 2), (15, 2), (16, 2), (17, 3)]:
        c.record(float(t), live, 0)
    assert [(s["time"], s["live"]) for s in c.samples] == [(2.0, 2), (15.0, 2), (17.0, 3)]


def test_canonical_manifest_prefers_coordinator_then_hash_rank_and_needs_leader_signature():
    def by(signer: str, leader: str | None = None, rnd: int = 3) -> Signed[Manifest]:
        return Signed(signer, manifest(rnd, leader or signer, []), 0.0)

    def leader(*signed: Signed[Manifest]) -> str | None:
        chosen = canonical_manifest(list(signed), 3, coordinator="C")
        return chosen.leader if chosen is not None else None

    assert leader(by("P1"), by("C")) == "C"
    assert leader(by("P1", leader="C")) is None  # forged leader field
    assert leader(by("P1", rnd=2)) is None
    pick = leader(by("P1"), by("P2"))
    assert pick is not None and pick == leader(by("P2"), by("P1"))


def test_book_config_is_validated():
    with pytest.raises(ValueError):
        BookConfig(heartbeat_ttl_s=10.0, departed_after_s=5.0)
    with pytest.raises(ValueError):
        BookConfig(heartbeat_ttl_s=0.0)
