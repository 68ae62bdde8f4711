"""The global model state every replica agrees on, and the outer step that advances it.

The global weights live on the CPU in fp32 whatever device a peer trains on: applying the same
payloads in the same order with the same CPU kernels gives bit-identical results on every peer,
which a GPU's reduction order would not guarantee.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from swarm.run import OuterConfig
from swarm.train.checkpoint import replace_dir


class NonFiniteUpdateError(RuntimeError):
    """An aggregated pseudo-gradient or a resulting weight that is NaN or infinite."""


class PartialStateError(RuntimeError):
    """A partial state's hash asked for after an outer step, before it adopted the new round's leaves."""


@dataclass(frozen=True)
class Leaf:
    """What a node knows of a tensor it does not hold: its shape and its leaf digest."""

    shape: tuple[int, ...]
    digest: bytes


@dataclass
class GlobalState:
    """θ(round) plus the outer optimiser's momentum (dense DiLoCo only), whole or in part.

    A node may hold only part of θ (a pipeline stage: its blocks). It keeps the leaves of the
    tensors it does not hold (`foreign`), so its hash is the agreed state's. After an outer step it
    cannot compute the new leaves of what it does not hold: it adopts them from the agreed index of
    the new round (`adopt`), which also checks its own part against them.
    """

    round: int
    params: dict[str, torch.Tensor]  # name -> fp32 CPU tensor, sorted by name
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    _hash: str | None = field(default=None, repr=False)  # of the tensors alone (the round is mixed in by .hash)
    foreign: dict[str, Leaf] = field(default_factory=dict)  # by leaf key: the tensors held elsewhere
    partial: bool = False  # holds part of θ (with `foreign` current, or stale after an outer step)
    _stale: bool = field(default=False, repr=False)

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
            foreign=dict(self.foreign),
            partial=self.partial,
            _stale=self._stale,
        )

    def part(self, names: Iterable[str]) -> GlobalState:
        """A partial copy holding the named parameters (and their momentum) only."""
        keep = set(names)
        if missing := keep - set(self.params):
            raise KeyError(f"not held here: {sorted(missing)[:3]}")
        leaves = self.leaves()
        state = GlobalState(
            round=self.round,
            params={n: t.clone() for n, t in self.params.items() if n in keep},
            momentum={n: t.clone() for n, t in self.momentum.items() if n in keep},
            partial=True,
        )
        held = state.held_keys()
        shapes = self.shapes()
        state.foreign = {k: Leaf(shapes[k], d) for k, d in leaves.items() if k not in held}
        state._hash = leaves_root(leaves)
        return state

    def held_keys(self) -> set[str]:
        return {leaf_key(n) for n in self.params} | {leaf_key(n, momentum=True) for n in self.momentum}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape by leaf key, held or not."""
        out = {leaf_key(n): tuple(t.shape) for n, t in self.params.items()}
        out.update({leaf_key(n, momentum=True): tuple(t.shape) for n, t in self.momentum.items()})
        out.update({k: leaf.shape for k, leaf in self.foreign.items()})
        return out

    def leaves(self) -> dict[str, bytes]:
        """Every leaf of the hash tree, held tensors' computed here, the others' as adopted."""
        if self._stale:
            raise PartialStateError(f"round {self.round}: the leaves of the tensors held elsewhere are not adopted yet")
        leaves = state_leaves(self.params, self.momentum)
        leaves.update({k: leaf.digest for k, leaf in self.foreign.items()})
        return leaves

    def adopt(self, round_no: int, leaves: dict[str, Leaf]) -> None:
        """Take the leaves of the agreed state of this round (from an index whose root was checked
        against the agreed hash) for the tensors held elsewhere, after checking the held ones
        against theirs. ValueError if this part is not the agreed one (the node reloads it)."""
        if round_no != self.round:
            raise ValueError(f"leaves of round {round_no} offered for a state at round {self.round}")
        mine = state_leaves(self.params, self.momentum)
        if missing := set(mine) - set(leaves):
            raise ValueError(f"the agreed state has no tensor {sorted(missing)[0]!r}")
        if wrong := sorted(k for k, d in mine.items() if leaves[k].digest != d):
            raise ValueError(f"{len(wrong)} held tensor(s) differ from the agreed state's, e.g. {wrong[0]!r}")
        self.foreign = {k: leaf for k, leaf in leaves.items() if k not in mine}
        self._stale = False
        self._hash = leaves_root({**mine, **{k: leaf.digest for k, leaf in self.foreign.items()}})

    @property
    def hash(self) -> str:
        """The root of a hash tree whose leaves are the tensors (name, shape, bytes), with the round
        mixed in: a state announced for another round is another state, even with the same weights."""
        if self._hash is None:
            self._hash = leaves_root(self.leaves())
        return round_hash(self.round, self._hash)

    def load_into(self, model: torch.nn.Module) -> None:
        """Copy the global weights into a (possibly GPU, possibly bf16-autocast) training model."""
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.is_meta or (self.partial and name not in self.params):
                    continue  # not built here (a stage's skeleton), or held elsewhere
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
            if self.partial and name not in self.params:
                continue  # held elsewhere
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
        self._stale = self.partial  # the others' new leaves come from the agreed index

    def invalidate_hash(self) -> None:
        """Call after changing tensors in place outside the outer step."""
        self._hash = None
        self._stale = self.partial

    def advance_without_update(self) -> None:
        """A round in which no valid payload arrived: the weights stay, the round counter moves."""
        self.round += 1

    def numel(self) -> int:
        return sum(t.numel() for t in self.params.values())


