"""Write an LKM-UNet plans file beside nnU-Net's, and check an edited one."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from lkm_unet.ablations import ablated_kwargs
from nnunetv2_plugin.plans import PlansError, lkm_architecture, stage_table, validate_architecture

logger = logging.getLogger("lkm_unet")

from nnunetv2_plugin import DEFAULT_LKM_PLANS as DEFAULT_TARGET_PLANS


def plans_path(dataset: str | int, plans_identifier: str) -> Path:
    """``$nnUNet_preprocessed/<DatasetXXX_Name>/<plans_identifier>.json``."""
    root = os.environ.get("nnUNet_preprocessed")
    if not root:
        raise PlansError("nnUNet_preprocessed is not set; export it as for nnUNetv2_plan_and_preprocess")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as error:
        raise PlansError(str(error)) from None
    return Path(root) / name / f"{plans_identifier}.json"


def _configurations(plans: dict, requested: Optional[Sequence[str]], path: Path) -> list[str]:
    available = list(plans["configurations"])
    if not requested:
        return [c for c in available if "architecture" in plans["configurations"][c]]
    unknown = [c for c in requested if c not in available]
    if unknown:
        raise PlansError(f"{path}: no configuration {', '.join(map(repr, unknown))}; "
                         f"available: {', '.join(available)}")
    return list(requested)


def write_lkm_plans(dataset: str | int, configurations: Optional[Sequence[str]] = None, preset: str = "auto",
                    source_plans: str = "nnUNetPlans", target_plans: str = DEFAULT_TARGET_PLANS,
                    shape_policy: str = "error", force: bool = False,
                    batch_size: Optional[int] = None, ablation: Optional[str] = None,
                    window_divisor: int = 1, gpu_memory: Optional[float] = None) -> tuple[Path, dict[str, str]]:
    """Copy ``source_plans`` to ``target_plans`` with an LKM-UNet architecture in each configuration.

    ``batch_size`` replaces the planned batch size (LKM-UNet needs more memory per sample than the
    U-Net nnU-Net planned for). ``ablation`` (``no-pim``, ``no-pam``, ``no-bim``, ``no-mamba``) and
    ``window_divisor`` write the paper's ablations into arch_kwargs (:mod:`lkm_unet.ablations`).
    ``gpu_memory`` (GiB) chooses the memory options and the batch size (at least 2, at most the planned
    one, or exactly ``batch_size``) so that the estimated training peak fits
    (:mod:`nnunetv2_plugin.memory_budget`); the table then ends with the estimate.

    Returns the written path and, per configuration, the per-stage table. Never overwrites an existing
    file unless ``force``; the source file is only read.
    """
    source = plans_path(dataset, source_plans)
    target = source.with_name(f"{target_plans}.json")
    if not source.is_file():
        raise PlansError(f"{source} does not exist; run nnUNetv2_plan_and_preprocess -d {dataset} first "
                         f"(or name the source with --source-plans)")
    if target == source:
        raise PlansError(f"the target plans {target_plans!r} would overwrite the source plans; choose another name")
    if target.exists() and not force:
        raise PlansError(f"{target} already exists; pass --force to overwrite it")
    plans = json.loads(source.read_text())
    manager = PlansManager(plans)
    tables = {}
    for name in _configurations(plans, configurations, source):
        configuration = manager.get_configuration(name)
        architecture = lkm_architecture(configuration, preset, shape_policy)
        try:
            architecture["arch_kwargs"] = ablated_kwargs(architecture["arch_kwargs"], configuration.patch_size,
                                                         ablation, window_divisor)
        except ValueError as error:
            raise PlansError(f"{target}, configuration {name!r}: {error}") from None
        where = f"{target}, configuration {name!r}"
        rows = validate_architecture(architecture, list(configuration.patch_size), where)
        plans["configurations"][name]["architecture"] = architecture
        if batch_size is not None:
            if batch_size < 1:
                raise PlansError(f"batch size must be a positive int, got {batch_size}")
            plans["configurations"][name]["batch_size"] = batch_size
        tables[name] = stage_table(rows, architecture["arch_kwargs"]["pim_grouping"])
        if gpu_memory is not None:
            tables[name] += "\n" + _fit_memory(plans["configurations"][name], architecture["arch_kwargs"],
                                               list(configuration.patch_size), gpu_memory, batch_size, where)
    plans["plans_name"] = target_plans
    target.write_text(json.dumps(plans, indent=4) + "\n")
    return target, tables


def _fit_memory(entry: dict, arch_kwargs: dict, patch_size: list[int], gpu_memory: float,
                batch_size: Optional[int], where: str) -> str:
    """Write the memory options and batch size that fit ``gpu_memory`` GiB into a configuration entry."""
    from nnunetv2_plugin.memory_budget import fit_to_budget
    if gpu_memory <= 0:
        raise PlansError(f"--gpu-memory must be a positive number of GiB, got {gpu_memory:g}")
    try:
        options, batch, peak = fit_to_budget(arch_kwargs, patch_size, gpu_memory,
                                             max(2, int(entry.get("batch_size", 2))), batch_size)
    except ValueError as error:
        raise PlansError(f"{where}: {error}") from None
    arch_kwargs.update(options)
    entry["batch_size"] = batch
    chosen = ", ".join(f"{k} {str(v).lower()}" for k, v in options.items())
    return f"estimated GPU training peak {peak:.1f} GiB (budget {gpu_memory:g} GiB): batch size {batch}, {chosen}"


def check_plans(dataset: str | int, plans_identifier: str = DEFAULT_TARGET_PLANS,
                configurations: Optional[Sequence[str]] = None) -> dict[str, str]:
    """Validate every LKM-UNet configuration of a (hand-edited) plans file; the per-stage tables.

    Raises :class:`PlansError` listing every problem of every configuration (``messages``)."""
    path = plans_path(dataset, plans_identifier)
    if not path.is_file():
        raise PlansError(f"{path} does not exist; write it with `lkm-unet plans {dataset}`")
    try:
        plans = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PlansError(f"{path} is not valid JSON: {error}") from None
    manager = PlansManager(plans)
    tables, errors = {}, []
    for name in _configurations(plans, configurations, path):
        configuration = manager.get_configuration(name)
        if configuration.network_arch_class_name.split(".")[-1] != "LKMUNet":
            if configurations:
                raise PlansError(f"{path}, configuration {name!r}: network_class_name is "
                                 f"{configuration.network_arch_class_name!r}, not LKM-UNet")
            continue
        raw = plans["configurations"][name].get("architecture") or {
            "arch_kwargs": configuration.network_arch_init_kwargs,
            "_kw_requires_import": configuration.network_arch_init_kwargs_req_import}
        try:
            rows = validate_architecture(raw, list(configuration.patch_size), f"{path}, configuration {name!r}")
        except PlansError as error:  # go on: report every configuration's problems in one run
            errors += error.messages
            continue
        tables[name] = stage_table(rows, raw["arch_kwargs"].get("pim_grouping", "window"))
    if errors:
        raise PlansError(*errors)
    if not tables:
        raise PlansError(f"{path}: no configuration uses LKM-UNet; write one with `lkm-unet plans {dataset}`")
    return tables
