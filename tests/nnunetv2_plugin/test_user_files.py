"""User files: evaluate never overwrites results without --force; unreadable images are one line naming them."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_plugin.datasets.raw_dataset import RawCase, write_cases
from nnunetv2_plugin.evaluation import EvaluationError, evaluate_folders
from nnunetv2_plugin.image_files import UNREADABLE, ImageReadError, read_array, read_size
from nnunetv2_plugin.overlays import write_overlays

LKM_UNET = [sys.executable, "-m", "nnunetv2_plugin.cli"]


def _write(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def _corrupt(path: Path) -> Path:
    """A real .nii.gz cut in half, as an interrupted copy leaves it."""
    _write(np.ones((4, 6, 6), dtype=np.uint8), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture()
def folders(tmp_path):
    cube = np.zeros((4, 6, 6), dtype=np.uint8)
    cube[1:3, 1:4, 1:4] = 1
    for name in ("a", "b"):
        _write(cube, tmp_path / "ref" / f"{name}.nii.gz")
        _write(cube, tmp_path / "pred" / f"{name}.nii.gz")
    return tmp_path


def test_evaluate_refuses_a_folder_with_results_unless_forced(folders):
    out = folders / "eval"
    evaluate_folders(folders / "pred", folders / "ref", output_dir=out)
    (out / "summary.csv").write_text("my own notes\n")
    before = (out / "per_case.csv").read_text()
    with pytest.raises(EvaluationError) as error:
        evaluate_folders(folders / "pred", folders / "ref", output_dir=out)
    assert str(error.value) == (f"{out} already holds per_case.csv and summary.csv; pass --force to overwrite "
                                f"them, or choose another --output-dir")
    assert (out / "summary.csv").read_text() == "my own notes\n"
    assert (out / "per_case.csv").read_text() == before
    evaluate_folders(folders / "pred", folders / "ref", output_dir=out, force=True)
    assert (out / "summary.csv").read_text().startswith("organ,DSC_mean")


def test_evaluate_command_refuses_the_default_output_folder_and_obeys_force(folders):
    pred = folders / "pred"
    (pred / "per_case.csv").write_text("kept\n")
    args = LKM_UNET + ["evaluate", str(pred), str(folders / "ref")]
    refused = subprocess.run(args, capture_output=True, text=True)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (f"error: {pred} already holds per_case.csv; pass --force to overwrite them, "
                                      f"or choose another --output-dir")
    assert (pred / "per_case.csv").read_text() == "kept\n"
    forced = subprocess.run(args + ["--force"], capture_output=True, text=True)
    assert forced.returncode == 0, forced.stderr
    assert (pred / "per_case.csv").read_text().startswith("case,organ,DSC,NSD")


def test_evaluate_command_names_a_corrupt_prediction_in_one_line(folders):
    bad = _corrupt(folders / "pred" / "b.nii.gz")
    result = subprocess.run(LKM_UNET + ["evaluate", str(folders / "pred"), str(folders / "ref"), "--output-dir",
                                        str(folders / "eval")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == f"error: cannot read image {bad}: {UNREADABLE}"
    assert "Traceback" not in result.stderr and "sitk::ERROR" not in result.stderr
    assert not (folders / "eval" / "summary.csv").exists()


def test_shared_reader_messages(tmp_path):
    bad = _corrupt(tmp_path / "bad.nii.gz")
    with pytest.raises(ImageReadError) as error:
        read_array(bad)
    assert str(error.value) == f"cannot read image {bad}: corrupt, truncated or not an image format SimpleITK reads"
    with pytest.raises(ImageReadError) as error:
        read_size(tmp_path / "none.nii.gz")
    assert str(error.value) == f"cannot read image {tmp_path / 'none.nii.gz'}: the file does not exist"


def test_converter_names_a_corrupt_label(tmp_path):
    image = _write(np.zeros((4, 6, 6), dtype=np.float32), tmp_path / "src" / "case_0000.nii.gz")
    label = _corrupt(tmp_path / "src" / "case.nii.gz")
    (tmp_path / "out").mkdir()
    with pytest.raises(ImageReadError) as error:
        write_cases(tmp_path / "out", [RawCase("case", image, label)], [], lambda array, path: array)
    assert str(error.value) == f"cannot read image {label}: {UNREADABLE}"


def test_overlays_command_names_a_corrupt_image(folders):
    images = folders / "img"
    _write(np.zeros((4, 6, 6), dtype=np.float32), images / "a_0000.nii.gz")
    bad = _corrupt(images / "b_0000.nii.gz")
    with pytest.raises(ImageReadError, match=f"^cannot read image {bad}: {UNREADABLE}$"):
        write_overlays(images, folders / "ref", folders / "pred", folders / "png")
    result = subprocess.run(LKM_UNET + ["overlays", str(images), str(folders / "ref"), str(folders / "pred"),
                                        str(folders / "png")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: cannot read image {bad}: {UNREADABLE}"
