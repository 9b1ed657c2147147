"""FLARE22 -> Dataset701_AbdomenCT on tiny synthetic cases in FLARE22's release layout."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import nnunetv2.experiment_planning.verify_dataset_integrity as nnunet_verify
from nnunetv2_plugin.cli import main
from nnunetv2_plugin.datasets.abdomen_organs import abdomen_labels
from nnunetv2_plugin.datasets.flare22 import convert_flare22
from nnunetv2_plugin.datasets.raw_dataset import DatasetError, split_cases, verify_raw_dataset

SPACING = (0.8, 0.7, 2.5)
ORIGIN = (10.0, -20.0, 30.5)
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
CASES = [f"FLARE22_Tr_{i:04d}" for i in (1, 2, 3, 7, 9)]


def _write(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    sitk.WriteImage(image, str(path), True)


@pytest.fixture
def flare_source(tmp_path: Path) -> Path:
    source = tmp_path / "FLARE22"
    (source / "images").mkdir(parents=True)
    (source / "labels").mkdir()
    rng = np.random.default_rng(0)
    for case in CASES:
        _write(rng.integers(-1000, 1000, (4, 8, 8)).astype(np.int16), source / "images" / f"{case}_0000.nii.gz")
        _write(rng.integers(0, 14, (4, 8, 8)).astype(np.int16), source / "labels" / f"{case}.nii.gz")
    return source


def test_cases_are_copied_with_labels_and_geometry_kept(flare_source: Path, tmp_path: Path) -> None:
    folder = convert_flare22(flare_source, tmp_path / "raw", test_cases=2, seed=3, verify=False)
    assert folder == tmp_path / "raw" / "Dataset701_AbdomenCT"
    train, test = split_cases(CASES, test_cases=2, seed=3)
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in train]
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == [f"{c}.nii.gz" for c in test]
    for case in CASES:
        subset = "Tr" if case in train else "Ts"
        copied = folder / f"images{subset}" / f"{case}_0000.nii.gz"
        assert copied.read_bytes() == (flare_source / "images" / f"{case}_0000.nii.gz").read_bytes()
        label = sitk.ReadImage(str(folder / f"labels{subset}" / f"{case}.nii.gz"))
        source_label = sitk.ReadImage(str(flare_source / "labels" / f"{case}.nii.gz"))
        assert label.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(source_label))
        assert label.GetSpacing() == pytest.approx(SPACING)
        assert label.GetOrigin() == pytest.approx(ORIGIN)
        assert label.GetDirection() == pytest.approx(DIRECTION)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "CT"}
    assert dataset_json["labels"] == abdomen_labels()
    assert list(dataset_json["labels"])[1:4] == ["liver", "right kidney", "spleen"]
    assert dataset_json["labels"]["left kidney"] == 13
    assert dataset_json["numTraining"] == 3
    assert dataset_json["file_ending"] == ".nii.gz"


def test_split_sizes_and_seed() -> None:
    assert [len(s) for s in split_cases(CASES, test_fraction=0.5)] == [2, 3]  # 2.5 rounds up
    assert [len(s) for s in split_cases(CASES, test_fraction=0.2)] == [4, 1]
    assert [len(s) for s in split_cases(CASES)] == [5, 0]
    assert split_cases(CASES, test_cases=2, seed=1) == split_cases(list(reversed(CASES)), test_cases=2, seed=1)
    with pytest.raises(DatasetError, match=r"^cannot hold out 5 of 5 cases: at least one must stay in training$"):
        split_cases(CASES, test_cases=5)
    with pytest.raises(DatasetError, match=r"^give either --test-cases or --test-fraction, not both$"):
        split_cases(CASES, test_cases=1, test_fraction=0.2)


def test_existing_folder_is_refused_without_force(flare_source: Path, tmp_path: Path) -> None:
    folder = convert_flare22(flare_source, tmp_path / "raw", verify=False)
    (folder / "stale.txt").write_text("old")
    with pytest.raises(DatasetError) as error:
        convert_flare22(flare_source, tmp_path / "raw", verify=False)
    assert str(error.value) == f"{folder} already exists; pass --force to replace it"
    assert (folder / "stale.txt").exists()
    convert_flare22(flare_source, tmp_path / "raw", force=True, verify=False)
    assert not (folder / "stale.txt").exists()
    assert len(list((folder / "imagesTr").iterdir())) == 5


def test_force_never_deletes_a_source_inside_the_dataset_folder(flare_source: Path, tmp_path: Path) -> None:
    folder = tmp_path / "raw" / "Dataset701_AbdomenCT"
    inside = folder / "download"
    inside.parent.mkdir(parents=True)
    flare_source.rename(inside)
    with pytest.raises(DatasetError) as error:
        convert_flare22(inside, tmp_path / "raw", force=True, verify=False)
    assert str(error.value) == (
        f"the source folder {inside} lies inside the output dataset folder {folder}; choose another --output-root"
    )
    assert len(list((inside / "images").iterdir())) == 5


def test_missing_label_names_the_image(flare_source: Path, tmp_path: Path) -> None:
    (flare_source / "labels" / "FLARE22_Tr_0003.nii.gz").unlink()
    with pytest.raises(DatasetError) as error:
        convert_flare22(flare_source, tmp_path / "raw", verify=False)
    image = flare_source / "images" / "FLARE22_Tr_0003_0000.nii.gz"
    label = flare_source / "labels" / "FLARE22_Tr_0003.nii.gz"
    assert str(error.value) == f"missing label for image {image}: expected {label}"
    assert not (tmp_path / "raw").exists()


def test_label_out_of_range_is_refused_and_partial_output_removed(flare_source: Path, tmp_path: Path) -> None:
    bad = flare_source / "labels" / "FLARE22_Tr_0009.nii.gz"
    _write(np.full((4, 8, 8), 14, dtype=np.int16), bad)
    with pytest.raises(DatasetError) as error:
        convert_flare22(flare_source, tmp_path / "raw", verify=False)
    assert str(error.value) == f"label {bad} has values [14] outside 0..13"
    assert not (tmp_path / "raw" / "Dataset701_AbdomenCT").exists()


def test_integrity_check_runs(flare_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_check = nnunet_verify.verify_dataset_integrity

    def spy(folder: str, num_processes: int = 8) -> None:
        calls.append((folder, num_processes))
        real_check(folder, num_processes)

    monkeypatch.setattr(nnunet_verify, "verify_dataset_integrity", spy)
    folder = convert_flare22(flare_source, tmp_path / "raw", test_cases=1, num_processes=1)
    assert calls == [(str(folder), 1)]
    convert_flare22(flare_source, tmp_path / "raw", force=True, verify=False)
    assert len(calls) == 1


def test_failed_integrity_check_names_the_folder(flare_source: Path, tmp_path: Path) -> None:
    folder = convert_flare22(flare_source, tmp_path / "raw", verify=False)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    dataset_json["numTraining"] = 6
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    with pytest.raises(DatasetError, match=r"^nnU-Net's integrity check failed for .*Dataset701_AbdomenCT: "
                                           r"Did not find the expected number of training cases \(6\)"):
        verify_raw_dataset(folder, 1)


def test_command_line(flare_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "env_raw"))
    assert main(["convert-flare22", str(flare_source), "--test-fraction", "0.4", "--no-verify"]) == 0
    folder = tmp_path / "env_raw" / "Dataset701_AbdomenCT"
    assert len(list((folder / "imagesTs").iterdir())) == 2
    with caplog.at_level(logging.ERROR, logger="lkm_unet"):
        assert main(["convert-flare22", str(flare_source), "--no-verify"]) == 1
    assert caplog.messages[-1] == f"error: {folder} already exists; pass --force to replace it"
