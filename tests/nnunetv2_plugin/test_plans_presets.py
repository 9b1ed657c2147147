"""`lkm-unet plans --preset paper|official` and `--batch-size`: the network written for a plan is the one
`LKMUNet.from_preset` builds, block counts and initialisation included."""
import copy
import json

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from lkm_unet import LKMUNet, load_config
from nnunet_fixtures import DATASET, DATASET_ID, run
from nnunetv2_plugin.lkm_unet_trainer import LKMUNetTrainer
from nnunetv2_plugin.plans import lkm_architecture

NARROW = [4, 8, 8, 8, 8, 8, 8]


def _paper_2d_plans(planned, features) -> dict:
    """The tiny dataset's nnU-Net plans with the paper's 2D backbone as nnU-Net plans it (2 convs per stage)."""
    plans = json.loads((planned["base"] / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    stored = load_config("abdomen_mr_2d")
    arch = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    for key in ("n_stages", "kernel_sizes", "strides"):
        arch[key] = copy.deepcopy(stored["architecture"][key])
    arch.update(features_per_stage=list(features), n_conv_per_stage=[2] * 7, n_conv_per_stage_decoder=[2] * 6)
    plans["configurations"]["2d"]["patch_size"] = list(stored["patch_size"])
    return plans


def test_stored_presets_refuse_a_plan_with_other_stages(planned):
    result = run(["lkm-unet", "plans", str(DATASET_ID), "-c", "2d", "--preset", "paper", "--target-plans",
                  "LKMPaperRefused"], planned["env"], check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: preset 'paper' holds the 7-stage tables of the paper's abdomen_mr_2d "
                                     "set-up, but this plan has 4 stages; use preset 'auto' to derive sizes for this plan")


@pytest.mark.parametrize("preset, grouping, encoder, decoder, pools", [
    ("paper", "window", [1, 3, 4, 6, 6, 6, 6], [1] * 6, [40, 20, 20, 10, 10, 5, 5]),
    ("official", "strided", [2] * 7, [2] * 6, [8, 4, 4, 2, 2, 1, 1]),
])
def test_plans_command_writes_the_from_preset_network(planned, preset, grouping, encoder, decoder, pools):
    source = planned["base"] / "preprocessed" / DATASET / "nnUNetPlansPaper2d.json"
    if not source.exists():
        source.write_text(json.dumps(_paper_2d_plans(planned, NARROW)))
    target = f"LKMPreset_{preset}"
    result = run(["lkm-unet", "plans", str(DATASET_ID), "-c", "2d", "--preset", preset, "--source-plans",
                  "nnUNetPlansPaper2d", "--target-plans", target, "--batch-size", "2"], planned["env"])
    assert f"PiM grouping: {grouping}" in result.stdout
    plans = json.loads((source.parent / f"{target}.json").read_text())
    configuration = plans["configurations"]["2d"]
    kwargs = configuration["architecture"]["arch_kwargs"]
    assert configuration["batch_size"] == 2
    assert (kwargs["n_blocks_per_stage"], kwargs["n_conv_per_stage_decoder"]) == (encoder, decoder)
    assert [k[0] for k in kwargs["pim_kernel_sizes"]] == [40, 20, 20, 10, 10, 5, 5]
    assert [p[0] for p in kwargs["pam_pool_sizes"]] == pools
    assert kwargs["pim_grouping"] == grouping

    manager = PlansManager(plans)
    torch.manual_seed(0)
    trained = LKMUNetTrainer.build_network_architecture(manager, manager.get_configuration("2d"), 1, 14, True)
    torch.manual_seed(0)
    direct = LKMUNet.from_preset(preset, "abdomen_mr_2d", input_channels=1, num_classes=14, deep_supervision=True,
                                 features_per_stage=NARROW)
    assert list(trained.state_dict()) == list(direct.state_dict())
    for (name, a), b in zip(trained.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("preset, parameters", [("paper", 131_905_076), ("official", 80_886_452),
                                                 ("auto", 65_151_860)])
def test_full_width_parameter_counts_on_the_plans_path(planned, preset, parameters):
    manager = PlansManager(_paper_2d_plans(planned, load_config("abdomen_mr_2d")["architecture"]["features_per_stage"]))
    kwargs = lkm_architecture(manager.get_configuration("2d"), preset)["arch_kwargs"]
    with torch.device("meta"):
        network = LKMUNet(input_channels=1, num_classes=14, **kwargs)
    assert sum(p.numel() for p in network.parameters()) == parameters
