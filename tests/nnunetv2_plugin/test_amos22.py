"""AMOS22 MR -> Dataset702_AbdomenMR on tiny synthetic cases in AMOS22's release layout."""
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
from nnunetv2_plugin.datasets.amos22 import amos_label_lookup, convert_amos22
from nnunetv2_plugin.datasets.raw_dataset import DatasetError

# The label names exactly as AMOS22's dataset.json spells them (including "arota").
AMOS_LABELS = {
    "0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney", "4": "gall bladder",
    "5": "esophagus", "6": "liver", "7": "stomach", "8": "arota", "9": "postcava", "10": "pancreas",
    "11": "right adrenal gland", "12": "left adrenal gland", "13": "duodenum", "14": "bladder",
    "15": "prostate/uterus",
}
# AMOS value -> FLARE22 value, written out by hand from the two label lists.
EXPECTED = {0: 0, 1: 3, 2: 2, 3: 13, 4: 9, 5: 10, 6: 1, 7: 11, 8: 5, 9: 6, 10: 4, 11: 7, 12: 8, 13: 12, 14: 0, 15: 0}
SPACING = (1.2, 1.1, 5.0)
ORIGIN = (-3.0, 4.0, -50.0)
DIRECTION = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
TRAIN_CASES = ["amos_0001", "amos_0499", "amos_0507", "amos_0510", "amos_0540"]
VALIDATION_CASES = ["amos_0100", "amos_0600"]
MR_CASES = ["amos_0507", "amos_0510", "amos_0540", "amos_0600"]


def _write(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    sitk.WriteImage(image, str(path), True)


def _label_array(seed: int) -> np.ndarray:
    values = np.arange(16, dtype=np.uint8).repeat(16)  # every AMOS value, 16 voxels each
    return np.random.default_rng(seed).permutation(values).reshape(4, 8, 8)


@pytest.fixture
def amos_source(tmp_path: Path) -> Path:
    source = tmp_path / "amos22"
    for subset, cases in (("Tr", TRAIN_CASES), ("Va", VALIDATION_CASES)):
        (source / f"images{subset}").mkdir(parents=True)
        (source / f"labels{subset}").mkdir()
        for index, case in enumerate(cases):
            _write(np.full((4, 8, 8), index, dtype=np.int16), source / f"images{subset}" / f"{case}.nii.gz")
            _write(_label_array(int(case[-4:])), source / f"labels{subset}" / f"{case}.nii.gz")
    (source / "dataset.json").write_text(json.dumps({"name": "AMOS", "labels": AMOS_LABELS}))
    return source


def test_mr_cases_are_remapped_per_voxel_with_geometry_kept(amos_source: Path, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lkm_unet"):
        folder = convert_amos22(amos_source, tmp_path / "raw", verify=False)
    assert folder == tmp_path / "raw" / "Dataset702_AbdomenMR"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in MR_CASES]
    assert f"{amos_source / 'imagesTr'}: 3 MR cases, 2 non-MR cases skipped" in caplog.messages
    assert f"{amos_source / 'imagesVa'}: 1 MR cases, 1 non-MR cases skipped" in caplog.messages
    for case in MR_CASES:
        subset = "Va" if case in VALIDATION_CASES else "Tr"
        source_image = amos_source / f"images{subset}" / f"{case}.nii.gz"
        assert (folder / "imagesTr" / f"{case}_0000.nii.gz").read_bytes() == source_image.read_bytes()
        label = sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz"))
        source = _label_array(int(case[-4:]))
        expected = np.vectorize(EXPECTED.get)(source)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), expected)
        assert label.GetPixelID() == sitk.sitkUInt8
        assert label.GetSpacing() == pytest.approx(SPACING)
        assert label.GetOrigin() == pytest.approx(ORIGIN)
        assert label.GetDirection() == pytest.approx(DIRECTION)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "MRI"}
    assert dataset_json["labels"] == abdomen_labels()
    assert dataset_json["numTraining"] == 4


