"""BatchStream: determinism, shard disjointness, resume; eval batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from swarm.data.sampler import BatchStream, epoch_permutation, eval_batches

SEQ = 7  # windows of 8 tokens


def _tokens(num_windows: int) -> np.ndarray:
    # Token value t at position i*8+j encodes its window i, so batches reveal their window ids.
    return (np.arange(num_windows * (SEQ + 1)) // (SEQ + 1)).astype(np.uint16)


def _window_ids(inputs: torch.Tensor) -> list[int]:
    return inputs[:, 0].tolist()


def test_batches_shape_and_shift() -> None:
    tokens = np.arange(1000, dtype=np.uint16) % 250
    x, y = next(BatchStream(tokens, batch_size=4, seq_len=SEQ, seed=0))
    assert x.shape == y.shape == (4, SEQ) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_same_seed_same_batches_other_seed_other_batches() -> None:
    tokens = _tokens(50)
    first = BatchStream(tokens, batch_size=4, seq_len=SEQ, seed=3)
    a = [next(first)[0] for _ in range(10)]
    stream = BatchStream(tokens, batch_size=4, seq_len=SEQ, seed=3)
    b = [next(stream)[0] for _ in range(10)]
    other = BatchStream(tokens, batch_size=4, seq_len=SEQ, seed=4)
    c = [next(other)[0] for _ in range(10)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_permutation_is_a_permutation_and_changes_per_epoch() -> None:
    p0 = epoch_permutation(1000, seed=1, epoch=0)
    assert sorted(p0.tolist()) == list(range(1000))
    assert not np.array_equal(p0, epoch_permutation(1000, seed=1, epoch=1))
    # Fixed forever: peers on any numpy version must agree on the order.
    assert epoch_permutation(8, seed=12345, epoch=3).tolist() == [5, 3, 2, 6, 1, 4, 7, 0]


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_shards_disjoint_within_an_epoch(num_shards: int) -> None:
    num_windows = 100
    per_shard = num_windows // num_shards
    seen: list[int] = []
    for shard in range(num_shards):
        stream = BatchStream(_tokens(num_windows), batch_size=1, seq_len=SEQ, seed=9, shard=shard, num_shards=num_shards)
        ids = [i for _ in range(per_shard) for i in _window_ids(next(stream)[0])]
        assert stream.epoch == 1 and stream.cursor == 0  # exactly one epoch consumed
        seen += ids
    assert len(seen) == len(set(seen)) == per_shard * num_shards


def test_every_window_once_per_epoch_and_batches_span_epochs() -> None:
    stream = BatchStream(_tokens(10), batch_size=4, seq_len=SEQ, seed=0)
    ids = [i for _ in range(5) for i in _window_ids(next(stream)[0])]  # 20 windows = 2 epochs
    assert sorted(ids[:10]) == list(range(10)) and sorted(ids[10:]) == list(range(10))
    assert ids[:10] != ids[10:]


def test_resume_from_state_is_bit_exact() -> None:
    tokens = _tokens(37)
    stream = BatchStream(tokens, batch_size=5, seq_len=SEQ, seed=2, shard=1, num_shards=3)
    for _ in range(4):
        next(stream)
    state = stream.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    expected = [next(stream) for _ in range(6)]
    resumed = BatchStream(tokens, batch_size=5, seq_len=SEQ, seed=2, shard=1, num_shards=3)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (next(resumed) for _ in range(6))):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_resume_rejects_another_stream() -> None:
    state = BatchStream(_tokens(20), batch_size=2, seq_len=SEQ, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        BatchStream(_tokens(20), batch_size=2, seq_len=SEQ, seed=1).load_state_dict(state)


def test_too_small_corpus_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="corpus too small.*fewer than one per shard"):
        BatchStream(_tokens(3), batch_size=1, seq_len=SEQ, seed=0, shard=0, num_shards=4)


def test_bad_shard_index() -> None:
    with pytest.raises(ValueError, match="shard"):
        BatchStream(_tokens(3), batch_size=1, seq_len=SEQ, seed=0, shard=2, num_shards=2)


def test_eval_batches_are_deterministic_and_capped() -> None:
    tokens = _tokens(11)
    batches = eval_batches(tokens, batch_size=4, seq_len=SEQ, max_batches=None)
    assert [len(x) for x, _ in batches] == [4, 4, 3]
    assert [i for x, _ in batches for i in _window_ids(x)] == list(range(11))
    assert len(eval_batches(tokens, batch_size=4, seq_len=SEQ, max_batches=2)) == 2
    with pytest.raises(ValueError, match="eval split too small"):
        eval_batches(tokens[:5], batch_size=4, seq_len=SEQ)
