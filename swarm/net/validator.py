"""A DHT record validator that refuses, at store time, values no honest swarm node writes.

hivemind's RSASignatureValidator checks the signature of records under an `[owner:...]` subkey but
lets unprotected records through; this one runs after it (on the stripped value) and refuses:
  * any record whose subkey carries no owner marker (unsigned: anyone could overwrite it);
  * values that are not one of our versioned msgpack records, or larger than MAX_RECORD_BYTES;
  * run descriptions (RUNS_KEY) that fail their schema.
Other records are checked against their own schema when read (swarm/net/dht.py); keys under a run
are not known to the DHT process, which starts before the run description is fetched.
"""

from __future__ import annotations

import re

import msgpack
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer

from swarm.net.records import RUNS_KEY
from swarm.net.schema import MAX_RECORD_BYTES, SCHEMA_VERSION, SchemaError, decode_record

_OWNER = re.compile(rb"\[owner:.+\]")


def _envelope_ok(data: object) -> bool:
    if not isinstance(data, bytes) or len(data) > MAX_RECORD_BYTES:
        return False
    try:
        outer = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_RECORD_BYTES)
    except Exception:  # msgpack raises many types on garbage
        return False
    return isinstance(outer, dict) and set(outer) == {"v", "body"} and outer["v"] == SCHEMA_VERSION


class SwarmRecordValidator(RecordValidatorBase):
    def __init__(self) -> None:
        self._runs_key = DHTID.generate(source=RUNS_KEY).to_bytes()

    def validate(self, record: DHTRecord) -> bool:
        if record.subkey is None or not _OWNER.search(record.subkey):
            return False
        try:
            value = MSGPackSerializer.loads(record.value)
        except Exception:
            return False
        if not _envelope_ok(value):
            return False
        if record.key == self._runs_key:
            from swarm.run import RunConfig  # imported late: the modes it validates import torch

            try:
                decode_record(RunConfig, value)
            except SchemaError:
                return False
        return True

    @property
    def priority(self) -> int:
        return 0  # after the signature check (10), on the stripped value
