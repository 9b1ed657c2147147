"""Which patch sizes a plan's strides can serve.

nnU-Net's U-Nets concatenate each decoder stage with the encoder stage of the same resolution, so the
patch must be divisible, per axis, by the total stride of all stages (the product of the per-stage
strides; nnU-Net's planner calls it ``shape_must_be_divisible_by`` and rounds its patches up to it).
These helpers say whether a patch fits, which patches nearby do, and how many leading stages a patch
could keep.
"""
from __future__ import annotations

import math
from typing import Sequence

from lkm_unet.modules.shape_policy import nearest_multiples

Strides = Sequence[Sequence[int] | int]


def total_stride(strides: Strides, ndim: int) -> list[int]:
    """Per axis, the product of the stages' strides (an int stride applies to every axis)."""
    per_stage = [[s] * ndim if isinstance(s, int) else list(s) for s in strides]
    return [math.prod(stage[axis] for stage in per_stage) for axis in range(ndim)]


def patch_stride_errors(patch_size: Sequence[int], strides: Strides) -> list[str]:
    """One message per axis whose patch size is not a multiple of the total stride there."""
    total = total_stride(strides, len(patch_size))
    return [f"patch_size {list(patch_size)}: axis {axis} (size {p}) is not a multiple of {t}, the total stride "
            f"of the {len(strides)} stages on that axis; sizes that are: "
            + " or ".join(map(str, nearest_multiples(p, t)))
            for axis, (p, t) in enumerate(zip(patch_size, total)) if p % t]


def nearest_valid_patches(patch_size: Sequence[int], strides: Strides) -> list[list[int]]:
    """Whole patches served by ``strides`` near ``patch_size``: each axis to its nearest multiple of the
    total stride (a tie goes down), then every axis down, then every axis up; without repeats."""
    total = total_stride(strides, len(patch_size))
    down = [max(t, p // t * t) for p, t in zip(patch_size, total)]
    up = [-(-p // t) * t for p, t in zip(patch_size, total)]
    nearest = [d if p - d <= u - p else u for p, d, u in zip(patch_size, down, up)]
    patches: list[list[int]] = []
    for patch in (nearest, down, up):
        if patch not in patches:
            patches.append(patch)
    return patches


def stages_serving(patch_size: Sequence[int], strides: Strides) -> int:
    """The largest number of leading stages whose total stride divides ``patch_size`` on every axis."""
    for n in range(len(strides), 0, -1):
        if not patch_stride_errors(patch_size, strides[:n]):
            return n
    return 0
