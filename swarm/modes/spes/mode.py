"""SPES: a mixture-of-experts model whose experts are sharded over peers.

Every peer trains the dense parameters (embeddings, attention, norms, routers, head) and only the
experts it owns; the others stay resident and frozen (routed to, no gradients, no AdamW state).
Each round a peer sends its dense slots and its experts' slots through the run's codec (SparseLoCo
by default): dense slots average over every peer, an expert's slots over its owners (one, or more
when peers outnumber experts), and an expert nobody covered this round stays as it is. After the
outer step everyone applies the expert-merging warm-up, so replicas stay bit-identical.
Ownership comes from the coordinator's signed role records (swarm/modes/spes/experts.py has the rule);
while the coordinator is down the records stand, so peers keep training what they own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from models import get_preset
from models.moe import expert_prefix, is_expert_parameter
from swarm.modes.base import Worker
from swarm.modes.replica import Replica, ReplicaMode
from swarm.modes.spes.experts import assign_experts, expert_neighbours, merge_alpha, merge_layer
from swarm.net.records import Role
from swarm.run import OuterConfig

if TYPE_CHECKING:
    from swarm.data.corpus import Corpus
    from swarm.modes.replica import Replica
    from swarm.state import GlobalState


@dataclass
class SpesOptions:
    """Knobs of the expert-merging warm-up (applied on every round's outer step)."""

    merge_alpha0: float = 0.05  # α0: pull towards similar experts at step 0 (reference value)
    merge_steps: int = 3000  # T, in inner steps: α falls linearly to 0 by then
    merge_neighbours: int = 4  # |N_i|: the most similar other experts of the same layer

    def __post_init__(self) -> None:
        if not 0 <= self.merge_alpha0 <= 1:
            raise ValueError(f"merge_alpha0 must be in [0, 1], got {self.merge_alpha0}")
        if self.merge_steps < 0 or self.merge_neighbours < 1:
            raise ValueError("merge_steps must be >= 0 and merge_neighbours >= 1")


class SpesMode(ReplicaMode):
    name = "spes"
    Options = SpesOptions

    @classmethod
    def default_outer(cls, dense_dtype: str = "fp32") -> OuterConfig:
        """SparseLoCo at 4x the density (256 of each 4096-value chunk): a peer sends only the dense part
        and its experts, so its payload costs about what a full replica's does at 64, and an expert
        with a single owner gets as many coordinates per round as the mean of 4 replicas would give
        it. Measured with `swarm-bench spes`: this closes SPES's eval-loss gap to full replicas."""
        return OuterConfig(topk_per_chunk=256)

    def check_run(self) -> None:
        cfg = get_preset(self.run.preset, **self.run.model_overrides)
        if not cfg.is_moe:
            raise ValueError(f"mode 'spes' needs a mixture-of-experts preset (e.g. moe-nano), not {self.run.preset!r}")
        if self.run.outer.codec != "sparseloco" or self.run.outer.momentum:
            raise ValueError("mode 'spes' sends SparseLoCo payloads without outer momentum")
        self.n_experts, self.n_layers = cfg.n_experts, cfg.n_layers

    def _pairs(self, experts: list[int]) -> list[tuple[int, int]]:
        return [(layer, e) for e in experts for layer in range(self.n_layers)]  # keeps acquisition order

    @staticmethod
    def _indices(role: Role) -> list[int]:
        return list(dict.fromkeys(e for _, e in role.experts))

    # ----- roles ---------------------------------------------------------------------------------

    def assign_roles(self, live: list[str], current: dict[str, Role], shards: dict[str, int], now: float) -> dict[str, Role]:
        owned = assign_experts(live, {p: self._indices(r) for p, r in current.items()}, self.n_experts)
        roles = {}
        for peer in live:
            pairs = self._pairs(owned[peer])
            old = current.get(peer)
            if old is not None and old.experts == pairs:
                roles[peer] = old
            else:
                roles[peer] = Role(peer_id=peer, kind="experts", data_shard=shards[peer], experts=pairs, assigned_at=now)
        return roles

    def default_role(self, peer_id: str, shard: int) -> Role:
        return Role(peer_id=peer_id, kind="experts", data_shard=shard, experts=[])  # dense part only

    def describe_role(self, role: Role) -> str:
        experts = ",".join(map(str, sorted(self._indices(role)))) or "none"
        return f"experts {experts} shard {role.data_shard}"

    # ----- local work ----------------------------------------------------------------------------

    def make_worker(self, role: Role, device: torch.device, corpus: Corpus | None = None) -> Worker:
        return Replica(self.run, shard=role.data_shard, device=device, corpus=corpus, experts=list(role.experts))

    def update_worker(self, worker: Worker, role: Role) -> None:
        if not isinstance(worker, Replica):
            raise TypeError(f"an SPES peer's worker is a Replica, got {type(worker).__name__}")
        worker.train_experts(list(role.experts))

    # ----- contributions and the outer step ------------------------------------------------------

    def contribution_names(self, role: Role, names: list[str]) -> list[str]:
        owned = set(role.experts)
        return [n for n in names if (key := is_expert_parameter(n)) is None or key in owned]

    def slot_group(self, name: str) -> str:
        key = is_expert_parameter(name)
        return "dense" if key is None else f"expert {key[1]}"

    def outer_step(self, state: GlobalState, mean: dict[str, torch.Tensor]) -> None:
        step = self.run.steps_before(state.round + 1)  # inner steps done once this round is applied
        state.apply_outer_step(mean, self.run.outer_at(state.round))
        alpha = merge_alpha(step, self.options.merge_alpha0, self.options.merge_steps)
        if alpha > 0:
            self.merge(state.params, alpha)
            state.invalidate_hash()

    def merge(self, params: dict[str, torch.Tensor], alpha: float) -> None:
        """The expert-merging warm-up on every MoE layer of the global weights, in place."""
        for layer in range(self.n_layers):
            experts = []
            for e in range(self.n_experts):
                prefix = expert_prefix(layer, e)
                experts.append({n[len(prefix) :]: params[n] for n in sorted(params) if n.startswith(prefix)})
            neighbours = expert_neighbours([list(x.values()) for x in experts], self.options.merge_neighbours)
            merge_layer(experts, neighbours, alpha)


MODE = SpesMode
