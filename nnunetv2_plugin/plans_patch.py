"""Set one configuration's patch size in a plans file and re-derive the LKM window and pool sizes.

What changes, and nothing else: the configuration's ``patch_size``, its ``pim_kernel_sizes`` and
``pam_pool_sizes`` (derived for the new patch by the rule of preset ``auto``, with the plan's grouping),
and, only when asked with ``n_stages``, the per-stage lists cut to the first ``n_stages`` stages. The
strides stay, so the patch must be a multiple of their total per axis (as nnU-Net requires); a patch
they cannot serve is refused with the nearest patches they can. Stages are never added: that needs
nnU-Net's planner (new strides, conv kernels and features).

A file that exists is copied to ``<plans>.json.bak-<time>`` before it is rewritten, so a plans file
edited by hand can be its own source.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from lkm_unet import LKMUNet, derive_kernel_sizes
from lkm_unet.modules.shape_policy import nearest_multiples
from nnunetv2_plugin import DEFAULT_LKM_PLANS
from nnunetv2_plugin.patch_sizes import nearest_valid_patches, patch_stride_errors, stages_serving, total_stride
from nnunetv2_plugin.plans import PlansError, is_lkm_architecture, lkm_architecture, stage_table, validate_architecture
from nnunetv2_plugin.plans_files import plans_path

# nnU-Net's default planner (ExperimentPlanner, nnunetv2 2.8.1): a U-Net whose
# compute_conv_feature_map_size is UNet_reference_val_{2d,3d} per sample fits, at batch size
# UNet_reference_val_corresp_bs_{2d,3d}, into UNet_reference_val_corresp_GB of GPU memory. Its planned
# batch size is round(reference / estimate * reference batch). A test checks these against the planner.
NNUNET_REFERENCE = {2: (85_000_000, 12), 3: (560_000_000, 2)}
NNUNET_REFERENCE_GB = 8
PER_STAGE_KEYS = ("features_per_stage", "kernel_sizes", "strides", "n_blocks_per_stage", "n_conv_per_stage")


@dataclass
class PatchChange:
    """What :func:`set_patch_size` did: the file written, its backup (None for a new file), the old and
    new patch, the per-stage table and nnU-Net's memory estimate of the new patch."""

    path: Path
    backup: Optional[Path]
    source: Path
    old_patch: list[int]
    patch: list[int]
    n_stages: int
    table: str
    estimate: int
    batch_size: int

    def memory_lines(self) -> list[str]:
        """nnU-Net's memory estimate in words: the planners' number and the reference they compare it to."""
        ndim = len(self.patch)
        reference, reference_batch = NNUNET_REFERENCE[ndim]
        total, budget = self.estimate * self.batch_size, reference * reference_batch
        return [
            f"memory estimate (nnU-Net's, compute_conv_feature_map_size per sample x batch size): "
            f"{self.estimate:,} x {self.batch_size} = {total:,}",
            f"nnU-Net's default planner allows {reference:,} x {reference_batch} = {budget:,} for a {ndim}D "
            f"net on its {NNUNET_REFERENCE_GB} GB reference GPU: this plan needs {total / budget:.1%} of that "
            f"(about {NNUNET_REFERENCE_GB * total / budget:.2f} GB on that scale)",
        ]


def set_patch_size(dataset: str | int, configuration: str, patch_size: Sequence[int],
                   plans: str = DEFAULT_LKM_PLANS, source_plans: Optional[str] = None,
                   n_stages: Optional[int] = None) -> PatchChange:
    """Give ``configuration`` of the plans ``plans`` the patch ``patch_size``; re-derive its LKM sizes.

    ``source_plans`` defaults to ``plans`` itself when that file exists (edit in place, every other
    edit kept) and to nnU-Net's ``nnUNetPlans`` otherwise (the configuration becomes LKM-UNet, the
    others are copied as they are). ``n_stages`` cuts the per-stage lists to the first ``n_stages``
    stages. Raises :class:`PlansError` naming the file, configuration and axis, with valid patches.
    """
    target = plans_path(dataset, plans)
    source = plans_path(dataset, source_plans) if source_plans else \
        target if target.is_file() else plans_path(dataset, "nnUNetPlans")
    if not source.is_file():
        raise PlansError(f"{source} does not exist; run nnUNetv2_plan_and_preprocess -d {dataset} first "
                         f"(or name the source with --source-plans)")
    try:
        content = json.loads(source.read_text())
    except json.JSONDecodeError as error:
        raise PlansError(f"{source} is not valid JSON: {error}") from None
    where = f"{target}, configuration {configuration!r}"
    if configuration not in content.get("configurations", {}):
        raise PlansError(f"{source}: no configuration {configuration!r}; available: "
                         f"{', '.join(content.get('configurations', {}))}")
    manager = PlansManager(content)
    planned = manager.get_configuration(configuration)
    patch = _patch(patch_size, len(planned.patch_size), where)
    if is_lkm_architecture(planned):
        architecture = copy.deepcopy(content["configurations"][configuration].get("architecture") or {
            "network_class_name": planned.network_arch_class_name,
            "arch_kwargs": planned.network_arch_init_kwargs,
            "_kw_requires_import": list(planned.network_arch_init_kwargs_req_import)})
    elif source == target:
        raise PlansError(f"{where}: the architecture is {planned.network_arch_class_name}, not LKM-UNet; "
                         f"name an LKM-UNet plans file with -p (nnU-Net's own plans are only read)")
    else:
        architecture = lkm_architecture(planned, "auto")
    kwargs = architecture["arch_kwargs"]
    _fit_stages(kwargs, patch, n_stages, where)
    preset = "official" if kwargs.get("pim_grouping") == "strided" else "paper"
    try:
        derived = derive_kernel_sizes(patch, kwargs["strides"], preset)
    except ValueError as error:
        raise PlansError(f"{where}: {error}") from None
    kwargs["pim_kernel_sizes"], kwargs["pam_pool_sizes"] = derived["pim_kernel_sizes"], derived["pam_pool_sizes"]
    rows = validate_architecture(architecture, patch, where)
    entry = content["configurations"][configuration]
    entry["patch_size"] = patch
    entry["architecture"] = architecture
    if source != target:  # a new file takes its own name, as `lkm-unet plans` writes it; in place it stays
        content["plans_name"] = plans
    backup = _backup(target) if target.is_file() else None
    target.write_text(json.dumps(content, indent=4) + "\n")
    return PatchChange(target, backup, source, list(planned.patch_size), patch, kwargs["n_stages"],
                       stage_table(rows, kwargs.get("pim_grouping", "window")),
                       _estimate(architecture, patch, source.parent / "dataset.json"), planned.batch_size)


