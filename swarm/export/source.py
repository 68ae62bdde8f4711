"""Where an export's weights come from: a solo checkpoint or a swarm's saved state.

* solo: a checkpoint directory (``meta.json`` + ``model.safetensors``) or the run's out dir that
  holds ``checkpoint/``; the model config is in its meta, the tokenizer file next to it.
* swarm: a coordinator's state dir (``run.json`` + ``state/``) or a saved state directory
  (``swarm-state`` meta) whose run description is given or sits in the parent directory; the
  model config comes from the run description's preset and overrides.

Either way the tensors are loaded into a ``LanguageModel`` first, so a file that does not fit the
config fails with the checkpoint code's own clear message before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models import LanguageModel, ModelConfig, get_preset
from swarm.data.tokenizer import TOKENIZER_FILE, Tokenizer, TokenizerError, load_tokenizer
from swarm.export.hf import ExportError

RUN_FILE = "run.json"  # what a coordinator keeps in its state dir (swarm/processes/coordinator.py)
STATE_SUBDIR = "state"


@dataclass
class ExportSource:
    cfg: ModelConfig
    params: dict[str, torch.Tensor]  # our state_dict names, fp32 CPU
    tokenizer_sha256: str  # "" = the byte tokenizer
    tokenizer_dirs: list[Path]  # where the run keeps its tokenizer file, searched in order
    provenance: dict[str, Any] = field(default_factory=dict)

    def model(self) -> LanguageModel:
        """Our model with these weights (what the round trip test compares against)."""
        model = LanguageModel(self.cfg)
        model.load_state_dict(self.params, strict=True)
        return model.eval()

    def tokenizer(self, path: str | Path | None = None) -> Tokenizer:
        """The run's tokenizer: `path` if given, else the file kept next to the source; its hash
        must be the one the run recorded."""
        if not self.tokenizer_sha256:
            if path is not None:
                return load_tokenizer(path, expected_sha256="")  # a BPE for a byte run: mismatch error
            return load_tokenizer(None)
        candidates = [Path(path)] if path is not None else [d / TOKENIZER_FILE for d in self.tokenizer_dirs]
        for candidate in candidates:
            if candidate.is_file():
                return load_tokenizer(candidate, expected_sha256=self.tokenizer_sha256)
        raise TokenizerError(
            f"the run uses tokenizer sha256 {self.tokenizer_sha256} but no {TOKENIZER_FILE} was found in "
            f"{[str(c.parent) for c in candidates]}; pass it with --tokenizer"
        )


def load_source(path: str | Path, *, run_file: str | Path | None = None) -> ExportSource:
    """Detect what `path` is (see the module docstring) and load it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ExportError(f"nothing to export at {str(path)!r}")
    if (path / RUN_FILE).is_file() and (path / STATE_SUBDIR / "meta.json").is_file():
        return _swarm_source(path / STATE_SUBDIR, Path(run_file) if run_file else path / RUN_FILE)
    meta = _meta(path) or _meta(path / "checkpoint")
    if meta is not None and meta.get("format") == "swarm-state":
        return _swarm_source(path, Path(run_file) if run_file else path.parent / RUN_FILE)
    if meta is not None and meta.get("format") == "swarm-checkpoint":
        return _solo_source(path)
    raise ExportError(
        f"{str(path)!r} is neither a solo checkpoint (meta.json of format swarm-checkpoint), a saved swarm "
        f"state (format swarm-state) nor a coordinator state dir ({RUN_FILE} + {STATE_SUBDIR}/)"
    )


def _meta(directory: Path) -> dict[str, Any] | None:
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise ExportError(f"{meta_path}: not valid JSON ({exc})") from exc
    return meta if isinstance(meta, dict) else None


def _solo_source(path: Path) -> ExportSource:
    from swarm.train.checkpoint import load_checkpoint
    from swarm.train.solo import checkpoint_dir_of

    ckpt = checkpoint_dir_of(path)
    meta = _meta(ckpt) or {}
    cfg = ModelConfig.from_dict(meta["model_config"])
    model = LanguageModel(cfg)
    load_checkpoint(ckpt, model=model)
    return ExportSource(
        cfg=cfg,
        params=_fp32(model.state_dict()),
        tokenizer_sha256=str(meta.get("tokenizer_sha256", "")),
        tokenizer_dirs=[ckpt, ckpt.parent],
        provenance={"source": "solo", "step": meta.get("step"), "checkpoint": str(ckpt.resolve())},
    )


def _swarm_source(state_dir: Path, run_file: Path) -> ExportSource:
    from swarm.net.schema import from_plain
    from swarm.run import RunConfig
    from swarm.state import load_state

    if not run_file.is_file():
        raise ExportError(f"saved state {str(state_dir)!r} needs its run description: no {str(run_file)!r} (pass --run)")
    run = from_plain(RunConfig, json.loads(run_file.read_text()))
    state = load_state(state_dir, run_id=run.run_id)
    if state is None:
        raise ExportError(f"no saved state in {str(state_dir)!r}")
    cfg = get_preset(run.preset, **run.model_overrides)
    model = LanguageModel(cfg)
    try:
        model.load_state_dict(state.params, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{state_dir}: the saved tensors do not fit preset {run.preset!r} of run {run.run_id}: {exc}") from exc
    return ExportSource(
        cfg=cfg,
        params=_fp32(model.state_dict()),
        tokenizer_sha256=run.tokenizer_sha256,
        tokenizer_dirs=[run_file.parent, state_dir],
        provenance={"source": "swarm", "run_id": run.run_id, "round": state.round, "state_hash": state.hash},
    )


def _fp32(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.detach().to("cpu", torch.float32) for n, t in state_dict.items()}
