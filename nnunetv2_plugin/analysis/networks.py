"""Build the network an nnU-Net run trains, from its plans, without data or a trainer instance."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Optional

from torch import nn

from nnunetv2_plugin.plans import PlansError


def load_plans(plans: str, plans_identifier: Optional[str] = None) -> tuple[dict, dict, Path]:
    """``(plans, dataset_json, plans_file)`` from a plans JSON file, or from a dataset id/name and a plans
    identifier under ``$nnUNet_preprocessed``. dataset.json is read from beside the plans file."""
    from nnunetv2_plugin.plans_files import plans_path

    path = Path(plans)
    if not path.is_file():
        if plans.endswith(".json"):
            raise PlansError(f"{plans} does not exist")
        path = plans_path(plans, plans_identifier or "nnUNetLKMUNetPlans")
        if not path.is_file():
            raise PlansError(f"{path} does not exist; plan it first (nnUNetv2_plan_and_preprocess, "
                             f"`lkm-unet plans`), or give a plans file")
    dataset_json = path.with_name("dataset.json")
    if not dataset_json.is_file():
        raise PlansError(f"{dataset_json} does not exist; nnUNetv2_plan_and_preprocess copies it beside {path.name}")
    return json.loads(path.read_text()), json.loads(dataset_json.read_text()), path


def find_trainer(name: str) -> type:
    """nnU-Net's own trainer lookup (nnunetv2 and ``nnUNet_extTrainer``), with its search chatter muted."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with contextlib.redirect_stdout(io.StringIO()):
        return recursive_find_trainer_class_by_name(name)


def default_trainer(plans: dict, configuration: str) -> type:
    """LKMUNetTrainer for LKM-UNet plans, nnU-Net's nnUNetTrainer for any other."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_plugin.lkm_unet_trainer import LKMUNetTrainer
    name = plans["configurations"].get(configuration, {}).get("architecture", {}).get("network_class_name", "")
    return LKMUNetTrainer if name.split(".")[-1] == "LKMUNet" else nnUNetTrainer


def build_network(plans: dict, dataset_json: dict, configuration: str, trainer: Optional[type] = None,
                  arch_overrides: Optional[dict] = None) -> tuple[nn.Module, tuple[int, ...]]:
    """The inference network (no deep supervision) ``trainer`` builds for ``configuration``, and the
    input shape of one patch, ``(1, channels, *patch_size)``. ``arch_overrides`` (LKM-UNet trainers
    only) are applied like an ablation trainer's."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    if configuration not in plans["configurations"]:
        raise PlansError(f"plans {manager.plans_name!r} have no configuration {configuration!r}; "
                         f"available: {', '.join(plans['configurations'])}")
    trainer = trainer or default_trainer(plans, configuration)
    if arch_overrides:
        if not hasattr(trainer, "lkm_arch_overrides"):
            raise PlansError(f"{trainer.__name__} is not an LKM-UNet trainer; ablations apply to LKM-UNet only")
        trainer = type(f"{trainer.__name__}_profiled", (trainer,),
                       {"lkm_arch_overrides": {**trainer.lkm_arch_overrides, **arch_overrides}})
    config = manager.get_configuration(configuration)
    channels = determine_num_input_channels(manager, config, dataset_json)
    heads = manager.get_label_manager(dataset_json).num_segmentation_heads
    network = trainer.build_network_architecture(manager, config, channels, heads, enable_deep_supervision=False)
    return network, (1, channels, *config.patch_size)