def _patch(patch_size: Sequence[int], ndim: int, where: str) -> list[int]:
    patch = list(patch_size)
    if len(patch) != ndim or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in patch):
        raise PlansError(f"{where}: patch size {patch} must be {ndim} positive ints (one per axis, as the "
                         f"planned patch)")
    return patch


def _fit_stages(kwargs: dict[str, Any], patch: list[int], n_stages: Optional[int], where: str) -> None:
    """Keep the plan's stages for ``patch``, or cut them to ``n_stages``; refuse what cannot work."""
    strides, planned = kwargs["strides"], kwargs["n_stages"]
    if n_stages is not None and not 1 <= n_stages <= planned:
        raise PlansError(f"{where}: n_stages {n_stages} must be between 1 and the plan's {planned} stages "
                         f"(adding stages needs nnU-Net's planner: new strides, conv kernels and features)")
    stages = planned if n_stages is None else n_stages
    errors = patch_stride_errors(patch, strides[:stages])
    if not errors:
        if stages < planned:
            for key in PER_STAGE_KEYS:
                if isinstance(kwargs.get(key), list):
                    kwargs[key] = kwargs[key][:stages]
            kwargs["n_conv_per_stage_decoder"] = kwargs["n_conv_per_stage_decoder"][:stages - 1]
            kwargs["n_stages"] = stages
        return
    total = total_stride(strides[:stages], len(patch))
    axes = "; ".join(f"axis {axis}: {p} -> {' or '.join(map(str, nearest_multiples(p, t)))}"
                     for axis, (p, t) in enumerate(zip(patch, total)) if p % t)
    valid = " or ".join(map(str, nearest_valid_patches(patch, strides[:stages])))
    message = (f"{where}: patch size {patch} does not fit the plan's {stages} stages, whose total stride "
               f"{total} must divide it on every axis ({axes}). Nearest valid patches: {valid}")
    serving = stages_serving(patch, strides)
    if 2 <= serving < stages:
        message += f"; or keep this patch with only the first {serving} stages (--n-stages {serving})"
    raise PlansError(message)


def _backup(path: Path) -> Path:
    """Copy ``path`` to ``<path>.bak-<UTC time>`` (``-2``, ``-3``... if taken); never overwrites."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    data = path.read_bytes()
    for n in range(1, 1000):
        backup = path.with_name(f"{path.name}.bak-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            with backup.open("xb") as handle:
                handle.write(data)
            return backup
        except FileExistsError:
            continue
    raise PlansError(f"{path}: 999 backups named {path.name}.bak-{stamp}* exist already")


def _estimate(architecture: dict[str, Any], patch: list[int], dataset_json: Path) -> int:
    """compute_conv_feature_map_size of the network for one sample, with the dataset's channels and
    labels (as nnU-Net's planner builds it)."""
    channels, labels = 1, 2
    if dataset_json.is_file():
        meta = json.loads(dataset_json.read_text())
        channels = len(meta.get("channel_names", meta.get("modality", {"0": ""})))
        labels = len(meta.get("labels", {"background": 0, "foreground": 1}))
    with torch.device("meta"):
        network = LKMUNet(input_channels=channels, num_classes=labels, **architecture["arch_kwargs"])
    return int(network.compute_conv_feature_map_size(patch))
