"""The two means of the evaluation: the paper's (FLARE rule) and the one over organs present in the reference."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_plugin.evaluation import SUMMARY_FOOTNOTE, evaluate_folders, format_summary


def _write(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing((0.8, 0.8, 3.0))
    sitk.WriteImage(image, str(path), True)


@pytest.fixture()
def absent_organ_cases(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two cases, organs liver (1), kidney (2), spleen (3).

    a: reference liver + kidney; prediction liver exact, no kidney; spleen in neither  -> DSC 1, 0, 1
    b: reference liver only; prediction liver shifted one slice (DSC 0.75), a spleen false positive,
       kidney in neither                                                                 -> DSC 0.75, 1, 0
    """
    predictions, references = tmp_path / "pred", tmp_path / "ref"
    predictions.mkdir()
    references.mkdir()
    liver = np.zeros((8, 12, 12), dtype=np.uint8)
    liver[2:6, 2:6, 2:6] = 1
    a_reference = liver.copy()
    a_reference[2:4, 8:10, 8:10] = 2
    _write(a_reference, references / "a.nii.gz")
    _write(liver, predictions / "a.nii.gz")
    b_prediction = np.roll(liver, 1, axis=0)
    b_prediction[0:2, 8:10, 8:10] = 3
    _write(liver, references / "b.nii.gz")
    _write(b_prediction, predictions / "b.nii.gz")
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}}))
    return predictions, references, dataset_json


def test_both_means_on_cases_with_absent_organs(absent_organ_cases, tmp_path: Path) -> None:
    predictions, references, dataset_json = absent_organ_cases
    per_case, summary = evaluate_folders(predictions, references, dataset_json=dataset_json,
                                         output_dir=tmp_path / "out")
    assert [(r["case"], r["organ"], r["DSC"], r["in_reference"]) for r in per_case] == [
        ("a", "liver", 1.0, 1), ("a", "kidney", 0.0, 1), ("a", "spleen", 1.0, 0),
        ("b", "liver", 0.75, 1), ("b", "kidney", 1.0, 0), ("b", "spleen", 0.0, 0),
    ]
    rows = {r["organ"]: r for r in summary}
    # FLARE rule: liver (1 + 0.75) / 2, kidney (0 + 1) / 2, spleen (1 + 0) / 2; mean of the three.
    assert [rows[o]["DSC_mean"] for o in ("liver", "kidney", "spleen", "mean")] == pytest.approx(
        [0.875, 0.5, 0.5, 0.625])
    # Present only: liver in both cases 0.875, kidney only in a: 0, spleen never: NaN and left out.
    assert [rows[o]["n_present"] for o in ("liver", "kidney", "spleen", "mean")] == [2, 1, 0, 2]
    assert rows["liver"]["DSC_present_mean"] == pytest.approx(0.875)
    assert rows["kidney"]["DSC_present_mean"] == 0.0
    assert np.isnan(rows["spleen"]["DSC_present_mean"])
    assert rows["mean"]["DSC_present_mean"] == pytest.approx(0.4375)
    # NSD: the one-slice (3 mm) shift is inside the liver's 5 mm tolerance, so liver 1; kidney 0, 1.
    assert [rows[o]["NSD_mean"] for o in ("liver", "kidney", "spleen")] == pytest.approx([1.0, 0.5, 0.5])
    assert rows["mean"]["NSD_present_mean"] == pytest.approx(0.5)
    with (tmp_path / "out" / "summary.csv").open() as handle:
        written = {r["organ"]: r for r in csv.DictReader(handle)}
    assert written["kidney"] == {"organ": "kidney", "DSC_mean": "0.500000", "DSC_std": "0.500000",
                                 "NSD_mean": "0.500000", "NSD_std": "0.500000", "n": "2", "n_present": "1",
                                 "DSC_present_mean": "0.000000", "NSD_present_mean": "0.000000"}
    assert written["mean"]["DSC_present_mean"] == "0.437500" and written["mean"]["n_present"] == "2"
    assert written["spleen"]["DSC_present_mean"] == "nan"


def test_table_shows_both_means_and_the_footnote(absent_organ_cases, tmp_path: Path) -> None:
    predictions, references, dataset_json = absent_organ_cases
    _, summary = evaluate_folders(predictions, references, dataset_json=dataset_json, output_dir=tmp_path / "out")
    lines = format_summary(summary).splitlines()
    assert [line.split() for line in lines[1:5]] == [
        ["liver", "0.8750", "+-", "0.1250", "1.0000", "+-", "0.0000", "0.8750", "1.0000", "2/2"],
        ["kidney", "0.5000", "+-", "0.5000", "0.5000", "+-", "0.5000", "0.0000", "0.0000", "1/2"],
        ["spleen", "0.5000", "+-", "0.5000", "0.5000", "+-", "0.5000", "-", "-", "0/2"],
        # case means: DSC a 2/3, b 1.75/3 (std 1/24); NSD a 2/3, b 2/3
        ["mean", "0.6250", "+-", "0.0417", "0.6667", "+-", "0.0000", "0.4375", "0.5000", "2", "organs"],
    ]
    assert lines[5:] == [""] + SUMMARY_FOOTNOTE.splitlines()
