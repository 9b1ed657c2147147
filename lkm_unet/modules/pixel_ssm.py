"""PiM, the pixel-level SSM (paper Sec. 2.2): BiMamba inside each window (or stride group)."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from lkm_unet.modules.partition import GROUPINGS, partition, reassemble
from lkm_unet.modules.spatial_ssm import SpatialSSM


class PixelSSM(SpatialSSM):
    """Pixel-level SSM: ``(B, C, *spatial) -> (B, C, *spatial)``, residual included.

    The map is split per axis by ``kernel_size`` (an int for every axis, or a per-axis tuple):
    ``grouping="window"`` (the paper) scans each block of adjacent pixels as one sequence;
    ``grouping="strided"`` (the released code) scans the pixels spaced ``k`` apart across the map.
    All sequences are batched through one BiMamba. Sizes that do not divide follow ``shape_policy``.
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
        tokens = partition(x, sizes, self.grouping)                  # (B * n_seq, length, C)
        token_mask = None
        if mask is not None:
            token_mask = partition(mask, sizes, self.grouping)[..., 0].repeat(x.shape[0], 1)
        return reassemble(self.mixer(tokens, token_mask), sizes, self.grouping, x.shape)
