"""`lkm-unet compare`: train (or collect) several nnU-Net runs on one fold, predict the held-out test set,
evaluate DSC and NSD per organ, and tabulate them with their cost (time, memory, parameters, FLOPs).

Every step is a stock nnU-Net command run as a subprocess (``nnUNetv2_plan_experiment``,
``nnUNetv2_preprocess``, ``nnUNetv2_train``, ``nnUNetv2_predict``), so a run trained here is the same
as one trained by hand, and a finished run found in ``$nnUNet_results`` is only collected.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from nnunetv2_plugin import DEFAULT_LKM_PLANS
from nnunetv2_plugin.analysis.budget import batch_size_plans, check_same_budget, trained_budget, with_budget

logger = logging.getLogger("lkm_unet")

# Plans nnU-Net's residual-encoder presets write, and the planner (-pl) that writes each.
RESENC_PLANNERS = {"nnUNetResEncUNetMPlans": "nnUNetPlannerResEncM", "nnUNetResEncUNetLPlans": "nnUNetPlannerResEncL",
                   "nnUNetResEncUNetXLPlans": "nnUNetPlannerResEncXL"}
_EPOCH_TIME = re.compile(r"Epoch time: ([0-9.]+) s")
_PEAK_MEMORY = re.compile(r"peak GPU memory: ([0-9.]+) MiB")


class CompareError(RuntimeError):
    """A comparison that cannot go on; the message names the run, file or command at fault."""


@dataclass(frozen=True)
class Run:
    """One nnU-Net run: a trainer with a plans identifier."""

    trainer: str
    plans: str

    @property
    def name(self) -> str:
        return f"{self.trainer}__{self.plans}"

    @classmethod
    def parse(cls, text: str) -> "Run":
        trainer, sep, plans = text.partition(":")
        if not sep or not trainer or not plans:
            raise CompareError(f"run {text!r} is not TRAINER:PLANS, e.g. LKMUNetTrainer:{DEFAULT_LKM_PLANS}")
        return cls(trainer, plans)


DEFAULT_RUNS = (Run("LKMUNetTrainer", DEFAULT_LKM_PLANS), Run("LKMUNetTrainer_noMamba", DEFAULT_LKM_PLANS),
                Run("nnUNetTrainer", "nnUNetResEncUNetMPlans"))


def _command(args: list[str], log: Path, planning: bool = False) -> None:
    """Run a stock command, its output appended to ``log``; a failure names the command and the log.
    ``planning`` drops ``nnUNet_n_proc_DA=0`` (in-process augmentation, common on CPUs): nnU-Net's planner
    passes it to ``torch.set_num_threads``, which refuses 0."""
    env = os.environ.copy()
    if planning and env.get("nnUNet_n_proc_DA") == "0":
        del env["nnUNet_n_proc_DA"]
    log.parent.mkdir(parents=True, exist_ok=True)
    logger.info("$ %s", " ".join(args))
    with log.open("a") as handle:
        handle.write(f"$ {' '.join(args)}\n")
        handle.flush()
        code = subprocess.run(args, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise CompareError(f"`{' '.join(args)}` failed with exit code {code}; log: {log}\n{tail}")


def _env_folder(variable: str) -> Path:
    value = os.environ.get(variable)
    if not value:
        raise CompareError(f"{variable} is not set; export nnU-Net's folders as for nnUNetv2_train")
    return Path(value)


def ensure_plans(dataset_id: str, dataset_name: str, run: Run, configuration: str, logs: Path) -> None:
    """Plan and preprocess what ``run`` needs and is missing: the dataset fingerprint, the ResEnc presets
    through nnU-Net's planner, LKM-UNet plans through `lkm-unet plans` (from nnU-Net's default plans,
    planned first if missing); any other plans must exist already."""
    from nnunetv2_plugin.plans_files import write_lkm_plans

    folder = _env_folder("nnUNet_preprocessed") / dataset_name
    path = folder / f"{run.plans}.json"
    processes = os.environ.get("nnUNet_def_n_proc", "2")
    if not path.is_file():
        if run.plans not in RESENC_PLANNERS and run.plans != DEFAULT_LKM_PLANS:
            raise CompareError(f"run {run.name}: {path} does not exist; write it first (`lkm-unet plans "
                               f"--target-plans {run.plans}` or nnUNetv2_plan_experiment)")
        if not (folder / "dataset_fingerprint.json").is_file():
            _command(["nnUNetv2_extract_fingerprint", "-d", dataset_id, "-np", processes,
                      "--verify_dataset_integrity"], logs / "planning.log", planning=True)
        if run.plans in RESENC_PLANNERS:
            _command(["nnUNetv2_plan_experiment", "-d", dataset_id, "-pl", RESENC_PLANNERS[run.plans]],
                     logs / "planning.log", planning=True)
        else:
            if not (folder / "nnUNetPlans.json").is_file():
                _command(["nnUNetv2_plan_experiment", "-d", dataset_id], logs / "planning.log", planning=True)
            write_lkm_plans(dataset_id, [configuration], target_plans=run.plans)
    plans = json.loads(path.read_text())
    if configuration not in plans["configurations"]:
        raise CompareError(f"run {run.name}: {path} has no configuration {configuration!r}")
    identifier = plans["configurations"][configuration].get("data_identifier", f"{run.plans}_{configuration}")
    if not (folder / identifier).is_dir():
        _command(["nnUNetv2_preprocess", "-d", dataset_id, "-plans_name", run.plans, "-c", configuration,
                  "-np", processes], logs / "planning.log", planning=True)


def run_folder(dataset_name: str, run: Run, configuration: str, fold: str) -> Path:
    """``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>/fold_<fold>``."""
    return _env_folder("nnUNet_results") / dataset_name / f"{run.name}__{configuration}" / f"fold_{fold}"


def train(dataset_id: str, run: Run, configuration: str, fold: str, folder: Path, device: str, logs: Path,
          collect_only: bool) -> None:
    """Train ``run`` unless its ``checkpoint_final.pth`` exists (continue from ``checkpoint_latest.pth``)."""
    if (folder / "checkpoint_final.pth").is_file():
        logger.info("run %s: trained (%s)", run.name, folder)
        return
    if collect_only:
        raise CompareError(f"run {run.name} is not trained: {folder / 'checkpoint_final.pth'} does not exist; "
                           f"drop --collect-only to train it")
    args = ["nnUNetv2_train", dataset_id, configuration, fold, "-tr", run.trainer, "-p", run.plans, "-device", device]
    if (folder / "checkpoint_latest.pth").is_file():
        args.append("--c")
    _command(args, logs / f"{run.name}_train.log")


def predict(dataset_id: str, run: Run, configuration: str, fold: str, images: Path, output: Path, device: str,
            logs: Path, tta: bool, expected: Sequence[str]) -> None:
    """nnUNetv2_predict into ``output`` unless it already holds every expected file."""
    if output.is_dir() and all((output / name).is_file() for name in expected):
        logger.info("run %s: predictions found in %s", run.name, output)
        return
    if output.exists():
        shutil.rmtree(output)
    args = ["nnUNetv2_predict", "-i", str(images), "-o", str(output), "-d", dataset_id, "-c", configuration,
            "-f", fold, "-tr", run.trainer, "-p", run.plans, "-device", device, "-npp", "1", "-nps", "1"]
    _command(args + ([] if tta else ["--disable_tta"]), logs / f"{run.name}_predict.log")


def training_cost(folder: Path) -> dict[str, Optional[float]]:
    """Mean seconds per epoch and peak GPU MiB from the run's nnU-Net training logs (None if absent)."""
    text = "".join(p.read_text(errors="replace") for p in sorted(folder.glob("training_log_*.txt")))
    epochs = [float(t) for t in _EPOCH_TIME.findall(text)]
    memory = [float(m) for m in _PEAK_MEMORY.findall(text)]
    return {"epoch_s": sum(epochs) / len(epochs) if epochs else None, "peak_gpu_mib": max(memory) if memory else None}


