"""PaM, the patch-level SSM (paper Sec. 2.2): BiMamba over all pooled patches of a sample."""
from __future__ import annotations

import math
from typing import Optional, Sequence

from torch import Tensor

from lkm_unet.modules.partition import partition, reassemble
from lkm_unet.modules.spatial_ssm import SpatialSSM


class PatchSSM(SpatialSSM):
    """Patch-level SSM: ``(B, C, *spatial) -> (B, C, *spatial)``, residual included.

    Average-pool by ``pool_size`` (int or per-axis tuple), scan ALL pooled tokens of a sample as one
    sequence (raster order) with BiMamba, upsample back by nearest neighbour. With padding, a pooled
    token averages only the real pixels of its patch, so no padded token enters the sequence.
    """

    size_name = "pool_size"

    def __init__(self, dim: int, pool_size: int | Sequence[int], shape_policy: str = "pad", **kwargs) -> None:
        super().__init__(dim, pool_size, shape_policy, **kwargs)

    @property
    def pool_size(self) -> tuple[int, ...]:
        return self.per_axis_size()

    def mix(self, x: Tensor, sizes: tuple[int, ...], mask: Optional[Tensor]) -> Tensor:
        batch, channels = x.shape[:2]
        patches = partition(x, sizes, "window")                     # (B * n_patches, prod(sizes), C)
        if mask is None:
            pooled = patches.mean(dim=1)
        else:
            counts = partition(mask, sizes, "window").sum(dim=1).repeat(batch, 1)   # (B * n_patches, 1)
            pooled = patches.sum(dim=1) / counts
        tokens = pooled.reshape(batch, -1, channels)                # one raster-order sequence per sample
        mixed = self.mixer(tokens).reshape(-1, 1, channels).expand(-1, math.prod(sizes), channels)
        return reassemble(mixed, sizes, "window", x.shape)
