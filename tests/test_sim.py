"""The simulator: virtual time, the network model, determinism, the invariants, and seeded fault schedules."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import statistics
import subprocess
import sys
import time

import pytest

from launch import sim as sim_cli
from swarm.round.admission import Validator
from swarm.sim.actors import Applied, Ledger
from swarm.sim.clock import VirtualLoop, run_virtual
from swarm.sim.faults import KINDS, Fault
from swarm.sim.invariants import check
from swarm.sim.network import Profile, SimNetwork
from swarm.sim.node import derived_identity
from swarm.sim.runner import SimConfig, simulate


def test_virtual_time_jumps_to_the_next_timer_and_keeps_the_order():
    async def main() -> tuple[list[tuple[str, float]], list[str]]:
        loop = asyncio.get_running_loop()
        order: list[tuple[str, float]] = []

        async def wake(name: str, after: float) -> str:
            await asyncio.sleep(after)
            order.append((name, loop.time()))
            return await asyncio.to_thread(str.upper, name)  # inline: no thread races the clock

        results = await asyncio.gather(wake("hour", 3600), wake("ten", 10), wake("five", 5))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.sleep(1000), 30)
        order.append(("timeout", loop.time()))
        return order, list(results)

    started = time.perf_counter()
    order, results = run_virtual(main)
    assert order == [("five", 5.0), ("ten", 10.0), ("hour", 3600.0), ("timeout", 3630.0)]
    assert results == ["HOUR", "TEN", "FIVE"]
    assert time.perf_counter() - started < 2.0


def _network(**profile: object) -> SimNetwork:
    fields: dict[str, object] = {"name": "t", "uplink_mbps": (8, 8), "downlink_mbps": (80, 80), "rtt_ms": (100, 100)}
    fields.update({"dht_delay_s": (1, 1), **profile})
    net = SimNetwork(VirtualLoop(), Profile(**fields), random.Random(0))  # type: ignore[arg-type]
    for name in ("a", "b", "c"):
        net.add_node(name)
    return net


def test_a_senders_uplink_serves_one_transfer_at_a_time():
    net = _network()
    first = net.transfer_time("a", "b", 1_000_000)  # 8 Mbit over an 8 Mbit/s uplink: 1 s after 0.1 s of latency
    assert net.transfer_time("a", "c", 1_000_000, within_s=1.5) is None, "would end at 2.1 s: nothing booked"
    second = net.transfer_time("a", "c", 1_000_000)  # queued behind the first on a's uplink
    assert first == pytest.approx(1.1)
    assert second == pytest.approx(2.1)
    assert net.links["a"].sent == 2_000_000 and net.links["b"].received == 1_000_000


def test_slow_senders_reach_a_fast_downlink_side_by_side_up_to_its_rate():
    """A transfer holds the receiver's downlink for its share only: three 8 Mbit/s senders into an
    80 Mbit/s downlink run side by side, each starting a tenth of a second after the one before
    (TCP runs them together), and seventeen of them take 2.7 s, not seventeen uplink-seconds."""
    net = _network()  # uplinks 8 Mbit/s, downlinks 80 Mbit/s, 50 ms one way
    senders = [f"s{i}" for i in range(20)]
    for name in senders:
        net.add_node(name)
    assert [net.transfer_time(src, "a", 1_000_000) for src in senders[:3]] == pytest.approx([1.1, 1.2, 1.3])
    ends = [net.transfer_time(src, "b", 1_000_000) for src in senders[3:]]
    assert ends == pytest.approx([1.1 + 0.1 * k for k in range(17)])  # the last at 2.7 s (one at a time: 17.1 s)
    assert net.links["a"].received == 3_000_000


def test_records_arrive_late_replace_the_old_one_once_visible_expire_and_respect_partitions():
    net = _network()
    assert net.put("a", "k", "v1", ttl_s=100)
    assert net.get("b", "k") == {}  # not visible yet: latency + DHT delay
    net.loop.advance(2)
    assert net.get("b", "k") == {"a": "v1"}
    net.put("a", "k", "v2", ttl_s=100)
    assert net.get("b", "k") == {"a": "v1"}, "the old version stays until the new one is visible"
    net.loop.advance(2)
    assert net.get("b", "k") == {"a": "v2"} and net.record_count() == 1
    net.groups["a"] = 1
    assert net.get("b", "k") == {} and net.get("a", "k") == {"a": "v2"}
    net.groups.clear()
    net.loop.advance(200)
    assert net.get("b", "k") == {} and net.record_count() == 0, "expired records are dropped"


def test_profiles_ship_and_load_from_a_file(tmp_path):
    volunteers = Profile.load("volunteers")
    assert volunteers.uplink_mbps == (10, 100) and volunteers.downlink_mbps == (50, 500) and volunteers.rtt_ms == (20, 300)
    for name in ("lan", "datacenter"):
        Profile.load(name)
    mine = tmp_path / "home.json"
    mine.write_text(json.dumps({"uplink_mbps": [5, 20], "downlink_mbps": [20, 100], "rtt_ms": [30, 60]}))
    assert Profile.load(str(mine)).name == "home"
    mine.write_text(json.dumps({"uplink_mbps": [5, 20], "downlink_mbps": [20, 100], "rtt_ms": [30, 60], "jitter": 1}))
    with pytest.raises(ValueError, match="unknown profile field"):
        Profile.load(str(mine))
    with pytest.raises(ValueError, match="no network profile"):
        Profile.load("moon")


def _applied(
    node: str, r: int, result: str, *, reloaded: bool = False, leader: str = "leader", closed_at: float = 0.0
) -> Applied:
    return Applied(node, r, "base", result, leader, (), 0.0, reloaded, closed_at)


def test_the_invariants_catch_a_fork_a_second_manifest_and_a_stuck_round():
    net = _network()
    run = SimConfig().run_config()
    ledger = Ledger(applied=[_applied("p0", 3, "x"), _applied("p1", 3, "x")])
    assert check(ledger, net, run, disturbed_until=0, nodes=3) == []
    ledger.applied.append(_applied("p2", 3, "y"))
    assert [v.kind for v in check(ledger, net, run, disturbed_until=0, nodes=3)] == ["safety"]
    ledger.departed["p2"] = 5.0  # p2 left for good 5 s after settling "y": nobody builds on its state
    assert check(ledger, net, run, disturbed_until=0, nodes=3) == []
    ledger.departed["p2"] = 5.0 + 2 * run.leader_timeout_s  # it stayed long enough to matter
    assert [v.kind for v in check(ledger, net, run, disturbed_until=0, nodes=3)] == ["safety"]
    ledger = Ledger(applied=[_applied("p0", 3, "x"), _applied("p0", 3, "x")])
    assert [v.kind for v in check(ledger, net, run, disturbed_until=0, nodes=3)] == ["one-manifest"]
    ledger = Ledger(applied=[_applied("p0", 3, "x"), _applied("p0", 3, "z", reloaded=True), _applied("p0", 3, "x")])
    assert check(ledger, net, run, disturbed_until=0, nodes=3) == [], "after a reload a node settles the round again"
    fair = Ledger(applied=[_applied("p0", 3, "x", leader="L", closed_at=30.0)], honest={"L", "p1"}, submitted={(3, "p1"): 10.0})
    assert [v.kind for v in check(fair, net, run, disturbed_until=0, nodes=3)] == ["fairness"], "p1's payload was in time"
    fair.applied[0].rejected = (("p1", "copies QmX's payload"),)
    assert [v.kind for v in check(fair, net, run, disturbed_until=0, nodes=3)] == ["fairness"], "an honest payload refused"
    fair.applied[0].rejected = (("p1", "payload not delivered: p1 unreachable"),)
    assert check(fair, net, run, disturbed_until=0, nodes=3) == [], "it never reached the leader"
    fair.submitted[(3, "p1")] = 27.0
    fair.applied[0].rejected = ()
    assert check(fair, net, run, disturbed_until=0, nodes=3) == [], "sent as the leader closed: it may miss the round"
    ledger = Ledger(first_submission={4: 0.0})
    net.loop.advance(1000)
    assert [v.kind for v in check(ledger, net, run, disturbed_until=0, nodes=3)] == ["liveness"]
    assert check(ledger, net, run, disturbed_until=990, nodes=3) == [], "judged only once the faults have healed"


def test_a_leader_that_leaves_out_honest_work_breaks_fairness(monkeypatch):
    """The fairness invariant on a whole run: a coordinator that quietly passes over one honest
    submission every round (neither listed nor refused) is caught."""
    validate = Validator.validate

    async def unfair(self, state, subs, seen):
        passed_over = min(subs, key=lambda p: (seen.get(p, 0), p))  # the first in: long before the close
        return await validate(self, state, {p: s for p, s in subs.items() if p != passed_over}, seen)

    monkeypatch.setattr(Validator, "validate", unfair)
    result = simulate(SimConfig(seed=1, peers=4, rounds=2, step_s=(0.2, 3.0), horizon_s=300.0))
    assert [v.kind for v in result.violations] == ["fairness"], result.violations


def test_a_seed_is_a_replayable_run():
    cfg = SimConfig(seed=5, peers=3, rounds=3, faults=["crash", "slow", "coordinator-crash"])
    first, again = simulate(cfg), simulate(cfg)
    assert first.ok and first.rounds_closed == 3
    assert first.trace == again.trace and first.close_s == again.close_s
    assert simulate(SimConfig(seed=6, peers=3, rounds=3, faults=["crash", "slow", "coordinator-crash"])).trace != first.trace


def test_a_seed_replays_in_another_process_with_the_same_peer_ids():
    """Identities derive from a node's position, not from this process's randomness, so a seed
    printed by one run (CI's, a colleague's) replays the same trace anywhere."""
    assert str(derived_identity(0).peer_id) == "QmXLGg2AauAcR2y6yWBTiqUxGzSR5pGssc8kR3qPDZ4eF6"
    code = (
        "from swarm.sim.runner import SimConfig, simulate;"
        "print(repr(simulate(SimConfig(seed=7, peers=3, rounds=2, faults=['crash', 'slow'])).trace))"
    )
    elsewhere = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    here = simulate(SimConfig(seed=7, peers=3, rounds=2, faults=["crash", "slow"])).trace
    assert elsewhere.stdout.strip().splitlines()[-1] == repr(here)


ALL_KINDS = list(KINDS)  # partitions included since the member floor on peer-led quorums (below)


def test_a_partitioned_minority_does_not_settle_a_round_of_its_own():
    """Found by the simulator (seed 5): a peer cut off alone sees neither the coordinator nor the other
    peers, so peers may lead, and the quorum a peer-led manifest needed was a majority of the trainers
    it sees: itself. It led and applied a round of its own payload while the rest of the swarm applied
    the coordinator's (a fork, healed later by a reload). The quorum now has a floor: a strict
    majority of the members with standing, whoever is in view."""
    result = simulate(SimConfig(seed=5, peers=3, rounds=3, schedule=[Fault(11.3, "partition", "peer1", 17.0)]))
    assert result.ok, result.violations


def test_a_node_behind_takes_the_round_the_swarm_settled():
    """Found by the simulator (1 in ~1,000 seeds of `--faults all` each). Seed 2049: a peer crashed,
    then cut off alone for 53 s, gave up the coordinator's manifest of round 3 (its payloads out of
    reach), and once back led round 3 itself from the old submissions while everyone else was at
    round 7: a fork. A node now never leads a round the coordinator or most trainers with standing
    report having applied, and reloads the swarm's state if that round's manifest stays out of reach
    (`RoundAgreement._behind`; with it reverted this seed forked at round 3). Seed 3363: a coordinator
    restarted from its saved round 0 led round 1 again while the peers were at round 3 under a leader
    now cut off; the simulated coordinator skipped what the real one does on a restart (take the
    swarm's newer state: `Coordinator._obtain_state`), and now does it. (Since a crash no longer holds
    back a schedule's later faults, these seeds draw other timings: they stay as regression seeds,
    and no longer fork with the fix reverted; docs/simulation.md.)"""
    for seed in (2049, 3363):
        result = simulate(SimConfig(seed=seed, peers=4, rounds=4, faults=ALL_KINDS))
        assert result.ok, f"seed {seed}: {result.violations}"


def test_a_peer_led_round_counts_once_most_members_endorse_it():
    """Found by the simulator (seeds 5845, 6581, 7206 and 8771 of 10,000 with every fault kind): with
    the coordinator away, a peer cut off from the rest still held every submission of the round from
    before the cut, led it and applied its manifest, which listed a majority of payloads, while the
    others closed the same round without its payload: a fork. A peer-led manifest now counts once a
    strict majority of the members with standing endorse it, each at most one per round. The two
    schedules below are those seeds' faults as they happened; with `RoundAgreement._consented`
    bypassed they fork again (5845: `peer3 -> 583f0d93, peer1 -> 32977533` at round 3; 6581:
    `peer3 -> 9b5442a4, peer0 -> efa6ced1` at round 2)."""
    cut_off_after_submitting = {
        5845: [
            Fault(17.72, "coordinator-crash", "coordinator", 28.95),
            Fault(46.67, "coordinator-leave", "coordinator"),
            Fault(46.67, "partition", "peer3", 52.0),
        ],
        6581: [Fault(17.67, "coordinator-leave", "coordinator"), Fault(49.87, "partition", "peer0", 44.0)],
    }
    for seed, schedule in cut_off_after_submitting.items():
        result = simulate(SimConfig(seed=seed, peers=4, rounds=4, schedule=schedule))
        assert result.ok, f"seed {seed}: {result.violations}"
    for seed in (7206, 8771):
        result = simulate(SimConfig(seed=seed, peers=4, rounds=4, faults=ALL_KINDS))
        assert result.ok, f"seed {seed}: {result.violations}"


def test_a_coordinator_back_from_a_restart_takes_the_round_its_peers_are_closing():
    """Found by the 10,000-seed sweep once peer-led manifests needed endorsements (seeds 1332 and
    6625): the coordinator came back while its peers were endorsing a peer-led manifest, saw none
    endorsed yet, and published its own at once; peers that had applied theirs and the coordinator
    forked. Back from a restart, it now leads no round its peers are closing until theirs gets a
    majority or two view timeouts pass (`RoundAgreement._peers_closing`). Seed 3593 (the sweep of the
    final code): with one view timeout it led just as the peers, whose own view timeout ran out at
    the same moment, finished endorsing theirs (`coordinator -> 6567b157, peer2 -> ed7f7134` at round 3)."""
    for seed in (1332, 6625, 3593):
        result = simulate(SimConfig(seed=seed, peers=4, rounds=4, faults=ALL_KINDS))
        assert result.ok, f"seed {seed}: {result.violations}"


def test_crashes_partitions_and_a_coordinator_outage_keep_every_invariant():
    schedule = [
        Fault(15.0, "partition", "peer0", 40.0),
        Fault(30.0, "crash", "peer1", 30.0),
        Fault(45.0, "coordinator-crash", "coordinator", 60.0),
    ]
    result = simulate(SimConfig(seed=11, peers=4, rounds=8, schedule=schedule, profile="volunteers"))
    assert result.ok, result.violations
    assert result.rounds_closed == 8
    assert any("restarts" in line for line in result.trace) or result.rounds_closed == 8


def test_overlapped_peers_keep_every_invariant_and_close_rounds():
    """The production schedule (round r+1 trains while round r settles) under crashes and an outage."""
    for seed in range(8):
        result = simulate(SimConfig(seed=seed, peers=4, rounds=5, overlap=True, faults=ALL_KINDS))
        assert result.ok, f"seed {seed}: {result.violations}"
        assert result.rounds_closed >= 5  # a peer slowed down mid-round catches up later: the others go on


@pytest.mark.parametrize("block", range(4))
def test_random_fault_schedules_keep_every_invariant(block):
    """Seeded fault schedules (every kind, partitions included), a block of seeds per case; a failure names its seed."""
    for seed in range(block * 50, block * 50 + 50):
        result = simulate(SimConfig(seed=seed, peers=4, rounds=4, faults=ALL_KINDS))
        kinds = " ".join(ALL_KINDS)
        assert result.ok, (
            f"seed {seed}: {result.violations}; reproduce with `swarm-sim --seed {seed} --rounds 4 --faults {kinds}`"
        )


def test_swarm_sim_prints_each_seed_and_fails_on_a_bad_argument(capsys):
    levels = {name: logging.getLogger(name).level for name in ("swarm", "models")}
    try:
        assert sim_cli.main(["--seeds", "0..1", "--peers", "2", "--rounds", "2"]) == 0
    finally:  # the command quiets the library's loggers; later tests in this process expect them
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    out = capsys.readouterr().out
    assert "seed 0: 2 rounds" in out and "seed 1: 2 rounds" in out and "2 seeds in" in out
    with pytest.raises(SystemExit, match="unknown attack"):
        sim_cli.main(["--attack", "teleport"])
    with pytest.raises(SystemExit):
        sim_cli.main(["--seeds", "5..2"])


def test_many_transfers_into_one_downlink_lose_goodput_by_the_profiles_fan_in():
    """A transfer booked behind j others into the same downlink takes 1 + fan_in·j times as long
    (the testbed's measured loss); uplinks and the default profile are unaffected."""
    ideal = _network(downlink_mbps=(8, 8), uplink_mbps=(80, 80))
    lossy = _network(downlink_mbps=(8, 8), uplink_mbps=(80, 80), fan_in=0.5)
    for net in (ideal, lossy):
        net.add_node("d")
    ends = {id(net): [net.transfer_time(src, "d", 1_000_000) for src in ("a", "b", "c")] for net in (ideal, lossy)}
    assert ends[id(ideal)] == pytest.approx([1.1, 2.1, 3.1])  # 1 s each, one after the other
    assert ends[id(lossy)] == pytest.approx([1.1, 2.6, 4.6])  # 1, 1.5 and 2 s: one and two flows ahead
    lossy.loop.advance(10)
    assert lossy.transfer_time("a", "d", 1_000_000) == pytest.approx(11.1), "the earlier flows have ended"
    with pytest.raises(ValueError, match="fan_in"):
        _network(fan_in=2.0)


def test_compute_per_payload_delays_a_rounds_close_and_apply():
    """`cpu_s`: a leader's checks and every node's apply take virtual time per payload."""
    quick = simulate(SimConfig(seed=2, peers=3, rounds=2))
    slow = simulate(SimConfig(seed=2, peers=3, rounds=2, cpu_s=(0.5, 0.4)))
    assert quick.ok and slow.ok
    assert statistics.median(slow.all_applied_s) >= statistics.median(quick.all_applied_s) + 1.0
