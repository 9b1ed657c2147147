"""Cut a feature map into token sequences and put it back (PiM groupings, SPEC 4).

A map ``(B, C, S_1, ..., S_d)`` whose axes are multiples of ``k`` is viewed as ``(S_i / k_i, k_i)``
per axis. ``window`` makes one sequence per block of ``k_1 x ... x k_d`` adjacent pixels (raster
order inside the block); ``strided`` makes one sequence per offset inside the block, holding the
``S_i / k_i`` pixels spaced ``k_i`` apart across the whole map.
"""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor

GROUPINGS = ("window", "strided")


def _split_shape(shape: Sequence[int], k: Sequence[int]) -> list[int]:
    """``(B, C, *S) -> (B, C, S_1/k_1, k_1, ..., S_d/k_d, k_d)``."""
    split = [shape[0], shape[1]]
    for size, window in zip(shape[2:], k):
        split += [size // window, window]
    return split


def _order(ndim: int, grouping: str) -> list[int]:
    """Permutation of the split view to ``(B, *batch_axes, *sequence_axes, C)``."""
    outer = [2 + 2 * i for i in range(ndim)]   # position of the block (S_i / k_i)
    inner = [3 + 2 * i for i in range(ndim)]   # offset inside the block (k_i)
    if grouping == "window":
        return [0, *outer, *inner, 1]
    return [0, *inner, *outer, 1]


def partition(x: Tensor, k: Sequence[int], grouping: str) -> Tensor:
    """``(B, C, *S) -> (B * n_sequences, length, C)``; batch-major, so sample b owns a contiguous run."""
    order = _order(len(k), grouping)
    length = math.prod(k) if grouping == "window" else math.prod([s // w for s, w in zip(x.shape[2:], k)])
    return x.reshape(_split_shape(x.shape, k)).permute(order).reshape(-1, length, x.shape[1])


def reassemble(tokens: Tensor, k: Sequence[int], grouping: str, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`partition` for a map of ``shape = (B, C, *S)``."""
    order = _order(len(k), grouping)
    split = _split_shape(shape, k)
    permuted_shape = [split[i] for i in order]
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return tokens.reshape(permuted_shape).permute(inverse).reshape(shape)
