"""The synthetic demo dataset: determinism, content, geometry and nnU-Net's integrity check."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
from nnunetv2_plugin.cli import main
from nnunetv2_plugin.datasets.demo import DEMO_SHAPE, demo_case, generate_demo_dataset
from nnunetv2_plugin.datasets.raw_dataset import DatasetError


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    first = generate_demo_dataset(tmp_path / "one", seed=7, num_train=3, num_test=2)
    second = generate_demo_dataset(tmp_path / "two", seed=7, num_train=3, num_test=2)
    assert _files(first) == _files(second)
    assert len(_files(first)) == 11  # 5 images, 5 labels, dataset.json
    image, label = demo_case(7, 0)
    other_image, other_label = demo_case(8, 0)
    assert not np.array_equal(label, other_label)
    assert not np.array_equal(image, other_image)
    np.testing.assert_array_equal(demo_case(7, 1)[1], demo_case(7, 1)[1])
    assert not np.array_equal(demo_case(7, 1)[1], label)  # cases of one seed differ too


@pytest.mark.parametrize("case_index", range(6))
def test_every_case_has_three_separable_organs(case_index: int) -> None:
    image, label = demo_case(0, case_index)
    assert image.shape == label.shape == DEMO_SHAPE
    assert (image.dtype, label.dtype) == (np.int16, np.uint8)
    assert set(np.unique(label)) == {0, 1, 2, 3}
    means = [float(image[label == value].mean()) for value in (1, 2, 3)]
    assert means[1] - means[0] > 40 and means[0] - means[2] > 30  # kidney > liver > spleen
    assert all(np.count_nonzero(label == value) > 300 for value in (1, 2, 3))


def test_layout_geometry_and_nnunet_integrity(tmp_path: Path) -> None:
    folder = generate_demo_dataset(tmp_path, seed=0, num_train=4, num_test=2)
    assert folder == tmp_path / "Dataset990_LKMUNetDemo"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"demo_{i:04d}_0000.nii.gz" for i in range(4)]
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == ["demo_0004.nii.gz", "demo_0005.nii.gz"]
    image = sitk.ReadImage(str(folder / "imagesTr" / "demo_0000_0000.nii.gz"))
    label = sitk.ReadImage(str(folder / "labelsTr" / "demo_0000.nii.gz"))
    assert image.GetSize() == (96, 96, 16)
    assert image.GetSpacing() == label.GetSpacing() == (1.0, 1.0, 3.0)
    assert image.GetOrigin() == label.GetOrigin() == (-47.5, -47.5, -22.5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), demo_case(0, 0)[1])
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["labels"] == {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}
    assert (dataset_json["numTraining"], dataset_json["file_ending"]) == (4, ".nii.gz")
    assert dataset_json["channel_names"] == {"0": "MRI"}
    verify_dataset_integrity(str(folder), 1)  # raises on any problem


def test_refusal_and_force(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    assert main(["demo-data", "--num-train", "2", "--num-test", "1"]) == 0
    folder = tmp_path / "Dataset990_LKMUNetDemo"
    with pytest.raises(DatasetError) as error:
        generate_demo_dataset(num_train=2, num_test=0)
    assert str(error.value) == f"{folder} already exists; pass --force to replace it"
    assert main(["demo-data", "--num-train", "2", "--num-test", "0"]) == 1
    assert main(["demo-data", "--num-train", "2", "--num-test", "0", "--force", "--seed", "3"]) == 0
    assert not (folder / "imagesTs").exists()
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 2


def test_nnunet_raw_must_be_set_without_output_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(DatasetError, match=r"^nnUNet_raw is not set; set it or pass --output-root$"):
        generate_demo_dataset()