def network_cost(dataset_name: str, run: Run, configuration: str) -> dict[str, Optional[float]]:
    """Parameters and GFLOPs of one forward pass of one patch, as `lkm-unet profile` counts them."""
    from nnunetv2_plugin.analysis.networks import build_network, find_trainer, load_plans
    from nnunetv2_plugin.analysis.profile import profile_network

    plans, dataset_json, _ = load_plans(str(_env_folder("nnUNet_preprocessed") / dataset_name / f"{run.plans}.json"))
    network, shape = build_network(plans, dataset_json, configuration, find_trainer(run.trainer))
    total = profile_network(network, shape)["total"]
    return {"params": total["params"], "gflops": total["total_flops"] / 1e9}


def compare(dataset: str, configuration: str, output_dir: Path, runs: Sequence[Run] = DEFAULT_RUNS,
            fold: str = "0", collect_only: bool = False, test_images: Optional[Path] = None,
            test_labels: Optional[Path] = None, device: Optional[str] = None, tta: bool = True,
            force: bool = False, schedule: Optional[str] = None, batch_size: Optional[int] = None,
            allow_different_budgets: bool = False) -> list[dict]:
    """Train or collect ``runs`` on one fold, predict and evaluate the test set, write the tables.

    ``schedule`` trains trainer ``T`` of each run as nnU-Net's variant ``T_<schedule>`` and ``batch_size``
    each run's plans as ``<plans>_bs<batch_size>`` (:mod:`nnunetv2_plugin.analysis.budget`). Every run
    must have trained the same epochs and iterations per epoch (read from its ``debug.json``) unless
    ``allow_different_budgets``.

    Writes into ``output_dir``: ``table.md``, ``table.csv``, ``per_case.csv``, ``boxplots.png``, and
    ``predictions/<run>/``, ``evaluation/<run>/``, ``logs/``. Test images default to the dataset's
    ``imagesTs`` and labels to ``labelsTs``. Returns the table rows (one per run and organ, plus ``mean``).
    """
    import torch
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunetv2_plugin.analysis.compare_table import (comparison_rows, write_box_plots, write_per_case,
                                                        write_tables)
    from nnunetv2_plugin.evaluation import evaluate_folders

    if len(runs) < 1 or len({r.name for r in runs}) != len(runs):
        raise CompareError(f"give one or more distinct runs, got {[r.name for r in runs]}")
    if (output_dir / "table.md").exists() and not force:
        raise CompareError(f"{output_dir / 'table.md'} already exists; pass --force to replace the comparison")
    runs = with_budget(list(runs), schedule)
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as error:
        raise CompareError(str(error)) from None
    dataset_id = str(int(dataset_name[7:10]))
    raw = _env_folder("nnUNet_raw") / dataset_name
    images, labels = Path(test_images or raw / "imagesTs"), Path(test_labels or raw / "labelsTs")
    for folder, what in ((images, "test images"), (labels, "test labels")):
        if not folder.is_dir():
            raise CompareError(f"{folder} ({what}) does not exist; give --test-images and --test-labels")
    dataset_json = raw / "dataset.json"
    ending = json.loads(dataset_json.read_text()).get("file_ending", ".nii.gz")
    expected = sorted(p.name for p in labels.iterdir() if p.name.endswith(ending))
    if not expected:
        raise CompareError(f"{labels} holds no {ending} label files")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    logs = output_dir / "logs"
    per_case, summaries, info, budgets = {}, {}, {}, {}
    preprocessed = _env_folder("nnUNet_preprocessed") / dataset_name
    planned = []
    for run in runs:  # plan everything first: a missing plan fails before hours of training
        if not collect_only:
            ensure_plans(dataset_id, dataset_name, run, configuration, logs)
        if batch_size is not None:
            plans = (batch_size_plans(preprocessed, run.plans, configuration, batch_size) if not collect_only
                     else f"{run.plans}_bs{batch_size}")
            run = replace(run, plans=plans)
        planned.append(run)
    runs = planned
    for run in runs:
        folder = run_folder(dataset_name, run, configuration, fold)
        train(dataset_id, run, configuration, fold, folder, device, logs, collect_only)
        budgets[run.name] = trained_budget(folder)
        if not allow_different_budgets:
            check_same_budget(budgets)
        predictions = output_dir / "predictions" / run.name
        if force and predictions.exists():
            shutil.rmtree(predictions)
        predict(dataset_id, run, configuration, fold, images, predictions, device, logs, tta, expected)
        evaluation = output_dir / "evaluation" / run.name
        if evaluation.exists():
            shutil.rmtree(evaluation)  # this command's own output, rewritten from the predictions
        per_case[run.name], summaries[run.name] = evaluate_folders(predictions, labels, dataset_json, evaluation)
        info[run.name] = {"trainer": run.trainer, "plans": run.plans, **network_cost(dataset_name, run, configuration),
                          **training_cost(folder), "epochs": budgets[run.name]["num_epochs"],
                          "iterations": budgets[run.name]["num_iterations_per_epoch"],
                          "batch_size": budgets[run.name]["batch_size"]}
    rows = comparison_rows(per_case, summaries, info)
    organs = [s["organ"] for s in summaries[runs[0].name] if s["organ"] != "mean"]
    header = (f"# {dataset_name}, {configuration}, fold {fold}: {len(expected)} test cases from {labels}")
    write_tables(rows, output_dir, header)
    write_per_case(per_case, output_dir / "per_case.csv")
    write_box_plots(per_case, organs, output_dir / "boxplots.png")
    logger.info("wrote %s, %s and %s", output_dir / "table.md", output_dir / "table.csv", output_dir / "boxplots.png")
    return rows
