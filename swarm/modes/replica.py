"""A peer's local work for one round: H inner AdamW steps from θ(t), on the whole model or on the
part its role trains (a full replica, or the dense parameters plus owned MoE experts in SPES).

Runs in a worker thread (see swarm/processes/volunteer.py) so the event loop keeps serving; everything here is plain
single-device torch. Every mode whose peers hold a whole replica shares this worker (`ReplicaMode`);
the pipeline's full replicas and SPSA's worker build on it. The inner optimizer state persists across rounds, as in DiLoCo; parameters
that are not trained (other peers' experts) have no gradient and no optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from models import ModelConfig, build_model, count_active_parameters, count_parameters, get_preset
from models.moe import freeze_experts
from swarm.data.corpus import Corpus, DataConfig, load_corpus
from swarm.data.sampler import BatchStream, eval_batches
from swarm.data.shards import stream_slot
from swarm.data.tokenizer import run_tokenizer_source
from swarm.modes.base import RoundWork, TrainingMode, Worker
from swarm.net.records import Role
from swarm.run import RunConfig
from swarm.state import STATE_FORMAT, GlobalState, load_state
from swarm.train.checkpoint import CheckpointError, load_checkpoint
from swarm.train.optim import OptimConfig, build_optimizer
from swarm.train.step import Trainer, evaluate


def model_config(run: RunConfig) -> ModelConfig:
    return get_preset(run.preset, **run.model_overrides)


def data_config(run: RunConfig) -> DataConfig:
    return DataConfig(
        source=run.data_source,
        text_field=run.text_field,
        eval_fraction=run.eval_fraction,
        max_bytes=run.data_max_bytes,
        tokenizer=run_tokenizer_source(run),  # put in the cache by obtain_run_tokenizer when the node joined
    )


def shard_stream(run: RunConfig, corpus: Corpus, shard: int) -> BatchStream:
    """The training batches of data shard `shard` (of a sharded corpus: its part of one file)."""
    _, sub_shard, sub_shards = stream_slot(len(run.corpus), run.num_shards, shard)
    return BatchStream(
        corpus.train_tokens,
        batch_size=run.batch_size,
        seq_len=run.seq_len,
        seed=run.seed,
        shard=sub_shard,
        num_shards=sub_shards,
    )


def optim_config(run: RunConfig) -> OptimConfig:
    return OptimConfig(
        lr=run.inner_lr,
        warmup_steps=run.warmup_steps,
        total_steps=run.total_inner_steps,
        weight_decay=run.weight_decay,
        grad_clip=run.grad_clip,
    )


def initial_state(run: RunConfig, init_from: str | Path | None = None) -> GlobalState:
    """θ(0): the model initialised from the run seed, identical on every machine, or the weights of a
    checkpoint (`init_from`: a solo checkpoint or a swarm's saved state, both safetensors)."""
    model = build_model(model_config(run), seed=run.seed)
    if init_from is not None:
        load_weights(model, init_from)
    return GlobalState.from_model(model)


def load_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """The parameters of a solo checkpoint or a saved swarm state, into `model` (names and shapes
    checked; CheckpointError when they do not fit or the directory is neither)."""
    directory = Path(directory)
    if not (directory / "meta.json").is_file():
        raise CheckpointError(f"no checkpoint or saved state at {str(directory)!r}")
    meta = json.loads((directory / "meta.json").read_text())
    if meta.get("format") != STATE_FORMAT:
        load_checkpoint(directory, model=model)  # a solo checkpoint (checks its format version)
        return
    tensors = load_file(str(directory / "model.safetensors"))
    params = dict(model.named_parameters())
    if set(tensors) != set(params):
        raise CheckpointError(f"{directory}: its tensors do not match the model's ({len(set(tensors) ^ set(params))} differ)")
    with torch.no_grad():
        for name, param in params.items():
            if tensors[name].shape != param.shape:
                shapes = f"{tuple(tensors[name].shape)}, the model {tuple(param.shape)}"
                raise CheckpointError(f"{directory}: {name} has shape {shapes}")
            param.copy_(tensors[name])


def start_state(run: RunConfig, directory: str | Path) -> GlobalState:
    """A state to start from instead of downloading one: this run's saved state (any round), or a
    checkpoint taken as round 0, which must be the run's own initial weights."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("format") == STATE_FORMAT and meta.get("run_id") == run.run_id:
        saved = load_state(directory, run_id=run.run_id)
        if saved is not None:
            return saved
    state = initial_state(run, directory)
    expected = run.init_hash or initial_state(run).hash
    if state.hash != expected:
        raise ValueError(f"{directory}: not this run's initial weights (hash {state.hash[:12]}, the run's {expected[:12]})")
    return state


MEASURE_WHOLE_BELOW = 50_000_000  # parameters: a bigger model is measured on two of its layers


def measure_tokens_per_s(run: RunConfig, device: torch.device, steps: int = 2) -> float:
    """Forward+backward speed of this machine on the run's model and batch (announced on joining).

    A model above MEASURE_WHOLE_BELOW parameters is measured on a two-layer model of the same width
    and scaled by the ratio of parameters a token passes through: a peer that will hold one stage
    of a model too big for it must not build the whole model to say how fast it is."""
    cfg = model_config(run)
    if count_parameters(cfg) > MEASURE_WHOLE_BELOW and cfg.n_layers > 2:
        small = dataclasses.replace(cfg, n_layers=2)
        return _measure(small, run, device, steps) * count_active_parameters(small) / count_active_parameters(cfg)
    return _measure(cfg, run, device, steps)


def _measure(cfg: ModelConfig, run: RunConfig, device: torch.device, steps: int) -> float:
    model = build_model(cfg, seed=run.seed).to(device)
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
    """A model that trains on its own data shard: all of it, or the dense part plus some experts."""

    def __init__(
        self,
        run: RunConfig,
        *,
        shard: int,
        device: torch.device,
        corpus: Corpus | None = None,
        experts: list[tuple[int, int]] | None = None,
        prepare_model: Callable[[torch.nn.Module], None] | None = None,
    ) -> None:
        """`experts`: the MoE (layer, expert) pairs to train; None trains every parameter.
        `prepare_model`: the run's mode's change to the model before weights load (its
        `TrainingMode.prepare_model`, e.g. the pipeline's fixed embedding); None changes nothing."""
        self.run = run
        self.device = device
        self.corpus = corpus or load_corpus(data_config(run))
        self.model = build_model(model_config(run), seed=run.seed).to(device)
        if prepare_model is not None:
            prepare_model(self.model)
        if experts is not None:
            freeze_experts(self.model, experts)
        self.optimizer = build_optimizer(self.model, optim_config(run))
        self.trainer = Trainer(self.model, self.optimizer, optim_config(run), device=device)
        self.stream = shard_stream(run, self.corpus, shard)

    def read_shard(self, shard: int, corpus: Corpus | None = None) -> None:
        """Train on data shard `shard` from now on (of `corpus` if given, else of the current one)."""
        self.corpus = corpus or self.corpus
        self.stream = shard_stream(self.run, self.corpus, shard)

    def train_experts(self, experts: list[tuple[int, int]]) -> None:
        """Train these experts from now on; AdamW moments of parameters still trained are kept."""
        freeze_experts(self.model, experts)
        old = self.optimizer
        self.optimizer = build_optimizer(self.model, optim_config(self.run))
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p in old.state:
                    self.optimizer.state[p] = old.state[p]
        step = self.trainer.step
        self.trainer = Trainer(self.model, self.optimizer, optim_config(self.run), device=self.device, step=step)

    def trained_names(self) -> list[str]:
        """Names of the parameters this replica trains (its contribution), sorted."""
        return sorted(n for n, p in self.model.named_parameters() if p.requires_grad)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of gradients (one per trained parameter during a step) and of AdamW state held now."""
        grads = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        optim = sum(
            t.numel() * t.element_size() for st in self.optimizer.state.values() for t in st.values() if torch.is_tensor(t)
        )
        return {"grad_bytes": grads, "optimizer_bytes": optim}

    def link_bytes(self) -> dict[str, int]:
        return {}  # a full replica talks to no other peer while it trains

    def train_round(self, state: GlobalState, stop: threading.Event | None = None) -> RoundWork | None:
        """Load θ(t), run H inner steps, return the pseudo-gradient (None if stopped midway)."""
        state.load_into(self.model)
        # The schedule follows the run's round, so a late joiner uses the swarm's current lr.
        self.trainer.step = self.run.steps_before(state.round)
        start, cpu_start = time.perf_counter(), time.thread_time()
        losses, tokens = [], 0
        for _ in range(self.run.inner_steps_at(state.round)):
            if stop is not None and stop.is_set():
                return None
            inputs, targets = next(self.stream)
            stats = self.trainer.train_step(inputs, targets)
            losses.append(stats.lm_loss)
            tokens += stats.tokens
        compute_s, compute_cpu_s = time.perf_counter() - start, time.thread_time() - cpu_start
        delta = state.pseudo_gradient(self.model, self.trained_names())
        return RoundWork(delta, sum(losses) / len(losses), tokens, compute_s, compute_cpu_s=compute_cpu_s)

    def evaluate(self, state: GlobalState) -> float:
        """Eval loss (nats/byte) of the global weights on the held-out split."""
        state.load_into(self.model)
        batches = eval_batches(
            self.corpus.eval_tokens, batch_size=self.run.batch_size, seq_len=self.run.seq_len, max_batches=self.run.eval_batches
        )
        return evaluate(self.model, batches, device=self.device)


PROBE_TOKENS = 512  # held-out tokens a probe batch holds at least ...
PROBE_WINDOWS = 16  # ... in at least this many windows (the standard error needs them: with 4, a
# t-statistic of -3 comes from noise alone in 3% of honest shares) ...
PROBE_WINDOW = 64  # ... of at most this many tokens (16 windows of 64 tokens at seq_len 128)


class LossProbe:
    """A round leader's loss on data of its choosing (swarm/round/usefulness.py): windows of the
    held-out split drawn at random from a seed (at least PROBE_TOKENS tokens in PROBE_WINDOWS windows
    or more, each at most PROBE_WINDOW tokens of context),
    evaluated on a model of its own (the coordinator's evaluator runs beside it), per window, so the
    leader can tell a real effect from the batch's noise. Cost per round: one forward pass of the
    batch per contribution, plus one."""

    def __init__(
        self,
        run: RunConfig,
        corpus: Corpus,
        *,
        tokens: int = PROBE_TOKENS,
        prepare_model: Callable[[torch.nn.Module], None] | None = None,
    ) -> None:
        self.run, self.tokens = run, corpus.eval_tokens
        self.window = min(run.seq_len, PROBE_WINDOW)
        self.sequences = max(PROBE_WINDOWS, -(-tokens // self.window))
        if len(self.tokens) <= self.window + 1:
            raise ValueError(f"the held-out split ({len(self.tokens)} tokens) is too small to probe windows of {self.window}")
        self.model = build_model(model_config(run), seed=run.seed)
        if prepare_model is not None:
            prepare_model(self.model)
        self.model.eval()

    def batch(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed % (1 << 63))
        starts = torch.randint(0, len(self.tokens) - self.window - 1, (self.sequences,), generator=generator)
        windows = [np.asarray(self.tokens[s : s + self.window + 1], dtype=np.int64) for s in starts.tolist()]
        batch = torch.from_numpy(np.stack(windows))
        return batch[:, :-1], batch[:, 1:]

    def _per_window(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(inputs).logits.float()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return losses.mean(dim=1).double()

    def losses(
        self, state: GlobalState, updates: Iterable[dict[str, torch.Tensor]], seed: int
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-window loss at θ and at θ − u for each u, on one batch (torch threads: the caller's)."""
        inputs, targets = self.batch(seed)
        state.load_into(self.model)
        params = dict(self.model.named_parameters())
        out = []
        with torch.no_grad():
            base = self._per_window(inputs, targets)
            for update in updates:
                for name, u in update.items():
                    params[name].sub_(u)
                out.append(self._per_window(inputs, targets))
                for name in update:
                    params[name].copy_(state.params[name])
        return base, out


class ReplicaMode(TrainingMode):
    """A mode whose peers train full replicas on their own data shards (the default roles): its
    worker is a `Replica` of the whole model."""

    scored = True

    def make_probe(self, corpus: Corpus) -> LossProbe | None:
        return LossProbe(self.run, corpus, prepare_model=self.prepare_model)

    def make_worker(self, role: Role, device: torch.device, corpus: Corpus | None = None) -> Worker:
        return Replica(self.run, shard=role.data_shard, device=device, corpus=corpus, prepare_model=self.prepare_model)
