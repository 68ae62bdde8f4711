"""Per-round figures to TensorBoard and Weights & Biases, beside our own JSONL files.

The coordinator (rounds.jsonl), every peer (peer-<id>.jsonl) and the solo trainer (metrics.jsonl)
hand each row they append to `MetricSinks.log` as well, so the dashboards carry exactly the
figures of the files: every finite number in the row, under its JSONL key (`key/inner` inside a
nested object), at the row's round (or step). Strings (hashes, leaders, roles) and booleans stay
in the JSONL only.

Both backends are optional dependencies (the `metrics` extra): asking for one that
is not installed is a `MetricsUnavailable` error when the config is built, before a run starts.
W&B logs offline (to be uploaded later with `wandb sync`) when asked to, when WANDB_MODE says
so, or when its server cannot be reached or no API key is configured, so a volunteer without
network access to W&B still gets the run on disk rather than a hang or a crash.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import netrc
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from swarm.log import get_logger

logger = get_logger(__name__)

WANDB_DEFAULT_URL = "https://api.wandb.ai"
NOT_FIGURES = ("time",)  # wall clock of the row: the backends stamp their own
INSTALL_HINT = "pip install -e '.[metrics]' in the swarm checkout"


class MetricsUnavailable(ValueError):
    """A metrics backend was asked for but its package is not installed."""


@dataclass
class SinkConfig:
    """Where a process sends its per-round figures besides the JSONL (nothing by default)."""

    tensorboard_dir: str | None = None  # event files go to <dir>/<process name>/
    wandb_project: str | None = None  # W&B project; the run's id groups coordinator and peers
    wandb_offline: bool = False  # never contact the W&B server; `wandb sync` uploads later
    wandb_dir: str | None = None  # where W&B keeps its files (default: its ./wandb)
    wandb_probe_timeout_s: float = 3.0  # how long to try reaching the W&B server before going offline

    def __post_init__(self) -> None:
        if self.tensorboard_dir == "" or self.wandb_project == "":
            raise ValueError("tensorboard_dir and wandb_project must be non-empty when given")
        if not self.wandb_probe_timeout_s > 0:
            raise ValueError("wandb_probe_timeout_s must be positive")
        if self.tensorboard_dir is not None:
            _require("tensorboard", "--tensorboard")
        if self.wandb_project is not None:
            _require("wandb", "--wandb")

    @property
    def enabled(self) -> bool:
        return self.tensorboard_dir is not None or self.wandb_project is not None

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SinkConfig:
        return cls(**d)


def _require(package: str, flag: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise MetricsUnavailable(
            f"{flag} needs the {package!r} package, which is not installed: pip install {package} (or {INSTALL_HINT})"
        )


class Sink(Protocol):
    def log(self, figures: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


def figures(row: Mapping[str, object], step_key: str, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a JSONL row, less its step key and wall clock; a nested object's
    numbers are named `key/inner` (the coordinator's `coverage` per slot group)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if prefix == "" and (key == step_key or key in NOT_FIGURES):
            continue
        if isinstance(value, Mapping):
            out.update(figures(value, step_key, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


class MetricSinks:
    """Sends each row to every configured backend; with none configured it does nothing.

    Opening and closing block (W&B starts and stops a helper process): call them off the event
    loop. `log` only queues (both backends write from their own threads).
    """

    def __init__(self, sinks: list[Sink] | None = None, *, step_key: str = "round") -> None:
        self.sinks = list(sinks or [])
        self.step_key = step_key

    @classmethod
    def open(
        cls,
        cfg: SinkConfig | None,
        *,
        name: str,
        step_key: str = "round",
        group: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> MetricSinks:
        """Sinks for one process: `name` is its run in TensorBoard and W&B (coordinator, peer-1a2b3c4d, solo),
        `group` the swarm run they belong to, `config` the settings shown beside the curves."""
        sinks: list[Sink] = []
        if cfg is not None and cfg.tensorboard_dir is not None:
            sinks.append(TensorBoardSink(Path(cfg.tensorboard_dir) / name))
        if cfg is not None and cfg.wandb_project is not None:
            sinks.append(WandbSink(cfg, name=name, group=group, config=config))
        return cls(sinks, step_key=step_key)

    def log(self, row: Mapping[str, object]) -> None:
        step = row.get(self.step_key)
        if not self.sinks or not isinstance(step, int):
            return
        values = figures(row, self.step_key)
        for sink in self.sinks:
            sink.log(values, step)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:  # one backend failing to flush must not hide the others' data
                logger.exception("closing a metrics sink failed")
        self.sinks = []


class TensorBoardSink:
    """Scalars in TensorBoard event files, one tag per JSONL key."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for

        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir))
        logger.info("TensorBoard event files in %s", log_dir)

    def log(self, figures: dict[str, float], step: int) -> None:
        for tag, value in figures.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # rows come seconds apart: readers see each as it happens

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per process, grouped by the swarm run."""

    def __init__(self, cfg: SinkConfig, *, name: str, group: str | None, config: Mapping[str, Any] | None) -> None:
        self.wandb = importlib.import_module("wandb")
        self.mode = wandb_mode(cfg)
        self.run = self.wandb.init(
            project=cfg.wandb_project,
            name=name,
            group=group,
            config=dict(config or {}),
            dir=cfg.wandb_dir,
            mode=self.mode,
        )
        logger.info("W&B run %s in project %s (%s)", name, cfg.wandb_project, self.mode)

    def log(self, figures: dict[str, float], step: int) -> None:
        self.run.log(figures, step=step)

    def close(self) -> None:
        self.run.finish()
        if self.mode == "offline":
            where = getattr(getattr(self.run, "settings", None), "sync_dir", None) or "<its offline-run-* folder>"
            logger.info("W&B run saved offline; upload it with: wandb sync %s", where)


def wandb_mode(cfg: SinkConfig) -> str:
    """offline when asked (flag or WANDB_MODE), or when W&B cannot be reached or has no key; else online."""
    if cfg.wandb_offline:
        return "offline"
    chosen = os.environ.get("WANDB_MODE")
    if chosen:
        return chosen
    base = os.environ.get("WANDB_BASE_URL", WANDB_DEFAULT_URL)
    host = urlsplit(base).hostname or ""
    if not _has_api_key(host):
        logger.warning("no W&B API key (WANDB_API_KEY or `wandb login`): logging offline")
        return "offline"
    if not _reachable(base, cfg.wandb_probe_timeout_s):
        logger.warning("cannot reach the W&B server at %s: logging offline", base)
        return "offline"
    return "online"


def _has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(url: str, timeout_s: float) -> bool:
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False
