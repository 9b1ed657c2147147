"""Edited LKM-UNet plans: a valid edit changes the built network; invalid edits fail with precise messages."""
import json

import pytest
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_fixtures import DATASET, DATASET_ID, run
from nnunetv2_plugin.lkm_unet_trainer import LKMUNetTrainer
from nnunetv2_plugin.plans import PlansError
from nnunetv2_plugin.plans_files import check_plans, write_lkm_plans


@pytest.fixture()
def lkm_plans(planned, monkeypatch, request):
    monkeypatch.setenv("nnUNet_preprocessed", str(planned["base"] / "preprocessed"))
    name = f"LKMEdit_{request.node.name.replace('[', '_').replace(']', '').replace('-', '_')}"
    path, _ = write_lkm_plans(DATASET, ["3d_fullres"], target_plans=name)
    return path


def _edit(path, key, stage, value):
    plans = json.loads(path.read_text())
    kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    if stage is None:
        kwargs[key] = value
    else:
        kwargs[key][stage] = value
    path.write_text(json.dumps(plans))
    return plans


def test_valid_edit_changes_the_built_network(lkm_plans):
    plans = _edit(lkm_plans, "pim_kernel_sizes", 0, [4, 8, 16])
    tables = check_plans(DATASET, lkm_plans.stem)
    assert "    0  [16, 32, 32]     [4, 8, 16]     [8, 8, 8]      none" in tables["3d_fullres"]
    manager = PlansManager(plans)
    net = LKMUNetTrainer.build_network_architecture(manager, manager.get_configuration("3d_fullres"), 1, 2, True)
    assert net.encoder.lkm_stages[0].pim.kernel_size == (4, 8, 16)
    assert net.encoder.lkm_stages[1].pim.kernel_size == (8, 8, 8)


@pytest.mark.parametrize("key, stage, value, message", [
    ("pim_kernel_sizes", None, [[8, 8, 8], [8, 8, 8], [4, 4, 4]],
     "pim_kernel_sizes has 3 entries but n_stages=4: pim_kernel_sizes=[[8, 8, 8], [8, 8, 8], [4, 4, 4]]"),
    ("pim_kernel_sizes", 2, [8, 8, 3],
     "stage 2 PiM (pim_kernel_sizes[2]): kernel size 3 does not divide axis 2 of the feature map (8, 8, 8) "
     "(size 8); kernel sizes that divide it: 2 or 4; or a patch size of 24 or 48 on axis 2; or shape_policy='pad'"),
    ("pam_pool_sizes", 1, [8, 0, 8], "pam_pool_sizes[1] (stage 1)=[8, 0, 8]: axis 1 has 0; sizes must be positive ints"),
    ("pim_kernel_sizes", 0, [8, "8", 8],
     "pim_kernel_sizes[0] (stage 0)=[8, '8', 8]: axis 1 has '8'; sizes must be positive ints"),
    ("pim_kernel_sizes", 3, [4, 4],
     "pim_kernel_sizes[3] (stage 3)=[4, 4] has 2 entries; this is a 3D network, so give one int or 3 ints"),
    ("pim_grouping", None, "rows", "pim_grouping='rows' is not valid; valid: 'window', 'strided'"),
])
def test_invalid_edit_is_reported_with_file_configuration_key_and_stage(lkm_plans, key, stage, value, message):
    _edit(lkm_plans, key, stage, value)
    with pytest.raises(PlansError) as error:
        check_plans(DATASET, lkm_plans.stem)
    assert str(error.value) == f"{lkm_plans}, configuration '3d_fullres': {message}"


def test_missing_key_is_reported(lkm_plans):
    plans = json.loads(lkm_plans.read_text())
    del plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["pam_pool_sizes"]
    lkm_plans.write_text(json.dumps(plans))
    with pytest.raises(PlansError, match=r"configuration '3d_fullres': arch_kwargs has no 'pam_pool_sizes'"):
        check_plans(DATASET, lkm_plans.stem)


def test_pad_policy_accepts_a_non_dividing_window_and_reports_the_padding(lkm_plans):
    _edit(lkm_plans, "shape_policy", None, "pad")
    _edit(lkm_plans, "pim_kernel_sizes", 2, [8, 8, 3])
    table = check_plans(DATASET, lkm_plans.stem)["3d_fullres"]
    assert "    2  [8, 8, 8]        [8, 8, 3]      [4, 4, 4]      PiM [0, 0, 1] PaM [0, 0, 0]" in table


def test_training_with_an_invalid_edit_fails_before_loading_data(planned, lkm_plans):
    _edit(lkm_plans, "pim_kernel_sizes", 2, [8, 8, 3])
    result = run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "all", "-tr", "LKMUNetTrainer", "-p",
                  lkm_plans.stem, "-device", "cpu"], planned["env"], check=False)
    assert result.returncode != 0
    assert (f"nnunetv2_plugin.plans.PlansError: plans '{lkm_plans.stem}', configuration '3d_fullres': stage 2 PiM "
            "(pim_kernel_sizes[2]): kernel size 3 does not divide axis 2") in result.stderr
    assert "Epoch 0" not in result.stdout and "unpacking" not in result.stdout.lower()
    command = run(["lkm-unet", "check-plans", str(DATASET_ID), "-p", lkm_plans.stem], planned["env"], check=False)
    assert command.returncode == 2
    assert command.stderr.startswith(f"error: {lkm_plans}, configuration '3d_fullres': stage 2 PiM")
