"""LKM-UNet trainers for the stock ``nnUNetv2_train`` / ``nnUNetv2_predict`` (SPEC 6).

``LKMUNetTrainer`` builds LKM-UNet from the configuration's ``arch_kwargs`` when the plans name
LKM-UNet (an ``lkm-unet plans`` file, possibly hand-edited), and otherwise derives the LKM sizes
from the planned patch and strides. The plans are validated when the trainer is created, before
any data is loaded. Variants are one-flag subclasses in nnU-Net's naming style.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from lkm_unet import LKMUNet
from lkm_unet.ablations import ablation_kwargs
from lkm_unet.ops.causal_conv1d import conv_backend
from lkm_unet.ops.selective_scan import ENV_VAR, available_backends, resolve_backend
from nnunetv2_plugin.finite_guard import (NonFiniteTrainingError, gradients_finite, locate_non_finite,
                                          loss_finite, non_finite_message)
from nnunetv2_plugin.plans import resolve_architecture, stage_table



class LKMUNetTrainer(nnUNetTrainer):
    """nnU-Net's default training schedule with LKM-UNet as the network.

    Variants set one class attribute each; users subclass the same way.
    """

    #: preset used when the plans do not already describe LKM-UNet
    lkm_preset = "auto"
    #: False keeps the whole network in fp32 under nnU-Net's autocast (LKMUNetTrainerNoAMP)
    lkm_allow_autocast = True
    #: epochs to train; None keeps nnU-Net's default (1000)
    lkm_num_epochs: Optional[int] = None
    #: False trains on the full-resolution output only
    lkm_deep_supervision = True
    #: LKMUNet kwargs that replace the plans' arch_kwargs (the ablation trainers, lkm_unet.ablations)
    lkm_arch_overrides: dict = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.lkm_num_epochs is not None:
            self.num_epochs = self.lkm_num_epochs
        self.enable_deep_supervision = self.lkm_deep_supervision
        if not self.lkm_allow_autocast:
            self.grad_scaler = None
        # Fail on bad plans now, before nnU-Net unpacks or loads any data.
        where = f"plans {self.plans_manager.plans_name!r}, configuration {self.configuration_name!r}"
        architecture, origin, rows = resolve_architecture(self.configuration_manager, where, self.lkm_preset,
                                                          self.lkm_arch_overrides)
        kwargs = architecture["arch_kwargs"]
        backend = resolve_backend("auto", self.device)
        fell_back = self.device.type == "cuda" and backend != "cuda"
        self.print_to_log_file(
            f"LKM-UNet architecture {origin}; shape_policy {kwargs.get('shape_policy', 'pad')}\n"
            f"{stage_table(rows, kwargs.get('pim_grouping', 'window'))}\n"
            f"selective scan backend on {self.device.type}: {backend}"
            + (f" (cuda: {available_backends()['cuda']})" if fell_back else "")
            + f"; causal conv1d: {conv_backend(self.device)}\n"
            f"deep supervision {'on' if self.enable_deep_supervision else 'off'}; mixed precision "
            + ("allowed on cuda" if self.lkm_allow_autocast else "off (the whole network in fp32)"))
        if self.device.type == "cpu" and backend == "torch":
            # The numba kernel sets flush-to-zero in its own threads; the torch scan's decaying states drift into the
            # denormal range, which made early CPU training steps 4-5x slower. Set for this process only.
            torch.set_flush_denormal(True)
            numba_state = available_backends()["numba"]
            why = (f"numba: {numba_state}" if numba_state != "ok"
                   else f"{ENV_VAR}={os.environ[ENV_VAR]}" if os.environ.get(ENV_VAR) else "chosen by scan_backend")
            self.print_to_log_file(f"CPU scan backend is torch ({why}): flush-to-zero for denormal floats is on in "
                                   "this training process")

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """Used by training and by ``nnUNetv2_predict`` (with ``enable_deep_supervision=False``)."""
        architecture, _, _ = resolve_architecture(configuration_manager, f"plans {plans_manager.plans_name!r}",
                                                  cls.lkm_preset, cls.lkm_arch_overrides)
        network = LKMUNet(input_channels=num_input_channels, num_classes=num_output_channels,
                          deep_supervision=enable_deep_supervision, **architecture["arch_kwargs"])
        network.apply(network.initialize)
        network.allow_autocast = cls.lkm_allow_autocast
        return network

    def on_epoch_end(self) -> None:
        if self.device.type == "cuda" and self.local_rank == 0:
            # nnU-Net does not log memory; `lkm-unet compare` reads this line.
            self.print_to_log_file(f"peak GPU memory: {torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MiB")
        super().on_epoch_end()

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's step, guarded: non-finite gradients stop training before the optimizer step (so the
        weights stay as they were) and a non-finite loss after it, naming the first block whose output
        is non-finite. With a GradScaler a step with non-finite gradients is skipped by the scaler
        and never reaches the check."""
        if getattr(self, "_finite_hook", None) is None:
            self._finite_hook = self.optimizer.register_step_pre_hook(self._check_gradients)
        what = None
        try:
            result = super().train_step(batch)
        except _NonFiniteGradient:
            what = "gradient"
        else:
            if not loss_finite(result["loss"]):
                what = f"loss ({float(result['loss'])})"
        if what is not None:
            data = batch["data"].to(self.device, non_blocking=True)
            block, parameter = locate_non_finite(self.network, data, autocast=self.device.type == "cuda")
            message = non_finite_message(what, self.current_epoch, block, parameter)
            self.print_to_log_file(message)
            raise NonFiniteTrainingError(message)
        return result

    def _check_gradients(self, optimizer, args, kwargs) -> None:
        if not gradients_finite(self.network):
            raise _NonFiniteGradient

    def _do_i_compile(self) -> bool:
        """Off unless ``nnUNet_compile`` asks for it. The scan is a custom op that breaks the graph at
        every call; on an H200 compiling the 2D net cost 244 s for no measurable gain (README)."""
        if "nnUNet_compile" in os.environ:
            return super()._do_i_compile()
        if self.device.type == "cuda":
            self.print_to_log_file("torch.compile is off for LKM-UNet (set nnUNet_compile=true to try it)")
        return False


