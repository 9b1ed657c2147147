"""Per-case, per-organ DSC and NSD of a prediction folder against a reference folder (NIfTI).

Files are matched by name. Spacing comes from the reference headers. The default organ table is the
13 abdominal organs with the NSD tolerances of the FLARE22 evaluation used by the paper; aorta,
inferior vena cava and esophagus are scored only on the reference's axial slices. Conventions for
empty masks: see :mod:`nnunetv2_plugin.surface_metrics` and docs/evaluation.md.

Outputs: ``per_case.csv`` (case, organ, DSC, NSD, in_reference) and ``summary.csv`` (per organ mean and
std over cases, the number of cases whose reference has the organ and the means over those cases only,
then ``mean`` over organs). Two means, because they answer different questions:

* the paper's (FLARE rule): an organ absent from both reference and prediction scores 1, so every case
  counts for every organ; this is the number to compare with the paper's tables;
* over present organs: only the cases whose reference contains the organ; a model that predicts
  nothing scores 0 here, while under the FLARE rule it keeps 1 for every organ outside the scan.
"""
from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from nnunetv2_plugin.datasets.abdomen_organs import ABDOMEN_ORGANS, normalize_label_name
from nnunetv2_plugin.surface_metrics import organ_scores

logger = logging.getLogger("lkm_unet")

PathLike = Union[str, Path]

# NSD tolerances (mm) of the FLARE22 evaluation, as used in the paper.
PAPER_NSD_TOLERANCES_MM: Dict[str, float] = {
    "liver": 5.0,
    "right kidney": 3.0,
    "spleen": 3.0,
    "pancreas": 5.0,
    "aorta": 2.0,
    "inferior vena cava": 2.0,
    "right adrenal gland": 2.0,
    "left adrenal gland": 2.0,
    "gallbladder": 2.0,
    "esophagus": 3.0,
    "stomach": 5.0,
    "duodenum": 7.0,
    "left kidney": 3.0,
}
# Tubular organs whose extent along z depends on the scan's field of view.
REFERENCE_SLICE_ORGANS = ("aorta", "inferior vena cava", "esophagus")
DEFAULT_TOLERANCE_MM = 2.0
ORGAN_TABLES = ("flare",)
SUMMARY_COLUMNS = ("organ", "DSC_mean", "DSC_std", "NSD_mean", "NSD_std", "n",
                   "n_present", "DSC_present_mean", "NSD_present_mean")
SUMMARY_FOOTNOTE = (
    "[FLARE] the paper's rule: an organ absent from both reference and prediction scores 1, so every case\n"
    "        counts for every organ (n cases); mean row: mean of the organ means +- std over cases.\n"
    "[present] only the cases whose reference contains the organ (present: in how many of the n cases);\n"
    "        mean row: mean over the organs present in at least one case (present: how many organs).")


class EvaluationError(ValueError):
    """A problem with the folders or files to evaluate, naming the files at fault."""


@dataclass(frozen=True)
class OrganSpec:
    """One scored label: its name, value, NSD tolerance and whether the slice rule applies."""

    name: str
    label: int
    tolerance_mm: float
    reference_slices_only: bool = False


def flare_organs() -> Tuple[OrganSpec, ...]:
    """The 13 abdominal organs (values 1..13) with the paper's tolerances and slice rule."""
    return tuple(_organ_spec(name, value, DEFAULT_TOLERANCE_MM) for value, name in enumerate(ABDOMEN_ORGANS, 1))


def organs_from_dataset_json(
    dataset_json: PathLike, default_tolerance_mm: float = DEFAULT_TOLERANCE_MM
) -> Tuple[OrganSpec, ...]:
    """Organs from an nnU-Net v2 dataset.json ``labels`` (background and ``ignore`` skipped).

    A name matching one of the 13 abdominal organs (case, spaces and underscores ignored) gets the
    paper's tolerance and slice rule; any other label gets ``default_tolerance_mm`` and no slice rule.
    """
    path = Path(dataset_json)
    try:
        labels = json.loads(path.read_text())["labels"]
    except (OSError, KeyError, json.JSONDecodeError) as error:
        raise EvaluationError(f"cannot read 'labels' from {path}: {error}") from error
    organs = []
    for name, value in labels.items():
        if normalize_label_name(name) in ("background", "ignore"):
            continue
        if not isinstance(value, int):
            raise EvaluationError(f"{path}: label {name!r} is a region {value}; only plain labels are supported")
        organs.append(_organ_spec(name, value, default_tolerance_mm))
    return tuple(sorted(organs, key=lambda organ: organ.label))


