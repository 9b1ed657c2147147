"""Cut a feature map into token sequences and put it back (PiM groupings, SPEC 4).

A map ``(B, C, S_1, ..., S_d)`` whose axes are multiples of ``k`` is viewed as ``(S_i / k_i, k_i)``
per axis. ``window`` makes one sequence per block of ``k_1 x ... x k_d`` adjacent pixels (raster
order inside the block); ``strided`` makes one sequence per offset inside the block, holding the
``S_i / k_i`` pixels spaced ``k_i`` apart across the whole map.

Sequences are numbered batch-major, then in raster order of the grouped axes (the block index for
``window``, the offset for ``strided``). :func:`sequence_rows` splits that numbering into runs of
whole rows along the first grouped axis, which :func:`partition` can cut out of the map one run at a
time, copying only that run (PiM's recomputation works run by run to bound its working memory).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch.nn.functional as F
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


def _sequence_length(shape: Sequence[int], k: Sequence[int], grouping: str) -> int:
    return math.prod(k) if grouping == "window" else math.prod([s // w for s, w in zip(shape[2:], k)])


def partition(x: Tensor, k: Sequence[int], grouping: str, rows: Optional[tuple[int, int, int]] = None) -> Tensor:
    """``(B, C, *S) -> (B * n_sequences, length, C)``; batch-major, so sample b owns a contiguous run.

    ``rows = (b, start, stop)`` returns only the sequences of sample ``b`` whose index along the first
    grouped axis is in ``[start, stop)``: a contiguous run of the full result, and the only part copied.
    """
    order = _order(len(k), grouping)
    length = _sequence_length(x.shape, k, grouping)
    view = x.reshape(_split_shape(x.shape, k)).permute(order)
    if rows is not None:
        b, start, stop = rows
        view = view[b:b + 1, start:stop]
    return view.reshape(-1, length, x.shape[1])


def sequence_rows(shape: Sequence[int], k: Sequence[int], grouping: str,
                  max_elements: int) -> list[tuple[int, int, int]]:
    """Split the sequences of a ``(B, C, *S)`` map into runs ``(b, start, stop)`` for :func:`partition`,
    each holding at most ``max_elements`` elements where one row along the first grouped axis allows
    (a single row is never split). Concatenated in order, the runs give the full partition."""
    first = shape[2] // k[0] if grouping == "window" else k[0]
    row_elements = math.prod(shape[1:]) // first
    step = max(1, max_elements // max(row_elements, 1))
    return [(b, start, min(start + step, first)) for b in range(shape[0]) for start in range(0, first, step)]


def reassemble(tokens: Tensor, k: Sequence[int], grouping: str, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`partition` for a map of ``shape = (B, C, *S)``."""
    order = _order(len(k), grouping)
    split = _split_shape(shape, k)
    permuted_shape = [split[i] for i in order]
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return tokens.reshape(permuted_shape).permute(inverse).reshape(shape)


def pool_tokens(x: Tensor, k: Sequence[int], mask: Optional[Tensor] = None) -> Tensor:
    """Average-pool ``(B, C, *S)`` by ``k`` into raster-order tokens ``(B, prod(S / k), C)``, reducing a
    view of the map (no copy of it). With ``mask`` (1, 1, *S), True for real pixels, a token averages
    only the real pixels of its patch."""
    # torch's pooling op rather than a mean over a reshaped view: its gradient comes back contiguous,
    # where the view's (an expanded tensor) cannot be viewed back in a compiled backward graph
    pool = getattr(F, f"avg_pool{len(k)}d")
    pooled = pool(x, tuple(k))
    if mask is not None:  # padded pixels are zero, so sum / real count = mean(x) / mean(mask)
        pooled = pooled / pool(mask.to(x.dtype), tuple(k))
    return pooled.flatten(2).transpose(1, 2)


def upsample_tokens(tokens: Tensor, k: Sequence[int], shape: Sequence[int]) -> Tensor:
    """Inverse shape of :func:`pool_tokens`: nearest-neighbour ``(B, n, C) -> (B, C, *S)``, one copy."""
    batch, channels = shape[0], shape[1]
    blocks = [s // w for s, w in zip(shape[2:], k)]
    grid = tokens.transpose(1, 2).reshape(batch, channels, *blocks)
    expanded = grid.reshape([batch, channels, *(d for b in blocks for d in (b, 1))])
    return expanded.expand(_split_shape(shape, k)).reshape(shape)
