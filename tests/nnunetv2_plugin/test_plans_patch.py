"""`lkm-unet set-patch` on real nnU-Net plans (2D and 3D) and the every-error report of check-plans."""
import json
import sys

import pytest
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_fixtures import DATASET, DATASET_ID, run
from nnunetv2_plugin.cli import main
from nnunetv2_plugin.plans import PlansError, resolve_architecture
from nnunetv2_plugin.plans_files import check_plans, plans_path, write_lkm_plans
from nnunetv2_plugin.plans_patch import NNUNET_REFERENCE, NNUNET_REFERENCE_GB, set_patch_size


@pytest.fixture()
def preprocessed(planned, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(planned["base"] / "preprocessed"))
    return planned


def _name(request) -> str:
    return f"LKMPatch_{request.node.name.replace('[', '_').replace(']', '').replace('-', '_')}"


def _user_edited_lkm_plans(request):
    """An LKM plans file with hand edits that set-patch must keep."""
    path, _ = write_lkm_plans(DATASET, target_plans=_name(request))
    plans = json.loads(path.read_text())
    three_d = plans["configurations"]["3d_fullres"]
    three_d["batch_size"] = 1
    three_d["architecture"]["arch_kwargs"]["d_state"] = 8
    three_d["architecture"]["arch_kwargs"]["features_per_stage"] = [16, 32, 64, 128]
    three_d["my_note"] = "kept"
    plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["pim_kernel_sizes"][0] = [8, 16]
    path.write_text(json.dumps(plans, indent=2))
    return path


