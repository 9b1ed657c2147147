"""PaM, the patch-level SSM (paper Sec. 2.2): BiMamba over all pooled patches of a sample."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from lkm_unet.modules.partition import pool_tokens, upsample_tokens
from lkm_unet.modules.spatial_ssm import SpatialSSM


class PatchSSM(SpatialSSM):
    """Patch-level SSM: ``(B, C, *spatial) -> (B, C, *spatial)``, residual included.

    Average-pool by ``pool_size`` (int or per-axis tuple), scan ALL pooled tokens of a sample as one
    sequence (raster order) with BiMamba, upsample back by nearest neighbour. With padding, a pooled
    token averages only the real pixels of its patch, so no padded token enters the sequence.
    With ``checkpointing`` only the block input is stored; pooling and BiMamba run again in backward.
    """

    size_name = "pool_size"

    def __init__(self, dim: int, pool_size: int | Sequence[int], shape_policy: str = "pad", **kwargs) -> None:
        super().__init__(dim, pool_size, shape_policy, **kwargs)

    @property
    def pool_size(self) -> tuple[int, ...]:
        return self.per_axis_size()

    def mix(self, x: Tensor, sizes: tuple[int, ...], mask: Optional[Tensor]) -> Tensor:
        if self.recomputing(x):
            mixed = self.recompute(self._pool_and_mix, x, sizes, mask)
        else:
            mixed = self._pool_and_mix(x, sizes, mask)
        return upsample_tokens(mixed, sizes, x.shape)

    def _pool_and_mix(self, x: Tensor, sizes: tuple[int, ...], mask: Optional[Tensor]) -> Tensor:
        """``(B, C, *S) -> (B, n_patches, C)``: one raster-order sequence of pooled tokens per sample."""
        return self.mixer(pool_tokens(x, sizes, mask))
