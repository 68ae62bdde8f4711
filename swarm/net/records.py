"""Every record a peer writes into the DHT: key names, schemas and their validation.

All records are stored under a subkey holding the writer's '[owner:...]' marker, so hivemind's
RSASignatureValidator signs them on store and every node rejects forgeries and overwrites; readers
map the marker back to the writer's peer id (see identity.py). Values are msgpack-encoded
dataclasses (schema.py), checked field by field when read.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
RUNS_KEY = "swarm/runs"  # subkey: coordinator's owner marker -> RunDescription
# A mode whose whole contribution is a few bytes (SPSA) sends it inside its signed submission record
# and the manifest repeats it, so no payload transfer happens; this bounds what a peer can put there.
MAX_INLINE_BYTES = 1024
MAX_MANIFEST_BYTES = 1024 * 1024  # a manifest's own limit (every other record: MAX_RECORD_BYTES)

Phase = Literal["joining", "training", "exchanging", "idle", "leaving", "coordinating"]
RoleKind = Literal["replica", "experts", "stage", "observer"]


def run_key(run_id: str, name: str) -> str:
    return f"swarm/{run_id}/{name}"


def role_key(run_id: str, peer_id: str) -> str:
    return run_key(run_id, f"role/{peer_id}")


def submit_key(run_id: str, round_no: int) -> str:
    return run_key(run_id, f"round/{round_no}/submit")


def manifest_key(run_id: str, round_no: int) -> str:
    return run_key(run_id, f"round/{round_no}/manifest")


def endorse_key(run_id: str, round_no: int) -> str:
    return run_key(run_id, f"round/{round_no}/endorse")


@dataclass
class Capacity:
    """What a joining peer offers: announced under run_key(run, 'peers')."""

    peer_id: str
    name: str
    device: str
    memory_gb: float
    tokens_per_s: float
    addrs: list[str] = field(default_factory=list)
    version: str = ""
    invite: str = ""  # under the invite policy: the proof of a token bound to this peer id (swarm/processes/admission.py)

    def __post_init__(self) -> None:
        if len(self.invite) > MAX_INVITE_CHARS:
            raise ValueError(f"an invite proof is at most {MAX_INVITE_CHARS} characters")


MAX_INVITE_CHARS = 256


@dataclass
class Role:
    """The coordinator's assignment for one peer (general over training modes)."""

    peer_id: str
    kind: RoleKind
    data_shard: int
    experts: list[tuple[int, int]] = field(default_factory=list)  # (layer, expert) owned in MoE mode
    stage: int | None = None  # pipeline stage index
    replica_group: int | None = None  # which pipelined replica the stage belongs to
    assigned_at: float = 0.0
    group_peers: list[str] = field(default_factory=list)  # a pipeline group's peers, in stage order
    layer_cuts: list[int] = field(default_factory=list)  # the group's block boundaries between stages

    def __post_init__(self) -> None:
        if self.data_shard < 0:
            raise ValueError("data_shard must be >= 0")
        if self.kind == "stage":
            if self.stage is None or not 0 <= self.stage < len(self.group_peers):
                raise ValueError("a stage role needs a stage index within its group")
            if self.group_peers[self.stage] != self.peer_id or len(set(self.group_peers)) != len(self.group_peers):
                raise ValueError("a stage role's group must list each peer once, this one at its stage")
            if len(self.layer_cuts) != len(self.group_peers) - 1 or self.layer_cuts != sorted(set(self.layer_cuts)):
                raise ValueError("a stage role needs one increasing layer cut between each two stages")


@dataclass
class Roster:
    """The coordinator's table of admitted peers and their current roles, under run_key(run, 'roster').

    Signed by the coordinator and long-lived, so it stands while the coordinator is down; the status
    page draws who-trains-what from it (e.g. the SPES ownership map).
    """

    roles: list[Role]
    updated_at: float

    def __post_init__(self) -> None:
        ids = [r.peer_id for r in self.roles]
        if len(set(ids)) != len(ids):
            raise ValueError("a roster lists each peer once")


