"""Pipelined replicas: weak peers form one replica together, joined by compressed activations.

Peers that can hold a model (weights, grads, AdamW state) train as full SparseLoCo replicas; weak
ones (announced memory below the threshold, `join-swarm --memory-gb` to override) are grouped S at
a time into pipeline groups, each stage holding consecutive blocks (swarm/modes/pipeline/groups.py). A
stage sends its activations forward and receives their gradients over the stage link, compressed
to k = d / ratio numbers per token (models/subspace.py). Each stage contributes the slots it holds,
averaged with the same slots of every full replica and of the same stage of other groups; a group
missing a stage contributes nothing that round (`incomplete_contributions`). With compression on,
every node projects the residual writers back onto span(U) after each outer step, so the global
weights always satisfy the constraint that makes the link exact; the embedding's part outside
span(U) is either projected too or folded into the link's fixed table (`embedding_drift`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import torch

from models import LanguageModel, get_preset
from models.subspace import Subspace
from swarm.modes.base import TrainingMode, Worker
from swarm.modes.pipeline.groups import incomplete_groups, plan_roles, stage_layers
from swarm.modes.pipeline.link import StageLink
from swarm.modes.pipeline.options import PipelineOptions
from swarm.modes.pipeline.worker import PipelineWorker
from swarm.modes.replica import LossProbe
from swarm.net.records import Capacity, Role
from swarm.run import OuterConfig

if TYPE_CHECKING:
    from swarm.data.corpus import Corpus
    from swarm.node import SwarmNode
    from swarm.state import GlobalState


class PipelineMode(TrainingMode):
    name = "pipeline"
    Options = PipelineOptions

    @classmethod
    def default_outer(cls, dense_dtype: str = "fp32") -> OuterConfig:
        """SparseLoCo's settings, without overlapping rounds: a group's stages must train the same round."""
        return OuterConfig(overlap=False)

    def check_run(self) -> None:
        cfg = get_preset(self.run.preset, **self.run.model_overrides)
        opts: PipelineOptions = self.options
        if cfg.is_moe:
            raise ValueError("mode 'pipeline' needs a dense preset")
        if cfg.n_layers < opts.stages:
            raise ValueError(f"{cfg.n_layers} layers cannot be split into {opts.stages} stages")
        if opts.ratio > 1 and cfg.tie_embeddings:
            raise ValueError("compressed pipelines need untied embeddings (the head must not be kept in span(U))")
        if opts.ratio > cfg.d_model:
            raise ValueError(f"ratio {opts.ratio} exceeds d_model {cfg.d_model}")
        if self.run.outer.codec != "sparseloco" or self.run.outer.momentum:
            raise ValueError("mode 'pipeline' sends SparseLoCo payloads without outer momentum")
        if self.run.outer.overlap:
            raise ValueError("mode 'pipeline' does not overlap rounds: a group's stages must start each round together")
        if opts.link_timeout_s >= self.run.round_timeout_s:
            raise ValueError("link_timeout_s must be below round_timeout_s, or a broken group holds up every round")
        self.cfg = cfg
        self._subspace: Subspace | None = None
        self.capacities: dict[str, Capacity] = {}

    @property
    def subspace(self) -> Subspace | None:
        if self._subspace is None and self.options.ratio > 1:
            self._subspace = self.options.subspace(self.cfg, self.run.seed)
        return self._subspace

    # ----- roles ---------------------------------------------------------------------------------

    def note_capacities(self, capacities: dict[str, Capacity]) -> None:
        self.capacities = dict(capacities)

    def assign_roles(self, live: list[str], current: dict[str, Role], shards: dict[str, int], now: float) -> dict[str, Role]:
        return plan_roles(
            live,
            current,
            shards,
            self.capacities,
            stages=self.options.stages,
            n_layers=self.cfg.n_layers,
            weak_below_gb=self.options.threshold_gb(self.cfg),
            now=now,
        )

    def describe_role(self, role: Role) -> str:
        if role.kind == "stage":
            start, end = stage_layers(role, self.cfg.n_layers)
            return f"stage {role.stage} of group {role.replica_group} (layers {start}-{end - 1}) shard {role.data_shard}"
        if role.kind == "observer":
            return "spare (waits for a pipeline group)"
        return super().describe_role(role)

    # ----- local work ----------------------------------------------------------------------------

    def prepare_model(self, model: torch.nn.Module) -> None:
        if self.subspace is not None:
            if not isinstance(model, LanguageModel):
                raise TypeError(f"the pipeline's fixed embedding attaches to a LanguageModel, not {type(model).__name__}")
            self.subspace.attach(model)

    scored = True

    def make_probe(self, corpus: Corpus) -> LossProbe:
        """The leader scores a stage's contribution on the whole model, as it scores a replica's."""
        return LossProbe(self.run, corpus, prepare_model=self.prepare_model)

    def make_worker(self, role: Role, device: torch.device, corpus: Corpus | None = None) -> Worker:
        return PipelineWorker(self.run, self.options, role, device=device, corpus=corpus, prepare_model=self.prepare_model)

    def update_worker(self, worker: Worker, role: Role) -> None:
        _pipeline_worker(worker).update(role)

    def round_partners(self, role: Role) -> list[str]:
        return [p for p in role.group_peers if p != role.peer_id] if role.kind == "stage" else []

    async def attach_worker(self, worker: Worker, node: SwarmNode) -> None:
        link = StageLink(node.server.p2p, asyncio.get_running_loop())
        await link.start()
        await asyncio.to_thread(_pipeline_worker(worker).attach_link, link)

    # ----- contributions -------------------------------------------------------------------------

    def contribution_names(self, role: Role, names: list[str]) -> list[str]:
        if role.kind == "replica":
            return list(names)
        if role.kind != "stage" or role.stage is None:
            return []
        start, end = stage_layers(role, self.cfg.n_layers)
        last = role.stage == len(role.group_peers) - 1
        return [n for n in names if _in_stage(n, start, end, first=role.stage == 0, last=last)]

    def held_names(self, role: Role, names: list[str]) -> list[str] | None:
        """A stage holds its blocks (and the embedding its subspace is built from); a spare holds
        nothing until it becomes a stage; a full replica holds all."""
        if role.kind == "replica":
            return None
        held = set(self.contribution_names(role, names))
        if held and self.subspace is not None and "tok_emb.weight" in names:
            held.add("tok_emb.weight")  # every stage projects onto span(U), computed from E each round
        return sorted(held)

    def incomplete_contributions(self, roles: dict[str, Role]) -> dict[str, str]:
        return incomplete_groups(roles)

    def scored_together(self, roles: dict[str, Role]) -> list[list[str]]:
        """A group's stages: each sends its blocks of one replica's update, and a newcomer stage's
        blocks alone barely move the loss (it would never pass probation, and its group's work
        would sit out with it)."""
        groups: dict[tuple[int | None, tuple[str, ...]], list[str]] = {}
        for peer, role in roles.items():
            if role.kind == "stage":
                groups.setdefault((role.replica_group, tuple(role.group_peers)), []).append(peer)
        return list(groups.values())

    def slot_group(self, name: str) -> str:
        if name.startswith("blocks."):
            return f"block {name.split('.')[1]}"
        return "embedding" if name.startswith("tok_emb") else "head"

    # ----- applying ------------------------------------------------------------------------------

    def outer_step(self, state: GlobalState, mean: dict[str, torch.Tensor]) -> None:
        state.apply_outer_step(mean, self.run.outer_at(state.round))
        if self.subspace is not None:
            project_state(self.subspace, state.params, self.cfg.n_layers)
            state.invalidate_hash()


def project_state(subspace: Subspace, params: dict[str, torch.Tensor], n_layers: int) -> None:
    """Project the global weights the subspace holds (the writers, and E unless it is folded) onto
    span(U) in float64 and round once to float32, so a BLAS kernel's summation order (it differs
    between machines) almost never changes a bit. Each tensor on its own: a partial holder
    projects the ones it holds."""
    u = subspace.U.double().cpu()
    for name in subspace.held_names(n_layers):
        if name not in params:
            continue  # held elsewhere
        w = params[name].double()
        projected = (w @ u) @ u.T if name == "tok_emb.weight" else u @ (u.T @ w)
        params[name].copy_(projected.to(torch.float32))


def _in_stage(name: str, start: int, end: int, *, first: bool, last: bool) -> bool:
    if name.startswith("blocks."):
        return start <= int(name.split(".")[1]) < end
    if name.startswith("tok_emb."):
        return first
    return last  # norm, head


def _pipeline_worker(worker: Worker) -> PipelineWorker:
    if not isinstance(worker, PipelineWorker):
        raise TypeError(f"a pipeline peer's worker is a PipelineWorker, got {type(worker).__name__}")
    return worker


MODE = PipelineMode