def test_3d_patch_change_in_place_keeps_every_other_edit(preprocessed, request):
    path = _user_edited_lkm_plans(request)
    before_bytes = path.read_bytes()
    before = json.loads(before_bytes)
    change = set_patch_size(DATASET, "3d_fullres", [12, 32, 16], plans=path.stem)
    after = json.loads(path.read_text())
    assert change.backup.name.startswith(f"{path.name}.bak-") and change.backup.read_bytes() == before_bytes
    assert (change.old_patch, change.patch, change.n_stages) == ([16, 32, 32], [12, 32, 16], 4)
    # Stage maps [12,32,16] [12,16,8] [6,8,4] [3,4,2]; the bottleneck is one window, doubled every two stages.
    windows = [[6, 8, 4], [6, 8, 4], [3, 4, 2], [3, 4, 2]]
    expected = json.loads(json.dumps(before))
    expected["configurations"]["3d_fullres"]["patch_size"] = [12, 32, 16]
    expected["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["pim_kernel_sizes"] = windows
    expected["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["pam_pool_sizes"] = windows
    assert after == expected
    table = check_plans(DATASET, path.stem)["3d_fullres"]
    assert "    0  [12, 32, 16]     [6, 8, 4]      [6, 8, 4]      none" in table
    assert change.table == table


def test_memory_estimate_is_nnunets_planner_number(preprocessed, request):
    """The estimate is what nnU-Net's ExperimentPlanner computes for the written plan, and the
    reference values are the planner's own."""
    path = _user_edited_lkm_plans(request)
    change = set_patch_size(DATASET, "3d_fullres", [12, 32, 16], plans=path.stem)
    script = (
        "import json, sys\n"
        "from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner\n"
        f"planner = ExperimentPlanner({DATASET_ID})\n"
        f"arch = json.load(open(sys.argv[1]))['configurations']['3d_fullres']['architecture']\n"
        "estimate = planner.static_estimate_VRAM_usage([12, 32, 16], 1, 2, arch['network_class_name'],\n"
        "    arch['arch_kwargs'], arch['_kw_requires_import'])\n"
        "print(json.dumps([int(estimate), planner.UNet_reference_val_2d, planner.UNet_reference_val_corresp_bs_2d,\n"
        "    planner.UNet_reference_val_3d, planner.UNet_reference_val_corresp_bs_3d,\n"
        "    planner.UNet_reference_val_corresp_GB]))\n")
    result = run([sys.executable, "-c", script, str(path)], preprocessed["env"])
    estimate, *reference = json.loads(result.stdout.strip().splitlines()[-1])
    assert change.estimate == estimate
    assert reference == [*NNUNET_REFERENCE[2], *NNUNET_REFERENCE[3], NNUNET_REFERENCE_GB]
    assert change.batch_size == 1
    assert change.memory_lines()[0] == (f"memory estimate (nnU-Net's, compute_conv_feature_map_size per sample x "
                                        f"batch size): {estimate:,} x 1 = {estimate:,}")
    assert change.memory_lines()[1].startswith("nnU-Net's default planner allows 560,000,000 x 2 = 1,120,000,000 "
                                               "for a 3D net on its 8 GB reference GPU: this plan needs ")


def test_2d_patch_from_nnunet_plans_writes_a_new_lkm_file(preprocessed, request):
    name = _name(request)
    source = plans_path(DATASET, "nnUNetPlans")
    source_bytes = source.read_bytes()
    change = set_patch_size(DATASET, "2d", [16, 24], plans=name)
    assert change.backup is None and change.source == source and source.read_bytes() == source_bytes
    written, nnunet = json.loads(change.path.read_text()), json.loads(source_bytes)
    kwargs = written["configurations"]["2d"]["architecture"]["arch_kwargs"]
    assert written["configurations"]["2d"]["patch_size"] == [16, 24]
    assert kwargs["pim_kernel_sizes"] == kwargs["pam_pool_sizes"] == [[4, 6], [4, 6], [2, 3], [2, 3]]
    assert kwargs["strides"] == nnunet["configurations"]["2d"]["architecture"]["arch_kwargs"]["strides"]
    assert written["configurations"]["3d_fullres"] == nnunet["configurations"]["3d_fullres"]
    assert "    3  [2, 3]           [2, 3]         [2, 3]         none" in check_plans(DATASET, name)["2d"]


def test_a_patch_the_strides_cannot_serve_is_refused_with_the_nearest_valid_ones(preprocessed, request):
    path = _user_edited_lkm_plans(request)
    before = path.read_bytes()
    with pytest.raises(PlansError) as error:
        set_patch_size(DATASET, "3d_fullres", [10, 30, 16], plans=path.stem)
    assert str(error.value) == (
        f"{path}, configuration '3d_fullres': patch size [10, 30, 16] does not fit the plan's 4 stages, whose "
        "total stride [4, 8, 8] must divide it on every axis (axis 0: 10 -> 8 or 12; axis 1: 30 -> 24 or 32). "
        "Nearest valid patches: [8, 32, 16] or [8, 24, 16] or [12, 32, 16]; or keep this patch with only the "
        "first 2 stages (--n-stages 2)")
    with pytest.raises(PlansError) as error:
        set_patch_size(DATASET, "2d", [3, 32], plans=path.stem)
    assert str(error.value) == (
        f"{path}, configuration '2d': patch size [3, 32] does not fit the plan's 4 stages, whose total stride "
        "[8, 8] must divide it on every axis (axis 0: 3 -> 8). Nearest valid patches: [8, 32]")
    assert path.read_bytes() == before
    assert list(path.parent.glob(f"{path.name}.bak-*")) == []


def test_fewer_stages_on_request_and_backups_never_overwritten(preprocessed, request, capsys):
    path = _user_edited_lkm_plans(request)
    original = path.read_bytes()
    assert main(["set-patch", DATASET, "-c", "2d", "--patch-size", "20", "24", "-p", path.stem, "--n-stages", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:5] == ["configuration 2d: patch size [32, 32] -> [20, 24] (3 stages; window and pool sizes re-derived)",
                       "stage  feature map      PiM kernel     PaM pool       padding",
                       "    0  [20, 24]         [10, 12]       [10, 12]       none",
                       "    1  [10, 12]         [5, 6]         [5, 6]         none",
                       "    2  [5, 6]           [5, 6]         [5, 6]         none"]
    kwargs = json.loads(path.read_text())["configurations"]["2d"]["architecture"]["arch_kwargs"]
    assert (kwargs["n_stages"], kwargs["strides"], kwargs["n_conv_per_stage_decoder"]) == \
        (3, [[1, 1], [2, 2], [2, 2]], [2, 2])
    assert len(kwargs["features_per_stage"]) == len(kwargs["kernel_sizes"]) == len(kwargs["n_blocks_per_stage"]) == 3
    once = path.read_bytes()
    assert main(["set-patch", DATASET, "-c", "2d", "--patch-size", "20", "16", "-p", path.stem]) == 0
    backups = sorted(path.parent.glob(f"{path.name}.bak-*"), key=lambda p: p.stat().st_mtime_ns)
    assert [b.read_bytes() for b in backups] == [original, once]
    check_plans(DATASET, path.stem)
    assert main(["set-patch", DATASET, "-c", "2d", "--patch-size", "16", "16", "-p", path.stem, "--n-stages", "5"]) == 2
    assert capsys.readouterr().err == (
        f"error: {path}, configuration '2d': n_stages 5 must be between 1 and the plan's 3 stages (adding stages "
        "needs nnU-Net's planner: new strides, conv kernels and features)\n")


def test_nnunets_own_plans_are_never_edited_in_place(preprocessed):
    with pytest.raises(PlansError, match=r"configuration '2d': the architecture is dynamic_network_architectures"
                                         r".architectures.unet.PlainConvUNet, not LKM-UNet"):
        set_patch_size(DATASET, "2d", [16, 16], plans="nnUNetPlans")


def test_check_plans_reports_every_failing_stage_and_axis(preprocessed, request):
    path, _ = write_lkm_plans(DATASET, target_plans=_name(request))
    plans = json.loads(path.read_text())
    three_d = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    three_d["pim_kernel_sizes"][0] = [5, 24, 8]
    three_d["pam_pool_sizes"][2] = [8, 8, 3]
    plans["configurations"]["2d"]["patch_size"] = [36, 20]
    path.write_text(json.dumps(plans))
    where_3d, where_2d = f"{path}, configuration '3d_fullres'", f"{path}, configuration '2d'"
    with pytest.raises(PlansError) as error:
        check_plans(DATASET, path.stem)
    # A patch the strides cannot divide is reported alone (its stage maps are not defined).
    assert error.value.messages[:2] == [
        f"{where_2d}: patch_size [36, 20]: axis 0 (size 36) is not a multiple of 8, the total stride of the 4 stages "
        "on that axis; sizes that are: 32 or 40",
        f"{where_2d}: patch_size [36, 20]: axis 1 (size 20) is not a multiple of 8, the total stride of the 4 stages "
        "on that axis; sizes that are: 16 or 24",
    ]
    assert error.value.messages[2:] == [
        f"{where_3d}: stage 0 PiM (pim_kernel_sizes[0]): kernel size 5 does not divide axis 0 of the feature map "
        "(16, 32, 32) (size 16); kernel sizes that divide it: 4 or 8; or a patch size of 20 on axis 0; "
        "or shape_policy='pad'",
        f"{where_3d}: stage 0 PiM (pim_kernel_sizes[0]): kernel size 24 does not divide axis 1 of the feature map "
        "(16, 32, 32) (size 32); kernel sizes that divide it: 16 or 32; or a patch size of 24 or 48 on axis 1; "
        "or shape_policy='pad'",
        f"{where_3d}: stage 2 PaM (pam_pool_sizes[2]): pool size 3 does not divide axis 2 of the feature map "
        "(8, 8, 8) (size 8); pool sizes that divide it: 2 or 4; or a patch size of 24 or 48 on axis 2; "
        "or shape_policy='pad'",
    ]
    result = run(["lkm-unet", "check-plans", str(DATASET_ID), "-p", path.stem], preprocessed["env"], check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {m}" for m in error.value.messages]
    # The trainer validates with the same collector: it raises every problem of its configuration.
    manager = PlansManager(plans)
    with pytest.raises(PlansError) as trainer_error:
        resolve_architecture(manager.get_configuration("3d_fullres"), where_3d)
    assert trainer_error.value.messages == error.value.messages[2:]