def evaluate_case(
    prediction_file: PathLike, reference_file: PathLike, organs: Sequence[OrganSpec]
) -> List[Dict[str, object]]:
    """Rows ``{"case", "organ", "DSC", "NSD"}`` for one prediction/reference pair."""
    import SimpleITK as sitk

    reference_image = sitk.ReadImage(str(reference_file))
    prediction_image = sitk.ReadImage(str(prediction_file))
    if reference_image.GetSize() != prediction_image.GetSize():
        raise EvaluationError(
            f"{prediction_file} has size {prediction_image.GetSize()} but {reference_file} has "
            f"size {reference_image.GetSize()}"
        )
    if not np.allclose(reference_image.GetSpacing(), prediction_image.GetSpacing(), rtol=1e-3, atol=1e-4):
        raise EvaluationError(
            f"{prediction_file} has spacing {prediction_image.GetSpacing()} but {reference_file} has "
            f"spacing {reference_image.GetSpacing()}"
        )
    spacing_zyx = reference_image.GetSpacing()[::-1]  # SimpleITK (x, y, z) -> numpy (z, y, x)
    reference = sitk.GetArrayFromImage(reference_image)
    prediction = sitk.GetArrayFromImage(prediction_image)
    case = _case_name(Path(reference_file))
    rows = []
    for organ in organs:
        dsc, nsd = organ_scores(
            prediction == organ.label,
            reference == organ.label,
            spacing_zyx,
            organ.tolerance_mm,
            organ.reference_slices_only and reference.ndim == 3,  # axial slices need a volume
        )
        rows.append({"case": case, "organ": organ.name, "DSC": dsc, "NSD": nsd,
                     "in_reference": int(np.any(reference == organ.label))})
    return rows


def evaluate_folders(
    prediction_dir: PathLike,
    reference_dir: PathLike,
    dataset_json: Optional[PathLike] = None,
    output_dir: Optional[PathLike] = None,
    organs: str = "flare",
    default_tolerance_mm: float = DEFAULT_TOLERANCE_MM,
) -> Tuple[List[Dict[str, object]], List[Dict[str, object]]]:
    """Evaluate every case; write ``per_case.csv`` and ``summary.csv`` and return both row lists.

    Args:
        prediction_dir, reference_dir: folders of ``*.nii.gz``/``*.nii`` label maps with equal names.
        dataset_json: take the organs from this dataset.json instead of the ``organs`` table.
        output_dir: where the CSVs go; defaults to ``prediction_dir``.
        organs: built-in organ table; ``"flare"`` is the 13 organs of both paper datasets.
        default_tolerance_mm: NSD tolerance of labels without a paper tolerance (dataset.json only).
    """
    if dataset_json is not None:
        organ_specs = organs_from_dataset_json(dataset_json, default_tolerance_mm)
    elif organs == "flare":
        organ_specs = flare_organs()
    else:
        raise EvaluationError(f"unknown organ table {organs!r}; choose one of {', '.join(ORGAN_TABLES)}")
    pairs = _matched_files(Path(prediction_dir), Path(reference_dir))
    per_case: List[Dict[str, object]] = []
    for prediction_file, reference_file in pairs:
        per_case += evaluate_case(prediction_file, reference_file, organ_specs)
        logger.info("Evaluated %s", reference_file.name)
    summary = summarize(per_case, [organ.name for organ in organ_specs])
    output = Path(output_dir) if output_dir is not None else Path(prediction_dir)
    output.mkdir(parents=True, exist_ok=True)
    _write_csv(output / "per_case.csv", per_case, ["case", "organ", "DSC", "NSD", "in_reference"])
    _write_csv(output / "summary.csv", summary, SUMMARY_COLUMNS)
    logger.info("Wrote %s and %s", output / "per_case.csv", output / "summary.csv")
    return per_case, summary


