"""The trainer stops on a non-finite loss and names the first block whose output is non-finite."""
import json

import pytest
import torch

from nnunet_fixtures import DATASET
from nnunetv2_plugin.finite_guard import NonFiniteTrainingError, locate_non_finite
from nnunetv2_plugin.lkm_unet_trainer import LKMUNetTrainer


def test_locate_names_the_first_non_finite_block_and_parameter():
    from lkm_unet import LKMUNet
    torch.manual_seed(0)
    net = LKMUNet(input_channels=1, n_stages=3, features_per_stage=[4, 8, 8], conv_op="torch.nn.Conv2d", kernel_sizes=3,
                  strides=[1, 2, 2], n_blocks_per_stage=1, num_classes=2, n_conv_per_stage_decoder=1,
                  norm_op="torch.nn.InstanceNorm2d", norm_op_kwargs={"affine": True}, nonlin="torch.nn.LeakyReLU",
                  pim_kernel_sizes=[4, 2, 2], pam_pool_sizes=[4, 2, 2])
    x = torch.randn(1, 1, 16, 16)
    assert locate_non_finite(net, x, autocast=False) == (None, None)
    with torch.no_grad():
        net.encoder.lkm_stages[1].pam.mixer.out_proj.weight[0, 0] = float("inf")
    assert locate_non_finite(net, x, autocast=False) == (
        "stage 1 PaM (encoder.lkm_stages.1.pam)", "parameter encoder.lkm_stages.1.pam.mixer.out_proj.weight")


def test_trainer_stops_with_the_block_name(planned, monkeypatch):
    preprocessed = planned["base"] / "preprocessed" / DATASET
    # nnunetv2's path objects read the environment whenever they are used
    monkeypatch.setenv("nnUNet_preprocessed", str(planned["base"] / "preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(planned["base"] / "results_guard"))
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False   # what nnUNetv2_train adds to the plans it hands the trainer
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    trainer = LKMUNetTrainer(plans, "2d", 0, dataset_json, device=torch.device("cpu"))
    trainer.initialize()
    patch = trainer.configuration_manager.patch_size
    scales = trainer._get_deep_supervision_scales()
    data = torch.randn(2, 1, *patch)
    target = [torch.randint(0, 2, (2, 1, *[int(p * s) for p, s in zip(patch, scale)])).float() for scale in scales]
    assert torch.isfinite(torch.as_tensor(trainer.train_step({"data": data, "target": target})["loss"]))
    with torch.no_grad():
        trainer.network.encoder.lkm_stages[2].pim.mixer.norm.weight[0] = float("nan")
    with pytest.raises(NonFiniteTrainingError, match=r"training stopped at epoch 0: non-finite gradient; "
                                                    r"first block with a non-finite output: stage 2 PiM "
                                                    r"\(encoder.lkm_stages.2.pim\); first non-finite parameter "
                                                    r"encoder.lkm_stages.2.pim.mixer.norm.weight"):
        trainer.train_step({"data": data, "target": target})


def test_trainer_on_the_torch_scan_says_why_and_sets_flush_to_zero(planned, monkeypatch):
    """With the torch scan on the CPU (here asked for by the environment, numba being usable) the trainer turns on
    flush-to-zero in its process and its log says which backend and why."""
    monkeypatch.setenv("nnUNet_preprocessed", str(planned["base"] / "preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(planned["base"] / "results_torch_scan"))
    monkeypatch.setenv("LKM_UNET_SCAN_BACKEND", "torch")
    preprocessed = planned["base"] / "preprocessed" / DATASET
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    try:
        trainer = LKMUNetTrainer(plans, "2d", 0, dataset_json, device=torch.device("cpu"))
        assert torch.tensor(1e-40) == 0  # a denormal float32 reads as zero while the flag is on
    finally:
        torch.set_flush_denormal(False)
    log = open(trainer.log_file).read()
    assert "selective scan backend on cpu: torch; causal conv1d: torch" in log
    assert ("CPU scan backend is torch (LKM_UNET_SCAN_BACKEND=torch): flush-to-zero for denormal floats is on in "
            "this training process") in log
