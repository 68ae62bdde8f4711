"""A peer's local work for one SPSA round: K two-point estimates, forward passes only.

Each estimate takes the next batch of the peer's data shard, draws its direction from the seed of
(run, round, peer, sample), and measures L(θ+εz) and L(θ−εz) on that batch with dropout off. No
parameter requires a gradient and there is no optimizer: the peer holds the global weights (CPU
fp32), a working copy in the model, and one direction tensor at a time.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from functools import partial

import torch

from models import build_model
from swarm.data.corpus import Corpus, load_corpus
from swarm.data.sampler import eval_batches
from swarm.modes.base import RoundWork
from swarm.modes.replica import data_config, model_config, shard_stream
from swarm.modes.spsa.perturb import two_point
from swarm.modes.spsa.scalar import encode_scalars
from swarm.modes.spsa.seeds import direction_seed
from swarm.run import RunConfig
from swarm.state import GlobalState
from swarm.train.step import NonFiniteLossError, autocast_for, evaluate


class SpsaWorker:
    """A `Worker` (swarm/modes/base.py) that holds no gradients and no optimizer: not a Replica,
    whose AdamW and backprop trainer are the very state this mode exists to do without."""

    def __init__(
        self,
        run: RunConfig,
        *,
        peer_id: str,
        shard: int,
        device: torch.device,
        samples: int,
        eps: float,
        scalar_scale: float,
        corpus: Corpus | None = None,
        prepare_model: Callable[[torch.nn.Module], None] | None = None,
    ) -> None:
        """`prepare_model`: the mode's change to the model before weights load (None: none)."""
        self.run, self.device, self.peer_id = run, device, peer_id
        self.samples, self.eps, self.scalar_scale = samples, eps, scalar_scale
        self.corpus = corpus or load_corpus(data_config(run))
        self.model = build_model(model_config(run), seed=run.seed).to(device)
        if prepare_model is not None:
            prepare_model(self.model)
        self.model.requires_grad_(False)
        self.model.eval()  # dropout off: L+ and L− must see the same function
        self.stream = shard_stream(run, self.corpus, shard)  # as a Replica reads its shard
        self.last_scalars: list[float] = []  # the raw estimates of the last round (before the byte codec)

    def trained_names(self) -> list[str]:
        return []

    def read_shard(self, shard: int, corpus: Corpus | None = None) -> None:
        self.corpus = corpus or self.corpus
        self.stream = shard_stream(self.run, self.corpus, shard)

    def link_bytes(self) -> dict[str, int]:
        return {}

    def memory_bytes(self) -> dict[str, int]:
        return {"grad_bytes": 0, "optimizer_bytes": 0}

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        with autocast_for(self.device):
            loss = float(self.model(inputs, targets).lm_loss)
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"non-finite loss {loss} in an SPSA forward pass")
        return loss

    @torch.no_grad()
    def train_round(self, state: GlobalState, stop: threading.Event | None = None) -> RoundWork | None:
        """K estimates on θ(t); their bytes are the round's payload (None if stopped midway)."""
        start, cpu_start = time.perf_counter(), time.thread_time()
        scalars, losses, tokens = [], [], 0
        for k in range(self.samples):
            if stop is not None and stop.is_set():
                return None
            inputs, targets = (t.to(self.device) for t in next(self.stream))  # (B, T) each
            seed = direction_seed(self.run.run_id, state.round, self.peer_id, k)
            g, plus, minus = two_point(self.model, state.params, seed, self.eps, partial(self._loss, inputs, targets))
            scalars.append(g)
            losses.append((plus + minus) / 2)
            tokens += 2 * targets.numel()
        self.last_scalars = scalars
        inline = encode_scalars(scalars, self.scalar_scale)
        compute_s, compute_cpu_s = time.perf_counter() - start, time.thread_time() - cpu_start
        return RoundWork({}, sum(losses) / len(losses), tokens, compute_s, inline=inline, compute_cpu_s=compute_cpu_s)

    def evaluate(self, state: GlobalState) -> float:
        state.load_into(self.model)
        batches = eval_batches(
            self.corpus.eval_tokens, batch_size=self.run.batch_size, seq_len=self.run.seq_len, max_batches=self.run.eval_batches
        )
        return evaluate(self.model, batches, device=self.device)
