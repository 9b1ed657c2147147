"""`lkm-unet profile`: the conv FLOPs are FlopCounterMode's on the backbone, the scan is counted by formula."""
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "nets"))
from test_lkm_unet import small_net  # noqa: E402

from nnunet_fixtures import DATASET_ID, run  # noqa: E402
from nnunetv2_plugin.analysis.profile import profile_network, scan_flops  # noqa: E402


def test_conv_flops_are_flop_counter_modes_on_the_backbone_and_the_split_sums_up():
    torch.manual_seed(0)
    full = small_net(2, "window", ds=False)
    backbone = small_net(2, "window", ds=False, use_pim=False, use_pam=False)
    table = profile_network(full, (1, 2, 16, 16))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone.eval()(torch.zeros(1, 2, 16, 16))
    assert table["conv"]["flops"] == counter.get_total_flops() == 989_184
    assert table["conv"]["params"] == sum(p.numel() for p in backbone.parameters()) == 6610
    assert sum(table[p]["params"] for p in ("conv", "PiM", "PaM")) == table["total"]["params"] == \
        sum(p.numel() for p in full.parameters()) == 18_690
    # PiM: stage s has (C, d_inner) = (4, 8), (8, 16), (8, 16); windows 4, 2, 2 on maps 16, 8, 4 give
    # (sequences, length) = (16, 16), (16, 4), (4, 4); two directions, d_state 16.
    expected_pim = 2 * (scan_flops(16, 8, 16, 16) + scan_flops(16, 16, 4, 16) + scan_flops(4, 16, 4, 16))
    assert table["PiM"]["scan_flops"] == expected_pim == 891_904
    assert table["conv"]["scan_flops"] == 0
    assert table["total"]["total_flops"] == sum(table[p]["flops"] + table[p]["scan_flops"] for p in ("conv", "PiM", "PaM"))
    # one scan direction halves the scan FLOPs
    one_way = profile_network(small_net(2, "window", ds=False, bidirectional=False), (1, 2, 16, 16))
    assert 2 * one_way["total"]["scan_flops"] == table["total"]["scan_flops"]


def test_profile_command_on_planned_plans(planned):
    result = run(["lkm-unet", "profile", str(DATASET_ID), "-c", "3d_fullres", "-p", "nnUNetPlans"], planned["env"])
    lines = result.stdout.splitlines()
    assert "PlainConvUNet, one forward pass of input [1, 1, 16, 32, 32]" in lines[0]
    assert lines[3].split()[1:] == ["0.000", "0.000", "0.000", "0.000"]  # no PiM in a plain U-Net
    lkm = run(["lkm-unet", "profile", str(DATASET_ID), "-c", "3d_fullres", "-p", "nnUNetPlans",
               "-tr", "LKMUNetTrainer"], planned["env"])
    no_mamba = run(["lkm-unet", "profile", str(DATASET_ID), "-c", "3d_fullres", "-p", "nnUNetPlans",
                    "-tr", "LKMUNetTrainer", "--ablation", "no-mamba"], planned["env"])
    conv_rows = [out.stdout.splitlines()[2] for out in (lkm, no_mamba)]
    assert conv_rows[0] == conv_rows[1] and conv_rows[0].startswith("conv")
    assert float(lkm.stdout.splitlines()[3].split()[3]) > 0  # PiM scan GFLOPs