@dataclass
class Heartbeat:
    """A peer's periodic status, read by other peers (liveness, leader choice) and the status page."""

    peer_id: str
    name: str
    role: str
    device: str
    phase: Phase
    round: int
    tokens_per_s: float
    loss: float | None
    bytes_sent: int
    bytes_received: int
    param_hash: str  # hash of the global weights this peer holds at `round` ("" if none yet)
    version: str
    time: float
    is_coordinator: bool = False
    steps: int = 0
    addrs: list[str] = field(default_factory=list)
    reachable: bool = True  # others can dial it (False: behind NAT; never leads or donates state)
    links: dict[str, float] = field(default_factory=dict)  # activation bytes/s to + from each link neighbour, last round
    ram_bytes: int = 0  # the process's resident memory now
    device_bytes: int = 0  # accelerator memory at its peak in the last round (0 on the CPU)
    round_bytes_in: int = 0  # bytes received over transfers in the last round (payloads, state)
    round_bytes_out: int = 0
    partial: bool = False  # holds part of the state (a pipeline stage): never leads or endorses


@dataclass
class Submission:
    """'My pseudo-gradient for this round is the payload with this digest; fetch it from me.'"""

    peer_id: str
    round: int
    digest: str
    size: int
    base_hash: str  # hash of the global weights the pseudo-gradient was computed against
    tokens: int
    loss: float | None
    inline: bytes = b""  # the payload itself, in modes that carry it in the record (digest and size still name it)

    def __post_init__(self) -> None:
        _check_inline(self.inline)


@dataclass
class ManifestEntry:
    peer_id: str
    digest: str
    size: int
    scales: dict[str, float] = field(default_factory=dict)  # clip factors in (0, 1] of tensors above the round's median norm
    inline: bytes = b""  # the sender's inline payload (modes that carry it in the record)

    def __post_init__(self) -> None:
        _check_inline(self.inline)


def _check_inline(data: bytes) -> None:
    if len(data) > MAX_INLINE_BYTES:
        raise ValueError(f"an inline payload holds at most {MAX_INLINE_BYTES} bytes, got {len(data)}")


@dataclass
class Rejection:
    peer_id: str
    reason: str
    fault: bool = False  # the sender's fault: everyone who applies the manifest counts a strike


@dataclass
class Manifest:
    """The agreed set of payloads of one round, in application order (sorted by peer id)."""

    round: int
    leader: str
    base_hash: str  # the global weights every entry was computed against
    entries: list[ManifestEntry]
    rejected: list[Rejection]
    closed_at: float
    eval_loss: float | None = None  # the leader's eval loss of the base weights, when it measured one
    missing: list[str] = field(default_factory=list)  # expected peers that delivered nothing in time
    # The leader's score of each contribution it measured: the share of the probe loss it removes
    # (swarm/round/usefulness.py; positive helps). Only the coordinator's count toward standing.
    scores: dict[str, float] = field(default_factory=dict)
    # sha256 of the round's aggregate (the listed payloads' clipped mean, compressed again), which
    # nodes apply instead of fetching every payload; "" when there is none. Only the coordinator's.
    aggregate: str = ""
    proof: bytes = b""  # the leader's signature of the manifest without this field (swarm/round/evidence.py)
    # Larger than other records: it lists a round's every contribution and score (about 210 bytes
    # each, plus clip factors: 1,000 contributions took 212-550 KB, past MAX_RECORD_BYTES, so no
    # node read the manifest of a 1,000-peer round; found by the simulator).
    MAX_BYTES: ClassVar[int] = MAX_MANIFEST_BYTES

    def __post_init__(self) -> None:
        ids = [e.peer_id for e in self.entries]
        if ids != sorted(set(ids)):
            raise ValueError("manifest entries must be sorted by peer id and unique")
        if not set(self.scores) <= set(ids) | {r.peer_id for r in self.rejected}:
            raise ValueError("a manifest scores only the contributions it lists or rejects")
        if not all(math.isfinite(v) for v in self.scores.values()):
            raise ValueError("manifest scores must be finite")
        if self.aggregate and not re.fullmatch(r"[0-9a-f]{64}", self.aggregate):
            raise ValueError("a manifest's aggregate is a sha256 digest in hex")


