"""SparseLoCo compressor: top-k selection, density, error feedback, state, config checks."""

import numpy as np
import pytest
import torch

from swarm.codec.base import PayloadError
from swarm.codec.sparseloco import (
    SparseLoCoCompressor,
    SparseLoCoConfig,
    decode_encoded,
    encode_sparse,
    sparse_section_nbytes,
)

CONFIGS = [SparseLoCoConfig(), SparseLoCoConfig(index_coding="fixed"), SparseLoCoConfig(value_bits=4)]


def _reference_topk_mask(x: torch.Tensor, config: SparseLoCoConfig) -> torch.Tensor:
    """Loop over 2-D blocks: True where |x| is among the block's k_c largest."""
    mask = torch.zeros_like(x, dtype=torch.bool)
    rows, cols = x.shape
    for r in range(0, rows, config.chunk_rows):
        for c in range(0, cols, config.chunk_cols):
            block = x[r : r + config.chunk_rows, c : c + config.chunk_cols]
            k = min(block.numel(), -(-config.topk_per_chunk * block.numel() // config.block_values))
            flat = torch.zeros(block.numel(), dtype=torch.bool)
            flat[block.abs().reshape(-1).topk(k).indices] = True
            mask[r : r + config.chunk_rows, c : c + config.chunk_cols] = flat.reshape(block.shape)
    return mask


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("shape", [(128, 192), (130, 200), (70, 1)])
def test_round_trip_is_topk_of_quantised_values(config, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    encoded, delta_hat = encode_sparse(x, config)
    decoded = decode_encoded(encoded)
    assert torch.equal(decoded, delta_hat)
    assert torch.equal(decoded != 0, _reference_topk_mask(x, config))
    table = np.frombuffer(encoded.sections[0], dtype="<f4")
    assert set(decoded[decoded != 0].tolist()) <= set(table.tolist())
    assert [len(s) for s in encoded.sections] == sparse_section_nbytes(shape, config)


def test_exactly_k_nonzeros_per_full_chunk_and_proportional_edges():
    x = torch.randn(256, 520)  # 4 x 8 full blocks plus a 256 x 8 edge column
    decoded = decode_encoded(encode_sparse(x, SparseLoCoConfig())[0])
    for r in range(0, 256, 64):
        for c in range(0, 512, 64):
            assert (decoded[r : r + 64, c : c + 64] != 0).sum() == 64
        assert (decoded[r : r + 64, 512:] != 0).sum() == 8  # 64 * 8 values -> k = 8
    assert (decoded != 0).float().mean().item() == pytest.approx(1 / 64, rel=1e-9)


def test_one_dimensional_tensors_use_contiguous_runs():
    x = torch.randn(5000)
    decoded = decode_encoded(encode_sparse(x, SparseLoCoConfig())[0])
    assert (decoded[:4096] != 0).sum() == 64 and (decoded[4096:] != 0).sum() == 15
    first_run = torch.zeros(4096, dtype=torch.bool)
    first_run[x[:4096].abs().topk(64).indices] = True
    assert torch.equal(decoded[:4096] != 0, first_run)
    scalar = decode_encoded(encode_sparse(torch.tensor(0.5), SparseLoCoConfig())[0])
    assert scalar.shape == () and scalar.item() == 0.5
    empty = decode_encoded(encode_sparse(torch.zeros(0, 4), SparseLoCoConfig())[0])
    assert empty.shape == (0, 4)


def test_error_feedback_invariant_is_bit_exact_over_rounds():
    config = SparseLoCoConfig()
    compressor = SparseLoCoCompressor(config)
    generator = torch.Generator().manual_seed(2)
    error = torch.zeros(130, 200)
    for _ in range(3):
        delta = torch.randn(130, 200, generator=generator)
        a = torch.add(delta, error, alpha=config.error_decay)
        encoded = compressor.compress("w", delta)
        buffer = compressor.error_buffer("w")
        assert buffer is not None
        error = buffer
        assert torch.equal(error, a - SparseLoCoCompressor.decode(encoded))


def test_error_feedback_eventually_sends_a_constant_signal():
    compressor = SparseLoCoCompressor(SparseLoCoConfig(error_decay=1.0))
    delta = torch.full((64, 64), 1e-3)
    sent = torch.zeros(64, 64)
    for _ in range(64):
        sent += SparseLoCoCompressor.decode(compressor.compress("w", delta))
    assert (sent != 0).all()  # every coordinate got its turn through the error buffer


def test_non_finite_input_raises_and_keeps_the_buffer():
    compressor = SparseLoCoCompressor(SparseLoCoConfig())
    compressor.compress("w", torch.randn(64, 100))
    buffer = compressor.error_buffer("w")
    assert buffer is not None
    before = buffer.clone()
    for bad in (float("nan"), float("inf")):
        delta = torch.randn(64, 100)
        delta[63, 99] = bad
        with pytest.raises(ValueError, match="'w'.*NaN or inf"):
            compressor.compress("w", delta)
        after = compressor.error_buffer("w")
        assert after is not None and torch.equal(after, before)
    with pytest.raises(ValueError, match="shape"):
        compressor.compress("w", torch.randn(64, 64))


@pytest.mark.parametrize("shape", [(130, 200), (5000,)])
def test_any_non_finite_pattern_is_detected(shape):
    """The compressor finds NaN/inf through the top-k picks; every chunk position counts."""
    generator = torch.Generator().manual_seed(3)
    for trial in range(20):
        x = torch.randn(shape, generator=generator).reshape(-1)
        count = int(torch.randint(1, 200, (1,), generator=generator))
        where = torch.randint(0, x.numel(), (count,), generator=generator)
        x[where] = [float("nan"), float("inf"), -float("inf")][trial % 3]
        with pytest.raises(ValueError, match="NaN or inf"):
            encode_sparse(x.reshape(shape), SparseLoCoConfig(topk_per_chunk=1 + trial))
    full = torch.full((64, 64), float("nan"))  # more non-finite values than k in a chunk
    with pytest.raises(ValueError, match="NaN or inf"):
        encode_sparse(full, SparseLoCoConfig())


def test_absurd_values_raise():
    with pytest.raises(ValueError, match="exceeds"):
        encode_sparse(torch.full((64,), 1e6), SparseLoCoConfig())


def test_state_dict_round_trip_and_validation():
    compressor = SparseLoCoCompressor(SparseLoCoConfig())
    compressor.compress_all({"a": torch.randn(64, 64), "b": torch.randn(10)})
    state = compressor.state_dict()
    restored = SparseLoCoCompressor(SparseLoCoConfig())
    restored.load_state_dict(state)
    assert sorted(restored.names()) == ["a", "b"]
    delta = torch.randn(64, 64)
    assert compressor.compress("a", delta).sections == restored.compress("a", delta).sections
    with pytest.raises(ValueError, match="NaN or inf"):
        restored.load_state_dict({"a": torch.tensor([float("nan")])})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chunk_rows": 0},
        {"chunk_rows": 2, "chunk_cols": 2, "topk_per_chunk": 1},
        {"chunk_1d": 8},
        {"topk_per_chunk": 5000},
        {"error_decay": 1.5},
        {"value_bits": 3},
        {"index_coding": "rice"},
        {"topk_per_chunk": True},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        SparseLoCoConfig(**kwargs)


def test_non_square_blocks_are_allowed():
    config = SparseLoCoConfig(chunk_rows=1, chunk_cols=256, topk_per_chunk=4)
    decoded = decode_encoded(encode_sparse(torch.randn(3, 512), config)[0])
    assert ((decoded != 0).sum(dim=1) == 8).all()


def test_wire_params_round_trip_and_bad_params_are_payload_errors():
    config = SparseLoCoConfig(topk_per_chunk=32, index_coding="fixed")
    assert SparseLoCoConfig.from_wire_params(config.wire_params()).wire_params() == config.wire_params()
    assert config.density == 32 / 4096
    encoded, _ = encode_sparse(torch.randn(64, 64), config)
    bad = dict(encoded.params, value_bits=3)
    with pytest.raises(PayloadError, match="params"):
        decode_encoded(type(encoded)(encoded.codec, encoded.shape, encoded.sections, bad))
