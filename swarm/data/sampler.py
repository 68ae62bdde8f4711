"""Deterministic, shard-disjoint batch streams over a token array.

The stream is cut into aligned windows of seq_len + 1 tokens (window w covers tokens
[w*(T+1), (w+1)*(T+1))). Each epoch orders the windows by a permutation that depends only on
(seed, epoch); shard i of n takes permuted positions i, i+n, i+2n, ... so within an epoch no
window is seen by two shards. The permutation comes from a fixed integer hash (splitmix64), not
from a library RNG, so every peer computes the same order whatever its numpy or torch version.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic is intended)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def epoch_permutation(num_windows: int, *, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(num_windows) fixed by (seed, epoch): sort windows by a keyed hash."""
    key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    key = _splitmix64(key ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
    scores = _splitmix64(np.arange(num_windows, dtype=np.uint64) ^ key)
    return np.argsort(scores, kind="stable")


def _windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """(num_windows, seq_len + 1) view of the aligned windows; the ragged tail is dropped."""
    num = len(tokens) // (seq_len + 1)
    return tokens[: num * (seq_len + 1)].reshape(num, seq_len + 1)


def _to_batch(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.from_numpy(rows.astype(np.int64))  # (B, T+1)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # inputs, targets: (B, T)


class BatchStream:
    """Endless (inputs, targets) batches of shape (batch_size, seq_len) for one shard.

    Batches may span an epoch boundary, so a shard needs only one window per epoch. The
    position is two ints (epoch, cursor); `state_dict()` / `load_state_dict()` resume bit-exactly.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        shard: int = 0,
        num_shards: int = 1,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.shard, self.num_shards = shard, num_shards
        self._windows = _windows(np.asarray(tokens), seq_len)
        self.num_windows = len(self._windows)
        self.windows_per_shard = self.num_windows // num_shards  # equal for all shards
        if self.windows_per_shard < 1:
            raise ValueError(
                f"corpus too small: {len(tokens)} tokens make {self.num_windows} windows of "
                f"seq_len+1={seq_len + 1}, fewer than one per shard for {num_shards} shard(s); "
                "use more data, a shorter seq_len or fewer shards"
            )
        self.epoch = 0
        self.cursor = 0  # next index into this shard's window list for the epoch
        self._order: np.ndarray | None = None

    def _shard_order(self) -> np.ndarray:
        if self._order is None:
            perm = epoch_permutation(self.num_windows, seed=self.seed, epoch=self.epoch)
            used = perm[: self.windows_per_shard * self.num_shards]  # same count for every shard
            self._order = used[self.shard :: self.num_shards]
        return self._order

    def next_window_ids(self) -> np.ndarray:
        """Indices of the windows in the next batch, advancing the stream."""
        ids: list[int] = []
        while len(ids) < self.batch_size:
            order = self._shard_order()
            take = order[self.cursor : self.cursor + self.batch_size - len(ids)]
            ids.extend(take.tolist())
            self.cursor += len(take)
            if self.cursor >= len(order):
                self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        return np.asarray(ids, dtype=np.int64)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _to_batch(self._windows[self.next_window_ids()])

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "shard": self.shard,
            "num_shards": self.num_shards,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; the stream's shape (seed, shards, sizes, corpus) must match."""
        mine = self.state_dict()
        for key in ("seed", "shard", "num_shards", "batch_size", "seq_len", "num_windows"):
            if int(state[key]) != mine[key]:
                raise ValueError(f"stream state mismatch on {key}: saved {state[key]}, this stream {mine[key]}")
        if not 0 <= int(state["cursor"]) < self.windows_per_shard or int(state["epoch"]) < 0:
            raise ValueError(f"stream state out of range: epoch {state['epoch']}, cursor {state['cursor']}")
        self.epoch, self.cursor, self._order = int(state["epoch"]), int(state["cursor"]), None


def eval_batches(
    tokens: np.ndarray, *, batch_size: int, seq_len: int, max_batches: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first windows of `tokens` in order, as at most `max_batches` batches (last may be short)."""
    windows = _windows(np.asarray(tokens), seq_len)
    if len(windows) == 0:
        raise ValueError(
            f"eval split too small: {len(tokens)} tokens, need at least seq_len+1={seq_len + 1}; "
            "raise eval_fraction or lower seq_len"
        )
    if max_batches is not None:
        windows = windows[: max_batches * batch_size]
    return [_to_batch(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]
