"""LKM-UNet's encoder and decoder: dynamic-network-architectures' residual pieces plus PiM and PaM."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.unet_residual_decoder import UNetResDecoder
from torch import Tensor, nn

from lkm_unet.modules.patch_ssm import PatchSSM
from lkm_unet.modules.pixel_ssm import PixelSSM


class LKMStage(nn.Module):
    """The two SSM blocks that follow a stage's residual convolutions: PiM, then PaM (paper Fig. 1).

    Either may be None (the paper's "no PiM" / "no PaM" ablations); with both None the stage is the
    identity and holds no parameters.
    """

    def __init__(self, pim: Optional[PixelSSM], pam: Optional[PatchSSM]) -> None:
        super().__init__()
        self.pim = pim
        self.pam = pam

    def forward(self, x: Tensor) -> Tensor:
        for block in (self.pim, self.pam):
            if block is not None:
                x = block(x)
        return x


class LKMEncoder(ResidualEncoder):
    """nnU-Net's residual encoder with an :class:`LKMStage` after every stage.

    ``lkm_stages[s]`` runs on the output of ``stages[s]``; skips are taken after it. Everything the
    decoder reads (output_channels, strides, conv_op, norm/nonlin settings) is inherited.
    """

    def __init__(self, lkm_stages: Sequence[LKMStage], **residual_encoder_kwargs) -> None:
        super().__init__(return_skips=True, **residual_encoder_kwargs)
        self.lkm_stages = nn.ModuleList(lkm_stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        skips = []
        for stage, lkm in zip(self.stages, self.lkm_stages):
            x = lkm(stage(x))
            skips.append(x)
        return skips

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Conv feature maps (as the base class) plus what PiM and PaM store for backward, in the same
        unit: elements of conv feature maps, whose saved bytes under AMP are about ``CONV_BYTES_PER_ELEMENT``
        each (measured on dynamic-network-architectures' residual U-Nets; docs/benchmarks.md).

        Without ``ssm_checkpointing`` a BiMamba over T tokens of C channels stores about
        ``T * (13.65 * expand * C + 7.75 * d_state)`` fp32 values (projections, conv, gate, the scan's
        inputs, both directions; refitted with the scan custom op and the numba backend, whose Mamba
        projections no longer keep transposed copies), ``AUTOCAST_STORED_FRACTION`` of those bytes
        with ``ssm_autocast``.
        With it, a stage stores only the PiM output PaM recomputes from (its other input is already
        stored by the convolutions); the working memory of one recomputed run
        (:meth:`recompute_working_bytes`) does not grow with the batch and is not counted here.
        """
        total = super().compute_conv_feature_map_size(input_size)
        size = list(input_size)
        for stride, channels, lkm in zip(self.strides, self.output_channels, self.lkm_stages):
            size = [s // k for s, k in zip(size, stride)]
            pixels = math.prod(size)
            blocks = [(block, tokens) for block, tokens in ((lkm.pim, pixels), (lkm.pam, None)) if block is not None]
            if not blocks:
                continue
            if blocks[0][0].checkpointing:
                total += np.int64(pixels * channels)   # the stored block input, autocast dtype like a conv map
                continue
            for block, tokens in blocks:
                if tokens is None:  # PaM runs on the pooled map
                    tokens = math.prod(-(-s // p) for s, p in zip(size, block.pool_size))
                total += np.int64(round(tokens * bimamba_stored_bytes(block.mixer, channels)
                                        / CONV_BYTES_PER_ELEMENT))
        return total

    def recompute_working_bytes(self, input_size: Sequence[int], autocast_bytes: int = 2) -> int:
        """Peak extra bytes while one checkpointed run is recomputed and differentiated: the largest run
        (at most ``ssm_checkpoint_elements`` input elements, or one sample's stage map) times what a
        BiMamba stores per input element, twice (activations plus their gradients). 0 without
        checkpointing."""
        size, worst = list(input_size), 0
        for stride, channels, lkm in zip(self.strides, self.output_channels, self.lkm_stages):
            size = [s // k for s, k in zip(size, stride)]
            block = lkm.pim if lkm.pim is not None else lkm.pam
            if block is not None and block.checkpointing:
                run = min(block.checkpoint_elements, math.prod(size) * channels) // channels
                worst = max(worst, 2 * run * bimamba_stored_bytes(block.mixer, channels))
        return worst


#: Saved bytes per element of ``compute_conv_feature_map_size`` for the conv-only residual U-Net
#: under bf16 autocast (2D 4.4, 3D 5.1 measured; the mean).
CONV_BYTES_PER_ELEMENT = 4.75


#: What a BiMamba with ``ssm_autocast`` stores under bf16 autocast, as a fraction of what it stores
#: without: the projections, conv, gate and scan inputs in bf16; the LayerNorm, the scan states and the
#: per-block bf16 weight copies in fp32 or fixed (0.56-0.58 measured on BiMamba alone at 8-64 channels,
#: 0.6 fits the networks of tests/nets/test_memory_estimate.py).
AUTOCAST_STORED_FRACTION = 0.6


def bimamba_stored_bytes(mixer, channels: int) -> float:
    """Bytes a BiMamba stores per token when not recomputed (fit to the saved-bytes measurement)."""
    directions = 1 if mixer.backward_mixer is None else 2  # the fit is for two; one direction stores half
    fp32_values = (13.65 * mixer.forward_mixer.expand * channels + 7.75 * mixer.forward_mixer.d_state) * directions / 2
    return fp32_values * 4 * (AUTOCAST_STORED_FRACTION if mixer.autocast else 1.0)


class LKMDecoder(UNetResDecoder):
    """nnU-Net's residual U-Net decoder. Without deep supervision, the unused heads still join the
    graph with weight zero during training, so DDP sees every parameter used (SPEC 6)."""

    def forward(self, skips: list[Tensor]) -> Tensor | list[Tensor]:
        out = super().forward(skips)
        if not self.deep_supervision and torch.is_grad_enabled() and self.training:
            unused = sum(p.sum() for head in self.seg_layers[:-1] for p in head.parameters())
            out = out + 0.0 * unused
        return out
