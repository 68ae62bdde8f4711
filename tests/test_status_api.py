"""The status JSON API against a live local swarm: coordinator + 2 peers + `swarm-status`, then the coordinator killed.

The same swarm also writes TensorBoard event files (coordinator and alice), checked against their JSONL rows.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from launch.cluster import NANO_RUN, LocalCluster, get_json, wait_for
from models import count_parameters, get_preset

pytestmark = pytest.mark.slow
PARAMS = count_parameters(get_preset("nano"))
TTL = NANO_RUN["heartbeat_ttl_s"]
TENSORBOARD = importlib.util.find_spec("tensorboard") is not None  # in the test extra


class Swarm(NamedTuple):
    cluster: LocalCluster
    url: str  # the swarm-status page joined through the coordinator
    run_id: str


@contextmanager
def training_swarm(workdir: Path) -> Iterator[Swarm]:
    """Coordinator, alice and bob, and a status server, once its summary shows them training."""
    tb = ["--tensorboard", str(workdir / "tb")] if TENSORBOARD else []
    with LocalCluster(workdir, NANO_RUN, coordinator_args=tb) as cluster:
        cluster.add_peer("alice", device="cpu", extra=tb)
        cluster.add_peer("bob", device="cpu")
        url = cluster.start_status()
        wait_for(lambda: training(url), 120, "two training peers and two closed rounds", cluster)
        run_id = re.search(r"run (run-\w+):", cluster.log("coordinator"))
        assert run_id, cluster.log("coordinator")
        yield Swarm(cluster, url, run_id.group(1))


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """Shared by the tests that leave the swarm as they found it."""
    with training_swarm(tmp_path_factory.mktemp("status-api")) as s:
        yield s


def api(url: str, route: str) -> Any:
    return get_json(url + route.lstrip("/"))


def training(url: str) -> dict | None:
    """The summary once two peers train and two rounds have closed, else None."""
    s = api(url, "/api/summary")
    return s if s["live_peers"] == 2 and s["rounds_recorded"] >= 2 and (s["round"] or 0) >= 2 else None


def test_summary_describes_the_run(swarm: Swarm) -> None:
    s = api(swarm.url, "/api/summary")
    assert s["run_id"] == swarm.run_id and s["mode"] == "sparseloco" and s["codec"] == "sparseloco"
    assert s["preset"] == "nano" and s["parameters"] == PARAMS and s["inner_steps"] == NANO_RUN["inner_steps"]
    assert s["coordinator"]["state"] == "live" and s["coordinator"]["peer_id"] == swarm.cluster.address.rsplit("/p2p/")[1]
    assert s["elapsed_s"] > 0 and math.isfinite(s["eval_loss"]) and s["total_tokens"] > 0
    assert s["compression"] > 20  # SparseLoCo payloads vs 4 bytes x parameters
    assert s["dense_bytes_total"] > s["payload_bytes_total"] > 0
    assert s["heartbeat_ttl_s"] == TTL and s["observer"]["polls"] > 0


def test_peers_lists_every_live_peer(swarm: Swarm) -> None:
    def both_sent_a_payload() -> list | None:  # a payload is sent when the round's leader fetches it
        peers = api(swarm.url, "/api/peers")
        sent = [p["bytes_sent"] > 0 for p in peers if p["name"] in ("alice", "bob")]
        return peers if sent == [True, True] else None

    by_name = {p["name"]: p for p in wait_for(both_sent_a_payload, 60, "both peers to send a payload", swarm.cluster)}
    assert {"coordinator", "alice", "bob"} <= set(by_name)
    for name in ("alice", "bob"):
        p = by_name[name]
        assert p["state"] == "live" and not p["is_coordinator"] and p["role"].startswith("replica shard")
        assert p["device"] == "cpu" and p["version"] and p["heartbeat_age_s"] < TTL
        assert p["bytes_received"] > 0 and p["round"] >= 0
        assert p["short_id"] == p["peer_id"][-8:] and p["addrs"]
    assert by_name["coordinator"]["is_coordinator"]


def test_history_has_consecutive_rounds_with_costs_and_losses(swarm: Swarm) -> None:
    history = api(swarm.url, "/api/history")
    rounds = history["rounds"]
    numbers = [r["round"] for r in rounds]
    assert len(numbers) >= 2 and numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    for r in rounds:
        assert r["dense_bytes"] == 4 * PARAMS * r["payloads"]
        assert 0 < r["payload_bytes"] < r["dense_bytes"]
        assert r["eval_loss"] is None or math.isfinite(r["eval_loss"])
    assert any(r["train_loss"] is not None for r in rounds) and any(r["eval_loss"] is not None for r in rounds)
    assert history["peers_over_time"] and history["peers_over_time"][-1]["live"] == 2


def test_events_show_joins_and_roles(swarm: Swarm) -> None:
    def joined() -> list | None:  # each peer's event log reaches the page on its next DHT read
        events = api(swarm.url, "/api/events")
        kinds = {(e["kind"], e["name"]) for e in events}
        return events if ("join", "alice") in kinds and ("join", "bob") in kinds else None

    events = wait_for(joined, 60, "both joins on the page", swarm.cluster)
    assert any(e["kind"] == "role" for e in events)
    times = [e["time"] for e in events]
    assert times == sorted(times, reverse=True)


def test_all_is_the_sections_together_and_round_advances(swarm: Swarm) -> None:
    everything = api(swarm.url, "/api/all")
    assert set(everything) >= {"api_version", "generated_at", "summary", "peers", "history", "events"}
    start = everything["summary"]["round"]
    wait_for(lambda: api(swarm.url, "/api/summary")["round"] >= start + 2, 60, "the round to advance", swarm.cluster)


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written right now
            break
    return rows


@pytest.mark.skipif(not TENSORBOARD, reason="tensorboard is not installed (it is in the test extra)")
def test_tensorboard_carries_the_jsonl_rows(swarm: Swarm) -> None:
    workdir = swarm.cluster.workdir
    (alice_tb,) = (workdir / "tb").glob("peer-*")

    def two_rounds_in_the_event_files() -> tuple | None:
        # The coordinator writes a round's row once its evaluation is done, off the round's path.
        # Event files first: every row they hold was written to the JSONL just before.
        coordinator, alice = tensorboard_scalars(workdir / "tb" / "coordinator"), tensorboard_scalars(alice_tb)
        rows = {r["round"]: r for r in jsonl(workdir / "coordinator" / "rounds.jsonl") if not r.get("final")}
        return (coordinator, alice, rows) if len(coordinator.get("payload_bytes", {})) >= 2 else None

    coordinator, alice, rows = wait_for(two_rounds_in_the_event_files, 90, "two rounds in TensorBoard", swarm.cluster)
    assert {"eval_loss", "applied", "rejected", "payload_bytes"} <= set(coordinator)
    common = set(coordinator["payload_bytes"]) & set(rows)
    assert len(common) >= 2 and set(coordinator["payload_bytes"]) <= set(rows)
    for r in common:
        # TensorBoard keeps float32 scalars
        assert coordinator["payload_bytes"][r] == pytest.approx(rows[r]["payload_bytes"], rel=1e-6)
        assert coordinator["applied"][r] == rows[r]["applied"]
    peer_rows = {r["round"]: r for r in jsonl(workdir / "metrics" / f"{alice_tb.name}.jsonl")}
    assert {"loss", "tokens_per_s", "bytes_sent", "bytes_received", "round_s"} <= set(alice)
    assert set(alice["bytes_sent"]) <= set(peer_rows) and alice["bytes_sent"]
    for r, sent in alice["bytes_sent"].items():
        assert sent == pytest.approx(peer_rows[r]["bytes_sent"], rel=1e-6)


def test_live_api_is_read_only(swarm: Swarm) -> None:
    request = urllib.request.Request(swarm.url + "api/peers", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 405


def test_pages_keep_working_with_the_coordinator_killed(tmp_path: Path) -> None:
    # Its own swarm: killing the shared one's coordinator would change what the other tests see.
    with training_swarm(tmp_path) as swarm:
        cluster, url = swarm.cluster, swarm.url
        peer = next(p for p in api(url, "/api/peers") if p["name"] == "alice")
        cluster.kill("coordinator")
        killed_at = api(url, "/api/summary")["round"]

        def coordinator_gone_and_rounds_go_on() -> bool:
            s = api(url, "/api/summary")
            return s["coordinator"]["state"] in ("stale", "departed") and s["round"] >= killed_at + 2

        wait_for(coordinator_gone_and_rounds_go_on, 90, "peers to lead rounds without the coordinator", cluster)
        # A fresh status server that only knows a peer's address, started while the coordinator is dead.
        coordinator_id = cluster.address.rsplit("/p2p/", 1)[1]
        url2 = cluster.start_status(peer["addrs"][0], name="status-standalone", coordinator=coordinator_id)
        s = wait_for(lambda: training(url2), 90, "the standalone page to see the swarm", cluster)
        assert s["run_id"] == swarm.run_id and s["coordinator"]["state"] != "live"
        assert s["history_from_round"] == 0 and s["rounds_recorded"] >= killed_at  # read back from the peers
        events = api(url2, "/api/events")
        assert any(e["kind"] == "join" and e["name"] == "alice" for e in events)
        wait_for(lambda: api(url2, "/api/summary")["round"] >= s["round"] + 2, 60, "rounds on the standalone page", cluster)
