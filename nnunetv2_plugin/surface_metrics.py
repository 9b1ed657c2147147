"""Dice (DSC) and normalised surface Dice (NSD) of one binary mask pair, with the paper's conventions.

Surface distances come from MONAI's ``compute_surface_dice`` with ``use_subvoxels=True``: surface
elements and their areas are computed on the voxel-corner grid as in DeepMind's ``surface-distance``
package, the implementation behind the FLARE22 and AMOS22 challenge evaluations. Masks are numpy arrays
in SimpleITK's array order (z, y, x); ``spacing_zyx`` is in mm in the same order.

Conventions (FLARE22's):
    * reference and prediction both empty: DSC = 1, NSD = 1;
    * exactly one of them empty: DSC = 0, NSD = 0;
    * with ``reference_slices_only`` (aorta, inferior vena cava, esophagus), both masks are first
      restricted to the axial slices (numpy axis 0) on which the reference has the organ; this applies
      only when the reference is not empty, so a false positive on a case without the organ still
      scores 0.
"""
from __future__ import annotations

import warnings
from typing import Sequence, Tuple

import numpy as np


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """2 |P & R| / (|P| + |R|) of two boolean masks; 1.0 when both are empty."""
    total = int(np.count_nonzero(prediction)) + int(np.count_nonzero(reference))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(prediction & reference)) / total


def normalized_surface_dice(
    prediction: np.ndarray, reference: np.ndarray, spacing_zyx: Sequence[float], tolerance_mm: float
) -> float:
    """Fraction of the two surfaces (by area) lying within ``tolerance_mm`` of the other surface.

    Both masks must be non-empty boolean arrays of the same shape (2D or 3D). A surface element at
    exactly ``tolerance_mm`` counts as correct.
    """
    import torch
    from monai.metrics import compute_surface_dice

    prediction, reference = _crop_to_union(prediction, reference)
    one_hot = [
        torch.from_numpy(np.stack([~mask, mask])[None]) for mask in (prediction, reference)
    ]
    with warnings.catch_warnings():
        # MONAI 1.5-1.6 passes its own deprecated ``always_return_as_numpy`` argument internally.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        nsd = compute_surface_dice(
            one_hot[0],
            one_hot[1],
            class_thresholds=[float(tolerance_mm)],
            include_background=False,
            spacing=[float(s) for s in spacing_zyx],
            use_subvoxels=True,
        )
    return float(nsd[0, 0])


def restrict_to_reference_slices(
    prediction: np.ndarray, reference: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """Zero both masks on the axial slices (numpy axis 0) where ``reference`` is empty."""
    other_axes = tuple(range(1, reference.ndim))
    keep = np.any(reference, axis=other_axes)
    shape = (-1,) + (1,) * len(other_axes)
    return prediction & keep.reshape(shape), reference


def organ_scores(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing_zyx: Sequence[float],
    tolerance_mm: float,
    reference_slices_only: bool = False,
) -> Tuple[float, float]:
    """(DSC, NSD) of one organ's boolean masks with the conventions in the module docstring."""
    prediction, reference = prediction.astype(bool), reference.astype(bool)
    if prediction.shape != reference.shape:
        raise ValueError(f"mask shapes differ: {prediction.shape} vs {reference.shape}")
    reference_empty = not reference.any()
    if reference_slices_only and not reference_empty:
        prediction, reference = restrict_to_reference_slices(prediction, reference)
    prediction_empty = not prediction.any()
    if reference_empty and prediction_empty:
        return 1.0, 1.0
    if reference_empty or prediction_empty:
        return 0.0, 0.0
    return (
        dice(prediction, reference),
        normalized_surface_dice(prediction, reference, spacing_zyx, tolerance_mm),
    )


def _crop_to_union(a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus one background voxel on every side.

    Saves memory on large scans; outside the image counts as background anyway, so surfaces and
    distances are unchanged.
    """
    union = a | b
    slices = []
    for axis in range(union.ndim):
        present = np.flatnonzero(np.any(union, axis=tuple(i for i in range(union.ndim) if i != axis)))
        slices.append(slice(int(present[0]), int(present[-1]) + 1))
    pad = [(1, 1)] * union.ndim
    return tuple(np.pad(m[tuple(slices)], pad) for m in (a, b))
