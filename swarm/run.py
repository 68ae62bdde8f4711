"""The run description: one signed, versioned dataclass that tells a volunteer everything.

The coordinator publishes it in the DHT under RUNS_KEY with its own owner marker; a joiner accepts
it only if the marker's peer id equals the coordinator peer id in the address it was given.
"""

from __future__ import annotations

import dataclasses
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Literal, get_args

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_PEER_ID = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{16,128}$")  # base58, as libp2p writes peer ids


SHARDS_SOURCE = "shards"  # RunConfig.data_source of a run whose corpus is its shard list
SWARM = "swarm"  # a source meaning: any node of the run that serves it
SHARD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".txt", ".md", ".py")

SourceKind = Literal["swarm", "http", "local"]


@dataclass
class CorpusShard:
    """One file of the corpus, named by its content."""

    name: str  # a plain file name; its suffix says the format (SHARD_SUFFIXES)
    sha256: str  # hex digest of the file's bytes: the shard's identity
    size: int  # bytes
    sources: list[str] = field(default_factory=lambda: [SWARM])  # tried in order

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or ".." in self.name:
            raise ValueError(f"shard name {self.name!r:.80} must be a plain file name (letters, digits, '._-')")
        if not self.name.lower().endswith(SHARD_SUFFIXES):
            raise ValueError(f"shard {self.name!r}: unknown format, expected one of {', '.join(SHARD_SUFFIXES)}")
        if not _SHA256.match(self.sha256):
            raise ValueError(f"shard {self.name!r}: sha256 must be 64 lowercase hex digits")
        if self.size <= 0:
            raise ValueError(f"shard {self.name!r}: size must be positive, got {self.size}")
        if not self.sources:
            raise ValueError(f"shard {self.name!r} has no source")
        for source in self.sources:
            source_kind(source)


def source_kind(source: str) -> SourceKind:
    """'swarm', an http(s) URL, or a local path; any other URL scheme is refused."""
    if source == SWARM:
        return "swarm"
    if source.startswith(("http://", "https://")):
        return "http"
    if not source or "://" in source:
        raise ValueError(f"shard source {source!r:.100} is not 'swarm', an http(s) URL or a local path")
    return "local"


Codec = Literal["sparseloco", "dense-fp32", "dense-fp16"]


