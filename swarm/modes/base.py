"""The one interface every training mode implements, and the data-parallel defaults.

A mode answers five questions, and the runtime asks nothing else:
  * roles: which roles a run has and how the coordinator assigns them (`assign_roles`);
  * local work: what a peer in a role trains (`make_worker`, `update_worker`): a `Worker`, the one
    interface the peer calls on its local trainer (full replicas share `swarm/modes/replica.py`);
  * contribution: which tensors it sends each round (`contribution_names`; the codec is the run's);
  * validation: which tensors a leader accepts from a peer in a role (the same names, checked by
    the round code against the sender's coordinator-signed role);
  * applying: how everyone turns the round's per-slot mean into the next global state
    (`outer_step`), deterministically on the CPU.
A mode whose contribution is a few bytes (SPSA) sets `inline_payload`: the bytes travel inside the
signed submission record and the manifest, are checked by `check_inline` and applied by
`apply_inline` instead of the payload transfer, the codec and the per-slot mean.
The defaults describe a full data-parallel replica (SparseLoCo, DiLoCo; `ReplicaMode` in replica.py
adds its worker); a mode overrides what differs. Slots: every parameter tensor is a slot, averaged over the contributions that cover it
(swarm/codec/aggregate.py); `slot_group` only names groups of slots for reports.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from swarm.net.records import Capacity, Role

if TYPE_CHECKING:
    from swarm.data.corpus import Corpus
    from swarm.node import SwarmNode
    from swarm.run import OuterConfig, RunConfig
    from swarm.state import GlobalState


@dataclass
class RoundWork:
    """The outcome of one round of a worker's local work."""

    delta: dict[str, torch.Tensor]  # Δ = θ(t) − θ_local, CPU fp32
    loss: float  # mean LM loss over the inner steps
    tokens: int
    compute_s: float  # wall time of the inner steps alone
    inline: bytes | None = None  # a mode whose payload travels inside the submission record (SPSA)
    compute_cpu_s: float = 0.0  # CPU time of the computing thread: its wall time on a core of its own


class Worker(Protocol):
    """A peer's local trainer, whatever its mode: everything the peer calls on it. Its methods
    block (they run in a worker thread, off the event loop)."""

    @property
    def model(self) -> torch.nn.Module:
        """The local model (its parameter names and shapes are the slots the peer knows)."""
        ...

    def train_round(self, state: GlobalState, stop: threading.Event | None = None) -> RoundWork | None:
        """Local work from θ(t) = `state`: the round's contribution, or None (stopped midway, or no
        work this round)."""
        ...

    def read_shard(self, shard: int, corpus: Corpus | None = None) -> None:
        """Read data shard `shard` from now on (of `corpus` if given, else of the current one)."""
        ...

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held now for training: {"grad_bytes": ..., "optimizer_bytes": ...}."""
        ...

    def link_bytes(self) -> dict[str, int]:
        """Activation bytes moved per neighbouring peer so far ({} for a worker with no links)."""
        ...

    def evaluate(self, state: GlobalState) -> float:
        """Eval loss (nats per token) of the weights `state` on the held-out split."""
        ...


@dataclass
class NoOptions:
    """A mode without knobs of its own."""


def build_options(cls: type, values: dict[str, Any], mode: str) -> Any:
    """The mode's typed options from the run's `mode_options`; unknown knobs are an error."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        choices = ", ".join(sorted(known)) or "none"
        raise ValueError(f"mode {mode!r} has no option(s) {', '.join(unknown)} (its options: {choices})")
    return cls(**values)


