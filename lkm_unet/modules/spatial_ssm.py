"""Shared machinery of PiM and PaM: per-axis sizes, the shape policy, BiMamba, recomputation, residual add."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from lkm_unet.modules.bimamba import BiMamba
from lkm_unet.modules.shape_policy import check_policy, padding_for, per_axis


def valid_checkpointing(mode: Any) -> bool:
    """Whether ``mode`` is a checkpointing mode: True (always), False (never) or "auto" (on accelerators)."""
    return isinstance(mode, bool) or mode == "auto"


class SpatialSSM(nn.Module):
    """Base of :class:`PixelSSM` and :class:`PatchSSM`: ``(B, C, *spatial) -> (B, C, *spatial)``.

    ``size`` is one int for every axis or a per-axis tuple. ``where`` names the block in error
    messages (the network sets 'stage 2 PiM'); ``input_stride`` is its total downsampling per axis,
    so errors can quote valid patch sizes.

    Memory options (the network's ``ssm_*`` kwargs; none changes the function computed):

    - ``checkpointing``: keep only the block's input for the backward pass and recompute the BiMamba
      activations there (``torch.utils.checkpoint``, non-reentrant), in runs of sequences of at most
      ``checkpoint_elements`` input elements, so the recomputation's working memory stays bounded.
      ``"auto"`` does so for inputs on an accelerator (a GPU's memory is what limits training) and not
      on the CPU, where the recomputation made a training step about 1.5x slower for memory a
      workstation has (docs/benchmarks.md).
    - ``autocast``: under autocast, projections, conv and gate run (and are stored) in the autocast
      dtype; the scan state, ``A``, ``D`` and the dt bias stay fp32 (see :class:`BiMamba`).
    """

    size_name = "size"

    def __init__(self, dim: int, size: int | Sequence[int], shape_policy: str = "pad", d_state: int = 16,
                 d_conv: int = 4, expand: int = 2, spatial_dims: Optional[int] = None,
                 where: Optional[str] = None, input_stride: Optional[Sequence[int]] = None,
                 bidirectional: bool = True, checkpointing: bool | str = False, checkpoint_elements: int = 2 ** 24,
                 autocast: bool = False) -> None:
        super().__init__()
        if spatial_dims is None and not isinstance(size, int):
            spatial_dims = len(size)
        self._size = size
        self.spatial_dims = spatial_dims
        if spatial_dims is not None:
            per_axis(size, spatial_dims, self.size_name)
        elif isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{self.size_name}={size!r}; give a positive int or a per-axis tuple of them")
        self.shape_policy = check_policy(shape_policy)
        self.where = where or type(self).__name__
        self.input_stride = None if input_stride is None else tuple(input_stride)
        if isinstance(checkpoint_elements, bool) or not isinstance(checkpoint_elements, int) or checkpoint_elements < 1:
            raise ValueError(f"{self.where}: checkpoint_elements={checkpoint_elements!r}; give a positive int")
        if not valid_checkpointing(checkpointing):
            raise ValueError(f"{self.where}: checkpointing={checkpointing!r}; give true, false or \"auto\"")
        self.checkpointing = checkpointing
        self.checkpoint_elements = checkpoint_elements
        self.mixer = BiMamba(dim, d_state=d_state, d_conv=d_conv, expand=expand, bidirectional=bidirectional,
                             autocast=autocast)

    def _sizes(self, ndim: int) -> tuple[int, ...]:
        if self.spatial_dims is None:
            self.spatial_dims = ndim  # an int size follows the first input it sees
        if ndim != self.spatial_dims:
            raise ValueError(f"{self.where}: built for {self.spatial_dims}D maps ({self.size_name}="
                             f"{self._sizes(self.spatial_dims)}), got a {ndim}D map")
        return per_axis(self._size, ndim, self.size_name)

    def per_axis_size(self) -> tuple[int, ...]:
        return per_axis(self._size, self.spatial_dims or 2, self.size_name)

    def forward(self, x: Tensor) -> Tensor:
        sizes = self._sizes(x.ndim - 2)
        spatial = x.shape[2:]
        pads = padding_for(spatial, sizes, self.shape_policy, self.where, self.size_name.replace("_", " "),
                           self.input_stride)
        mask = None
        padded = x
        if any(pads):
            # F.pad lists the last axis first; pad every axis at its end.
            flat = [amount for pad in reversed(pads) for amount in (0, pad)]
            padded = F.pad(x, flat)
            mask = F.pad(torch.ones((1, 1, *spatial), dtype=torch.bool, device=x.device), flat)
        out = self.mix(padded, sizes, mask)
        crop = (slice(None), slice(None), *(slice(0, s) for s in spatial))
        return x + out[crop]

    def recomputing(self, x: Tensor) -> bool:
        """Whether this forward pass (of input ``x``) keeps only inputs and recomputes activations in
        backward."""
        on = self.checkpointing is True or (self.checkpointing == "auto" and x.device.type != "cpu")
        return on and torch.is_grad_enabled()

    @staticmethod
    def recompute(fn: Callable[..., Tensor], *args: Any) -> Tensor:
        """``fn(*args)``, storing only ``args`` for the backward pass, which runs ``fn`` again (same
        autocast state and RNG state)."""
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

    def mix(self, x: Tensor, sizes: tuple[int, ...], mask: Optional[Tensor]) -> Tensor:
        """The block's contribution on a map whose axes ``sizes`` divide; ``mask`` marks real pixels."""
        raise NotImplementedError
