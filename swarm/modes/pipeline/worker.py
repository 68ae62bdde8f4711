"""A peer's local work in the pipeline mode: a full replica, one stage of a group, or a spare.

`PipelineWorker` is what the mode hands the peer; it follows role changes (a spare becomes a stage
when a group needs it, a group's layers move when a member is replaced). A stage trains only its
blocks: the global weights are loaded into a CPU model and only the stage's slice is moved to the
device and given gradients and AdamW state. If a neighbour fails mid-round the stage gives up the
round (its update is never sent: a partial replica's update must not count).
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
import time
from collections.abc import Callable

import torch

from models import build_model, build_stage
from models.subspace import Subspace
from swarm.data.corpus import Corpus, load_corpus
from swarm.log import get_logger
from swarm.modes.pipeline.link import LinkError, StageLink
from swarm.modes.pipeline.options import PipelineOptions
from swarm.modes.pipeline.schedule import StageContext, stage_step
from swarm.modes.replica import Replica, RoundWork, data_config, model_config, optim_config, shard_stream
from swarm.net.records import Role
from swarm.run import RunConfig
from swarm.state import GlobalState
from swarm.train.optim import build_optimizer, lr_at
from swarm.train.step import NonFiniteLossError

logger = get_logger(__name__)


class StageTrainer:
    """Blocks [start, end) of the model (plus embedding / head) for one group's stage."""

    def __init__(
        self,
        run: RunConfig,
        options: PipelineOptions,
        role: Role,
        *,
        device: torch.device,
        corpus: Corpus,
        link: StageLink,
        subspace: Subspace | None,
    ) -> None:
        assert role.stage is not None
        self.run, self.options, self.role, self.device, self.link = run, options, role, device, link
        self.subspace = subspace
        # Only the stage's own tensors exist, on the device; the rest of the model is a skeleton of
        # names and shapes (the meta device): a stage of a model larger than this peer never builds it.
        self.model, self.stage = build_stage(model_config(run), role.layer_cuts, role.stage, device=device)
        if subspace is not None:
            subspace.attach(self.model)
        names = {id(p) for p in self.stage.parameters()}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in names)
        self.optimizer = build_optimizer(self.stage, optim_config(run))
        self.step = 0
        peers = role.group_peers
        self.prev = peers[role.stage - 1] if role.stage > 0 else None
        self.next = peers[role.stage + 1] if role.stage + 1 < len(peers) else None
        link.set_neighbours(self.prev, self.next)  # now: a neighbour may start the round before us
        self.stream = shard_stream(run, corpus, role.data_shard)  # as a Replica reads it

    def trained_names(self) -> list[str]:
        return sorted(n for n, _ in self.stage.named_parameters())

    def train_round(self, state: GlobalState, stop: threading.Event | None) -> RoundWork | None:
        state.load_into(self.model)
        if self.subspace is not None:  # exact from the first micro-batch (θ(0) is not projected)
            self.subspace.begin_round(state.params["tok_emb.weight"], self.device)
            self.subspace.project_model_(self.stage, self.model.cfg.n_layers)
        self.link.set_neighbours(self.prev, self.next)
        self.link.begin_round(state.round)
        ctx = StageContext(
            self.stage,
            self.link,
            self.prev,
            self.next,
            self.subspace,
            self.options.wire_dtype,
            self.options.micro_batches,
            self.options.link_timeout_s,
            self.device,
            stop,
        )
        self.step = first = self.run.steps_before(state.round)
        start, losses, tokens = time.perf_counter(), [], 0
        for h in range(self.run.inner_steps_at(state.round)):
            if stop is not None and stop.is_set():
                return None
            inputs, targets = self._batch(first + h)
            try:
                losses.append(stage_step(ctx, state.round, h, inputs, targets))
            except (LinkError, concurrent.futures.TimeoutError) as e:
                if stop is not None and stop.is_set():
                    self.optimizer.zero_grad(set_to_none=True)
                    return None
                logger.warning(
                    "stage %d of group %s gives up round %d: %s", self.role.stage, self.role.replica_group, state.round, e
                )
                self.optimizer.zero_grad(set_to_none=True)
                return None
            self._optimizer_step()
            tokens += targets.numel()
        compute_s = time.perf_counter() - start
        delta = state.pseudo_gradient(self.model, self.trained_names())
        return RoundWork(delta, sum(losses) / len(losses), tokens, compute_s)

    def _batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `index` of the group's shard. Every stage of the group must read the same batch
        whatever rounds it gave up or joined late in, so the stream position follows the round and
        step rather than the batches this stage has read."""
        consumed = index * self.run.batch_size
        per_epoch = self.stream.windows_per_shard
        epoch, cursor = divmod(consumed, per_epoch)
        if epoch != self.stream.epoch:
            self.stream.epoch, self.stream._order = epoch, None
        self.stream.cursor = cursor
        return next(self.stream)

    def _optimizer_step(self) -> None:
        params = [p for p in self.stage.parameters() if p.grad is not None]
        # Clipped per stage: a group-wide norm would cost one more round trip per step.
        max_norm = self.run.grad_clip if self.run.grad_clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"non-finite gradient norm in stage {self.role.stage} at step {self.step + 1}")
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, optim_config(self.run))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.subspace is not None:
            self.subspace.project_model_(self.stage, self.model.cfg.n_layers)


class PipelineWorker:
    """The peer's worker in the pipeline mode; its trainer follows the peer's role."""

    def __init__(
        self,
        run: RunConfig,
        options: PipelineOptions,
        role: Role,
        *,
        device: torch.device,
        corpus: Corpus | None,
        prepare_model: Callable[[torch.nn.Module], None],
    ) -> None:
        """`prepare_model`: the mode's change to every full model it builds (the fixed embedding)."""
        self.run, self.options, self.device = run, options, device
        self.prepare_model = prepare_model
        self.corpus = corpus or load_corpus(data_config(run))
        self.subspace = options.subspace(model_config(run), run.seed)
        self.link: StageLink | None = None
        self.inner: Replica | StageTrainer | None = None
        with torch.device("meta"):  # names and shapes only: a spare holds no weights
            self._spare_model = build_model(model_config(run))
        self.role = role
        self._configure(role)

    @property
    def model(self) -> torch.nn.Module:
        return self.inner.model if self.inner is not None else self._spare_model

    def _configure(self, role: Role) -> None:
        self.role = role
        if role.kind == "replica":
            if not isinstance(self.inner, Replica):
                self.inner = Replica(
                    self.run, shard=role.data_shard, device=self.device, corpus=self.corpus, prepare_model=self.prepare_model
                )
                if self.subspace is not None and self.options.full_replicas != "free":
                    keep_in_subspace(self.inner, self.subspace, writers_only=self.options.full_replicas == "writers")
        elif role.kind == "stage" and self.link is not None:
            self.inner = StageTrainer(
                self.run, self.options, role, device=self.device, corpus=self.corpus, link=self.link, subspace=self.subspace
            )
        else:  # a spare, or a stage whose link is not attached yet
            self.inner = None

    def attach_link(self, link: StageLink) -> None:
        self.link = link
        self._configure(self.role)

    def read_shard(self, shard: int, corpus: Corpus | None = None) -> None:
        """Read data shard `shard` from now on (a stage's trainer is rebuilt on it by `update`)."""
        self.corpus = corpus or self.corpus
        if isinstance(self.inner, Replica):
            self.inner.read_shard(shard, self.corpus)

    def update(self, role: Role) -> None:
        if role != self.role:
            self._configure(role)

    def trained_names(self) -> list[str]:
        return self.inner.trained_names() if self.inner is not None else []

    def memory_bytes(self) -> dict[str, int]:
        if isinstance(self.inner, Replica):
            return self.inner.memory_bytes()
        if isinstance(self.inner, StageTrainer):
            grads = sum(p.numel() * p.element_size() for p in self.inner.stage.parameters())
            optim = sum(
                t.numel() * t.element_size()
                for s in self.inner.optimizer.state.values()
                for t in s.values()
                if torch.is_tensor(t)
            )
            return {"grad_bytes": grads, "optimizer_bytes": optim}
        return {"grad_bytes": 0, "optimizer_bytes": 0}

    def link_bytes(self) -> dict[str, int]:
        """Activation bytes sent + received per neighbour so far (for rates on the status page)."""
        if self.link is None:
            return {}
        t = self.link.traffic
        return {p: t.sent.get(p, 0) + t.received.get(p, 0) for p in set(t.sent) | set(t.received)}

    def train_round(self, state: GlobalState, stop: threading.Event | None = None) -> RoundWork | None:
        """This round's work; None when there is none (a spare, or the group lost a stage)."""
        if self.inner is None:
            return None
        if self.subspace is not None and self.options.full_replicas == "stage" and isinstance(self.inner, Replica):
            self.subspace.begin_round(state.params["tok_emb.weight"], self.device)  # its step hook keeps E's drift
        work = self.inner.train_round(state, stop)
        if work is not None and self.subspace is not None and isinstance(self.inner, Replica):
            # The outer step projects what the subspace holds anyway: send only what survives it,
            # so the top-k budget and the error buffer are spent on coordinates that count.
            layers = self.inner.model.cfg.n_layers
            self.subspace.project_(work.delta, layers, self.subspace.held_names(layers))
        return work

    def evaluate(self, state: GlobalState) -> float:
        if isinstance(self.inner, Replica):
            return self.inner.evaluate(state)
        raise RuntimeError("only a full replica evaluates")


def keep_in_subspace(replica: Replica, subspace: Subspace, writers_only: bool = False) -> None:
    """Project a full replica's residual writers onto span(U) after each of its optimizer steps, and
    its embedding as a stage would (unless `writers_only`: then E learns in all d directions)."""
    model, layers = replica.model, replica.model.cfg.n_layers
    project = subspace.project_writers_ if writers_only else subspace.project_model_
    replica.optimizer.register_step_post_hook(lambda *_: project(model, layers))
