"""PiM, the pixel-level SSM (paper Sec. 2.2): BiMamba inside each window (or stride group)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from lkm_unet.modules.partition import GROUPINGS, partition, reassemble, sequence_rows
from lkm_unet.modules.spatial_ssm import SpatialSSM


class PixelSSM(SpatialSSM):
    """Pixel-level SSM: ``(B, C, *spatial) -> (B, C, *spatial)``, residual included.

    The map is split per axis by ``kernel_size`` (an int for every axis, or a per-axis tuple):
    ``grouping="window"`` (the paper) scans each block of adjacent pixels as one sequence;
    ``grouping="strided"`` (the released code) scans the pixels spaced ``k`` apart across the map.
    All sequences are batched through one BiMamba. Sizes that do not divide follow ``shape_policy``.
    With ``checkpointing`` the sequences are recomputed run by run (:func:`sequence_rows`).
    """

    size_name = "kernel_size"

    def __init__(self, dim: int, kernel_size: int | Sequence[int], grouping: str = "window",
                 shape_policy: str = "pad", **kwargs) -> None:
        if grouping not in GROUPINGS:
            raise ValueError(f"grouping={grouping!r} is not valid; valid: {', '.join(map(repr, GROUPINGS))}")
        super().__init__(dim, kernel_size, shape_policy, **kwargs)
        self.grouping = grouping

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.per_axis_size()

    def mix(self, x: Tensor, sizes: tuple[int, ...], mask: Optional[Tensor]) -> Tensor:
        # (n_sequences, length) for one sample; the same for every sample
        token_mask = None if mask is None else partition(mask, sizes, self.grouping)[..., 0]
        if not self.recomputing(x):
            tokens = partition(x, sizes, self.grouping)              # (B * n_seq, length, C)
            batch_mask = None if token_mask is None else token_mask.repeat(x.shape[0], 1)
            return reassemble(self.mixer(tokens, batch_mask), sizes, self.grouping, x.shape)
        runs = sequence_rows(x.shape, sizes, self.grouping, self.checkpoint_elements)
        blocks = [s // k for s, k in zip(x.shape[2:], sizes)]
        grouped = blocks if self.grouping == "window" else list(sizes)   # the axes that index sequences
        per_row = math.prod(grouped[1:])                                  # sequences per row of the first
        mixed = []
        for b, start, stop in runs:
            run_mask = None if token_mask is None else token_mask[start * per_row:stop * per_row]
            mixed.append(self.recompute(self._mix_run, x, sizes, (b, start, stop), run_mask))
        return reassemble(torch.cat(mixed), sizes, self.grouping, x.shape)

    def _mix_run(self, x: Tensor, sizes: tuple[int, ...], rows: tuple[int, int, int],
                 mask: Optional[Tensor]) -> Tensor:
        return self.mixer(partition(x, sizes, self.grouping, rows), mask)
