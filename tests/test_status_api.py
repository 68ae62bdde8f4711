"""The status JSON API against a live local swarm: coordinator + 2 peers + `swarm-status`, then the coordinator killed."""

from __future__ import annotations

import math
import re
import urllib.error
import urllib.request

import pytest
from swarm_fixtures import (
    NANO_RUN,
    get_json,
    kill_hard,
    log_text,
    reap,
    start_coordinator,
    start_peer,
    start_status,
    wait_for,
)

from models import count_parameters, get_preset

pytestmark = pytest.mark.slow
PARAMS = count_parameters(get_preset("nano"))
TTL = NANO_RUN["heartbeat_ttl_s"]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("status-api")
    procs = []
    try:
        coord, address = start_coordinator(tmp)
        procs.append(coord)
        procs += [start_peer(address, "alice", tmp), start_peer(address, "bob", tmp)]
        status, url = start_status(address, tmp)
        procs.append(status)
        run_id = re.search(r"run (run-\w+):", log_text(coord)).group(1)
        yield {"tmp": tmp, "coord": coord, "address": address, "url": url, "run_id": run_id, "procs": procs}
    finally:
        reap(procs)


def api(url: str, route: str) -> dict | list:
    return get_json(url + route.lstrip("/"))


def training(url: str) -> dict | None:
    """The summary once two peers train and two rounds have closed, else None."""
    s = api(url, "/api/summary")
    return s if s["live_peers"] == 2 and s["rounds_recorded"] >= 2 and (s["round"] or 0) >= 2 else None


def test_summary_describes_the_run(swarm):
    s = wait_for(lambda: training(swarm["url"]), 120, what="two training peers and two closed rounds")
    assert s["run_id"] == swarm["run_id"] and s["mode"] == "sparseloco" and s["codec"] == "sparseloco"
    assert s["preset"] == "nano" and s["parameters"] == PARAMS and s["inner_steps"] == NANO_RUN["inner_steps"]
    assert s["coordinator"]["state"] == "live" and s["coordinator"]["peer_id"] == swarm["address"].rsplit("/p2p/")[1]
    assert s["elapsed_s"] > 0 and math.isfinite(s["eval_loss"]) and s["total_tokens"] > 0
    assert s["compression"] > 20  # SparseLoCo payloads vs 4 bytes x parameters
    assert s["dense_bytes_total"] > s["payload_bytes_total"] > 0
    assert s["heartbeat_ttl_s"] == TTL and s["observer"]["polls"] > 0


def test_peers_lists_every_live_peer(swarm):
    def both_sent_a_payload() -> list | None:  # a payload is sent when the round's leader fetches it
        peers = api(swarm["url"], "/api/peers")
        sent = [p["bytes_sent"] > 0 for p in peers if p["name"] in ("alice", "bob")]
        return peers if sent == [True, True] else None

    by_name = {p["name"]: p for p in wait_for(both_sent_a_payload, 60, what="both peers to send a payload")}
    assert {"coordinator", "alice", "bob"} <= set(by_name)
    for name in ("alice", "bob"):
        p = by_name[name]
        assert p["state"] == "live" and not p["is_coordinator"] and p["role"].startswith("replica shard")
        assert p["device"] == "cpu" and p["version"] and p["heartbeat_age_s"] < TTL
        assert p["bytes_received"] > 0 and p["round"] >= 0
        assert p["short_id"] == p["peer_id"][-8:] and p["addrs"]
    assert by_name["coordinator"]["is_coordinator"]


def test_history_has_consecutive_rounds_with_costs_and_losses(swarm):
    history = api(swarm["url"], "/api/history")
    rounds = history["rounds"]
    numbers = [r["round"] for r in rounds]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))) and len(numbers) >= 2
    for r in rounds:
        assert r["dense_bytes"] == 4 * PARAMS * r["payloads"]
        assert 0 < r["payload_bytes"] < r["dense_bytes"]
        assert r["eval_loss"] is None or math.isfinite(r["eval_loss"])
    assert any(r["train_loss"] is not None for r in rounds) and any(r["eval_loss"] is not None for r in rounds)
    assert history["peers_over_time"] and history["peers_over_time"][-1]["live"] == 2


def test_events_show_joins_and_roles(swarm):
    events = api(swarm["url"], "/api/events")
    kinds = {(e["kind"], e["name"]) for e in events}
    assert ("join", "alice") in kinds and ("join", "bob") in kinds
    assert any(e["kind"] == "role" for e in events)
    times = [e["time"] for e in events]
    assert times == sorted(times, reverse=True)


def test_all_is_the_sections_together_and_round_advances(swarm):
    everything = api(swarm["url"], "/api/all")
    assert set(everything) >= {"api_version", "generated_at", "summary", "peers", "history", "events"}
    start = everything["summary"]["round"]
    wait_for(lambda: api(swarm["url"], "/api/summary")["round"] >= start + 2, 60, what="the round to advance")


def test_live_api_is_read_only(swarm):
    request = urllib.request.Request(swarm["url"] + "api/peers", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 405


def test_pages_keep_working_with_the_coordinator_killed(swarm):
    url = swarm["url"]
    peer = next(p for p in api(url, "/api/peers") if p["name"] == "alice")
    kill_hard(swarm["coord"])
    killed_at = api(url, "/api/summary")["round"]

    def coordinator_gone_and_rounds_go_on() -> bool:
        s = api(url, "/api/summary")
        return s["coordinator"]["state"] in ("stale", "departed") and s["round"] >= killed_at + 2

    wait_for(coordinator_gone_and_rounds_go_on, 90, what="peers to lead rounds without the coordinator")
    # A fresh status server that only knows a peer's address, started while the coordinator is dead.
    coordinator_id = swarm["address"].rsplit("/p2p/", 1)[1]
    proc, url2 = start_status(peer["addrs"][0], swarm["tmp"], coordinator=coordinator_id)
    swarm["procs"].append(proc)
    s = wait_for(lambda: training(url2), 90, what="the standalone page to see the swarm")
    assert s["run_id"] == swarm["run_id"] and s["coordinator"]["state"] != "live"
    assert s["history_from_round"] == 0 and s["rounds_recorded"] >= killed_at  # read back from the peers
    events = api(url2, "/api/events")
    assert any(e["kind"] == "join" and e["name"] == "alice" for e in events)
    wait_for(lambda: api(url2, "/api/summary")["round"] >= s["round"] + 2, 60, what="rounds on the standalone page")
