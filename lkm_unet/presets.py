"""Named LKM-UNet variants (SPEC 5) and the rule that derives per-stage window and pool sizes.

The tables live in the repository's ``configs/<config>.json`` (installed inside the package as
``lkm_unet/configs``): the backbone of the paper's two set-ups (patch size, stages, strides,
features) and, per preset, the block counts (``n_blocks_per_stage``, ``n_conv_per_stage_decoder``)
and the LKM kwargs. A preset fixes both, so one preset name is one network (docs/presets.md):

- ``paper``: the stored block counts of the paper's set-up, ``window`` grouping, pools = windows.
- ``official``: what the released code builds from an nnU-Net plan: one residual block per planned
  encoder conv (``n_conv_per_stage``) and per planned decoder conv, ``strided`` grouping, its pools.
  The stored counts are those of nnU-Net's default plan (two convs per stage).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

PRESETS = ("paper", "official")
CONFIGS = ("abdomen_ct_3d", "abdomen_mr_2d")
GROUPING_OF_PRESET = {"paper": "window", "official": "strided"}


def config_dir() -> Path:
    """Where the tables are: inside an installed package, or ``configs/`` beside it in a checkout."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def load_config(config: str) -> dict[str, Any]:
    """The stored table of a paper set-up: ``patch_size``, ``architecture`` kwargs and ``presets``."""
    if config not in CONFIGS:
        raise ValueError(f"config={config!r} is not known; valid: {', '.join(CONFIGS)}")
    return json.loads((config_dir() / f"{config}.json").read_text())


def preset_kwargs(preset: str, config: str) -> dict[str, Any]:
    """The kwargs a stored preset fixes: block counts (``n_blocks_per_stage``,
    ``n_conv_per_stage_decoder``) and LKM sizes (``pim_kernel_sizes``, ``pam_pool_sizes``,
    ``pim_grouping``)."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not known; valid: {', '.join(PRESETS)}")
    return dict(load_config(config)["presets"][preset])


def stage_feature_sizes(patch_size: Sequence[int], strides: Sequence[Sequence[int] | int]) -> list[list[int]]:
    """Feature-map size per stage: the patch divided by the cumulative stride (floor, as nnU-Net)."""
    size = list(patch_size)
    sizes = []
    for stride in strides:
        stride = [stride] * len(size) if isinstance(stride, int) else list(stride)
        size = [s // k for s, k in zip(size, stride)]
        sizes.append(size)
    return sizes


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def derive_kernel_sizes(
    patch_size: Sequence[int], strides: Sequence[Sequence[int] | int], preset: str = "paper"
) -> dict[str, Any]:
    """Per-stage PiM windows and PaM pools that divide every stage's feature map.

    Rule (it reproduces the paper's tables for both of its set-ups). With ``n`` stages and the
    bottleneck map ``F_{n-1}``, stage ``s`` aims at the window ``F_{n-1} * 2^floor((n-1-s)/2)`` per
    axis: the bottleneck is one window, and the window doubles every two stages towards the input, so
    early stages see large windows and they shrink every two stages. The window actually used is the
    largest divisor of the stage's feature size not above that aim (equal to it whenever the strides
    are powers of two, as nnU-Net plans them).

    - ``paper``: ``window`` grouping; PaM pool = PiM window.
    - ``official`` (what the released code computes): ``strided`` grouping with the same numbers;
      PaM pool ``2^(floor((n - s + 1) / 2) - 1)`` per axis (0-based ``s``), reduced to a divisor likewise.

    Returns ``{"pim_kernel_sizes", "pam_pool_sizes", "pim_grouping"}`` as JSON-safe lists.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not known; valid: {', '.join(PRESETS)}")
    sizes = stage_feature_sizes(patch_size, strides)
    n = len(sizes)
    for s, size in enumerate(sizes):
        if min(size) < 1:
            raise ValueError(f"patch size {list(patch_size)} with strides {list(strides)} leaves stage {s} "
                             f"with feature map {size}; the patch is too small for that many stages")
    bottleneck = sizes[-1]
    kernels = [[_largest_divisor_at_most(f, b * 2 ** ((n - 1 - s) // 2)) for f, b in zip(size, bottleneck)]
               for s, size in enumerate(sizes)]
    if preset == "paper":
        pools = [list(k) for k in kernels]
    else:
        pools = [[_largest_divisor_at_most(f, 2 ** ((n - s + 1) // 2 - 1)) for f in size]
                 for s, size in enumerate(sizes)]
    return {"pim_kernel_sizes": kernels, "pam_pool_sizes": pools, "pim_grouping": GROUPING_OF_PRESET[preset]}
