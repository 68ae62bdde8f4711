"""A DHT record validator that refuses, at store time, values no honest swarm node writes.

Every record a swarm node stores carries its type in its subkey ('[owner:...]#Manifest', see
`SwarmDHT.put`). hivemind's RSASignatureValidator checks the signature of records under an owner
marker; this one runs after it (on the stripped value) and refuses:
  * any record whose subkey carries no owner marker (unsigned: anyone could overwrite it);
  * any record without a known type tag (the `RecordTypes` the node was given), or whose value is not a valid record of
    that type under its full schema (swarm/net/schema.py), or larger than MAX_RECORD_BYTES;
  * anything under RUNS_KEY but a valid run description.
DHT keys are hashed, so the validator cannot tell which record a key should hold; readers check
that the tag is the type they expect (`SwarmDHT.get_all`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import msgpack
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer

from swarm.net.records import RUNS_KEY
from swarm.net.schema import MAX_RECORD_BYTES, SCHEMA_VERSION, SchemaError, decode_record, record_limit

_SUBKEY = re.compile(rb"\[owner:[^\]]+\]#([A-Za-z][A-Za-z0-9_]{0,63})")


class RecordTypes:
    """The record types a swarm stores in the DHT, by tag. The application hands them in (this layer
    knows none of them but its own records); `runs_type` is the only type allowed under RUNS_KEY."""

    def __init__(self, types: Sequence[type], *, runs_type: type):
        self.by_tag = {t.__name__: t for t in (runs_type, *types)}
        if len(self.by_tag) != len(types) + 1:
            raise ValueError("two record types share a name")
        self.runs_type = runs_type

    def get(self, tag: str) -> type | None:
        return self.by_tag.get(tag)

    def tag(self, record: object) -> str:
        """The tag a record is stored under; a type not in the table is a programming error."""
        tag = type(record).__name__
        if self.by_tag.get(tag) is not type(record):
            raise TypeError(f"{tag} is not a DHT record type: add it to the node's RecordTypes")
        return tag


def _envelope_ok(data: object, limit: int = MAX_RECORD_BYTES) -> bool:
    if not isinstance(data, bytes) or len(data) > limit:
        return False
    try:
        outer = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=limit)
    except Exception:  # msgpack raises many types on garbage
        return False
    return isinstance(outer, dict) and set(outer) == {"v", "body"} and outer["v"] == SCHEMA_VERSION


class SwarmRecordValidator(RecordValidatorBase):
    def __init__(self, types: RecordTypes) -> None:
        self.types = types
        self._runs_key = DHTID.generate(source=RUNS_KEY).to_bytes()

    def validate(self, record: DHTRecord) -> bool:
        if record.subkey is None:
            return False
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value)
        except Exception:
            return False
        match = _SUBKEY.fullmatch(subkey) if isinstance(subkey, bytes) else None
        cls = self.types.get(match.group(1).decode()) if match is not None else None
        if cls is None or not _envelope_ok(value, record_limit(cls)):
            return False
        if record.key == self._runs_key and cls is not self.types.runs_type:
            return False
        try:
            decode_record(cls, value)
        except SchemaError:
            return False
        return True

    @property
    def priority(self) -> int:
        return 0  # after the signature check (10), on the stripped value
