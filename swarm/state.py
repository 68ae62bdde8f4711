"""The global model state every replica agrees on, and the outer step that advances it.

The global weights live on the CPU in fp32 whatever device a peer trains on: applying the same
payloads in the same order with the same CPU kernels gives bit-identical results on every peer,
which a GPU's reduction order would not guarantee.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from swarm.run import OuterConfig
from swarm.train.checkpoint import replace_dir


class NonFiniteUpdateError(RuntimeError):
    """An aggregated pseudo-gradient or a resulting weight that is NaN or infinite."""


@dataclass
class GlobalState:
    """θ(round) plus the outer optimiser's momentum (dense DiLoCo only)."""

    round: int
    params: dict[str, torch.Tensor]  # name -> fp32 CPU tensor, sorted by name
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    _hash: str | None = field(default=None, repr=False)  # of the tensors alone (the round is mixed in by .hash)

    @classmethod
    def from_model(cls, model: torch.nn.Module, round_no: int = 0) -> GlobalState:
        params = {n: p.detach().to("cpu", torch.float32).clone() for n, p in sorted(model.named_parameters())}
        return cls(round=round_no, params=params)

    def copy(self) -> GlobalState:
        return GlobalState(
            round=self.round,
            params={n: t.clone() for n, t in self.params.items()},
            momentum={n: t.clone() for n, t in self.momentum.items()},
            _hash=self._hash,
        )

    @property
    def hash(self) -> str:
        """sha256 of the round number and every tensor's name, shape and bytes, in name order: a state
        announced for another round is another state, even with the same weights."""
        if self._hash is None:
            self._hash = state_hash(self.params, self.momentum)
        return hashlib.sha256(f"{self.round}:{self._hash}".encode()).hexdigest()[:32]

    def load_into(self, model: torch.nn.Module) -> None:
        """Copy the global weights into a (possibly GPU, possibly bf16-autocast) training model."""
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(self.params[name])

    def pseudo_gradient(self, model: torch.nn.Module, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Δ = θ(t) − θ_local, on the CPU in fp32, for the named (default: all) parameters."""
        local = dict(model.named_parameters())
        names = names if names is not None else list(self.params)
        return {n: self.params[n] - local[n].detach().to("cpu", torch.float32) for n in names}

    def apply_outer_step(self, mean_delta: dict[str, torch.Tensor], outer: OuterConfig) -> None:
        """θ ← θ − lr·update, where update is Δ (SparseLoCo) or Nesterov momentum of Δ (DiLoCo)."""
        for name, delta in mean_delta.items():
            if not torch.isfinite(delta).all():
                raise NonFiniteUpdateError(f"round {self.round}: aggregated update of {name} is not finite")
        for name in sorted(mean_delta):
            delta = mean_delta[name]
            if outer.momentum > 0:
                buf = self.momentum.setdefault(name, torch.zeros_like(delta))
                buf.mul_(outer.momentum).add_(delta)
                delta = delta + outer.momentum * buf if outer.nesterov else buf
            # α·Δ first, then subtract: two IEEE roundings on every CPU. A fused sub_(Δ, alpha=α) is an
            # FMA in AVX2/AVX-512/NEON kernels and a multiply-then-subtract in scalar ones, so the
            # bits would depend on the machine (and on which elements fall in a thread's scalar tail).
            step = delta * outer.outer_lr if outer.outer_lr != 1.0 else delta
            self.params[name].sub_(step)
        self.round += 1
        self._hash = None

    def invalidate_hash(self) -> None:
        """Call after changing tensors in place outside the outer step."""
        self._hash = None

    def advance_without_update(self) -> None:
        """A round in which no valid payload arrived: the weights stay, the round counter moves."""
        self.round += 1

    def numel(self) -> int:
        return sum(t.numel() for t in self.params.values())


def tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    h = hashlib.sha256()
    h.update(name.encode())
    h.update(repr(tuple(tensor.shape)).encode())
    h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return h.digest()


def state_hash(params: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for prefix, tensors in (("p:", params), ("m:", momentum)):
        for name in sorted(tensors):
            h.update(tensor_digest(prefix + name, tensors[name]))
    return h.hexdigest()[:32]


STATE_FORMAT = "swarm-state"
STATE_FORMAT_VERSION = 1


def save_state(state: GlobalState, directory: str | Path, *, run_id: str) -> None:
    """Write θ(round) (and any outer momentum) as safetensors + JSON, atomically (a crash mid-write
    leaves the previous copy). The parameter file loads into a model like a solo checkpoint's."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in state.params.items()}, str(tmp / "model.safetensors"))
    if state.momentum:
        save_file({n: t.contiguous() for n, t in state.momentum.items()}, str(tmp / "momentum.safetensors"))
    meta = {"format": STATE_FORMAT, "version": STATE_FORMAT_VERSION, "run_id": run_id, "round": state.round, "hash": state.hash}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    replace_dir(tmp, directory)


def load_state(directory: str | Path, *, run_id: str) -> GlobalState | None:
    """The state saved in `directory` (None if there is none); ValueError if it is another run's,
    another format, or does not match its recorded hash."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_FORMAT_VERSION:
        raise ValueError(f"{directory}: not a {STATE_FORMAT} v{STATE_FORMAT_VERSION} directory")
    if meta.get("run_id") != run_id:
        raise ValueError(f"{directory}: state of run {meta.get('run_id')!r}, not {run_id!r}")
    params = dict(sorted(load_file(str(directory / "model.safetensors")).items()))
    momentum_path = directory / "momentum.safetensors"
    momentum = dict(sorted(load_file(str(momentum_path)).items())) if momentum_path.exists() else {}
    state = GlobalState(round=int(meta["round"]), params=params, momentum=momentum)
    if state.hash != meta["hash"]:
        raise ValueError(f"{directory}: tensors do not match the recorded state hash (corrupted?)")
    return state