def summarize(per_case: Sequence[Dict[str, object]], organ_names: Sequence[str]) -> List[Dict[str, object]]:
    """Per organ: mean and std (population, ddof 0) over cases (FLARE rule), ``n_present`` (cases whose
    reference has the organ) and the means over those cases only (NaN if none).

    Last row ``mean``: the mean of the organ means, with the std over cases of each case's mean over
    organs; ``n_present`` the number of organs present in at least one case, and the present means
    averaged over those organs. Rows without ``in_reference`` count as present.
    """
    summary = []
    for name in organ_names:
        rows = [row for row in per_case if row["organ"] == name]
        present = [row for row in rows if row.get("in_reference", 1)]
        stats = _stats(name, [r["DSC"] for r in rows], [r["NSD"] for r in rows])
        stats["n_present"] = len(present)
        for metric in ("DSC", "NSD"):
            stats[f"{metric}_present_mean"] = float(np.mean([r[metric] for r in present])) if present else math.nan
        summary.append(stats)
    cases = sorted({row["case"] for row in per_case})
    case_means = {
        metric: [float(np.mean([r[metric] for r in per_case if r["case"] == c])) for c in cases]
        for metric in ("DSC", "NSD")
    }
    overall = _stats("mean", case_means["DSC"], case_means["NSD"])
    present_organs = [row for row in summary if row["n_present"]]
    overall["n_present"] = len(present_organs)
    for metric in ("DSC", "NSD"):
        overall[f"{metric}_mean"] = float(np.mean([row[f"{metric}_mean"] for row in summary]))
        overall[f"{metric}_present_mean"] = (float(np.mean([row[f"{metric}_present_mean"] for row in present_organs]))
                                             if present_organs else math.nan)
    return summary + [overall]


def format_summary(summary: Sequence[Dict[str, object]]) -> str:
    """The summary rows as an aligned text table: both means of DSC and NSD, and the footnote that
    says which rule each uses."""
    width = max(len("organ"), *(len(str(row["organ"])) for row in summary))
    header = ["DSC [FLARE]", "NSD [FLARE]", "DSC [present]", "NSD [present]", "present"]
    lines = [f"{'organ':<{width}}  {header[0]:>16}  {header[1]:>16}  {header[2]:>13}  {header[3]:>13}  {header[4]:>9}"]
    for row in summary:
        flare = [f"{row[m + '_mean']:.4f} +- {row[m + '_std']:.4f}" for m in ("DSC", "NSD")]
        present = [_number(row[f"{m}_present_mean"]) for m in ("DSC", "NSD")]
        count = f"{row['n_present']} organs" if row["organ"] == "mean" else f"{row['n_present']}/{row['n']}"
        lines.append(f"{row['organ']:<{width}}  {flare[0]:>16}  {flare[1]:>16}  {present[0]:>13}  {present[1]:>13}"
                     f"  {count:>9}")
    return "\n".join(lines + ["", SUMMARY_FOOTNOTE])


def _number(value: object) -> str:
    return "-" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}"


def _organ_spec(name: str, value: int, default_tolerance_mm: float) -> OrganSpec:
    key = {normalize_label_name(n): n for n in PAPER_NSD_TOLERANCES_MM}.get(normalize_label_name(name))
    if key is None:
        return OrganSpec(name, value, default_tolerance_mm)
    return OrganSpec(name, value, PAPER_NSD_TOLERANCES_MM[key], key in REFERENCE_SLICE_ORGANS)


def _stats(name: str, dsc: Sequence[float], nsd: Sequence[float]) -> Dict[str, object]:
    row: Dict[str, object] = {"organ": name, "n": len(dsc)}
    for metric, values in (("DSC", dsc), ("NSD", nsd)):
        row[f"{metric}_mean"] = float(np.mean(values)) if values else math.nan
        row[f"{metric}_std"] = float(np.std(values)) if values else math.nan
    return row


def _case_name(path: Path) -> str:
    for ending in (".nii.gz", ".nii"):
        if path.name.endswith(ending):
            return path.name[: -len(ending)]
    return path.stem


def _nifti_files(folder: Path) -> Dict[str, Path]:
    if not folder.is_dir():
        raise EvaluationError(f"{folder} is not a folder")
    return {p.name: p for p in sorted(folder.iterdir()) if p.name.endswith((".nii.gz", ".nii"))}


def _matched_files(prediction_dir: Path, reference_dir: Path) -> List[Tuple[Path, Path]]:
    predictions, references = _nifti_files(prediction_dir), _nifti_files(reference_dir)
    missing_predictions = sorted(set(references) - set(predictions))
    missing_references = sorted(set(predictions) - set(references))
    problems = []
    if missing_predictions:
        problems.append(f"missing from {prediction_dir}: {', '.join(missing_predictions)}")
    if missing_references:
        problems.append(f"missing from {reference_dir}: {', '.join(missing_references)}")
    if problems:
        raise EvaluationError("; ".join(problems))
    if not references:
        raise EvaluationError(f"no .nii.gz or .nii files in {reference_dir}")
    return [(predictions[name], references[name]) for name in sorted(references)]


def _write_csv(path: Path, rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