def leaf_digest(key: str, shape: tuple[int, ...], data: bytes | memoryview) -> bytes:
    """One leaf of the state's hash tree: a tensor's key ("p:name" for a parameter, "m:name" for
    its outer momentum), shape and fp32 bytes."""
    h = hashlib.sha256()
    h.update(key.encode())
    h.update(repr(tuple(shape)).encode())
    h.update(data)
    return h.digest()


def tensor_digest(key: str, tensor: torch.Tensor) -> bytes:
    return leaf_digest(key, tuple(tensor.shape), tensor.detach().contiguous().cpu().numpy().tobytes())


def leaf_key(name: str, *, momentum: bool = False) -> str:
    return ("m:" if momentum else "p:") + name


def state_leaves(params: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """Every leaf of the hash tree, by key."""
    leaves = {leaf_key(n): tensor_digest(leaf_key(n), t) for n, t in params.items()}
    leaves.update({leaf_key(n, momentum=True): tensor_digest(leaf_key(n, momentum=True), t) for n, t in momentum.items()})
    return leaves


def leaves_root(leaves: dict[str, bytes]) -> str:
    """The root over the leaves: parameters in name order, then momentum in name order. A node that
    holds some tensors checks them against the leaves of an index whose root is the agreed one,
    without the rest (swarm/processes/statesync.py)."""
    h = hashlib.sha256()
    for prefix in ("p:", "m:"):
        for key in sorted(k for k in leaves if k.startswith(prefix)):
            h.update(leaves[key])
    return h.hexdigest()[:32]


def round_hash(round_no: int, root: str) -> str:
    """The state hash announced for a round: the round mixed into the root."""
    return hashlib.sha256(f"{round_no}:{root}".encode()).hexdigest()[:32]


def state_hash(params: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor]) -> str:
    return leaves_root(state_leaves(params, momentum))


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


# ----- the state index: what a donor holds, and the hash tree's leaves ------------------------------

INDEX_VERSION = 2  # 2: the index carries leaf digests (a hash tree) and what its donor holds
MOMENTUM_PREFIX = "momentum/"  # a momentum tensor's name in the index and in state transfers


class StateError(ValueError):
    """State bytes from a donor that do not match what was asked for or announced."""


