"""The DHT validator refuses unsigned and malformed values at store time."""

from __future__ import annotations

import msgpack
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer

from swarm.net.records import RUNS_KEY, Heartbeat
from swarm.net.schema import encode_record
from swarm.net.validator import RecordTypes, SwarmRecordValidator
from swarm.node import RECORD_TYPES
from swarm.run import RunConfig

MARKER = b"[owner:ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ]"


def tag(name: str) -> bytes:
    return MSGPackSerializer.dumps(MARKER + b"#" + name.encode())


def record(key: str, value: bytes, subkey: bytes | None = None) -> DHTRecord:
    subkey = tag("Heartbeat") if subkey is None else subkey
    return DHTRecord(DHTID.generate(source=key).to_bytes(), subkey, MSGPackSerializer.dumps(value), 0.0)


def beat() -> Heartbeat:
    return Heartbeat("p", "p", "replica", "cpu", "idle", 0, 0.0, None, 0, 0, "", "0", 0.0)


def test_signed_records_of_ours_pass():
    v = SwarmRecordValidator(RECORD_TYPES)
    assert v.validate(record("swarm/r/heartbeat", encode_record(beat())))
    assert v.validate(record(RUNS_KEY, encode_record(RunConfig(run_id="r")), tag("RunConfig")))


def test_unsigned_garbage_oversized_and_bad_run_descriptions_are_refused():
    v = SwarmRecordValidator(RECORD_TYPES)
    good = encode_record(beat())
    assert not v.validate(record("swarm/r/heartbeat", good, subkey=MSGPackSerializer.dumps(b"plain")))
    assert not v.validate(DHTRecord(DHTID.generate(source="k").to_bytes(), None, MSGPackSerializer.dumps(good), 0.0))
    assert not v.validate(record("swarm/r/heartbeat", b"\xc1 not msgpack"))
    assert not v.validate(record("swarm/r/heartbeat", msgpack.packb({"v": 99, "body": {}})))
    assert not v.validate(record("swarm/r/heartbeat", msgpack.packb({"v": 1, "body": b"x" * 300_000})))
    # A run description breaking its own rules (the mode's options are checked by whoever reads it:
    # swarm.modes.mode_for, since the net layer knows no modes).
    bad_run = msgpack.packb({"v": 1, "body": {"run_id": "r", "batch_size": -1}})
    assert not v.validate(record(RUNS_KEY, bad_run, tag("RunConfig")))


def test_every_record_must_carry_a_known_type_and_match_its_schema():
    import pytest

    from swarm.net.records import Manifest

    v = SwarmRecordValidator(RECORD_TYPES)
    good = encode_record(beat())
    assert not v.validate(record("k", good, MSGPackSerializer.dumps(MARKER))), "untagged"
    assert not v.validate(record("k", good, tag("NoSuchRecord"))), "unknown type"
    assert not v.validate(record("k", good, tag("Manifest"))), "a heartbeat is not a manifest"
    assert not v.validate(record("k", msgpack.packb({"v": 1, "body": {"junk": 1}}))), "schema-violating heartbeat"
    assert not v.validate(record(RUNS_KEY, good)), "only run descriptions under the runs key"
    manifest = Manifest(1, "p", "h", [], [], 0.0)
    assert v.validate(record("k", encode_record(manifest), tag("Manifest")))
    assert RECORD_TYPES.tag(manifest) == "Manifest" and RECORD_TYPES.get("Manifest") is Manifest
    with pytest.raises(TypeError, match="RecordTypes"):
        RECORD_TYPES.tag(object())
    with pytest.raises(ValueError, match="share a name"):
        RecordTypes((Manifest, Manifest), runs_type=RunConfig)


def test_a_thousand_peer_manifest_fits_its_own_limit_and_no_other_record_does():
    """A manifest lists every contribution and score of a round: at 1,000 contributions with clip
    factors it passed the 256 KB every other record keeps (nobody could read the round's manifest;
    found by the simulator); manifests get 1 MiB of their own, and nothing past it."""
    import hashlib

    import pytest

    from swarm.net.records import MAX_MANIFEST_BYTES, Manifest, ManifestEntry
    from swarm.net.schema import MAX_RECORD_BYTES, SchemaError, decode_record, record_limit

    ids = sorted(f"Qm{hashlib.sha256(str(i).encode()).hexdigest()[:44]}" for i in range(1000))

    def manifest(clipped: int) -> bytes:
        scales = {f"blocks.{j}.attn.qkv.weight": 0.5 for j in range(clipped)}
        entries = [ManifestEntry(p, hashlib.sha256(p.encode()).hexdigest(), 20400, scales) for p in ids]
        return encode_record(Manifest(3, ids[0], "h" * 32, entries, [], 0.0, scores=dict.fromkeys(ids, 0.01)))

    v = SwarmRecordValidator(RECORD_TYPES)
    fits, too_large = manifest(4), manifest(40)
    assert MAX_RECORD_BYTES < len(fits) <= MAX_MANIFEST_BYTES < len(too_large)
    assert v.validate(record("k", fits, tag("Manifest"))) and decode_record(Manifest, fits).round == 3
    assert not v.validate(record("k", too_large, tag("Manifest")))
    with pytest.raises(SchemaError, match="limit"):
        decode_record(Manifest, too_large)
    # A heartbeat as large as the manifest that fits is refused: the larger limit is the manifest's.
    padded = beat()
    padded.name = "p" * len(fits)
    assert v.validate(record("k", encode_record(beat()))) and not v.validate(record("k", encode_record(padded)))
    assert record_limit(Heartbeat) == MAX_RECORD_BYTES