class _NonFiniteGradient(Exception):
    """Raised by the optimizer's step pre-hook; turned into a NonFiniteTrainingError by train_step."""


class nnUNetTrainerLKMUNet(LKMUNetTrainer):
    """The name the paper's README uses."""


class LKMUNetTrainerNoDeepSupervision(LKMUNetTrainer):
    lkm_deep_supervision = False


class LKMUNetTrainerNoAMP(LKMUNetTrainer):
    """Everything in fp32 (the SSM parts are fp32 in every trainer)."""
    lkm_allow_autocast = False


class LKMUNetTrainer_noPiM(LKMUNetTrainer):
    """The paper's ablation without the pixel-level SSM."""
    lkm_arch_overrides = ablation_kwargs("no-pim")


class LKMUNetTrainer_noPaM(LKMUNetTrainer):
    """The paper's ablation without the patch-level SSM."""
    lkm_arch_overrides = ablation_kwargs("no-pam")


class LKMUNetTrainer_noBiM(LKMUNetTrainer):
    """The paper's ablation with one scan direction in every BiMamba."""
    lkm_arch_overrides = ablation_kwargs("no-bim")


class LKMUNetTrainer_noMamba(LKMUNetTrainer):
    """Neither PiM nor PaM: the same residual backbone, trained the same way."""
    lkm_arch_overrides = ablation_kwargs("no-mamba")


class LKMUNetTrainer_1epoch(LKMUNetTrainer):
    lkm_num_epochs = 1


class LKMUNetTrainer_5epochs(LKMUNetTrainer):
    lkm_num_epochs = 5


class LKMUNetTrainer_10epochs(LKMUNetTrainer):
    lkm_num_epochs = 10


class LKMUNetTrainer_50epochs(LKMUNetTrainer):
    lkm_num_epochs = 50


class LKMUNetTrainer_100epochs(LKMUNetTrainer):
    lkm_num_epochs = 100


class LKMUNetTrainer_250epochs(LKMUNetTrainer):
    lkm_num_epochs = 250


class LKMUNetTrainer_demo(LKMUNetTrainer):
    """The quickstart's short schedule (8 epochs of 25 iterations) with a progress bar per epoch;
    learns the synthetic demo dataset in a few CPU minutes. Not a schedule for real data."""

    lkm_num_epochs = 8

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = 25
        self.num_val_iterations_per_epoch = 5
        self._progress = None

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.local_rank == 0:
            from tqdm import tqdm
            self._progress = tqdm(total=self.num_iterations_per_epoch, desc=f"epoch {self.current_epoch}",
                                  unit="it", leave=False)

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        if self._progress is not None:
            self._progress.set_postfix(loss=f"{result['loss']:.3f}")
            self._progress.update()
        return result

    def on_train_epoch_end(self, train_outputs: list) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        super().on_train_epoch_end(train_outputs)


TRAINERS = (
    "LKMUNetTrainer", "nnUNetTrainerLKMUNet", "LKMUNetTrainerNoDeepSupervision", "LKMUNetTrainerNoAMP",
    "LKMUNetTrainer_1epoch", "LKMUNetTrainer_5epochs", "LKMUNetTrainer_10epochs", "LKMUNetTrainer_50epochs",
    "LKMUNetTrainer_100epochs", "LKMUNetTrainer_250epochs", "LKMUNetTrainer_demo",
    "LKMUNetTrainer_noPiM", "LKMUNetTrainer_noPaM", "LKMUNetTrainer_noBiM", "LKMUNetTrainer_noMamba",
)
# the ablation variants of every schedule (LKMUNetTrainer_noMamba_demo, ...): nnunetv2_plugin.schedule_trainers
