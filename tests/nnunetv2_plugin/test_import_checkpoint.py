"""`lkm-unet import-checkpoint`: a checkpoint in the released code's layout, in a real nnU-Net results
folder, becomes a model that the stock nnUNetv2_predict uses, with the same predictions."""
import copy
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from nnunetv2.training.logging.nnunet_logger import LocalLogger
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from lkm_unet import LKMUNet
from nnunet_fixtures import DATASET, DATASET_ID, run, run_together
from nnunetv2_plugin.checkpoint_import import (CheckpointImportError, import_checkpoint, official_plans,
                                               package_to_released_key, released_to_package_key)

FEATURES = [4, 8, 8, 8, 8, 8, 8]


def _released_plans(planned) -> dict:
    """nnU-Net's plans of the tiny dataset with a 2d configuration in the old plans format the released
    code's nnU-Net wrote: the paper's 7 stages and 320 x 320 patch, narrow features to stay fast."""
    plans = json.loads((planned["base"] / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    configuration = plans["configurations"]["2d"]
    del configuration["architecture"]
    configuration.update(patch_size=[320, 320], UNet_class_name="PlainConvUNet", UNet_base_num_features=4,
                         unet_max_num_features=8, conv_kernel_sizes=[[3, 3]] * 7,
                         pool_op_kernel_sizes=[[1, 1]] + [[2, 2]] * 6, num_pool_per_axis=[6, 6],
                         n_conv_per_stage_encoder=[2] * 7, n_conv_per_stage_decoder=[2] * 6)
    return plans


def _released_order(keys: list[str]) -> list[str]:
    """The released encoder registers all stages, then all PiM (mamba_layers), then all PaM."""
    def rank(key: str) -> tuple:
        top = key.startswith("decoder.")
        inner = key[len("decoder."):] if top else key
        in_encoder = inner.startswith("encoder.")
        group = 1 if ".mamba_layers." in key else 2 if ".w_mamba_layers." in key else 0
        return top, not in_encoder, group
    return sorted(keys, key=rank)


@pytest.fixture(scope="module")
def released(planned):
    """A released-layout checkpoint (weights of a real official-preset LKMUNet, keys renamed back) in
    ``<results>/Dataset991_LKMTiny/nnUNetTrainerLKMUNet__nnUNetPlans__2d/fold_all``."""
    plans = _released_plans(planned)
    dataset_json = json.loads((planned["raw"] / "dataset.json").read_text())
    kwargs = official_plans(plans, "2d", "unused")["configurations"]["2d"]["architecture"]["arch_kwargs"]
    assert kwargs["features_per_stage"] == FEATURES and kwargs["n_blocks_per_stage"] == [2] * 7
    torch.manual_seed(0)
    network = LKMUNet(input_channels=1, num_classes=2, deep_supervision=True, **kwargs)
    network.apply(network.initialize)
    with torch.no_grad():  # move every weight off its initial value so no output is trivially equal
        for parameter in network.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    ours = network.state_dict()
    renamed = {package_to_released_key(k): v for k, v in ours.items()}
    weights = OrderedDict((k, renamed[k]) for k in _released_order(list(renamed)))
    names = [package_to_released_key(n) for n, _ in network.named_parameters()]
    order = _released_order(names)
    parameters = dict(zip(names, network.parameters()))
    # SGD state in the released parameter order; each momentum buffer is 2 x its parameter
    optimizer_state = {"state": {i: {"momentum_buffer": 2 * parameters[k].detach()} for i, k in enumerate(order)},
                       "param_groups": [{"lr": 1e-3, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5,
                                         "dampening": 0, "maximize": False, "foreach": None,
                                         "differentiable": False, "fused": None, "params": list(range(len(order)))}]}
    folder = planned["base"] / "released_results" / DATASET / "nnUNetTrainerLKMUNet__nnUNetPlans__2d"
    (folder / "fold_all").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    checkpoint = {"network_weights": weights, "optimizer_state": optimizer_state, "grad_scaler_state": None,
                  "logging": LocalLogger().get_checkpoint(), "_best_ema": 0.9, "current_epoch": 1000,
                  "init_args": {"plans": plans, "configuration": "2d", "fold": "all", "dataset_json": dataset_json,
                                "unpack_dataset": True, "device": torch.device("cuda")},
                  "trainer_name": "nnUNetTrainerLKMUNet", "inference_allowed_mirroring_axes": (0, 1)}
    torch.save(checkpoint, folder / "fold_all" / "checkpoint_final.pth")
    return {"source": folder / "fold_all" / "checkpoint_final.pth", "ours": ours, "network": network,
            "plans": plans, "dataset_json": dataset_json}


def _predict_together(planned, plans_identifiers: list[str]) -> list[dict]:
    """nnUNetv2_predict with each plans identifier (run at once); the probabilities of each run per case."""
    outs = [planned["base"] / f"pred_import_{plans}" for plans in plans_identifiers]
    run_together([["nnUNetv2_predict", "-i", str(planned["raw"] / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
                   "-c", "2d", "-f", "all", "-tr", "LKMUNetTrainer", "-p", plans, "-device", "cpu", "--disable_tta",
                   "--save_probabilities", "-npp", "1", "-nps", "1"] for out, plans in zip(outs, plans_identifiers)],
                 planned["env"])
    return [{case: np.load(out / f"{case}.npz")["probabilities"] for case in ("test0", "test1")} for out in outs]


def test_released_keys_follow_the_released_layout(released):
    keys = list(torch.load(released["source"], weights_only=False)["network_weights"])
    for key in ("encoder.mamba_layers.0.norm.weight", "encoder.mamba_layers.6.mamba_forw.A_log",
                "encoder.mamba_layers.3.mamba_backw.dt_proj.bias", "encoder.w_mamba_layers.2.out_proj.weight",
                "decoder.encoder.w_mamba_layers.5.mamba_forw.in_proj.weight", "encoder.stages.0.blocks.1.conv2.conv.weight"):
        assert key in keys
    assert not any("lkm_stages" in k or "mixer" in k for k in keys)
    assert released_to_package_key("decoder.encoder.w_mamba_layers.5.mamba_backw.conv1d.bias") == \
        "decoder.encoder.lkm_stages.5.pam.mixer.backward_mixer.conv1d.bias"


def test_import_then_stock_predict_equals_the_original_weights(planned, released):
    imported = run(["lkm-unet", "import-checkpoint", str(released["source"]), "-p", "nnUNetLKMUNetPlansImported"],
                   planned["env"])
    model = planned["base"] / "results" / DATASET / "LKMUNetTrainer__nnUNetLKMUNetPlansImported__2d"
    target = model / "fold_all" / "checkpoint_final.pth"
    assert imported.stdout.splitlines()[:2] == [
        "renamed 532 keys from the released layout; plans written with preset 'official'", f"wrote {target}"]
    checkpoint = torch.load(target, weights_only=False)
    assert checkpoint["trainer_name"] == "LKMUNetTrainer" and "unpack_dataset" not in checkpoint["init_args"]
    assert list(checkpoint["network_weights"]) == _released_order_package(released)
    for key, value in released["ours"].items():
        assert torch.equal(checkpoint["network_weights"][key], value), key
    arch = json.loads((model / "plans.json").read_text())["configurations"]["2d"]["architecture"]["arch_kwargs"]
    assert (arch["pim_grouping"], arch["n_blocks_per_stage"], arch["n_conv_per_stage_decoder"]) == \
        ("strided", [2] * 7, [2] * 6)
    assert [k[0] for k in arch["pim_kernel_sizes"]] == [40, 20, 20, 10, 10, 5, 5]
    assert [p[0] for p in arch["pam_pool_sizes"]] == [8, 4, 4, 2, 2, 1, 1]
    # the optimizer state follows each parameter to its index in this package's order
    for j, (name, parameter) in enumerate(released["network"].named_parameters()):
        torch.testing.assert_close(checkpoint["optimizer_state"]["state"][j]["momentum_buffer"], 2 * parameter.detach(),
                                   rtol=0, atol=0, msg=name)

    # the same weights under this package's names, as a native model folder
    native = planned["base"] / "results" / DATASET / "LKMUNetTrainer__nnUNetLKMUNetPlansNative__2d"
    (native / "fold_all").mkdir(parents=True)
    native_plans = official_plans(released["plans"], "2d", "nnUNetLKMUNetPlansNative")
    (native / "plans.json").write_text(json.dumps(native_plans))
    (native / "dataset.json").write_text(json.dumps(released["dataset_json"]))
    torch.save(dict(checkpoint, network_weights=released["ours"]), native / "fold_all" / "checkpoint_final.pth")

    from_import, from_native = _predict_together(planned, ["nnUNetLKMUNetPlansImported", "nnUNetLKMUNetPlansNative"])
    for case in from_native:
        assert np.array_equal(from_import[case], from_native[case])
        assert from_native[case][1].std() > 1e-3  # a map that varies, not a constant

    again = run(["lkm-unet", "import-checkpoint", str(released["source"]), "-p", "nnUNetLKMUNetPlansImported"],
                planned["env"], check=False)
    assert again.returncode == 2
    # the last line: nnU-Net itself warns about the released code's (old) plans format before it
    assert again.stderr.strip().splitlines()[-1] == f"error: {target} already exists; pass --force to overwrite it"
    run(["lkm-unet", "import-checkpoint", str(released["source"]), "-p", "nnUNetLKMUNetPlansImported", "--force"],
        planned["env"])


def _released_order_package(released) -> list[str]:
    keys = [package_to_released_key(k) for k in released["ours"]]
    return [released_to_package_key(k) for k in _released_order(keys)]


def test_a_key_mismatch_is_reported_as_a_diff(planned, released, tmp_path):
    checkpoint = torch.load(released["source"], weights_only=False)
    weights = checkpoint["network_weights"]
    del weights["encoder.mamba_layers.0.mamba_forw.D"]
    weights["encoder.mamba_layers.0.mamba_forw.A_b_log"] = torch.zeros(8, 16)
    weights["decoder.seg_layers.5.weight"] = torch.zeros(3, 4, 1, 1)
    source = tmp_path / "fold_all" / "checkpoint_final.pth"
    source.parent.mkdir()
    torch.save(checkpoint, source)
    with pytest.raises(CheckpointImportError) as error:
        import_checkpoint(source, tmp_path / "out")
    assert str(error.value).splitlines() == [
        f"{source}: its weights (532 keys renamed from the released layout) do not match the LKM-UNet that "
        "preset 'official' builds from its plans (configuration '2d'):",
        "  missing (1): encoder.lkm_stages.0.pim.mixer.forward_mixer.D",
        "  unexpected (1): encoder.lkm_stages.0.pim.mixer.forward_mixer.A_b_log",
        "  shape mismatch (1): decoder.seg_layers.5.weight (3, 4, 1, 1) in the checkpoint, (2, 4, 1, 1) in the network",
    ]
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "checkpoint_final.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointImportError) as error:
        import_checkpoint(bad, tmp_path / "out")
    assert str(error.value).startswith(f"cannot read checkpoint {bad}: ")
    assert "\n" not in str(error.value)
    torch.save({"network_weights": {}}, bad)
    with pytest.raises(CheckpointImportError, match="^" + str(bad) + " is not an nnU-Net checkpoint: it has no 'init_args'$"):
        import_checkpoint(bad, tmp_path / "out")
    assert copy.copy(released_to_package_key("encoder.stages.0.blocks.0.conv1.conv.weight")) == \
        "encoder.stages.0.blocks.0.conv1.conv.weight"