class TrainingMode:
    """Data-parallel full replicas; subclasses override what their mode does differently."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self.options = build_options(self.Options, dict(run.mode_options), self.name)
        self.check_run()

    def check_run(self) -> None:
        """Reject run settings that mean nothing (or something wrong) in this mode."""

    @classmethod
    def default_outer(cls, dense_dtype: str = "fp32") -> OuterConfig:
        """The outer settings this mode recommends: SparseLoCo's published ones by default."""
        from swarm.run import OuterConfig

        return OuterConfig()

    # ----- roles (coordinator) -------------------------------------------------------------------

    def assign_roles(self, live: list[str], current: dict[str, Role], shards: dict[str, int], now: float) -> dict[str, Role]:
        """Roles of the live peers (oldest first), given their current roles and data shards.

        Must be deterministic and keep a peer's role unchanged when nothing forces a change, so
        a coordinator that restarts reproduces the same table.
        """
        return {p: current.get(p) or Role(peer_id=p, kind="replica", data_shard=shards[p], assigned_at=now) for p in live}

    def note_capacities(self, capacities: dict[str, Capacity]) -> None:
        """The capacities live peers announced, given to the coordinator's mode before `assign_roles`
        (a mode that assigns roles by memory or speed keeps them; default: ignored)."""

    def default_role(self, peer_id: str, shard: int) -> Role:
        """The role a peer takes (and is checked against) when no coordinator-signed role exists."""
        return Role(peer_id=peer_id, kind="replica", data_shard=shard)

    def describe_role(self, role: Role) -> str:
        """One line for the status page and the logs."""
        return f"{role.kind} shard {role.data_shard}"

    # ----- local work (peer) ---------------------------------------------------------------------

    def make_worker(self, role: Role, device: torch.device, corpus: Corpus | None = None) -> Worker:
        """The local trainer of a peer in `role` (blocking: builds a model; called in a thread)."""
        raise NotImplementedError(f"mode {self.name!r} defines no worker")

    def update_worker(self, worker: Worker, role: Role) -> None:
        """The coordinator changed this peer's role: adapt the local trainer (default: nothing)."""

    def round_partners(self, role: Role) -> list[str]:
        """Peers without whom a round of this role's work cannot finish (a pipeline stage's group).
        A peer with partners watches, while it trains, its role and their heartbeats, and gives the
        round up as soon as the coordinator changes its role, the round closes, or a partner sits
        the round out, instead of waiting on them until its link's timeout. Default: none, the work
        is the peer's own."""
        return []

    async def attach_worker(self, worker: Worker, node: SwarmNode) -> None:
        """Give a new worker what it needs from its node's event loop, e.g. links to other peers
        over the node's libp2p host (default: nothing)."""

    def prepare_model(self, model: torch.nn.Module) -> None:
        """The mode's change to the model every node builds, before any weights are loaded (e.g. a
        fixed embedding added to the token embedding; default: none)."""

    scored: ClassVar[bool] = False  # the coordinator scores contributions by loss (then newcomers serve probation)

    def make_probe(self, corpus: Corpus) -> Any:
        """What a round leader scores contributions with (swarm/round/usefulness.py): an object with
        `losses(state, updates, seed)`, or None if this mode's contributions are not scored by loss
        (blocking: builds a model). Default: none."""
        return None

    # ----- contributions -------------------------------------------------------------------------

    def contribution_names(self, role: Role, names: list[str]) -> list[str]:
        """Tensors a peer in `role` sends each round (and the only ones a leader accepts from it)."""
        return list(names)

    def held_names(self, role: Role, names: list[str]) -> list[str] | None:
        """The part of the agreed state a peer in `role` holds, downloads and applies (None: all of
        it, as full replicas and the coordinator do). A partial holder checks its part against the
        agreed state's hash tree after every round (swarm/state.py). Default: all."""
        return None

    def incomplete_contributions(self, roles: dict[str, Role]) -> dict[str, str]:
        """Of the contributions a leader is about to accept (peer -> signed role), those that only
        count together with others missing this round, with the reason (no strike). Default: none."""
        return {}

    def scored_together(self, roles: dict[str, Role]) -> list[list[str]]:
        """Of the contributions a leader scores (peer -> signed role), the groups whose summed share
        is judged as one contribution (swarm/round/admission.py): parts of one update that say
        little alone. Default: none, each contribution is judged on its own."""
        return []

    def slot_group(self, name: str) -> str:
        """A coarse name for reports of which slots a round covered."""
        return "all"

    # ----- applying ------------------------------------------------------------------------------

    def outer_step(self, state: GlobalState, mean: dict[str, torch.Tensor]) -> None:
        """θ(t+1) from θ(t) and the per-slot mean of the round (covered slots only)."""
        state.apply_outer_step(mean, self.run.outer_at(state.round))

    # ----- inline payloads (off by default) ------------------------------------------------------

    inline_payload: ClassVar[bool] = False  # contributions travel inside the submission record

    def check_inline(self, data: bytes) -> str | None:
        """What is wrong with an inline payload (None: well-formed). Runs on the leader and on every
        node that applies a manifest listing it."""
        return f"mode {self.name!r} carries no inline payloads"

    def apply_inline(self, state: GlobalState, round_no: int, contributions: list[tuple[str, bytes]]) -> None:
        """θ(t+1) from θ(t) and the round's (peer id, inline payload) pairs in manifest order (at least
        one), deterministically on the CPU; advances the state's round."""
        raise NotImplementedError(f"mode {self.name!r} carries no inline payloads")

    def round_metrics(self, contributions: list[tuple[str, bytes]]) -> dict[str, float | int]:
        """Extra per-round figures for the round log and status page (e.g. SPSA's scalars per round)."""
        return {}
