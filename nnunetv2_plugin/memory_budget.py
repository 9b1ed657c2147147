"""Fit an LKM-UNet configuration to a GPU memory budget: batch size and memory options (``--gpu-memory``).

The estimate of a training step's peak on the GPU (bf16/fp16 autocast, SGD with momentum):

    peak = 16 B x parameters                       (fp32 weights, gradients, momentum, autocast copies)
         + GPU_FACTOR x CONV_BYTES_PER_ELEMENT x compute_conv_feature_map_size(patch) x batch
         + recompute_working_bytes(patch)          (one recomputed PiM run, with ssm_checkpointing)
         + CONTEXT_GIB                             (CUDA context, allocator slack)

``CONV_BYTES_PER_ELEMENT`` comes from the saved-bytes measurement (lkm_unet.memory); ``GPU_FACTOR``
from the one GPU peak measured without memory options (docs/benchmarks.md: the paper's 3D step,
40x224x192, batch 2, bf16, mamba-ssm's kernel: 30.2 GiB; the estimate above gives 30.1 GiB; for the
2D step, 320x320 batch 2, 3.4 GiB measured, 4.5 GiB estimated: conservative where weights dominate).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from lkm_unet import LKMUNet
from lkm_unet.nets.lkm_encoder import CONV_BYTES_PER_ELEMENT

GIB = 2 ** 30
GPU_FACTOR = 1.0
CONTEXT_GIB = 0.5
#: Tried in this order; the first that fits is written (recomputation costs time, so only when needed).
OPTION_LADDER = (
    {"ssm_checkpointing": False, "ssm_autocast": False},
    {"ssm_checkpointing": True, "ssm_autocast": False},
    {"ssm_checkpointing": True, "ssm_autocast": True},
    {"ssm_checkpointing": True, "ssm_autocast": True, "ssm_checkpoint_elements": 2 ** 22},
)


def estimate_peak_gib(arch_kwargs: dict[str, Any], patch_size: Sequence[int], batch_size: int) -> float:
    """Estimated GPU peak of one training step (GiB) for LKM-UNet built from ``arch_kwargs``."""
    with torch.device("meta"):
        net = LKMUNet(input_channels=1, num_classes=2, deep_supervision=True, **arch_kwargs)
    params = sum(p.numel() for p in net.parameters())
    activations = GPU_FACTOR * CONV_BYTES_PER_ELEMENT * int(net.compute_conv_feature_map_size(patch_size)) * batch_size
    return (16 * params + activations + net.encoder.recompute_working_bytes(patch_size)) / GIB + CONTEXT_GIB


def fit_to_budget(arch_kwargs: dict[str, Any], patch_size: Sequence[int], budget_gib: float, max_batch: int,
                  batch_size: Optional[int] = None) -> tuple[dict[str, Any], int, float]:
    """The first memory options of :data:`OPTION_LADDER` with which batch 2 (or ``batch_size``) fits
    ``budget_gib``, and the largest batch up to ``max_batch`` that fits with them.

    Returns (the options, the batch size, its estimated peak in GiB); raises ValueError naming the
    estimate when nothing fits."""
    smallest = batch_size or 2
    for options in OPTION_LADDER:
        kwargs = {**arch_kwargs, **options}
        if estimate_peak_gib(kwargs, patch_size, smallest) > budget_gib:
            continue
        batch = smallest
        while batch_size is None and batch < max_batch and estimate_peak_gib(kwargs, patch_size, batch + 1) <= budget_gib:
            batch += 1
        return dict(options), batch, estimate_peak_gib(kwargs, patch_size, batch)
    least = estimate_peak_gib({**arch_kwargs, **OPTION_LADDER[-1]}, patch_size, smallest)
    raise ValueError(f"patch {list(patch_size)} at batch {smallest} needs about {least:.1f} GiB even with every "
                     f"memory option, more than the {budget_gib:g} GiB budget; plan a smaller patch")
