"""DSC and NSD on hand-computable masks, the slice rule, empty conventions, folders and CSVs."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_plugin.cli import main
from nnunetv2_plugin.evaluation import (
    EvaluationError,
    evaluate_case,
    evaluate_folders,
    flare_organs,
    organs_from_dataset_json,
)
from nnunetv2_plugin.surface_metrics import organ_scores

SPACING_ZYX = (2.0, 0.8, 0.8)


def _plate(z: slice | int, x: slice | int, shape=(12, 16, 16)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[z, 4:10, x] = True
    return mask


def _write_labels(array: np.ndarray, path: Path, spacing_xyz=(0.8, 0.8, 3.0)) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing_xyz)
    sitk.WriteImage(image, str(path), True)


def test_dice_of_cubes_offset_along_the_anisotropic_axis() -> None:
    reference = np.zeros((12, 16, 16), dtype=bool)
    reference[2:6, 4:8, 4:8] = True  # 4 x 4 x 4 voxels
    prediction = np.roll(reference, 1, axis=0)  # one slice = 2 mm further: 3 of 4 slices overlap
    dsc, nsd = organ_scores(prediction, reference, SPACING_ZYX, tolerance_mm=2.0)
    assert dsc == pytest.approx(0.75)
    assert nsd == pytest.approx(1.0)  # no surface point is more than the 2 mm offset away
    assert organ_scores(prediction, reference, SPACING_ZYX, tolerance_mm=1.9)[1] < 1.0


# Two 6 x 6 plates, one voxel thick, two slices apart along z (2 mm per slice): each plate has two
# equal faces, the near one 2 mm and the far one 4 mm from the other plate's surface.
@pytest.mark.parametrize(
    "tolerance_mm, expected_nsd", [(1.9, 0.0), (2.0, 0.5), (3.9, 0.5), (4.0, 1.0), (4.1, 1.0)]
)
def test_nsd_switches_at_the_tolerance_along_z(tolerance_mm: float, expected_nsd: float) -> None:
    dsc, nsd = organ_scores(_plate(6, slice(4, 10)), _plate(4, slice(4, 10)), SPACING_ZYX, tolerance_mm)
    assert dsc == 0.0
    assert nsd == pytest.approx(expected_nsd, abs=1e-6)


@pytest.mark.parametrize(
    "tolerance_mm, expected_nsd", [(0.79, 0.0), (0.8, 0.5), (1.59, 0.5), (1.6, 1.0)]
)
def test_nsd_uses_the_spacing_of_each_axis(tolerance_mm: float, expected_nsd: float) -> None:
    # Plates perpendicular to x, two voxels (2 x 0.8 mm) apart.
    reference, prediction = _plate(slice(2, 8), 4), _plate(slice(2, 8), 6)
    assert organ_scores(prediction, reference, SPACING_ZYX, tolerance_mm)[1] == pytest.approx(expected_nsd, abs=1e-6)


def test_nsd_reads_spacing_from_the_headers_in_numpy_order(tmp_path: Path) -> None:
    # Adjacent plates along z with 3 mm slices and 0.8 mm pixels: NSD 0.5 below 3 mm, 1 from 3 mm.
    _write_labels(_plate(4, slice(4, 10)).astype(np.uint8), tmp_path / "ref.nii.gz")
    _write_labels(_plate(5, slice(4, 10)).astype(np.uint8), tmp_path / "pred.nii.gz")
    scores = {}
    for tolerance in (2.9, 3.0):
        organs = organs_from_dataset_json(_dataset_json(tmp_path, {"blob": 1}), default_tolerance_mm=tolerance)
        scores[tolerance] = evaluate_case(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", organs)[0]["NSD"]
    assert scores[2.9] == pytest.approx(0.5, abs=1e-6)
    assert scores[3.0] == pytest.approx(1.0)


def test_slice_rule_for_aorta_but_not_for_liver(tmp_path: Path) -> None:
    reference = np.zeros((10, 16, 16), dtype=np.uint8)
    prediction = np.zeros_like(reference)
    for label, x in ((1, 2), (5, 10)):  # liver and aorta: identical columns in-plane
        reference[2:6, 4:8, x:x + 4] = label  # 4 labelled slices
        prediction[0:8, 4:8, x:x + 4] = label  # 8 predicted slices, 2 extra on each side
    _write_labels(reference, tmp_path / "ref.nii.gz")
    _write_labels(prediction, tmp_path / "pred.nii.gz")
    rows = {r["organ"]: r for r in evaluate_case(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", flare_organs())}
    assert (rows["aorta"]["DSC"], rows["aorta"]["NSD"]) == (1.0, 1.0)
    assert rows["liver"]["DSC"] == pytest.approx(2 * 4 / (4 + 8))
    assert rows["liver"]["NSD"] < 0.9  # 6 mm overshoot > 5 mm tolerance
    assert (rows["spleen"]["DSC"], rows["spleen"]["NSD"]) == (1.0, 1.0)  # absent from both


def test_slice_rule_needs_a_volume(tmp_path: Path) -> None:
    reference, prediction = np.zeros((8, 8), dtype=np.uint8), np.zeros((8, 8), dtype=np.uint8)
    reference[2:5, 2:6] = 5  # aorta, 3 rows
    prediction[0:7, 2:6] = 5  # 7 rows: in 2D there are no axial slices to restrict to
    _write_labels(reference, tmp_path / "ref.nii.gz", spacing_xyz=(0.8, 0.8))
    _write_labels(prediction, tmp_path / "pred.nii.gz", spacing_xyz=(0.8, 0.8))
    rows = {r["organ"]: r for r in evaluate_case(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", flare_organs())}
    assert rows["aorta"]["DSC"] == pytest.approx(2 * 12 / (12 + 28))


@pytest.mark.parametrize("slice_rule", [False, True])
def test_empty_conventions(slice_rule: bool) -> None:
    empty, blob = np.zeros((6, 8, 8), dtype=bool), np.zeros((6, 8, 8), dtype=bool)
    blob[2:4, 2:5, 2:5] = True
    assert organ_scores(empty, empty, SPACING_ZYX, 2.0, slice_rule) == (1.0, 1.0)
    assert organ_scores(blob, empty, SPACING_ZYX, 2.0, slice_rule) == (0.0, 0.0)
    assert organ_scores(empty, blob, SPACING_ZYX, 2.0, slice_rule) == (0.0, 0.0)


def test_prediction_only_outside_the_reference_slices_scores_zero() -> None:
    reference, prediction = np.zeros((6, 8, 8), dtype=bool), np.zeros((6, 8, 8), dtype=bool)
    reference[1:3, 2:5, 2:5] = True
    prediction[4:6, 2:5, 2:5] = True
    assert organ_scores(prediction, reference, SPACING_ZYX, 2.0, reference_slices_only=True) == (0.0, 0.0)


def test_tolerance_table_and_dataset_json_names(tmp_path: Path) -> None:
    table = {organ.name: (organ.label, organ.tolerance_mm, organ.reference_slices_only) for organ in flare_organs()}
    assert table == {
        "liver": (1, 5.0, False), "right kidney": (2, 3.0, False), "spleen": (3, 3.0, False),
        "pancreas": (4, 5.0, False), "aorta": (5, 2.0, True), "inferior vena cava": (6, 2.0, True),
        "right adrenal gland": (7, 2.0, False), "left adrenal gland": (8, 2.0, False),
        "gallbladder": (9, 2.0, False), "esophagus": (10, 3.0, True), "stomach": (11, 5.0, False),
        "duodenum": (12, 7.0, False), "left kidney": (13, 3.0, False),
    }
    path = _dataset_json(tmp_path, {"Liver": 1, "kidney": 2, "Inferior_Vena_Cava": 3})
    organs = organs_from_dataset_json(path, default_tolerance_mm=1.5)
    assert [(o.name, o.label, o.tolerance_mm, o.reference_slices_only) for o in organs] == [
        ("Liver", 1, 5.0, False), ("kidney", 2, 1.5, False), ("Inferior_Vena_Cava", 3, 2.0, True),
    ]


def test_folders_csvs_and_summary(tmp_path: Path) -> None:
    predictions, references, output = tmp_path / "pred", tmp_path / "ref", tmp_path / "out"
    predictions.mkdir()
    references.mkdir()
    cube = np.zeros((8, 12, 12), dtype=np.uint8)
    cube[2:6, 2:6, 2:6] = 1
    _write_labels(cube, references / "a.nii.gz")
    _write_labels(cube, predictions / "a.nii.gz")  # liver DSC 1, kidney both empty: 1
    shifted = np.roll(cube, 1, axis=0)
    shifted[0:2, 0:2, 0:2] = 2  # a false positive kidney
    _write_labels(cube, references / "b.nii.gz")
    _write_labels(shifted, predictions / "b.nii.gz")  # liver DSC 0.75, kidney 0
    (predictions / "dataset.json").write_text("{}")  # non-NIfTI files are ignored
    per_case, summary = evaluate_folders(
        predictions, references, dataset_json=_dataset_json(tmp_path, {"liver": 1, "kidney": 2}), output_dir=output
    )
    assert [(r["case"], r["organ"], r["DSC"]) for r in per_case] == [
        ("a", "liver", 1.0), ("a", "kidney", 1.0), ("b", "liver", 0.75), ("b", "kidney", 0.0),
    ]
    rows = {r["organ"]: r for r in summary}
    assert rows["liver"]["DSC_mean"] == pytest.approx(0.875)
    assert rows["liver"]["DSC_std"] == pytest.approx(0.125)
    assert rows["kidney"]["DSC_mean"] == pytest.approx(0.5)
    assert rows["mean"]["DSC_mean"] == pytest.approx(0.6875)
    assert rows["mean"]["DSC_std"] == pytest.approx(0.3125)  # per-case means 1.0 and 0.375
    with (output / "per_case.csv").open() as handle:
        written = list(csv.DictReader(handle))
    assert written[2] == {"case": "b", "organ": "liver", "DSC": "0.750000", "NSD": written[2]["NSD"], "in_reference": "1"}
    assert float(written[2]["NSD"]) == pytest.approx(per_case[2]["NSD"], abs=1e-6)
    with (output / "summary.csv").open() as handle:
        assert [r["organ"] for r in csv.DictReader(handle)] == ["liver", "kidney", "mean"]


def test_files_missing_on_either_side_are_named(tmp_path: Path) -> None:
    predictions, references = tmp_path / "pred", tmp_path / "ref"
    predictions.mkdir()
    references.mkdir()
    empty = np.zeros((2, 4, 4), dtype=np.uint8)
    for name in ("a", "b"):
        _write_labels(empty, references / f"{name}.nii.gz")
    for name in ("b", "c"):
        _write_labels(empty, predictions / f"{name}.nii.gz")
    with pytest.raises(EvaluationError) as error:
        evaluate_folders(predictions, references)
    assert str(error.value) == f"missing from {predictions}: a.nii.gz; missing from {references}: c.nii.gz"


def test_shape_mismatch_names_both_files(tmp_path: Path) -> None:
    _write_labels(np.zeros((2, 4, 4), dtype=np.uint8), tmp_path / "ref.nii.gz")
    _write_labels(np.zeros((3, 4, 4), dtype=np.uint8), tmp_path / "pred.nii.gz")
    with pytest.raises(EvaluationError) as error:
        evaluate_case(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", flare_organs())
    assert str(error.value) == (
        f"{tmp_path / 'pred.nii.gz'} has size (4, 4, 3) but {tmp_path / 'ref.nii.gz'} has size (4, 4, 2)"
    )


def test_command_line_prints_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    cube = np.zeros((6, 8, 8), dtype=np.uint8)
    cube[1:4, 2:6, 2:6] = 1
    _write_labels(cube, tmp_path / "ref" / "case.nii.gz")
    _write_labels(cube, tmp_path / "pred" / "case.nii.gz")
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "ref"), "--output-dir", str(tmp_path / "o")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["organ", "DSC", "[FLARE]", "NSD", "[FLARE]", "DSC", "[present]", "NSD", "[present]",
                                "present"]
    assert lines[1].split() == ["liver", "1.0000", "+-", "0.0000", "1.0000", "+-", "0.0000", "1.0000", "1.0000", "1/1"]
    assert lines[2].split() == ["right", "kidney", "1.0000", "+-", "0.0000", "1.0000", "+-", "0.0000", "-", "-", "0/1"]
    assert lines[14].split() == ["mean", "1.0000", "+-", "0.0000", "1.0000", "+-", "0.0000", "1.0000", "1.0000", "1",
                                 "organs"]
    assert len(lines) == 20  # header, 13 organs, mean, blank line, 4 footnote lines
    assert lines[16].startswith("[FLARE] the paper's rule: an organ absent from both reference and prediction scores 1")
    assert (tmp_path / "o" / "summary.csv").is_file()
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "missing")]) == 1


def _dataset_json(folder: Path, labels: dict) -> Path:
    path = folder / "dataset.json"
    path.write_text(json.dumps({"labels": {"background": 0, **labels}}))
    return path
