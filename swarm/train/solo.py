"""The solo trainer: one process, one device, the baseline every swarm run is compared with."""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models import LanguageModel, ModelConfig, build_model, generate, get_preset
from swarm.data import BatchStream, Corpus, DataConfig, eval_batches, load_corpus
from swarm.data.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer, vocab_overrides
from swarm.log import get_logger
from swarm.train.checkpoint import (
    META_FILE,
    CheckpointError,
    load_checkpoint,
    read_meta,
    restore_rng_state,
    save_checkpoint,
)
from swarm.train.metrics import MetricsWriter
from swarm.train.optim import OptimConfig, build_optimizer
from swarm.train.progress import progress_bar
from swarm.train.sinks import MetricSinks, SinkConfig
from swarm.train.step import StepStats, Trainer, check_device_name, evaluate, resolve_device

logger = get_logger(__name__)

CHECKPOINT_SUBDIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
_TIMING_WARMUP_STEPS = 3  # first steps pay for allocator and kernel warm-up; kept out of the median


def suggested_lr(model_cfg: ModelConfig) -> float:
    """Peak AdamW lr by model width: small byte-level models train fastest near 3e-3, wider ones
    need less (roughly the usual GPT scaling of lr with 1/width)."""
    if model_cfg.d_model <= 128:
        return 3e-3
    if model_cfg.d_model <= 384:
        return 2e-3
    return 6e-4 if model_cfg.d_model <= 768 else 3e-4


