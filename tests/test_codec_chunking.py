"""Block tiling: sizes, proportional k, magnitudes layout, and the position bijection."""

import numpy as np
import pytest
import torch

from swarm.codec.chunking import ChunkLayout, chunk_topk


def _layout(shape, rows=64, cols=64, flat=4096):
    return ChunkLayout.for_shape(shape, rows, cols, flat)


@pytest.mark.parametrize(
    "shape, num_chunks",
    [((128, 256), 8), ((130, 200), 12), ((5000,), 2), ((), 1), ((3, 4, 5), 1), ((0, 7), 0), ((4096,), 1)],
)
def test_chunk_counts_and_groups_agree(shape, num_chunks):
    layout = _layout(shape)
    assert layout.num_chunks == num_chunks
    sizes = layout.sizes()
    assert sizes.sum() == int(np.prod(shape))
    groups = layout.size_groups()
    assert sum(count for count, _ in groups) == num_chunks
    assert sorted(np.repeat([n for _, n in groups], [c for c, _ in groups]).tolist()) == sorted(sizes.tolist())


def test_edge_chunks_keep_density_rounded_up():
    sizes = np.array([4096, 64 * 8, 2 * 64, 2 * 8, 1, 904])
    assert chunk_topk(sizes, 64, 4096).tolist() == [64, 8, 2, 1, 1, 15]
    assert chunk_topk(np.array([16]), 64, 64).tolist() == [16]  # never more than the chunk holds


def test_magnitudes_are_blocks_of_abs_with_negative_padding():
    x = torch.randn(130, 200)
    layout = _layout((130, 200))
    mags = layout.magnitudes(x)  # (12, 4096)
    assert mags.shape == (12, 4096)
    # block (row 2, col 3) is the 2x8 corner; the rest of its 64x64 tile is padding
    corner = mags[2 * 4 + 3].reshape(64, 64)
    assert torch.equal(corner[:2, :8], x[128:, 192:].abs())
    assert (corner[2:] == -1).all() and (corner[:, 8:] == -1).all()
    assert torch.equal(mags[1].reshape(64, 64), x[:64, 64:128].abs())


def test_magnitudes_of_exact_multiple_shape():
    x = torch.randn(128, 192)
    mags = _layout((128, 192)).magnitudes(x)
    for chunk in range(6):
        r, c = divmod(chunk, 3)
        assert torch.equal(mags[chunk].reshape(64, 64), x[64 * r : 64 * r + 64, 64 * c : 64 * c + 64].abs())


@pytest.mark.parametrize("shape", [(130, 200), (64, 64), (5000,), (2, 3, 700), ()])
def test_compact_positions_cover_every_element_once(shape):
    layout = _layout(shape)
    sizes = layout.sizes()
    chunk_of = np.repeat(np.arange(sizes.size), sizes)
    compact = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    flat = layout.flat_positions(chunk_of, compact)
    assert np.array_equal(np.sort(flat), np.arange(int(np.prod(shape))))


def test_padded_to_compact_matches_flat_positions():
    layout = _layout((130, 200))
    x = torch.arange(130 * 200, dtype=torch.float32).reshape(130, 200)
    mags = layout.magnitudes(x)
    chunk_ids = np.array([3, 3, 11])
    padded = np.array([0, 63 * 64 + 7, 1 * 64 + 7])  # chunk 3 is 64x8, chunk 11 is 2x8
    flat = layout.flat_positions(chunk_ids, layout.padded_to_compact(chunk_ids, padded))
    expected = mags[torch.from_numpy(chunk_ids), torch.from_numpy(padded)]
    assert torch.equal(x.reshape(-1)[torch.from_numpy(flat)], expected)
