"""Checkpoints as safetensors + JSON: nothing is pickled, so a checkpoint from anywhere is safe to load.

A checkpoint is a directory of three files (see docs/training.md):
  model.safetensors      model state_dict, tied tensors stored once
  optimizer.safetensors  optimizer state, one tensor per (param, slot): optim/<param name>/<slot>
  meta.json              format version, step, configs, data stream state, RNG states, fingerprint
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT_NAME = "swarm-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
META_FILE = "meta.json"
_OPTIM_PREFIX = "optim/"


class CheckpointError(ValueError):
    """A checkpoint is missing, of another format version, or does not fit the model/optimizer."""


def capture_rng_state() -> dict[str, Any]:
    """torch CPU (and CUDA) generator states as base64 strings (JSON-safe)."""
    state: dict[str, Any] = {"torch_cpu": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch_cpu"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda_states = [_unb64(s) for s in state["torch_cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def save_checkpoint(
    directory: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None, meta: dict[str, Any]
) -> Path:
    """Write model, optimizer and `meta` (plus format fields and RNG state) atomically to `directory`.

    `meta` should hold at least: step, model_config, train_config, data_state, corpus_fingerprint.
    The files go to a temporary sibling first and replace `directory` in one rename, so a crash
    mid-save leaves the previous checkpoint intact.
    """
    directory = Path(directory)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors, tied = _model_tensors(model)
    save_file(tensors, str(tmp / MODEL_FILE))
    full_meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **meta,
        "tied": tied,
        "rng": capture_rng_state(),
        "torch_version": torch.__version__,
        "saved_unix_s": time.time(),
    }
    if optimizer is not None:
        optim_tensors, full_meta["optimizer"] = _optimizer_tensors(model, optimizer)
        save_file(optim_tensors, str(tmp / OPTIM_FILE))
    (tmp / META_FILE).write_text(json.dumps(full_meta, indent=1, sort_keys=True))
    replace_dir(tmp, directory)
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    """meta.json of a checkpoint, after checking that it is one and of a version we read."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(directory)!r}: {META_FILE} not found")
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a {FORMAT_NAME} (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('format_version')!r}, this code reads version {FORMAT_VERSION}"
        )
    return meta


def load_checkpoint(directory: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load weights (and optimizer state) in place after validating names and shapes; return meta.

    RNG states are not touched here: call `restore_rng_state(meta["rng"])` when resuming a run.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    tensors = _read_tensors(directory / MODEL_FILE)
    _load_model(model, tensors, meta.get("tied", {}), directory)
    if optimizer is not None:
        if "optimizer" not in meta:
            raise CheckpointError(f"{directory}: checkpoint has no optimizer state")
        _load_optimizer(model, optimizer, _read_tensors(directory / OPTIM_FILE), meta["optimizer"], directory)
    return meta


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def replace_dir(tmp: Path, directory: Path) -> None:
    """Put the finished directory `tmp` in the place of `directory` (a reader never sees half of one)."""
    old = directory.with_name(f"{directory.name}.old-{os.getpid()}")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def _model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """state_dict with tensors that share storage saved once; `tied` maps alias -> saved name."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = t.detach().cpu().contiguous()
    return tensors, tied


def _load_model(model: nn.Module, tensors: dict[str, torch.Tensor], tied: dict[str, str], where: Path) -> None:
    expected = model.state_dict()
    full = {name: tensors[tied.get(name, name)] for name in expected if tied.get(name, name) in tensors}
    missing = sorted(set(expected) - set(full))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: model tensors do not match (missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "was it saved from another preset?"
        )
    for name, t in full.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{where}: shape of {name} is {tuple(t.shape)} in the checkpoint, {tuple(expected[name].shape)} in the model"
            )
    model.load_state_dict(full, strict=True)


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    names = _param_names(model)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    groups = []
    for group in optimizer.param_groups:
        groups.append([names[id(p)] for p in group["params"]])
        for p in group["params"]:
            for slot, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{_OPTIM_PREFIX}{names[id(p)]}/{slot}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(names[id(p)], {})[slot] = value
    return tensors, {"type": type(optimizer).__name__, "param_groups": groups, "scalars": scalars}


def _load_optimizer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    saved: dict[str, Any],
    where: Path,
) -> None:
    names = _param_names(model)
    current = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    if saved.get("type") != type(optimizer).__name__ or saved.get("param_groups") != current:
        raise CheckpointError(
            f"{where}: optimizer does not match the checkpoint ({saved.get('type')} with "
            f"{[len(g) for g in saved.get('param_groups', [])]} params per group vs "
            f"{type(optimizer).__name__} with {[len(g) for g in current]}); trainable parameters differ?"
        )
    by_name: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        param_name, _, slot = key[len(_OPTIM_PREFIX) :].rpartition("/")
        by_name.setdefault(param_name, {})[slot] = t
    for param_name, slots in saved.get("scalars", {}).items():
        by_name.setdefault(param_name, {}).update(slots)
    params = {name: p for name, p in model.named_parameters()}
    state_dict = optimizer.state_dict()
    flat = [name for group in current for name in group]
    state: dict[int, dict[str, Any]] = {}
    for index, name in enumerate(flat):
        if name in by_name:
            _check_slot_shapes(name, by_name[name], params[name], where)
            state[index] = by_name[name]
    optimizer.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})


def _check_slot_shapes(name: str, slots: dict[str, Any], param: torch.Tensor, where: Path) -> None:
    for slot, value in slots.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0 and tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{where}: optimizer slot {name}/{slot} has shape {tuple(value.shape)}, param has {tuple(param.shape)}"
            )
