"""The paper's ablations (Sec. 3, Table 3) as LKMUNet constructor kwargs, and its kernel-size sweep.

Every ablation is a plain dict of JSON-safe kwargs, so it lives in a plans file's ``arch_kwargs`` and
in a trainer's one-attribute override alike:

- ``no-pim``: drop the pixel-level SSM of every stage (``use_pim=False``);
- ``no-pam``: drop the patch-level SSM (``use_pam=False``);
- ``no-bim``: one scan direction in every BiMamba (``bidirectional=False``);
- ``no-mamba``: neither PiM nor PaM: the residual conv backbone alone.

The kernel-size sweep (smaller windows) divides each PiM window per axis by a factor; see
:func:`shrink_windows`.
"""
from __future__ import annotations

from typing import Any, Sequence

ABLATIONS: dict[str, dict[str, Any]] = {
    "no-pim": {"use_pim": False},
    "no-pam": {"use_pam": False},
    "no-bim": {"bidirectional": False},
    "no-mamba": {"use_pim": False, "use_pam": False},
}
# nnU-Net-style suffixes of the trainers and plans identifiers of each ablation.
ABLATION_SUFFIXES = {"no-pim": "noPiM", "no-pam": "noPaM", "no-bim": "noBiM", "no-mamba": "noMamba"}


def ablation_kwargs(name: str) -> dict[str, Any]:
    """The LKMUNet kwargs of ablation ``name`` (a copy)."""
    if name not in ABLATIONS:
        raise ValueError(f"ablation {name!r} is not known; valid: {', '.join(ABLATIONS)}")
    return dict(ABLATIONS[name])


def shrink_windows(pim_kernel_sizes: Sequence[Sequence[int]], feature_sizes: Sequence[Sequence[int]],
                   divisor: int) -> list[list[int]]:
    """PiM windows ``divisor`` times smaller per axis (the paper's kernel-size sweep).

    Each window ``k`` of a stage whose feature map is ``f`` on that axis becomes the largest divisor of
    ``f`` not above ``k // divisor`` (at least 1), so the smaller windows still tile the map. PaM pools
    are not changed: the sweep is about PiM's large kernel.
    """
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
        raise ValueError(f"window divisor must be a positive int, got {divisor!r}")
    if len(pim_kernel_sizes) != len(feature_sizes):
        raise ValueError(f"pim_kernel_sizes has {len(pim_kernel_sizes)} stages but the plan has "
                         f"{len(feature_sizes)}: {list(pim_kernel_sizes)}")
    shrunk = []
    for window, size in zip(pim_kernel_sizes, feature_sizes):
        aims = [max(1, int(k) // divisor) for k in window]
        shrunk.append([max(d for d in range(1, min(f, a) + 1) if f % d == 0) for f, a in zip(size, aims)])
    return shrunk


def ablated_kwargs(arch_kwargs: dict[str, Any], patch_size: Sequence[int], ablation: str | None = None,
                   window_divisor: int = 1) -> dict[str, Any]:
    """``arch_kwargs`` with an ablation's switches and PiM windows ``window_divisor`` times smaller
    (for the feature maps of ``patch_size``); a new dict, the input is not changed."""
    from lkm_unet.presets import stage_feature_sizes

    kwargs = dict(arch_kwargs)
    if ablation is not None:
        kwargs.update(ablation_kwargs(ablation))
    if window_divisor != 1:
        maps = stage_feature_sizes(patch_size, kwargs["strides"])
        kwargs["pim_kernel_sizes"] = shrink_windows(kwargs["pim_kernel_sizes"], maps, window_divisor)
    return kwargs
