"""Training schedules as trainer-name suffixes, so that every run of a comparison trains the same budget.

nnU-Net names a shorter schedule by a suffix of the trainer (``nnUNetTrainer_5epochs``); nnU-Net ships
``nnUNetTrainer_<N>epochs`` and this package ``LKMUNetTrainer_<N>epochs`` and ``LKMUNetTrainer_demo``.
This module completes the grid that `lkm-unet compare --schedule S` needs (trainer ``T`` becomes
``T_S``): every ablation trainer with every schedule (``LKMUNetTrainer_noMamba_5epochs``,
``LKMUNetTrainer_noMamba_demo``, ...), built from data rather than copied classes, and
``nnUNetTrainer_demo``, nnU-Net's own network with the quickstart's schedule.
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from lkm_unet.ablations import ABLATION_SUFFIXES, ablation_kwargs
from nnunetv2_plugin import lkm_unet_trainer

#: schedules every trainer of the default comparison has: the suffix, and LKM-UNet's class with it
SCHEDULE_BASES = {
    "1epoch": lkm_unet_trainer.LKMUNetTrainer_1epoch, "5epochs": lkm_unet_trainer.LKMUNetTrainer_5epochs,
    "10epochs": lkm_unet_trainer.LKMUNetTrainer_10epochs, "50epochs": lkm_unet_trainer.LKMUNetTrainer_50epochs,
    "100epochs": lkm_unet_trainer.LKMUNetTrainer_100epochs,
    "250epochs": lkm_unet_trainer.LKMUNetTrainer_250epochs, "demo": lkm_unet_trainer.LKMUNetTrainer_demo,
}


class nnUNetTrainer_demo(nnUNetTrainer):
    """nnU-Net's trainer (the network its plans name, e.g. ResEnc M) with LKMUNetTrainer_demo's schedule:
    8 epochs of 25 training and 5 validation iterations. Not a schedule for real data."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = lkm_unet_trainer.LKMUNetTrainer_demo.lkm_num_epochs
        self.num_iterations_per_epoch = 25
        self.num_val_iterations_per_epoch = 5


def _ablation_schedule_trainers() -> dict[str, type]:
    """``LKMUNetTrainer_<ablation>_<schedule>`` for every ablation and schedule: the schedule's class with
    the ablation's switch, as ``LKMUNetTrainer_<ablation>`` applies it."""
    trainers = {}
    for ablation, suffix in ABLATION_SUFFIXES.items():
        for schedule, base in SCHEDULE_BASES.items():
            name = f"LKMUNetTrainer_{suffix}_{schedule}"
            trainers[name] = type(name, (base,), {
                "lkm_arch_overrides": ablation_kwargs(ablation), "__module__": __name__, "__qualname__": name,
                "__doc__": f"{base.__name__} with the ablation {ablation!r} (lkm_unet.ablations)."})
    return trainers


_GENERATED = _ablation_schedule_trainers()
globals().update(_GENERATED)
__all__ = ["nnUNetTrainer_demo", *_GENERATED]
