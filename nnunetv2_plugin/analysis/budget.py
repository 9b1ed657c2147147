"""The training budget of a comparison: every run trains the same schedule (epochs x iterations per
epoch) and, where asked, the same batch size; what each run really trained is read back from nnU-Net's
``debug.json`` and checked.

- ``--schedule S`` maps each run's trainer ``T`` to nnU-Net's variant ``T_S`` (``nnUNetTrainer_5epochs``,
  ``LKMUNetTrainer_noMamba_demo``; :mod:`nnunetv2_plugin.schedule_trainers`).
- ``--batch-size N`` gives each run the plans ``<plans>_bs<N>``: a copy of its plans with the
  configuration's batch size set to ``N`` and everything else (the preprocessed data included) shared.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

#: the attributes of an nnU-Net trainer that make up a run's budget, as ``debug.json`` records them
BUDGET_KEYS = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "batch_size")


class BudgetError(RuntimeError):
    """Runs whose budgets differ, or a schedule or plans that cannot be made; the message names the run."""


def scheduled_trainer(trainer: str, schedule: Optional[str]) -> str:
    """``trainer`` with nnU-Net's schedule suffix (``LKMUNetTrainer`` + ``5epochs``: ``LKMUNetTrainer_5epochs``),
    checked against nnU-Net's trainer lookup (nnunetv2 and ``nnUNet_extTrainer``)."""
    if not schedule:
        return trainer
    from nnunetv2_plugin.analysis.networks import find_trainer

    name = f"{trainer}_{schedule}"
    try:
        find_trainer(name)
    except RuntimeError:
        from nnunetv2_plugin.schedule_trainers import SCHEDULE_BASES
        raise BudgetError(f"--schedule {schedule}: trainer {name} (the schedule of {trainer}) does not exist in "
                          f"nnunetv2 or nnUNet_extTrainer; every run's trainer needs a _{schedule} variant. "
                          f"Schedules of nnUNetTrainer and every LKM-UNet trainer: {', '.join(SCHEDULE_BASES)}"
                          ) from None
    return name


def batch_size_plans(preprocessed: Path, plans: str, configuration: str, batch_size: int) -> str:
    """Write (once) ``<plans>_bs<batch_size>.json`` beside ``plans``: the same plans with ``configuration``'s
    batch size replaced; returns its identifier. An existing file must hold that batch size."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BudgetError(f"--batch-size must be a positive int, got {batch_size!r}")
    name = f"{plans}_bs{batch_size}"
    source, target = preprocessed / f"{plans}.json", preprocessed / f"{name}.json"
    if target.is_file():
        found = json.loads(target.read_text())["configurations"].get(configuration, {}).get("batch_size")
        if found != batch_size:
            raise BudgetError(f"{target} exists with batch size {found} in configuration {configuration!r}, "
                              f"not {batch_size}; remove it or rename your plans")
        return name
    content = json.loads(source.read_text())
    content["plans_name"] = name  # nnU-Net names the run's results folder after it
    content["configurations"][configuration]["batch_size"] = batch_size
    target.write_text(json.dumps(content, indent=4))
    return name


def trained_budget(folder: Path) -> dict[str, int]:
    """What the run in ``folder`` (a ``fold_*`` folder) trained: :data:`BUDGET_KEYS` from its ``debug.json``,
    which nnU-Net writes when training starts."""
    path = folder / "debug.json"
    if not path.is_file():
        raise BudgetError(f"{path} does not exist; nnU-Net writes it when training starts, so the run's "
                          f"schedule cannot be checked")
    recorded = json.loads(path.read_text())
    missing = [key for key in BUDGET_KEYS if key not in recorded]
    if missing:
        raise BudgetError(f"{path} has no {', '.join(missing)}; is it an nnU-Net v2 training folder?")
    return {key: int(recorded[key]) for key in BUDGET_KEYS}


#: what must be equal across runs: the schedule. Batch sizes are the plans' (ResEnc presets size theirs to a
#: GPU memory budget); --batch-size makes them equal too.
SCHEDULE_KEYS = BUDGET_KEYS[:3]


def check_same_budget(budgets: dict[str, dict[str, int]], keys: tuple[str, ...] = SCHEDULE_KEYS) -> None:
    """Raise BudgetError naming the runs and values when any of ``keys`` differs from the first run's."""
    first, reference = next(iter(budgets.items()))
    for name, budget in budgets.items():
        differ = [f"{key} {budget[key]} (first run: {reference[key]})" for key in keys if budget[key] != reference[key]]
        if differ:
            raise BudgetError(f"run {name} trained a different budget than {first}: {'; '.join(differ)}. "
                              f"Give every run the same schedule (--schedule) and batch size (--batch-size), "
                              f"or pass --allow-different-budgets")


def with_budget(runs: list, schedule: Optional[str]) -> list:
    """``runs`` (compare.Run) with their trainers mapped to ``schedule``."""
    return [replace(run, trainer=scheduled_trainer(run.trainer, schedule)) for run in runs]
