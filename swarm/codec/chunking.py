"""How a parameter tensor is cut into chunks for per-chunk top-k.

A 2-D tensor (R, C) is tiled by `chunk_rows x chunk_cols` blocks in row-major block order.
Any other shape (1-D norms and biases, scalars, N-D) is flattened and viewed as a (1, numel)
matrix tiled by (1, chunk_1d) blocks, i.e. contiguous runs of `chunk_1d` values with a shorter
last run. One code path then serves both.

Edges: when R or C is not a multiple of the block, the last block row/column holds smaller
chunks. Such a chunk is a chunk of its own size n_c (not a padded full block): its positions
are numbered compactly 0..n_c-1 row-major inside the block, and it keeps the same density,
k_c = min(n_c, ceil(k * n_c / (chunk_rows * chunk_cols))), so every non-empty chunk sends at
least one value. Full chunks of either kind therefore send exactly `k` values when
chunk_1d == chunk_rows * chunk_cols (the default, 4096).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from swarm.codec.base import numel_of


def chunk_topk(sizes: np.ndarray, topk_per_chunk: int, block_capacity: int) -> np.ndarray:
    """Values sent per chunk: k scaled by the chunk's share of a full block, rounded up."""
    proportional = (sizes * topk_per_chunk + block_capacity - 1) // block_capacity
    return np.minimum(sizes, proportional)


@dataclass(frozen=True)
class ChunkLayout:
    """The block tiling of one tensor; per-chunk arrays are in row-major block order."""

    shape: tuple[int, ...]
    rows: int
    cols: int
    block_rows: int
    block_cols: int

    @staticmethod
    def for_shape(shape: tuple[int, ...], chunk_rows: int, chunk_cols: int, chunk_1d: int) -> ChunkLayout:
        if len(shape) == 2:
            return ChunkLayout(tuple(shape), shape[0], shape[1], chunk_rows, chunk_cols)
        return ChunkLayout(tuple(shape), 1, numel_of(shape), 1, chunk_1d)

    @property
    def grid_rows(self) -> int:
        return -(-self.rows // self.block_rows)

    @property
    def grid_cols(self) -> int:
        return -(-self.cols // self.block_cols)

    @property
    def num_chunks(self) -> int:
        return self.grid_rows * self.grid_cols if self.rows and self.cols else 0

    @property
    def capacity(self) -> int:
        """Values in a full block (the padded chunk width used for top-k)."""
        return self.block_rows * self.block_cols

    def _valid(self, total: int, block: int, grid: int) -> np.ndarray:
        return np.minimum(block, total - block * np.arange(grid, dtype=np.int64))

    def valid_rows(self) -> np.ndarray:
        """Real rows in each block row, (grid_rows,)."""
        return self._valid(self.rows, self.block_rows, self.grid_rows)

    def valid_cols(self) -> np.ndarray:
        """Real columns in each block column, (grid_cols,)."""
        return self._valid(self.cols, self.block_cols, self.grid_cols)

    def chunk_cols(self) -> np.ndarray:
        """Real columns of every chunk, (num_chunks,)."""
        if self.num_chunks == 0:
            return np.zeros(0, dtype=np.int64)
        return np.tile(self.valid_cols(), self.grid_rows)

    def sizes(self) -> np.ndarray:
        """Values in every chunk n_c, (num_chunks,)."""
        if self.num_chunks == 0:
            return np.zeros(0, dtype=np.int64)
        return np.outer(self.valid_rows(), self.valid_cols()).reshape(-1)

    def size_groups(self) -> list[tuple[int, int]]:
        """(count, n_c) for the at most four distinct chunk sizes, without per-chunk arrays."""
        if self.num_chunks == 0:
            return []
        row_groups = [(self.rows // self.block_rows, self.block_rows), (1, self.rows % self.block_rows)]
        col_groups = [(self.cols // self.block_cols, self.block_cols), (1, self.cols % self.block_cols)]
        return [(rc * cc, rn * cn) for rc, rn in row_groups for cc, cn in col_groups if rc * cc > 0 and rn * cn > 0]

    def magnitudes(self, x: torch.Tensor) -> torch.Tensor:
        """|x| as (num_chunks, capacity) rows; edge-block padding is -1 so top-k never picks it."""
        grid = (self.grid_rows, self.block_rows, self.grid_cols, self.block_cols)
        pad_r = self.grid_rows * self.block_rows - self.rows
        pad_c = self.grid_cols * self.block_cols - self.cols
        if not (pad_r or pad_c):
            out = torch.empty(self.grid_rows, self.grid_cols, self.block_rows, self.block_cols)
            torch.abs(x.reshape(grid).permute(0, 2, 1, 3), out=out)  # one pass, tiled on write
            return out.view(self.num_chunks, self.capacity)
        padded = torch.full((self.rows + pad_r, self.cols + pad_c), -1.0)
        torch.abs(x.reshape(self.rows, self.cols), out=padded[: self.rows, : self.cols])
        return padded.view(grid).permute(0, 2, 1, 3).reshape(self.num_chunks, self.capacity)

    def padded_to_compact(self, chunk_ids: np.ndarray, padded: np.ndarray) -> np.ndarray:
        """Block-local positions (r * block_cols + c) to compact ones (r * n_cols_c + c)."""
        r_in, c_in = np.divmod(padded, self.block_cols)
        return r_in * self.chunk_cols()[chunk_ids] + c_in

    def flat_positions(self, chunk_ids: np.ndarray, compact: np.ndarray) -> np.ndarray:
        """Row-major positions in the flattened tensor of compact chunk-local positions."""
        n_cols = self.chunk_cols()[chunk_ids]
        r_in, c_in = np.divmod(compact, n_cols)
        grid_r, grid_c = np.divmod(chunk_ids, self.grid_cols)
        row = grid_r * self.block_rows + r_in
        col = grid_c * self.block_cols + c_in
        return row * self.cols + col
