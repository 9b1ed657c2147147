"""Writing an nnU-Net v2 raw dataset folder: location, overwrite rules, test split, cases, dataset.json.

Shared by the FLARE22 and AMOS22 converters and the demo generator. SimpleITK and nnU-Net are imported
inside the functions that need them, so that building the `lkm-unet` parser stays cheap.
"""
from __future__ import annotations

import logging
import math
import os
import random
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from nnunetv2_plugin.image_files import read_image, read_size

if TYPE_CHECKING:
    import SimpleITK as sitk

logger = logging.getLogger("lkm_unet")

PathLike = Union[str, os.PathLike]
NIFTI_ENDING = ".nii.gz"


class DatasetError(ValueError):
    """A problem with the user's input or output folders, reported with the path at fault."""


@dataclass(frozen=True)
class RawCase:
    """One labelled case of a source dataset: its nnU-Net identifier and its two files."""

    case_id: str
    image: Path
    label: Path


def dataset_folder(dataset_name: str, output_root: Optional[PathLike] = None) -> Path:
    """``<output_root>/<dataset_name>``; ``output_root`` defaults to ``$nnUNet_raw``."""
    if output_root is None:
        output_root = os.environ.get("nnUNet_raw")
        if not output_root:
            raise DatasetError("nnUNet_raw is not set; set it or pass --output-root")
    return Path(output_root) / dataset_name


def prepare_dataset_folder(folder: Path, force: bool, source: Optional[Path] = None) -> None:
    """Create ``folder`` empty. An existing one is an error unless ``force``, which deletes it first.

    ``source`` (the user's raw download) is never deleted: a source inside ``folder`` is refused
    whatever ``force`` says.
    """
    if source is not None:
        src, dst = Path(source).resolve(), folder.resolve()
        if src == dst or dst in src.parents:
            raise DatasetError(
                f"the source folder {source} lies inside the output dataset folder {folder}; "
                "choose another --output-root"
            )
    if folder.exists() or folder.is_symlink():
        if not force:
            raise DatasetError(f"{folder} already exists; pass --force to replace it")
        logger.info("Replacing %s (--force)", folder)
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
        else:
            folder.unlink()
    folder.mkdir(parents=True)


@contextmanager
def new_dataset_folder(folder: Path, force: bool, source: Optional[Path] = None) -> Iterator[Path]:
    """:func:`prepare_dataset_folder`, and delete the half-written folder if the body raises."""
    prepare_dataset_folder(folder, force, source)
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def split_cases(
    case_ids: Sequence[str],
    test_cases: Optional[int] = None,
    test_fraction: Optional[float] = None,
    seed: int = 0,
) -> Tuple[List[str], List[str]]:
    """Split identifiers into (train, test), both sorted; the held-out draw depends only on ``seed``.

    ``test_fraction`` holds out ``round(fraction * n)`` cases (halves round up). At most one of the
    two options may be given; at least one case always stays in training.
    """
    ids = sorted(case_ids)
    if test_cases is not None and test_fraction is not None:
        raise DatasetError("give either --test-cases or --test-fraction, not both")
    if test_fraction is not None:
        if not 0.0 <= test_fraction < 1.0:
            raise DatasetError(f"--test-fraction must be in [0, 1), got {test_fraction}")
        test_cases = math.floor(test_fraction * len(ids) + 0.5)
    n_test = test_cases or 0
    if n_test < 0 or n_test >= len(ids):
        raise DatasetError(
            f"cannot hold out {n_test} of {len(ids)} cases: at least one must stay in training"
        )
    test = set(random.Random(seed).sample(ids, n_test))
    return [i for i in ids if i not in test], [i for i in ids if i in test]


def pair_images_with_labels(
    images: Dict[str, Path],
    labels_dir: Path,
    label_name: Callable[[str], str],
    label_wanted: Callable[[Path], bool] = lambda label: True,
) -> List[RawCase]:
    """Match each image (keyed by case id) with ``labels_dir / label_name(case_id)``, both ways.

    Raises DatasetError naming an image without its label, or a label file accepted by
    ``label_wanted(path)`` without its image.
    """
    cases = []
    for case_id in sorted(images):
        label = labels_dir / label_name(case_id)
        if not label.is_file():
            raise DatasetError(f"missing label for image {images[case_id]}: expected {label}")
        cases.append(RawCase(case_id, images[case_id], label))
    expected = {label_name(case_id) for case_id in images}
    for label in sorted(labels_dir.glob("*" + NIFTI_ENDING)):
        if label_wanted(label) and label.name not in expected:
            raise DatasetError(f"label {label} has no matching image")
    return cases


