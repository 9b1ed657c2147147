"""The paper's ablations through plans (`lkm-unet plans --ablation/--window-divisor`) and trainer variants."""
import json

import pytest
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_fixtures import DATASET, DATASET_ID, run
from nnunetv2_plugin import lkm_unet_trainer as trainers


def _arch(planned, plans):
    path = planned["base"] / "preprocessed" / DATASET / f"{plans}.json"
    return path, json.loads(path.read_text())["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]


def test_plans_writes_the_switches_and_names_the_file_after_the_ablation(planned):
    result = run(["lkm-unet", "plans", str(DATASET_ID), "-c", "3d_fullres", "--ablation", "no-pim"], planned["env"])
    path, kwargs = _arch(planned, "nnUNetLKMUNetPlans_noPiM")
    assert (kwargs["use_pim"], kwargs["use_pam"], kwargs["bidirectional"]) == (False, True, True)
    assert "    0  [16, 32, 32]     off            [8, 8, 8]      none" in result.stdout
    assert f"wrote {path}" in result.stdout

    run(["lkm-unet", "plans", str(DATASET_ID), "-c", "3d_fullres", "--window-divisor", "2"], planned["env"])
    _, kwargs = _arch(planned, "nnUNetLKMUNetPlans_windows2")
    assert kwargs["pim_kernel_sizes"] == [[4, 4, 4], [4, 4, 4], [2, 2, 2], [2, 2, 2]]
    assert kwargs["pam_pool_sizes"] == [[8, 8, 8], [8, 8, 8], [4, 4, 4], [4, 4, 4]]
    assert (kwargs["use_pim"], kwargs["use_pam"], kwargs["bidirectional"]) == (True, True, True)

    bad = run(["lkm-unet", "plans", str(DATASET_ID), "-c", "3d_fullres", "--window-divisor", "0"], planned["env"],
              check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().endswith("configuration '3d_fullres': window divisor must be a positive int, got 0")


@pytest.mark.parametrize("trainer, removed", [
    ("LKMUNetTrainer_noPiM", [".pim."]), ("LKMUNetTrainer_noPaM", [".pam."]),
    ("LKMUNetTrainer_noBiM", [".backward_mixer."]), ("LKMUNetTrainer_noMamba", [".pim.", ".pam."]),
])
def test_ablation_trainers_build_the_ablated_network_from_full_plans(planned, trainer, removed):
    path = planned["base"] / "preprocessed" / DATASET / "nnUNetPlans.json"
    manager = PlansManager(str(path))
    build = lambda cls: cls.build_network_architecture(  # noqa: E731
        manager, manager.get_configuration("3d_fullres"), 1, 2, enable_deep_supervision=False)
    full, ablated = set(build(trainers.LKMUNetTrainer).state_dict()), set(build(getattr(trainers, trainer)).state_dict())
    assert full - ablated == {k for k in full if any(r in k for r in removed)}
    assert ablated < full
