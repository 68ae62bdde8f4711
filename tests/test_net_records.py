"""Signed DHT records: only the coordinator's run description and roles are believed."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgpack
import pytest
from hivemind.utils import get_dht_time

from swarm.net.dht import DHTOptions, SwarmDHT
from swarm.net.identity import Identity, peer_id_from_owner_marker
from swarm.net.records import RUNS_KEY, Heartbeat, Manifest, ManifestEntry, Role, role_key
from swarm.net.schema import SchemaError, decode_record, encode_record
from swarm.node import RECORD_TYPES, fetch_run_description
from swarm.run import RunConfig

LOCAL = DHTOptions(host_maddrs=("/ip4/127.0.0.1/tcp/0",))


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    d = tmp_path_factory.mktemp("ids")
    coordinator = SwarmDHT.start(str(d / "c.key"), LOCAL, RECORD_TYPES)
    boot = tuple(coordinator.visible_maddrs())
    impostor = SwarmDHT.start(str(d / "i.key"), DHTOptions(initial_peers=boot, host_maddrs=LOCAL.host_maddrs), RECORD_TYPES)
    joiner = SwarmDHT.start(str(d / "j.key"), DHTOptions(initial_peers=boot, host_maddrs=LOCAL.host_maddrs), RECORD_TYPES)
    yield coordinator, impostor, joiner
    for node in (coordinator, impostor, joiner):
        node.shutdown()


def test_identity_file_keeps_peer_id(tmp_path):
    path = tmp_path / "id.key"
    first = Identity.load_or_create(path)
    assert Identity.load_or_create(path).peer_id == first.peer_id
    assert peer_id_from_owner_marker(first.owner_marker) == first.peer_id
    assert peer_id_from_owner_marker(first.owner_marker + b"#Heartbeat") == first.peer_id
    assert peer_id_from_owner_marker(b"[owner:not a key]") is None
    assert peer_id_from_owner_marker(b"plain subkey") is None


def test_only_the_coordinators_run_description_is_accepted(nodes):
    coordinator, impostor, joiner = nodes

    async def go():
        fake = RunConfig(run_id="fake", coordinator=coordinator.peer_id, preset="tiny")
        assert await impostor.put(RUNS_KEY, fake, 60)
        # An unsigned value under a plain subkey is stored by hivemind but ignored by us.
        raw = encode_record(RunConfig(run_id="unsigned", coordinator=coordinator.peer_id))
        joiner.dht.store(RUNS_KEY, raw, get_dht_time() + 60, subkey=b"plain")
        with pytest.raises(TimeoutError):
            await fetch_run_description(joiner, coordinator.peer_id, timeout_s=1.0)
        real = RunConfig(run_id="real", coordinator=coordinator.peer_id)
        assert await coordinator.put(RUNS_KEY, real, 60)
        got = await fetch_run_description(joiner, coordinator.peer_id, timeout_s=10)
        assert got.run_id == "real"

    asyncio.run(go())


def test_forged_subkey_is_refused_by_the_dht(nodes):
    coordinator, impostor, joiner = nodes

    async def go():
        key = role_key("r1", joiner.peer_id)
        forged = encode_record(Role(peer_id=joiner.peer_id, kind="replica", data_shard=7))
        # Writing under the coordinator's owner marker without its private key: no valid signature.
        ok = impostor.dht.store(key, forged, get_dht_time() + 60, subkey=coordinator.identity.owner_marker + b"#Role")
        assert not ok
        assert await joiner.get_from(key, Role, coordinator.peer_id) is None
        # A role signed by someone else is readable but is not the coordinator's.
        assert await impostor.put(key, Role(peer_id=joiner.peer_id, kind="replica", data_shard=9), 60)
        assert await joiner.get_from(key, Role, coordinator.peer_id) is None
        assert await coordinator.put(key, Role(peer_id=joiner.peer_id, kind="replica", data_shard=3), 60)
        role = await joiner.get_from(key, Role, coordinator.peer_id)
        assert role is not None and role.record.data_shard == 3

    asyncio.run(go())


def test_schema_violations_are_rejected(nodes):
    coordinator, _impostor, joiner = nodes
    beat: dict[str, Any] = dict(
        peer_id="x",
        name="n",
        role="r",
        device="cpu",
        phase="training",
        round=1,
        tokens_per_s=1.0,
        loss=None,
        bytes_sent=0,
        bytes_received=0,
        param_hash="",
        version="0",
        time=time.time(),
    )
    assert decode_record(Heartbeat, encode_record(Heartbeat(**beat))) == Heartbeat(**beat)
    bad = [
        {**beat, "round": "1"},
        {**beat, "phase": "dancing"},
        {**beat, "extra": 1},
        {k: v for k, v in beat.items() if k != "device"},
        {**beat, "loss": [1.0]},
    ]
    for body in bad:
        with pytest.raises(SchemaError):
            decode_record(Heartbeat, msgpack.packb({"v": 1, "body": body}))
    with pytest.raises(SchemaError):
        decode_record(Heartbeat, b"\xc1garbage")
    with pytest.raises(SchemaError):
        decode_record(Heartbeat, b"x" * 300_000)
    unsorted = {
        "round": 0,
        "leader": "a",
        "base_hash": "h",
        "rejected": [],
        "closed_at": 0.0,
        "entries": [{"peer_id": "b", "digest": "d", "size": 1}, {"peer_id": "a", "digest": "d", "size": 1}],
    }
    with pytest.raises(SchemaError, match="sorted"):
        decode_record(Manifest, msgpack.packb({"v": 1, "body": unsorted}))

    async def go():
        # A record that fails its schema is refused when stored, and would be dropped by a reader.
        ok = coordinator.dht.store(
            "swarm/t/heartbeat",
            msgpack.packb({"v": 1, "body": {"junk": 1}}),
            get_dht_time() + 60,
            subkey=coordinator.identity.owner_marker + b"#Heartbeat",
        )
        assert not ok
        assert await joiner.get_all("swarm/t/heartbeat", Heartbeat) == []
        # A valid record of another type under a key is not read as the expected type.
        assert await coordinator.put("swarm/t/heartbeat", Role(peer_id="x", kind="replica", data_shard=0), 60)
        assert await joiner.get_all("swarm/t/heartbeat", Heartbeat) == []
        with pytest.raises(TypeError):
            await coordinator.put("swarm/t/heartbeat", ManifestEntry("a", "d", 1), 60)  # not a DHT record type

    asyncio.run(go())
    assert ManifestEntry("a", "d", 1).peer_id == "a"