def write_cases(
    folder: Path,
    cases: Sequence[RawCase],
    test_ids: Sequence[str],
    remap_label: Callable[[np.ndarray, Path], np.ndarray],
) -> None:
    """Copy each image byte for byte to ``images{Tr,Ts}/<case>_0000.nii.gz`` and write its label.

    ``remap_label(array, label_path)`` turns the source label array into nnU-Net's values; the label
    is written as uint8 with the source label's spacing, origin and direction.
    """
    import SimpleITK as sitk

    held_out = set(test_ids)
    for case in cases:
        subset = "Ts" if case.case_id in held_out else "Tr"
        images_dir, labels_dir = folder / f"images{subset}", folder / f"labels{subset}"
        images_dir.mkdir(exist_ok=True)
        labels_dir.mkdir(exist_ok=True)
        source_label = read_image(case.label)
        image_size = read_size(case.image)
        if image_size != source_label.GetSize():
            raise DatasetError(
                f"label {case.label} has size {source_label.GetSize()} but its image {case.image} "
                f"has size {image_size}"
            )
        remapped = remap_label(sitk.GetArrayFromImage(source_label), case.label)
        shutil.copyfile(case.image, images_dir / f"{case.case_id}_0000{NIFTI_ENDING}")
        write_label(remapped, source_label, labels_dir / f"{case.case_id}{NIFTI_ENDING}")


def write_label(array: np.ndarray, geometry: "sitk.Image", path: Path) -> None:
    """Write ``array`` (numpy axis order z, y, x) as uint8 with the geometry of ``geometry``."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
    image.CopyInformation(geometry)
    sitk.WriteImage(image, str(path), useCompression=True)


def write_dataset_json(
    folder: Path,
    channel_names: Dict[str, str],
    labels: Dict[str, int],
    num_training: int,
    **extra: str,
) -> None:
    """nnU-Net v2 dataset.json with ``file_ending`` ``.nii.gz``; ``extra`` adds descriptive keys."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    generate_dataset_json(
        str(folder), dict(channel_names), dict(labels), num_training, NIFTI_ENDING, **extra
    )


def write_dataset(
    dataset_name: str,
    source: Path,
    cases: Sequence[RawCase],
    remap_label: Callable[[np.ndarray, Path], np.ndarray],
    channel_names: Dict[str, str],
    labels: Dict[str, int],
    metadata: Dict[str, str],
    output_root: Optional[PathLike],
    test_cases: Optional[int],
    test_fraction: Optional[float],
    seed: int,
    force: bool,
    verify: bool,
    num_processes: int,
) -> Path:
    """What every converter does once it has its cases: split off the held-out cases, write images,
    labels and dataset.json into a new folder (see :func:`new_dataset_folder`), run the integrity check."""
    train_ids, test_ids = split_cases([c.case_id for c in cases], test_cases, test_fraction, seed)
    folder = dataset_folder(dataset_name, output_root)
    logger.info("%s: %d training and %d held-out cases -> %s", dataset_name, len(train_ids), len(test_ids), folder)
    with new_dataset_folder(folder, force, source):
        write_cases(folder, cases, test_ids, remap_label)
        write_dataset_json(folder, channel_names, labels, len(train_ids), dataset_name=dataset_name, **metadata)
    if verify:
        verify_raw_dataset(folder, num_processes)
    return folder


def verify_raw_dataset(folder: Path, num_processes: int = 2) -> None:
    """Run nnU-Net's own integrity check on ``folder``; its findings are printed by nnU-Net."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    logger.info("Checking %s with nnU-Net's verify_dataset_integrity", folder)
    try:
        verify_dataset_integrity(str(folder), num_processes)
    except (AssertionError, RuntimeError, FileNotFoundError) as error:
        raise DatasetError(f"nnU-Net's integrity check failed for {folder}: {error}") from error

