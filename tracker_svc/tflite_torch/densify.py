"""DENSIFY: rebuild a dense tensor from TFLite's sparse encoding (folded at load time).

The encoding (schema `SparsityParameters`) describes a tensor of n dimensions, optionally split into
k blocks, as a walk over n + k levels:
- `traversal_order` (n + k entries) says which dimension each level walks: the first n are a
  permutation of the original dimensions, the last k a permutation of the block dimensions n..n+k-1;
- `block_map[j]` is the original dimension that block dimension n + j subdivides;
- `dim_metadata[level]` (in traversal order) is either DENSE (loop over `dense_size` coordinates) or
  SPARSE_CSR (loop over `array_segments[prev] .. array_segments[prev + 1]`, reading the coordinate
  from `array_indices`, where `prev` is the position reached at the level above).
Every leaf reached takes the next value from the buffer, in order. A blocked dimension's coordinate
is `outer · block_size + inner`. This mirrors TFLite's `FormatConverter::Populate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class DimFormat(IntEnum):
    DENSE = 0
    SPARSE_CSR = 1


@dataclass(frozen=True)
class DimMetadata:
    format: DimFormat
    dense_size: int = 0  # DENSE levels only
    array_segments: tuple[int, ...] = ()  # SPARSE_CSR levels only
    array_indices: tuple[int, ...] = ()


@dataclass(frozen=True)
class Sparsity:
    traversal_order: tuple[int, ...]
    block_map: tuple[int, ...]
    dim_metadata: tuple[DimMetadata, ...]  # in traversal order


def densify(values: np.ndarray, dense_shape: tuple[int, ...], sparsity: Sparsity) -> np.ndarray:
    """Returns the dense tensor of `dense_shape` that `values` + `sparsity` encode (zeros elsewhere)."""
    rank = len(dense_shape)
    levels = len(sparsity.traversal_order)
    if levels != len(sparsity.dim_metadata) or levels != rank + len(sparsity.block_map):
        raise ValueError(
            f"inconsistent sparsity: {levels} traversal levels, {len(sparsity.dim_metadata)} "
            f"metadata entries, rank {rank}, {len(sparsity.block_map)} block dims"
        )
    block_sizes = _block_sizes(sparsity, rank)
    coords = _leaf_coordinates(sparsity)  # (n_leaves, levels), in buffer order
    if len(coords) != values.size:
        raise ValueError(f"sparse walk reaches {len(coords)} leaves but the buffer has {values.size} values")
    dense_index = _original_indices(coords, sparsity, rank, block_sizes)
    dense = np.zeros(dense_shape, dtype=values.dtype)
    dense[tuple(dense_index.T)] = values.reshape(-1)
    return dense


def _block_sizes(sparsity: Sparsity, rank: int) -> list[int]:
    # A block dimension's size is the dense_size of the level that walks it.
    sizes = []
    for block_dim in range(len(sparsity.block_map)):
        level = sparsity.traversal_order.index(rank + block_dim)
        sizes.append(sparsity.dim_metadata[level].dense_size)
    return sizes


def _leaf_coordinates(sparsity: Sparsity) -> np.ndarray:
    """Walks the levels depth-first; returns each leaf's coordinate per level, in visiting order.

    Done level by level on arrays (a breadth-first expansion keeps depth-first order because each
    parent's children stay contiguous and in order), so large weights need no Python recursion.
    """
    coords = np.zeros((1, 0), dtype=np.int64)
    positions = np.zeros((1,), dtype=np.int64)  # `prev` of TFLite's walk, per partial path
    for meta in sparsity.dim_metadata:
        if meta.format == DimFormat.DENSE:
            size = meta.dense_size
            child_coord = np.tile(np.arange(size, dtype=np.int64), len(positions))
            parent = np.repeat(np.arange(len(positions)), size)
            positions = positions[parent] * size + child_coord
        else:
            segments = np.asarray(meta.array_segments, dtype=np.int64)
            indices = np.asarray(meta.array_indices, dtype=np.int64)
            starts, ends = segments[positions], segments[positions + 1]
            counts = ends - starts
            parent = np.repeat(np.arange(len(positions)), counts)
            offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            positions = starts[parent] + offsets
            child_coord = indices[positions]
        coords = np.concatenate([coords[parent], child_coord[:, None]], axis=1)
    return coords


def _original_indices(
    coords: np.ndarray, sparsity: Sparsity, rank: int, block_sizes: list[int]
) -> np.ndarray:
    index = np.zeros((len(coords), rank), dtype=np.int64)
    for level, dim in enumerate(sparsity.traversal_order[:rank]):
        index[:, dim] = coords[:, level]
    for level in range(rank, len(sparsity.traversal_order)):
        block_dim = sparsity.traversal_order[level] - rank
        dim = sparsity.block_map[block_dim]
        index[:, dim] = index[:, dim] * block_sizes[block_dim] + coords[:, level]
    return index