@dataclass
class TensorInfo:
    name: str  # a parameter's name, or MOMENTUM_PREFIX + a parameter's name
    shape: tuple[int, ...]
    leaf: str  # hex leaf digest of the state's hash tree (swarm/state.py)
    held: bool = True  # the donor that sent the index holds it (a partial holder does not hold all)

    @property
    def key(self) -> str:
        return _key(self.name)

    @property
    def nbytes(self) -> int:
        return 4 * int(np.prod(self.shape, dtype=np.int64))


@dataclass
class StateIndex:
    round: int
    hash: str
    tensors: list[TensorInfo]
    _held: set[str] | None = None

    def leaves(self) -> dict[str, Leaf]:
        return {t.key: Leaf(t.shape, bytes.fromhex(t.leaf)) for t in self.tensors}

    def held(self, name: str) -> bool:
        if self._held is None:
            self._held = {t.name for t in self.tensors if t.held}
        return name in self._held


def _key(name: str) -> str:
    if name.startswith(MOMENTUM_PREFIX):
        return leaf_key(name[len(MOMENTUM_PREFIX) :], momentum=True)
    return leaf_key(name)


def _name(key: str) -> str:
    return MOMENTUM_PREFIX + key[2:] if key.startswith("m:") else key[2:]


def all_tensors(state: GlobalState) -> dict[str, torch.Tensor]:
    tensors = dict(state.params)
    tensors.update({MOMENTUM_PREFIX + n: t for n, t in state.momentum.items()})
    return tensors


def build_index(state: GlobalState) -> bytes:
    """Every tensor of θ with its leaf, held by this node or not: whoever has the index checks it
    against the agreed hash (its root) and any part it holds against its leaves."""
    leaves, shapes, held = state.leaves(), state.shapes(), state.held_keys()
    tensors = [[_name(k), list(shapes[k]), leaves[k].hex(), k in held] for k in _leaf_order(leaves)]
    return msgpack.packb({"v": INDEX_VERSION, "round": state.round, "hash": state.hash, "tensors": tensors})


def _leaf_order(keys: Iterable[str]) -> list[str]:
    keys = list(keys)
    return sorted(k for k in keys if k.startswith("p:")) + sorted(k for k in keys if k.startswith("m:"))


def parse_index(data: bytes) -> StateIndex:
    """A donor's index, checked to hash to the state hash it names (StateError otherwise): its
    leaves are then the agreed state's whenever that hash is the agreed one."""
    try:
        raw = msgpack.unpackb(data, raw=False)
        if raw["v"] != INDEX_VERSION:
            raise StateError(f"unsupported state format version {raw['v']!r}")
        tensors = [TensorInfo(str(n), tuple(int(d) for d in s), str(h), bool(held)) for n, s, h, held in raw["tensors"]]
        if any(d < 0 or d > 2**40 for t in tensors for d in t.shape) or len({t.name for t in tensors}) != len(tensors):
            raise StateError("state index has impossible shapes or repeated names")
        index = StateIndex(int(raw["round"]), str(raw["hash"]), tensors)
        leaves = {t.key: bytes.fromhex(t.leaf) for t in tensors}
    except StateError:
        raise
    except Exception as e:
        raise StateError(f"malformed state index: {type(e).__name__}") from None
    if any(len(d) != 32 for d in leaves.values()) or round_hash(index.round, leaves_root(leaves)) != index.hash:
        raise StateError("state index does not hash to the state hash it names")
    return index


def split_chunk(data: bytes, infos: list[TensorInfo]) -> dict[str, torch.Tensor]:
    """Cut a chunk into tensors and check each one against its leaf in the index."""
    sizes = [i.nbytes for i in infos]
    if len(data) != sum(sizes):
        raise StateError(f"state chunk has {len(data)} bytes, expected {sum(sizes)}")
    out, offset = {}, 0
    for info, size in zip(infos, sizes):
        piece = data[offset : offset + size]
        offset += size
        if leaf_digest(info.key, info.shape, piece).hex() != info.leaf:
            raise StateError(f"tensor {info.name} does not match its leaf in the index")
        out[info.name] = torch.from_numpy(np.frombuffer(piece, dtype=np.float32).copy()).reshape(info.shape)
    return out
