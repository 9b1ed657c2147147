"""Reading the user's image files: one place that turns SimpleITK's multi-line exceptions into one
line naming the file.

Every command that reads images (evaluate, the converters, overlays) goes through these functions,
so a corrupt or missing file is reported as ``cannot read image <path>: <reason>``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Tuple, Union

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk

PathLike = Union[str, os.PathLike]
UNREADABLE = "corrupt, truncated or not an image format SimpleITK reads"


class ImageReadError(ValueError):
    """An image file that cannot be read; the message is one line that names it."""


def _reason(error: RuntimeError) -> str:
    text = str(error)
    if "does not exist" in text:
        return "the file does not exist"
    if "Unable to determine ImageIO reader" in text:
        return UNREADABLE
    last = text.strip().splitlines()[-1] if text.strip() else type(error).__name__
    return last.replace("sitk::ERROR: ", "").strip()


def read_image(path: PathLike) -> "sitk.Image":
    """The image at ``path`` with its geometry; :class:`ImageReadError` if it cannot be read."""
    import SimpleITK as sitk

    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ImageReadError(f"cannot read image {path}: {_reason(error)}") from None


def read_array(path: PathLike) -> np.ndarray:
    """The voxels of ``path`` in numpy axis order (z, y, x)."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(read_image(path))


def read_size(path: PathLike) -> Tuple[int, ...]:
    """The size (x, y, z as SimpleITK orders it) from the header only."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(Path(path)))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise ImageReadError(f"cannot read image {path}: {_reason(error)}") from None
    return tuple(reader.GetSize())