@dataclass
class Endorsement:
    """'I take this peer-led manifest of round r': a member's one consent per round. A manifest led
    by a peer counts once a strict majority of the members with standing endorse it, so two
    manifests of one round cannot both count, even when the swarm is cut in two."""

    round: int
    peer_id: str
    leader: str
    digest: str  # sha256 hex of the manifest as encoded (its proof included)

    def __post_init__(self) -> None:
        if not _SHA256_HEX.match(self.digest):
            raise ValueError("an endorsement names a manifest by its sha256 (64 hex digits)")


@dataclass
class Equivocation:
    """Proof that `accused` signed two different manifests for one round: both manifests as encoded
    (each carrying the accused's signature in `proof`) and the accused's public key (its DHT owner
    marker, from which its peer id follows). Anyone can check it; nobody can forge it."""

    round: int
    accused: str
    owner: bytes
    first: bytes
    second: bytes


@dataclass
class Evidence:
    """The equivocations a peer has witnessed (most recent few), published for everyone to check."""

    items: list[Equivocation]
    # Room for one proof against two of the largest manifests (a publisher sends what fits).
    MAX_BYTES: ClassVar[int] = 2 * MAX_MANIFEST_BYTES + 64 * 1024


@dataclass
class Event:
    time: float
    kind: str  # join, leave, reject, reload, round, ...
    text: str


@dataclass
class EventLog:
    """The writer's most recent events (bounded), replaced on every update."""

    peer_id: str
    events: list[Event]


@dataclass
class FileHolder:
    """'I serve the file with this sha256 and size': under run_key(run, 'files/<sha256>')."""

    peer_id: str
    sha256: str
    size: int
    time: float

    def __post_init__(self) -> None:
        if not _SHA256_HEX.match(self.sha256):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        if self.size < 0:
            raise ValueError("size must be >= 0")


@dataclass
class Ledger:
    """The coordinator's count of each peer's standing after the manifests of rounds < `round`
    (swarm/round/admission.py): what a joiner, a node that reloaded, or a restarted coordinator
    adopts, so strikes, bans and useful work carry over whoever was there when they were earned.
    Under run_key(run, 'ledger'), signed by the coordinator; only the coordinator's counts."""

    round: int
    useful: dict[str, int] = field(default_factory=dict)  # capped at the run's probation
    strikes: dict[str, int] = field(default_factory=dict)
    banned_until: dict[str, int] = field(default_factory=dict)
    absent: dict[str, int] = field(default_factory=dict)
    credit: dict[str, float] = field(default_factory=dict)  # measured gains a peer may spend on a share that hurts

    def __post_init__(self) -> None:
        for name in ("useful", "strikes", "banned_until", "absent", "credit"):
            counts = getattr(self, name)
            if len(counts) > MAX_LEDGER_PEERS:
                raise ValueError(f"a ledger lists at most {MAX_LEDGER_PEERS} peers per count, got {len(counts)}")
            if any(not (v >= 0) for v in counts.values()):  # also refuses NaN credit
                raise ValueError(f"ledger counts must be >= 0 ({name})")
        if any(not math.isfinite(v) or v > 1.0 for v in self.credit.values()):
            raise ValueError("ledger credit must be a finite fraction of the loss")


MAX_LEDGER_PEERS = 4096

# Every record type of this module that nodes store, in one place: the DHT validator is built from it
# plus the run description type (swarm/node.py). A new record type is added here.
RECORD_TYPES: tuple[type, ...] = (
    Capacity,
    Role,
    Roster,
    Heartbeat,
    Submission,
    Manifest,
    Endorsement,
    Evidence,
    EventLog,
    FileHolder,
    Ledger,
)
