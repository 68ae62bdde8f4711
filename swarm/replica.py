"""A data-parallel replica's local work for one round: H inner AdamW steps from θ(t).

Runs in a worker thread (see peer.py) so the event loop keeps serving; everything here is plain
single-device torch. The inner optimizer state persists across rounds, as in DiLoCo.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from models import build_model, get_preset
from swarm.data.corpus import Corpus, DataConfig, load_corpus
from swarm.data.sampler import BatchStream, eval_batches
from swarm.run import RunConfig
from swarm.state import GlobalState
from swarm.train.optim import OptimConfig, build_optimizer
from swarm.train.step import Trainer, evaluate


@dataclass
class RoundWork:
    """The outcome of one round of inner steps."""

    delta: dict[str, torch.Tensor]  # Δ = θ(t) − θ_local, CPU fp32
    loss: float  # mean LM loss over the inner steps
    tokens: int
    compute_s: float  # wall time of the inner steps alone


def model_config(run: RunConfig):
    return get_preset(run.preset, **run.model_overrides)


def data_config(run: RunConfig) -> DataConfig:
    return DataConfig(
        source=run.data_source, text_field=run.text_field, eval_fraction=run.eval_fraction, max_bytes=run.data_max_bytes
    )


def optim_config(run: RunConfig) -> OptimConfig:
    return OptimConfig(
        lr=run.inner_lr,
        warmup_steps=run.warmup_steps,
        total_steps=run.total_inner_steps,
        weight_decay=run.weight_decay,
        grad_clip=run.grad_clip,
    )


def initial_state(run: RunConfig) -> GlobalState:
    """θ(0): the model initialised from the run seed, identical on every machine."""
    return GlobalState.from_model(build_model(model_config(run), seed=run.seed))


def measure_tokens_per_s(run: RunConfig, device: torch.device, steps: int = 2) -> float:
    """Forward+backward speed of this machine on the run's model and batch (announced on joining)."""
    model = build_model(model_config(run), seed=run.seed).to(device)
    tokens = torch.randint(0, model.cfg.vocab_size, (run.batch_size, run.seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, T) each
    elapsed = []
    for _ in range(steps + 1):  # the first pass warms up kernels and allocators
        start = time.perf_counter()
        model(inputs, targets).loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed.append(time.perf_counter() - start)
    return inputs.numel() / min(elapsed[1:])


class Replica:
    """A full model replica that trains on its own data shard."""

    def __init__(self, run: RunConfig, *, shard: int, device: torch.device, corpus: Corpus | None = None):
        self.run = run
        self.device = device
        self.corpus = corpus or load_corpus(data_config(run))
        self.model = build_model(model_config(run), seed=run.seed).to(device)
        self.optimizer = build_optimizer(self.model, optim_config(run))
        self.trainer = Trainer(self.model, self.optimizer, optim_config(run), device=device)
        self.stream = BatchStream(
            self.corpus.train_tokens,
            batch_size=run.batch_size,
            seq_len=run.seq_len,
            seed=run.seed,
            shard=shard % run.num_shards,
            num_shards=run.num_shards,
        )

    def train_round(self, state: GlobalState, stop: threading.Event | None = None) -> RoundWork | None:
        """Load θ(t), run H inner steps, return the pseudo-gradient (None if stopped midway)."""
        state.load_into(self.model)
        # The schedule follows the run's round, so a late joiner uses the swarm's current lr.
        self.trainer.step = state.round * self.run.inner_steps
        start = time.perf_counter()
        losses, tokens = [], 0
        for _ in range(self.run.inner_steps):
            if stop is not None and stop.is_set():
                return None
            inputs, targets = next(self.stream)
            stats = self.trainer.train_step(inputs, targets)
            losses.append(stats.lm_loss)
            tokens += stats.tokens
        compute_s = time.perf_counter() - start
        return RoundWork(state.pseudo_gradient(self.model), sum(losses) / len(losses), tokens, compute_s)

    def evaluate(self, state: GlobalState) -> float:
        """Eval loss (nats/byte) of the global weights on the held-out split."""
        state.load_into(self.model)
        batches = eval_batches(
            self.corpus.eval_tokens, batch_size=self.run.batch_size, seq_len=self.run.seq_len, max_batches=self.run.eval_batches
        )
        return evaluate(self.model, batches, device=self.device)
