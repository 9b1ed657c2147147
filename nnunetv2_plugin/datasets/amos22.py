"""AMOS22 MR cases -> nnU-Net raw ``Dataset702_AbdomenMR`` with FLARE22's label order.

Source layout (the AMOS22 release)::

    SRC/dataset.json                        labels {"0": "background", "1": "spleen", ...}
    SRC/imagesTr/amos_0507.nii.gz ...       SRC/labelsTr/amos_0507.nii.gz ...
    SRC/imagesVa/...  SRC/labelsVa/...      optional; used when both folders exist

AMOS numbers its cases so that ids >= 500 are MR; CT cases are skipped. The label mapping is built from
the names in AMOS's own dataset.json (not from assumed values): each of the 13 organs goes to its value
in :data:`ABDOMEN_ORGANS`, bladder and prostate/uterus become background.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from nnunetv2_plugin.datasets.abdomen_organs import ABDOMEN_ORGANS, abdomen_labels, normalize_label_name
from nnunetv2_plugin.datasets.raw_dataset import (
    NIFTI_ENDING,
    DatasetError,
    PathLike,
    RawCase,
    pair_images_with_labels,
    write_dataset,
)

logger = logging.getLogger("lkm_unet")

AMOS22_DATASET_NAME = "Dataset702_AbdomenMR"
AMOS_FIRST_MR_CASE = 500
_CASE_NAME = re.compile(r"^amos_(\d{4})\.nii\.gz$")

# Spellings seen for AMOS label names (normalised), to the organ they denote; "" is background.
_NAME_ALIASES: Dict[str, str] = {
    "background": "",
    "bladder": "",
    "urinarybladder": "",
    "prostateuterus": "",
    "prostateoruterus": "",
    "spleen": "spleen",
    "rightkidney": "right kidney",
    "kidneyright": "right kidney",
    "kidneyr": "right kidney",
    "leftkidney": "left kidney",
    "kidneyleft": "left kidney",
    "kidneyl": "left kidney",
    "gallbladder": "gallbladder",
    "esophagus": "esophagus",
    "oesophagus": "esophagus",
    "liver": "liver",
    "stomach": "stomach",
    "aorta": "aorta",
    "arota": "aorta",  # the spelling in AMOS22's dataset.json
    "postcava": "inferior vena cava",
    "inferiorvenacava": "inferior vena cava",
    "ivc": "inferior vena cava",
    "pancreas": "pancreas",
    "rightadrenalgland": "right adrenal gland",
    "adrenalglandright": "right adrenal gland",
    "adrenalr": "right adrenal gland",
    "leftadrenalgland": "left adrenal gland",
    "adrenalglandleft": "left adrenal gland",
    "adrenall": "left adrenal gland",
    "duodenum": "duodenum",
}


def amos_label_lookup(dataset_json: PathLike) -> np.ndarray:
    """Lookup table ``new = table[amos_value]`` built from the label names in AMOS's dataset.json.

    Accepts the MSD style ``{"1": "spleen"}`` and the nnU-Net v2 style ``{"spleen": 1}``. Raises
    DatasetError naming the file for an unknown name, or for an organ missing or given twice.
    """
    path = Path(dataset_json)
    if not path.is_file():
        raise DatasetError(f"{path} not found; AMOS22's dataset.json names its label values")
    entries = json.loads(path.read_text()).get("labels")
    if not isinstance(entries, dict) or not entries:
        raise DatasetError(f"{path} has no 'labels' mapping")
    if all(isinstance(v, str) for v in entries.values()):
        value_to_name = {int(k): v for k, v in entries.items()}
    else:
        value_to_name = {int(v): k for k, v in entries.items()}
    new_values = abdomen_labels()
    table = np.zeros(max(value_to_name) + 1, dtype=np.uint8)
    seen: Dict[str, int] = {}
    for value, name in sorted(value_to_name.items()):
        organ = _NAME_ALIASES.get(normalize_label_name(name))
        if organ is None:
            raise DatasetError(f"{path}: unknown AMOS label name {name!r} (value {value})")
        if organ:
            if organ in seen:
                raise DatasetError(f"{path}: {organ!r} is labelled twice ({seen[organ]} and {value})")
            seen[organ] = value
            table[value] = new_values[organ]
    missing = [organ for organ in ABDOMEN_ORGANS if organ not in seen]
    if missing:
        raise DatasetError(f"{path}: no label for {', '.join(missing)}")
    return table


def convert_amos22(
    source: PathLike,
    output_root: Optional[PathLike] = None,
    test_cases: Optional[int] = None,
    test_fraction: Optional[float] = None,
    seed: int = 0,
    force: bool = False,
    verify: bool = True,
    num_processes: int = 2,
) -> Path:
    """Convert the labelled AMOS22 MR cases in ``source`` and return the new dataset folder.

    Arguments as :func:`nnunetv2_plugin.datasets.flare22.convert_flare22`; ``source`` holds
    ``dataset.json``, ``imagesTr``/``labelsTr`` and optionally ``imagesVa``/``labelsVa``.
    """
    source = Path(source)
    table = amos_label_lookup(source / "dataset.json")
    cases = []
    for subset in ("Tr", "Va"):
        images_dir, labels_dir = source / f"images{subset}", source / f"labels{subset}"
        if subset == "Va" and not (images_dir.is_dir() and labels_dir.is_dir()):
            continue
        cases += _mr_cases(images_dir, labels_dir)
    if not cases:
        raise DatasetError(f"no labelled MR cases (amos_XXXX with XXXX >= {AMOS_FIRST_MR_CASE}) in {source}")
    return write_dataset(
        AMOS22_DATASET_NAME, source, cases, lambda array, path: _remap(table, array, path), {"0": "MRI"},
        abdomen_labels(),
        {"description": "AMOS22 abdominal MR, 13 organs in FLARE22's order (bladder, prostate/uterus removed)",
         "reference": "https://amos22.grand-challenge.org/", "converted_by": "lkm-unet convert-amos22",
         "license": "see the AMOS22 terms"},
        output_root, test_cases, test_fraction, seed, force, verify, num_processes)


def _mr_cases(images_dir: Path, labels_dir: Path) -> list[RawCase]:
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir} is not a folder; expected AMOS22's imagesTr/ and labelsTr/")
    images, skipped = {}, 0
    for path in sorted(images_dir.glob("*" + NIFTI_ENDING)):
        if not _is_mr(path):
            skipped += 1
            continue
        images[path.name[: -len(NIFTI_ENDING)]] = path
    logger.info("%s: %d MR cases, %d non-MR cases skipped", images_dir, len(images), skipped)
    return pair_images_with_labels(images, labels_dir, lambda case_id: case_id + NIFTI_ENDING, _is_mr)


def _is_mr(path: Path) -> bool:
    match = _CASE_NAME.match(path.name)
    if match is None:
        raise DatasetError(f"unexpected file {path}: AMOS22 files are named amos_XXXX.nii.gz")
    return int(match.group(1)) >= AMOS_FIRST_MR_CASE


def _remap(table: np.ndarray, array: np.ndarray, path: Path) -> np.ndarray:
    values = np.unique(array)
    unknown = [int(v) for v in values if v < 0 or v >= len(table) or v != int(v)]
    if unknown:
        raise DatasetError(f"label {path} has values {unknown} not named in AMOS's dataset.json")
    return table[array.astype(np.int64)]