def default_optim(model_cfg: ModelConfig, steps: int, lr: float | None = None, warmup_steps: int | None = None) -> OptimConfig:
    """OptimConfig for a run of `steps` steps: cosine over the whole run, 10% warmup capped at 100."""
    return OptimConfig(
        lr=lr if lr is not None else suggested_lr(model_cfg),
        warmup_steps=warmup_steps if warmup_steps is not None else min(100, steps // 10),
        total_steps=max(steps, 1),
    )


@dataclass
class TrainConfig:
    """Everything a solo run needs; stored in every checkpoint so `--resume` can rebuild it."""

    preset: str = "nano"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields over the preset
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: str = ""  # a BPE tokenizer.json (swarm-tokenizer train); "" = bytes. Sets the model's vocab_size
    # Sequences per step. 16 x 128 beat 32 x 128 and 16 x 256 for nano on a fixed token budget on CPU.
    batch_size: int = 16
    seq_len: int = 128  # tokens (bytes) per sequence; <= the model's max_seq_len
    steps: int = 1000  # total optimizer steps of the run
    # None: OptimConfig defaults with lr=suggested_lr(model), total_steps=steps and
    # warmup_steps=min(100, steps // 10).
    optim: OptimConfig | None = None
    eval_every: int = 100  # steps between evaluations; 0 = only at the end
    eval_batches: int = 8  # batches of the held-out split per evaluation
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end (when out_dir is set)
    out_dir: str | None = "runs/solo"  # checkpoint and metrics go here; None writes nothing
    metrics_path: str | None = None  # default <out_dir>/metrics.jsonl
    sinks: SinkConfig = field(default_factory=SinkConfig)  # TensorBoard / W&B, besides the JSONL
    seed: int = 0  # model init and data order
    device: str = "auto"  # auto | cpu | cuda[:N]
    sample_bytes: int = 0  # bytes to generate after training (0 = none)
    sample_prompt: str = "\n"
    sample_temperature: float = 0.8
    sample_top_k: int | None = None

    def __post_init__(self) -> None:
        if self.optim is None:
            self.optim = default_optim(self.model_config(), self.steps)
        for name in ("batch_size", "seq_len", "steps", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "sample_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.sample_temperature < 0:
            raise ValueError(f"TrainConfig.sample_temperature must be >= 0, got {self.sample_temperature}")
        self.model_config()  # unknown preset or bad overrides fail here, not after loading data
        check_device_name(self.device)  # availability is checked when the run starts

    def model_config(self) -> ModelConfig:
        cfg = get_preset(self.preset, **vocab_overrides(self.load_tokenizer(), self.model_overrides))
        if self.seq_len > cfg.max_seq_len:
            raise ValueError(f"seq_len {self.seq_len} exceeds the {self.preset} model's max_seq_len {cfg.max_seq_len}")
        return cfg

    def load_tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer or None)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data"], d["optim"] = self.data.to_dict(), self.optim.to_dict()  # type: ignore[union-attr]
        d["sinks"] = self.sinks.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["data"] = DataConfig.from_dict(d["data"])
        d["optim"] = OptimConfig.from_dict(d["optim"]) if d.get("optim") is not None else None
        d["sinks"] = SinkConfig.from_dict(d.get("sinks") or {})  # checkpoints from before sinks have none
        return cls(**d)


@dataclass
class SoloResult:
    steps: int  # optimizer steps completed in total (including those before a resume)
    final_train_loss: float  # lm_loss of the last step
    final_eval_loss: float | None  # held-out lm_loss, nats per byte; None without an eval split
    tokens_per_s_median: float  # over this process's steps after warm-up
    tokens_seen: int
    elapsed_s: float
    out_dir: str | None
    metrics_path: str | None
    checkpoint_dir: str | None
    sample: str | None
    losses: list[float] = field(default_factory=list)  # lm_loss per step run by this process


def checkpoint_dir_of(path: str | Path) -> Path:
    """A checkpoint directory, given it or a run's out dir that contains `checkpoint/`."""
    path = Path(path)
    for candidate in (path, path / CHECKPOINT_SUBDIR):
        if (candidate / META_FILE).is_file():
            return candidate
    raise CheckpointError(f"no checkpoint in {str(path)!r} (looked for {META_FILE} and {CHECKPOINT_SUBDIR}/{META_FILE})")


def load_train_config(path: str | Path) -> TrainConfig:
    """The TrainConfig stored in the checkpoint at `path` (a run dir or checkpoint dir)."""
    return TrainConfig.from_dict(read_meta(checkpoint_dir_of(path))["train_config"])


class _SoloRun:
    """State of one run_solo call, split into small steps."""

    def __init__(self, cfg: TrainConfig, resume: str | Path | None) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model_cfg = cfg.model_config()
        self.tokenizer = cfg.load_tokenizer()
        self.corpus: Corpus = load_corpus(cfg.data, self.tokenizer)
        logger.info(
            "corpus %s: %d train / %d eval tokens, %d documents, fingerprint %s",
            cfg.data.source,
            len(self.corpus.train_tokens),
            len(self.corpus.eval_tokens),
            self.corpus.num_documents,
            self.corpus.fingerprint[:12],
        )
        self.model: LanguageModel = build_model(self.model_cfg, seed=cfg.seed).to(self.device)
        assert cfg.optim is not None
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.trainer = Trainer(self.model, self.optimizer, cfg.optim, device=self.device)
        self.stream = BatchStream(self.corpus.train_tokens, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed)
        self.evals = self._eval_set()
        self.elapsed_before_s = 0.0
        self.tokens_seen = 0
        if resume is not None:
            self._resume(checkpoint_dir_of(resume))
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else None
        metrics = cfg.metrics_path or (str(self.out_dir / METRICS_FILE) if self.out_dir else None)
        self.metrics_path = metrics
        self.metrics = MetricsWriter(metrics, resume_step=self.trainer.step if resume else None) if metrics else None
        self.sinks = MetricSinks.open(
            cfg.sinks, name=self.out_dir.name if self.out_dir else "solo", step_key="step", config=cfg.to_dict()
        )
        self.step_times: list[float] = []
        self.losses: list[float] = []
        self.eval_loss: float | None = None
        self.last: StepStats | None = None
        self.start = time.perf_counter()

    def _eval_set(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if len(self.corpus.eval_tokens) == 0:
            return []
        cfg = self.cfg
        return eval_batches(
            self.corpus.eval_tokens,
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            max_batches=cfg.eval_batches,
        )

    def _resume(self, ckpt: Path) -> None:
        meta = load_checkpoint(ckpt, model=self.model, optimizer=self.optimizer)
        if meta["model_config"] != self.model_cfg.to_dict():
            raise CheckpointError(f"{ckpt}: model config differs from this run's ({self.cfg.preset} + overrides)")
        if meta["corpus_fingerprint"] != self.corpus.fingerprint:
            raise CheckpointError(f"{ckpt}: corpus fingerprint differs: the data source or its contents changed")
        self.stream.load_state_dict(meta["data_state"])
        self.trainer.step = int(meta["step"])
        self.elapsed_before_s = float(meta.get("elapsed_s", 0.0))
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        restore_rng_state(meta["rng"])
        logger.info("resumed from %s at step %d", ckpt, self.trainer.step)

    def elapsed_s(self) -> float:
        return self.elapsed_before_s + time.perf_counter() - self.start

    def one_step(self, end: int) -> dict[str, Any]:
        """Train one step, then evaluate / record / checkpoint as due; returns the metrics record."""
        cfg = self.cfg
        inputs, targets = next(self.stream)
        t0 = time.perf_counter()
        stats = self.last = self.trainer.train_step(inputs, targets)
        self.step_times.append(time.perf_counter() - t0)
        self.tokens_seen += stats.tokens
        self.losses.append(stats.lm_loss)
        record = {
            **dataclasses.asdict(stats),
            "tokens_per_s": stats.tokens / self.step_times[-1],
            "elapsed_s": self.elapsed_s(),
        }
        if (cfg.eval_every and stats.step % cfg.eval_every == 0) or stats.step == cfg.steps:
            self.eval_loss = self.evaluate()
            if self.eval_loss is not None:
                record["eval_loss"] = self.eval_loss
                _log_eval(stats, self.eval_loss, cfg.steps, record["tokens_per_s"], record["elapsed_s"])
        if self.metrics:
            self.metrics.write(record)
        self.sinks.log(record)
        if (cfg.checkpoint_every and stats.step % cfg.checkpoint_every == 0) or stats.step == end:
            self.save()
        return record

    def result(self) -> SoloResult:
        if self.last is None:
            raise ValueError(f"nothing to do: the run is already at step {self.trainer.step} of {self.cfg.steps}")
        timed = self.step_times[_TIMING_WARMUP_STEPS:] or self.step_times
        return SoloResult(
            steps=self.trainer.step,
            final_train_loss=self.last.lm_loss,
            final_eval_loss=self.eval_loss,
            tokens_per_s_median=self.cfg.batch_size * self.cfg.seq_len / statistics.median(timed),
            tokens_seen=self.tokens_seen,
            elapsed_s=self.elapsed_s(),
            out_dir=str(self.out_dir) if self.out_dir else None,
            metrics_path=self.metrics_path,
            checkpoint_dir=str(self.out_dir / CHECKPOINT_SUBDIR) if self.out_dir else None,
            sample=self.sample() if self.trainer.step == self.cfg.steps else None,
            losses=self.losses,
        )

    def save(self) -> Path | None:
        if self.out_dir is None:
            return None
        meta = {
            "step": self.trainer.step,
            "model_config": self.model_cfg.to_dict(),
            "train_config": self.cfg.to_dict(),
            "data_state": self.stream.state_dict(),
            "corpus_fingerprint": self.corpus.fingerprint,
            "tokenizer_sha256": self.tokenizer.sha256,
            "elapsed_s": self.elapsed_s(),
            "tokens_seen": self.tokens_seen,
        }
        path = save_checkpoint(self.out_dir / CHECKPOINT_SUBDIR, model=self.model, optimizer=self.optimizer, meta=meta)
        if self.tokenizer.sha256:  # the checkpoint carries its tokenizer: swarm-export finds it there
            (path / TOKENIZER_FILE).write_text(self.tokenizer.to_json())
        return path

    def evaluate(self) -> float | None:
        return evaluate(self.model, self.evals, device=self.device) if self.evals else None

    def sample(self) -> str | None:
        cfg = self.cfg
        if cfg.sample_bytes == 0:
            return None
        tok = self.tokenizer
        prompt = torch.tensor([[tok.bos_id, *tok.encode(cfg.sample_prompt).tolist()]], device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        out = generate(
            self.model,
            prompt,
            cfg.sample_bytes,
            temperature=cfg.sample_temperature,
            top_k=cfg.sample_top_k,
            generator=gen,
        )
        return tok.decode(out[0, prompt.shape[1] :].cpu())


def run_solo(
    cfg: TrainConfig,
    *,
    progress: bool | None = None,
    resume: str | Path | None = None,
    stop_at_step: int | None = None,
) -> SoloResult:
    """Train `cfg.steps` steps (continuing a checkpoint when `resume` is given) and evaluate.

    `progress=None` shows a bar only when stderr is a terminal. `stop_at_step` ends this process
    early at that step (with a checkpoint), as a preempted job would; resuming then continues
    exactly as if it had never stopped.
    """
    run = _SoloRun(cfg, resume)
    end = min(cfg.steps, stop_at_step) if stop_at_step is not None else cfg.steps
    show = sys.stderr.isatty() if progress is None else progress
    try:
        with progress_bar(total=cfg.steps, initial=run.trainer.step, enabled=show) as bar:
            while run.trainer.step < end:
                record = run.one_step(end)
                bar.update(record["lm_loss"], record["tokens_per_s"])
    finally:
        if run.metrics:
            run.metrics.close()
        run.sinks.close()
    return run.result()


def _log_eval(stats: StepStats, eval_loss: float, total: int, tokens_per_s: float, elapsed_s: float) -> None:
    logger.info(
        "step %d/%d | train %.4f | eval %.4f nats/token (%.3f bits) | lr %.2e | %.0f tok/s | %.1f s",
        stats.step,
        total,
        stats.lm_loss,
        eval_loss,
        eval_loss / math.log(2),
        stats.lr,
        tokens_per_s,
        elapsed_s,
    )
