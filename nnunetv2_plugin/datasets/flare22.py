"""FLARE22 labelled training set -> nnU-Net raw ``Dataset701_AbdomenCT``.

Source layout (the FLARE22 release)::

    SRC/images/FLARE22_Tr_0001_0000.nii.gz ...
    SRC/labels/FLARE22_Tr_0001.nii.gz ...

FLARE22 already labels the 13 organs in the order of :data:`ABDOMEN_ORGANS` (1 liver ... 13 left
kidney), so labels are only checked (values 0..13) and written as uint8. Images are copied byte for byte.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

import numpy as np

from nnunetv2_plugin.datasets.abdomen_organs import ABDOMEN_ORGANS, abdomen_labels
from nnunetv2_plugin.datasets.raw_dataset import (
    NIFTI_ENDING,
    DatasetError,
    PathLike,
    pair_images_with_labels,
    write_dataset,
)

logger = logging.getLogger("lkm_unet")

FLARE22_DATASET_NAME = "Dataset701_AbdomenCT"
_IMAGE_NAME = re.compile(r"^(FLARE22_Tr_\d{4})_0000\.nii\.gz$")


def convert_flare22(
    source: PathLike,
    output_root: Optional[PathLike] = None,
    test_cases: Optional[int] = None,
    test_fraction: Optional[float] = None,
    seed: int = 0,
    force: bool = False,
    verify: bool = True,
    num_processes: int = 2,
) -> Path:
    """Convert the FLARE22 labelled cases in ``source`` and return the new dataset folder.

    Args:
        source: folder holding ``images/`` and ``labels/``.
        output_root: where ``Dataset701_AbdomenCT`` is created; defaults to ``$nnUNet_raw``.
        test_cases, test_fraction: how many cases go to ``imagesTs``/``labelsTs`` (at most one).
        seed: seed of the held-out draw.
        force: replace an existing dataset folder (never the source).
        verify: run nnU-Net's ``verify_dataset_integrity`` at the end.
        num_processes: worker processes of the integrity check.
    """
    source = Path(source)
    cases = pair_images_with_labels(
        _find_images(source / "images"), source / "labels", lambda case_id: case_id + NIFTI_ENDING
    )
    return write_dataset(
        FLARE22_DATASET_NAME, source, cases, _check_flare22_label, {"0": "CT"}, abdomen_labels(),
        {"description": "FLARE22 labelled abdominal CT, 13 organs",
         "reference": "https://flare22.grand-challenge.org/", "converted_by": "lkm-unet convert-flare22",
         "license": "see the FLARE22 challenge terms"},
        output_root, test_cases, test_fraction, seed, force, verify, num_processes)


def _find_images(images_dir: Path) -> dict:
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir} is not a folder; expected FLARE22's images/ and labels/")
    images = {}
    for path in sorted(images_dir.glob("*" + NIFTI_ENDING)):
        match = _IMAGE_NAME.match(path.name)
        if match is None:
            raise DatasetError(f"unexpected file {path}: FLARE22 images are named FLARE22_Tr_XXXX_0000.nii.gz")
        images[match.group(1)] = path
    if not images:
        raise DatasetError(f"no FLARE22_Tr_XXXX_0000.nii.gz images in {images_dir}")
    return images


def _check_flare22_label(array: np.ndarray, path: Path) -> np.ndarray:
    values = np.unique(array)
    unexpected = [int(v) for v in values if v < 0 or v > len(ABDOMEN_ORGANS) or v != int(v)]
    if unexpected:
        raise DatasetError(f"label {path} has values {unexpected} outside 0..{len(ABDOMEN_ORGANS)}")
    return array.astype(np.uint8)
