"""A synthetic abdomen-like dataset for the quickstart: ``Dataset990_LKMUNetDemo``.

Each case is a 16 x 96 x 96 volume (z, y, x) with 3.0 x 1.0 x 1.0 mm spacing, so nnU-Net plans a
``2d`` configuration on 96 x 96 slices. A smooth elliptic "body" holds three ellipsoid organs
(1 liver, 2 kidney, 3 spleen) with distinct mean intensities, random size and position per case, smooth
noise, white noise and a mild multiplicative bias field. It is built to be learnt in a few CPU minutes,
not to look like anatomy.

Everything is drawn from ``numpy.random.default_rng([seed, case_index])``: one seed gives the same
arrays and the same file bytes on every run.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from nnunetv2_plugin.datasets.raw_dataset import (
    NIFTI_ENDING,
    PathLike,
    dataset_folder,
    new_dataset_folder,
    write_dataset_json,
    write_label,
)

logger = logging.getLogger("lkm_unet")

DEMO_DATASET_NAME = "Dataset990_LKMUNetDemo"
DEMO_SHAPE: Tuple[int, int, int] = (16, 96, 96)  # numpy order z, y, x
DEMO_SPACING_XYZ: Tuple[float, float, float] = (1.0, 1.0, 3.0)  # SimpleITK order x, y, z
DEMO_LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}
_BODY_INTENSITY = 80.0


@dataclass(frozen=True)
class _OrganModel:
    """Mean ellipsoid of one organ in mm, relative to the volume centre (x, y, z order)."""

    label: int
    centre_mm: Tuple[float, float, float]
    radii_mm: Tuple[float, float, float]
    intensity: float


# Painted in this order; a later organ overwrites an earlier one where they touch.
# Large, long organs (z radius 26 mm of the 48 mm field of view) so that most 2D slices show all three:
# small or short ones are learnt far more slowly from 2D patches.
_ORGANS = (
    _OrganModel(DEMO_LABELS["liver"], (-15.0, -2.0, 0.0), (17.0, 15.0, 26.0), 220.0),
    _OrganModel(DEMO_LABELS["spleen"], (20.0, -12.0, 0.0), (13.0, 10.0, 26.0), 150.0),
    _OrganModel(DEMO_LABELS["kidney"], (18.0, 13.0, 0.0), (11.0, 10.0, 26.0), 300.0),
)


def demo_case(seed: int, case_index: int) -> Tuple[np.ndarray, np.ndarray]:
    """One synthetic case: (image int16, label uint8), both of shape :data:`DEMO_SHAPE` (z, y, x)."""
    rng = np.random.default_rng([seed, case_index])
    z, y, x = _grid_mm()
    body_axes = rng.uniform(38.0, 44.0), rng.uniform(28.0, 34.0)
    body = (x / body_axes[0]) ** 2 + (y / body_axes[1]) ** 2 <= 1.0
    label = np.zeros(DEMO_SHAPE, dtype=np.uint8)
    image = np.where(body, _BODY_INTENSITY, 0.0)
    for organ in _ORGANS:
        centre = np.asarray(organ.centre_mm) + rng.uniform(-3.0, 3.0, size=3)
        radii = np.asarray(organ.radii_mm) * rng.uniform(0.85, 1.15, size=3)
        inside = (
            ((x - centre[0]) / radii[0]) ** 2
            + ((y - centre[1]) / radii[1]) ** 2
            + ((z - centre[2]) / radii[2]) ** 2
        ) <= 1.0
        inside &= body
        label[inside] = organ.label
        image[inside] = organ.intensity + rng.normal(0.0, 8.0)  # per-case shift of the organ's mean
    image = image + 15.0 * _smooth_field(rng, x, y, z) + rng.normal(0.0, 12.0, size=DEMO_SHAPE)
    gradient = rng.normal(size=3)
    gradient /= np.linalg.norm(gradient)
    bias = 1.0 + 0.1 * (gradient[0] * x + gradient[1] * y + gradient[2] * z) / 48.0
    return np.round(image * bias).astype(np.int16), label


def generate_demo_dataset(
    output_root: Optional[PathLike] = None,
    seed: int = 0,
    force: bool = False,
    num_train: int = 24,
    num_test: int = 6,
) -> Path:
    """Write ``Dataset990_LKMUNetDemo`` (imagesTr/labelsTr, imagesTs/labelsTs, dataset.json).

    Args:
        output_root: where the dataset folder is created; defaults to ``$nnUNet_raw``.
        seed: seed of every random draw.
        force: replace an existing dataset folder.
        num_train, num_test: case counts; cases ``demo_0000 ...`` are training, the rest held out.
    """
    import SimpleITK as sitk

    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train} and {num_test}")
    folder = dataset_folder(DEMO_DATASET_NAME, output_root)
    with new_dataset_folder(folder, force):
        for index in range(num_train + num_test):
            subset = "Tr" if index < num_train else "Ts"
            (folder / f"images{subset}").mkdir(exist_ok=True)
            (folder / f"labels{subset}").mkdir(exist_ok=True)
            image_array, label_array = demo_case(seed, index)
            image = sitk.GetImageFromArray(image_array)
            image.SetSpacing(DEMO_SPACING_XYZ)
            image.SetOrigin(tuple(-0.5 * (n - 1) * s for n, s in zip(DEMO_SHAPE[::-1], DEMO_SPACING_XYZ)))
            case_id = f"demo_{index:04d}"
            sitk.WriteImage(image, str(folder / f"images{subset}" / f"{case_id}_0000{NIFTI_ENDING}"), True)
            write_label(label_array, image, folder / f"labels{subset}" / f"{case_id}{NIFTI_ENDING}")
        write_dataset_json(
            folder,
            {"0": "MRI"},  # any name but "CT" gives nnU-Net's z-score normalisation
            DEMO_LABELS,
            num_train,
            dataset_name=DEMO_DATASET_NAME,
            description=f"synthetic ellipsoid phantoms for the LKM-UNet quickstart (seed {seed})",
            converted_by="lkm-unet demo-data",
            license="CC0",
        )
    logger.info("Demo dataset: %d training and %d held-out cases -> %s", num_train, num_test, folder)
    return folder


def _grid_mm() -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Physical coordinates (z, y, x) in mm of every voxel centre, centred on the volume."""
    axes = [
        (np.arange(n) - 0.5 * (n - 1)) * s for n, s in zip(DEMO_SHAPE, DEMO_SPACING_XYZ[::-1])
    ]
    return tuple(np.meshgrid(*axes, indexing="ij"))


def _smooth_field(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """A sum of six random plane waves with wavelengths of 20-60 mm, at most 1 in magnitude."""
    field = np.zeros(DEMO_SHAPE)
    for _ in range(6):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        wavenumber = 2.0 * np.pi / rng.uniform(20.0, 60.0)
        phase = rng.uniform(0.0, 2.0 * np.pi)
        field += np.cos(wavenumber * (direction[0] * x + direction[1] * y + direction[2] * z) + phase)
    return field / 6.0