def test_spot_values_of_the_mapping(amos_source: Path) -> None:
    table = amos_label_lookup(amos_source / "dataset.json")
    assert (table[1], table[6], table[14], table[15], table[8], table[9]) == (3, 1, 0, 0, 5, 6)
    assert table.tolist() == [EXPECTED[v] for v in range(16)]


def test_nnunet_v2_style_labels_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": {name: int(value) for value, name in AMOS_LABELS.items()}}))
    assert amos_label_lookup(path).tolist() == [EXPECTED[v] for v in range(16)]


def test_unknown_or_missing_label_names_are_errors(amos_source: Path, tmp_path: Path) -> None:
    path = amos_source / "dataset.json"
    path.write_text(json.dumps({"labels": {**AMOS_LABELS, "16": "colon"}}))
    with pytest.raises(DatasetError) as error:
        convert_amos22(amos_source, tmp_path / "raw", verify=False)
    assert str(error.value) == f"{path}: unknown AMOS label name 'colon' (value 16)"
    path.write_text(json.dumps({"labels": {k: v for k, v in AMOS_LABELS.items() if k != "13"}}))
    with pytest.raises(DatasetError) as error:
        amos_label_lookup(path)
    assert str(error.value) == f"{path}: no label for duodenum"
    assert not (tmp_path / "raw").exists()


def test_label_value_not_in_dataset_json_names_the_file(amos_source: Path, tmp_path: Path) -> None:
    bad = amos_source / "labelsTr" / "amos_0510.nii.gz"
    _write(np.full((4, 8, 8), 16, dtype=np.uint8), bad)
    with pytest.raises(DatasetError) as error:
        convert_amos22(amos_source, tmp_path / "raw", verify=False)
    assert str(error.value) == f"label {bad} has values [16] not named in AMOS's dataset.json"


def test_missing_label_and_refusal_to_overwrite(amos_source: Path, tmp_path: Path) -> None:
    folder = convert_amos22(amos_source, tmp_path / "raw", test_cases=1, verify=False)
    assert len(list((folder / "imagesTs").iterdir())) == 1
    with pytest.raises(DatasetError) as error:
        convert_amos22(amos_source, tmp_path / "raw", verify=False)
    assert str(error.value) == f"{folder} already exists; pass --force to replace it"
    (amos_source / "labelsTr" / "amos_0540.nii.gz").unlink()
    with pytest.raises(DatasetError) as error:
        convert_amos22(amos_source, tmp_path / "raw", force=True, verify=False)
    assert str(error.value) == (
        f"missing label for image {amos_source / 'imagesTr' / 'amos_0540.nii.gz'}: "
        f"expected {amos_source / 'labelsTr' / 'amos_0540.nii.gz'}"
    )
    assert folder.exists()  # the error came before anything was replaced


def test_ct_labels_are_not_required(amos_source: Path, tmp_path: Path) -> None:
    (amos_source / "labelsTr" / "amos_0001.nii.gz").unlink()
    folder = convert_amos22(amos_source, tmp_path / "raw", verify=False)
    assert len(list((folder / "labelsTr").iterdir())) == 4


def test_integrity_check_runs(amos_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_check = nnunet_verify.verify_dataset_integrity

    def spy(folder: str, num_processes: int = 8) -> None:
        calls.append((folder, num_processes))
        real_check(folder, num_processes)

    monkeypatch.setattr(nnunet_verify, "verify_dataset_integrity", spy)
    assert main(["convert-amos22", str(amos_source), "--output-root", str(tmp_path / "raw"),
                 "--test-cases", "2", "--seed", "5", "--num-processes", "1"]) == 0
    folder = tmp_path / "raw" / "Dataset702_AbdomenMR"
    assert calls == [(str(folder), 1)]
    assert len(list((folder / "labelsTs").iterdir())) == 2