@dataclass
class OuterConfig:
    """How pseudo-gradients are compressed, averaged and applied each round."""

    codec: Codec = "sparseloco"
    outer_lr: float = 1.0  # alpha; the modes recommend theirs (SparseLoCo 2.5, dense DiLoCo 0.7)
    # alpha at the run's last round (max_rounds), reached linearly from outer_lr; 0 = constant alpha
    outer_lr_final: float = 0.0
    momentum: float = 0.0  # SparseLoCo needs none: the decayed error buffer plays that part
    nesterov: bool = False
    topk_per_chunk: int = 64  # 64 of 4096 = 1.56% density, the paper's setting
    chunk_size: int = 64  # matrices are cut into chunk_size x chunk_size blocks
    error_decay: float = 0.95  # beta of the error-feedback buffer
    overlap: bool = True  # train round r+1 while round r's manifest settles (one-step-delayed update, swarm/round/overlap.py)
    trim: float = 0.0  # coordinate-wise trimmed mean: fraction of contributions dropped at each end (dense codecs)

    def __post_init__(self) -> None:
        if not 0 < self.outer_lr <= 10:
            raise ValueError(f"outer_lr must be in (0, 10], got {self.outer_lr}")
        if not 0 <= self.outer_lr_final <= 10:
            raise ValueError(f"outer_lr_final must be in [0, 10] (0: a constant outer lr), got {self.outer_lr_final}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 < self.topk_per_chunk <= self.chunk_size**2:
            raise ValueError("topk_per_chunk must be in (0, chunk_size^2]")
        if not 0 <= self.error_decay <= 1:
            raise ValueError("error_decay must be in [0, 1]")
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {self.trim}")
        if self.trim and self.codec == "sparseloco":
            raise ValueError(
                "a trimmed mean needs a dense codec: sparse contributions are zero almost everywhere, trimming would drop their signal"
            )


AdmissionPolicy = Literal["open", "allow-list", "invite"]
# The run description is one DHT record (at most 256 KiB, swarm/net/schema.py): 2,000 peer ids of
# 46 characters take ~96 KiB of it, leaving room for a corpus list. A bigger closed run uses invites.
MAX_ALLOW = 2000


@dataclass
class AdmissionConfig:
    """Whom the coordinator admits as a member (docs/security.md, "Admission policies").

    open: anyone who announces itself; allow-list: the peer ids in `allow`; invite: a peer that
    proves it holds a token minted by `swarm-coordinator invite` (swarm/processes/admission.py). The
    token secret stays in the coordinator's state dir: nothing here lets anyone check or forge one.
    """

    policy: AdmissionPolicy = "open"
    allow: list[str] = field(default_factory=list)  # allow-list: the admitted peer ids (public, as the run is)
    invite_uses: int = 1  # invite: identities one token admits (more than 1: a team sharing a token)
    # New identities admitted per hour from one network prefix (IPv4 /24, IPv6 /48) of the addresses
    # a peer announces; 0 = no limit. Announced addresses are self-reported: this binds honest
    # clients and lazy Sybils, not an attacker who announces made-up addresses.
    per_prefix_per_hour: int = 0
    # Rounds of measured useful work before a newcomer's contributions, votes and leadership count.
    probation_rounds: int = 2

    def __post_init__(self) -> None:
        if self.policy not in get_args(AdmissionPolicy):
            raise ValueError(f"admission policy must be one of {', '.join(get_args(AdmissionPolicy))}, got {self.policy!r:.40}")
        if self.allow and self.policy != "allow-list":
            raise ValueError(f"an allow list goes with the allow-list policy only, not {self.policy!r}")
        if len(self.allow) > MAX_ALLOW:
            raise ValueError(f"an allow list holds at most {MAX_ALLOW} peer ids, got {len(self.allow)}: use invite tokens")
        for peer in self.allow:
            if not isinstance(peer, str) or not _PEER_ID.match(peer):
                raise ValueError(f"allow list entry {peer!r:.80} is not a peer id (base58, like Qm…)")
        if len(set(self.allow)) != len(self.allow):
            raise ValueError("the allow list names a peer id twice")
        if not 1 <= self.invite_uses <= 1000:
            raise ValueError(f"invite_uses must be in [1, 1000], got {self.invite_uses}")
        if not 0 <= self.per_prefix_per_hour <= 1_000_000:
            raise ValueError(f"per_prefix_per_hour must be in [0, 1000000] (0: no limit), got {self.per_prefix_per_hour}")
        if not 0 <= self.probation_rounds <= 10_000:
            raise ValueError(f"probation_rounds must be in [0, 10000], got {self.probation_rounds}")

    @property
    def can_refuse(self) -> bool:
        """Whether the coordinator may refuse a peer that announces itself."""
        return self.policy != "open" or self.per_prefix_per_hour > 0


@dataclass
class RunConfig:
    """A whole run: model, data, inner and outer optimisation, round timing."""

    run_id: str = field(default_factory=lambda: f"run-{secrets.token_hex(4)}")
    mode: str = "sparseloco"  # a module of swarm/modes/ (see swarm.modes.available_modes)
    mode_options: dict[str, int | float | bool | str] = field(default_factory=dict)  # the mode's own knobs
    preset: str = "nano"
    # sha256 of the run's tokenizer.json ("" = the byte tokenizer); peers fetch the file from the swarm
    # and refuse to train with any other. The model's vocab_size (in model_overrides) comes from it.
    tokenizer_sha256: str = ""
    tokenizer_bytes: int = 0  # its size (what a fetch asks the swarm for)
    model_overrides: dict[str, int | float | bool] = field(default_factory=dict)
    data_source: str = "stdlib"
    text_field: str = "text"
    data_max_bytes: int | None = None
    corpus: list[CorpusShard] = field(default_factory=list)  # data_source "shards": the corpus by content
    corpus_fingerprint: str = ""  # other sources: their token fingerprint, signed in by the coordinator
    corpus_origin: str = ""  # words for that source ("the standard library of Python 3.11.9")
    eval_fraction: float = 0.01
    seed: int = 0
    batch_size: int = 8
    seq_len: int = 128
    inner_steps: int = 30  # H: local AdamW steps per round (paper: 15..30)
    # H's ramp: round r < inner_steps_ramp takes fewer steps, from inner_steps_start at round 0 up to
    # inner_steps (`inner_steps_at`); 0 = every round takes H. Early rounds change the model most.
    inner_steps_start: int = 0
    inner_steps_ramp: int = 0
    inner_lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_rounds: int = 0  # 0 = until stopped; otherwise the cosine schedule's horizon
    outer: OuterConfig = field(default_factory=OuterConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)  # who may join (the coordinator enforces it)
    round_timeout_s: float = 120.0  # a round closes this long after the previous one, whoever is missing
    min_peers: int = 1
    # A coordinator-led round of at least this many contributions, or in a swarm of at least this
    # many members, also carries their aggregate: the per-slot mean compressed again (SparseLoCo: 4×
    # one payload's top-k; dense codecs: the mean), which every node fetches, relayed by members, and
    # applies instead of the R payloads (R × P in becomes about 4 P).
    # 0: never (every node fetches every payload). Issue 21's first step: docs/performance.md.
    aggregate_from: int = 0
    heartbeat_interval_s: float = 5.0
    heartbeat_ttl_s: float = 20.0  # a peer silent this long is stale: not waited for, not a leader
    num_shards: int = 1024  # data streams are disjoint for up to this many peers
    eval_batches: int = 8
    coordinator: str = ""  # peer id of the coordinator (filled in when published)
    init_hash: str = ""  # state hash of θ(0) when it came from a checkpoint (--init-from): never the seed's weights then
    created_at: float = 0.0

    def __post_init__(self) -> None:
        positive = {
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "inner_steps": self.inner_steps,
            "round_timeout_s": self.round_timeout_s,
            "heartbeat_interval_s": self.heartbeat_interval_s,
            "num_shards": self.num_shards,
            "min_peers": self.min_peers,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_ttl_s must exceed heartbeat_interval_s")
        if not (math.isfinite(self.inner_lr) and self.inner_lr > 0):
            raise ValueError(f"inner_lr must be positive, got {self.inner_lr}")
        if self.max_rounds < 0:
            raise ValueError("max_rounds must be >= 0")
        if self.aggregate_from < 0:
            raise ValueError(f"aggregate_from must be >= 0 (0: no aggregate), got {self.aggregate_from}")
        if self.inner_steps_ramp < 0 or not 0 <= self.inner_steps_start <= self.inner_steps:
            raise ValueError(
                f"inner_steps_ramp must be >= 0 and inner_steps_start in [0, inner_steps={self.inner_steps}],"
                f" got {self.inner_steps_ramp} and {self.inner_steps_start}"
            )
        if bool(self.inner_steps_ramp) != bool(self.inner_steps_start):
            raise ValueError("inner_steps_start and inner_steps_ramp go together: both 0 (no ramp) or both positive")
        if self.tokenizer_sha256 and not re.fullmatch(r"[0-9a-f]{64}", self.tokenizer_sha256):
            raise ValueError(f"tokenizer_sha256 must be 64 lowercase hex digits or empty, got {self.tokenizer_sha256!r:.80}")
        if not (0 < self.tokenizer_bytes <= 64 * 2**20 if self.tokenizer_sha256 else self.tokenizer_bytes == 0):
            raise ValueError(
                f"tokenizer_bytes must be in (0, 64 MiB] with a tokenizer_sha256, else 0; got {self.tokenizer_bytes}"
            )
        if (self.data_source == SHARDS_SOURCE) != bool(self.corpus):
            raise ValueError(f"data_source {SHARDS_SOURCE!r} goes with a non-empty corpus shard list, and only with it")
        if len(self.corpus) > self.num_shards:
            raise ValueError(f"{len(self.corpus)} corpus shards but num_shards={self.num_shards}: raise num_shards")
        if not self.run_id or "/" in self.run_id or len(self.run_id) > 64:
            raise ValueError(f"bad run_id {self.run_id!r}: 1-64 characters, no '/'")

    @property
    def leader_timeout_s(self) -> float:
        """How long followers wait for a live coordinator's manifest before a peer may close the round:
        past the coordinator's own deadline (round_timeout_s) plus time to validate and publish."""
        return 1.5 * self.round_timeout_s + 5.0

    @property
    def total_inner_steps(self) -> int:
        """Horizon of the inner cosine schedule (a long constant tail when the run is open-ended)."""
        return self.steps_before(self.max_rounds) if self.max_rounds else 10**9

    def outer_at(self, round_no: int) -> OuterConfig:
        """The outer settings of round `round_no`: α goes linearly from outer_lr (round 0) to
        outer_lr_final (round max_rounds, flat after) when both are set; otherwise `outer` as is.
        Linear, not a cosine: every node must compute the same α bit for bit, and IEEE arithmetic
        guarantees that where libm's cos does not."""
        if not (self.outer.outer_lr_final and self.max_rounds):
            return self.outer
        done = min(round_no, self.max_rounds)
        alpha = self.outer.outer_lr + (self.outer.outer_lr_final - self.outer.outer_lr) * done / self.max_rounds
        return dataclasses.replace(self.outer, outer_lr=alpha)

    def inner_steps_at(self, round_no: int) -> int:
        """H of round `round_no`: during the ramp, linear from inner_steps_start (round 0) towards
        inner_steps, rounded down; `inner_steps` from round inner_steps_ramp on."""
        if round_no >= self.inner_steps_ramp:
            return self.inner_steps
        return self.inner_steps_start + (self.inner_steps - self.inner_steps_start) * round_no // self.inner_steps_ramp

    def steps_before(self, round_no: int) -> int:
        """Inner steps of rounds 0 .. round_no − 1: where round `round_no`'s lr schedule starts."""
        ramp = min(round_no, self.inner_steps_ramp)
        return sum(self.inner_steps_at(r) for r in range(ramp)) + (round_no - ramp) * self.inner_steps
