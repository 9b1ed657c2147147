"""Bidirectional Mamba: the token mixer inside PiM and PaM (paper, Sec. 2.2)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from lkm_unet.modules.mamba import Mamba
from lkm_unet.modules.precision import run_in_fp32


class BiMamba(nn.Module):
    """LayerNorm, then one Mamba mixer on the sequence and one on the flipped sequence, each without
    its own out_proj; their outputs are summed (the backward one flipped back) and passed through ONE
    shared out_proj. The caller adds the residual.

    Input and output: ``(batch, length, dim)``; under autocast the output is in the autocast dtype.
    ``mask`` (batch, length), True for real tokens, keeps padded tokens out of the scan.
    ``bidirectional=False`` (the paper's "no BiM" ablation) builds only ``forward_mixer``; the shared
    out_proj stays.

    Precision under autocast: with ``autocast=False`` everything runs in fp32. With ``autocast=True``
    the LayerNorm runs in fp32, the projections, conv and gate in the autocast dtype (so that is what
    they store for backward), and the scan computes in fp32 from those inputs with ``A``, ``D`` and
    the dt bias in fp32. Outside autocast both are the same fp32 computation.
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 bidirectional: bool = True, autocast: bool = False) -> None:
        super().__init__()
        self.autocast = bool(autocast)
        self.norm = nn.LayerNorm(dim)
        self.forward_mixer = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand, out_proj=False)
        self.backward_mixer = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand, out_proj=False) \
            if bidirectional else None
        self.out_proj = nn.Linear(self.forward_mixer.d_inner, dim, bias=False)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        device_type = x.device.type
        if self.autocast and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                x = self.norm(x.float())
            return self._mix(x, mask)
        return run_in_fp32(lambda t: self._mix(self.norm(t), mask), x)

    def _mix(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        """``x``: the normalised tokens."""
        y = self.forward_mixer.mix(x, mask)
        if self.backward_mixer is not None:
            flipped_mask = None if mask is None else mask.flip(1)
            y = y + self.backward_mixer.mix(x.flip(1), flipped_mask).flip(1)
        return self.out_proj(y)
