"""The stock nnU-Net commands with LKMUNetTrainer on a real (tiny) dataset: plans, train, predict, evaluate.

Training on nnU-Net's own 2d plans (sizes derived by the trainer) is covered by the runs of
test_training_runs.py, which predict and evaluate too: a second 2d run here would repeat them."""
import json

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_fixtures import DATASET, DATASET_ID, resave_as_if_written_on_cuda, run
from nnunetv2_plugin.lkm_unet_trainer import LKMUNetTrainer


def _train(planned, configuration, plans, trainer="LKMUNetTrainer_CI"):
    result = run(["nnUNetv2_train", str(DATASET_ID), configuration, "all", "-tr", trainer, "-p", plans,
                  "-device", "cpu"], planned["env"], nnUNet_n_proc_DA="0")
    folder = planned["base"] / "results" / DATASET / f"{trainer}__{plans}__{configuration}" / "fold_all"
    return result, folder


def _predict_and_evaluate(planned, configuration, plans, name):
    out = planned["base"] / f"pred_{name}"
    run(["nnUNetv2_predict", "-i", str(planned["raw"] / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
         "-c", configuration, "-f", "all", "-tr", "LKMUNetTrainer_CI", "-p", plans, "-device", "cpu",
         "--disable_tta", "-npp", "1", "-nps", "1"], planned["env"])
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["test0.nii.gz", "test1.nii.gz"]
    run(["nnUNetv2_evaluate_simple", str(planned["raw"] / "labelsTs"), str(out), "-l", "1"], planned["env"])
    summary = json.loads((out / "summary.json").read_text())
    dice = summary["foreground_mean"]["Dice"]
    assert 0.0 <= dice <= 1.0
    return dice


def test_lkm_plans_train_predict_evaluate_3d(planned):
    write = run(["lkm-unet", "plans", str(DATASET_ID), "-c", "3d_fullres", "--preset", "auto"], planned["env"])
    assert "0  [16, 32, 32]     [8, 8, 8]      [8, 8, 8]      none" in write.stdout
    plans_file = planned["base"] / "preprocessed" / DATASET / "nnUNetLKMUNetPlans.json"
    arch = json.loads(plans_file.read_text())["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"] == "lkm_unet.nets.lkm_unet.LKMUNet"
    assert arch["arch_kwargs"]["pim_kernel_sizes"] == [[8, 8, 8], [8, 8, 8], [4, 4, 4], [4, 4, 4]]

    result, folder = _train(planned, "3d_fullres", "nnUNetLKMUNetPlans")
    assert (folder / "checkpoint_final.pth").is_file()
    log = next(folder.glob("training_log_*.txt")).read_text()
    assert "LKM-UNet architecture plans; shape_policy error" in log
    assert "selective scan backend on cpu: numba; causal conv1d: numba" in log
    assert "flush-to-zero" not in log  # only set when the torch scan runs on the CPU
    validation = json.loads((folder / "validation" / "summary.json").read_text())
    assert 0.0 <= validation["foreground_mean"]["Dice"] <= 1.0

    # trained with deep supervision; loads strictly into the network nnUNetv2_predict builds
    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    manager = PlansManager(str(plans_file))
    inference = LKMUNetTrainer.build_network_architecture(manager, manager.get_configuration("3d_fullres"), 1, 2,
                                                          enable_deep_supervision=False)
    inference.load_state_dict(checkpoint["network_weights"], strict=True)

    # a checkpoint written on a GPU predicts on this CPU-only machine
    resave_as_if_written_on_cuda(folder / "checkpoint_final.pth")
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(folder / "checkpoint_final.pth", weights_only=False)
    _predict_and_evaluate(planned, "3d_fullres", "nnUNetLKMUNetPlans", "3d")


def test_plans_command_refuses_to_overwrite(planned):
    args = ["lkm-unet", "plans", str(DATASET_ID), "-c", "2d", "--target-plans", "nnUNetLKMUNetPlansCopy"]
    run(args, planned["env"])
    again = run(args, planned["env"], check=False)
    target = planned["base"] / "preprocessed" / DATASET / "nnUNetLKMUNetPlansCopy.json"
    assert again.returncode == 2
    assert again.stderr.strip() == f"error: {target} already exists; pass --force to overwrite it"
    run(args + ["--force"], planned["env"])


def test_trainer_found_by_nnunet_lookup_with_only_ext_trainer_set(planned):
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
            "for name in ('LKMUNetTrainer', 'nnUNetTrainerLKMUNet', 'LKMUNetTrainer_5epochs', "
            "'LKMUNetTrainerNoAMP', 'LKMUNetTrainerNoDeepSupervision', 'LKMUNetTrainer_CI'):\n"
                    "    c = f(name); print('FOUND', name, c.__module__, c.mro()[1].__name__)")
    result = run(["python", "-c", code], planned["env"])
    lines = [line[6:] for line in result.stdout.splitlines() if line.startswith("FOUND ")]
    assert len(lines) == 6
    assert lines[0] == "LKMUNetTrainer nnunetv2_plugin.lkm_unet_trainer nnUNetTrainer"
    assert lines[2] == "LKMUNetTrainer_5epochs nnunetv2_plugin.lkm_unet_trainer LKMUNetTrainer"
    assert lines[5] == "LKMUNetTrainer_CI ci_trainers LKMUNetTrainer_1epoch"
