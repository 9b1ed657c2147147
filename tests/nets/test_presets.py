"""Presets: the derivation rule against the paper's tables, and one network per preset name."""
import pytest
import torch

from lkm_unet import LKMUNet, derive_kernel_sizes

# The paper's two set-ups: patch and nnU-Net's planned strides.
CT_3D_PATCH = [40, 224, 192]
CT_3D_STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
MR_2D_PATCH = [320, 320]
MR_2D_STRIDES = [[1, 1]] + [[2, 2]] * 6


def test_rule_reproduces_the_papers_3d_table():
    derived = derive_kernel_sizes(CT_3D_PATCH, CT_3D_STRIDES, "paper")
    # the paper's 3D (abdomen CT) table, typed from the paper, not read from configs/
    assert derived["pim_kernel_sizes"] == [[20, 28, 24], [20, 28, 24], [10, 14, 12], [10, 14, 12], [5, 7, 6], [5, 7, 6]]
    assert derived["pam_pool_sizes"] == derived["pim_kernel_sizes"]
    assert derived["pim_grouping"] == "window"
    official = derive_kernel_sizes(CT_3D_PATCH, CT_3D_STRIDES, "official")
    assert official["pim_kernel_sizes"] == derived["pim_kernel_sizes"]
    assert official["pam_pool_sizes"] == [[4] * 3, [4] * 3, [2] * 3, [2] * 3, [1] * 3, [1] * 3]
    assert official["pim_grouping"] == "strided"


def test_rule_reproduces_the_papers_2d_table():
    derived = derive_kernel_sizes(MR_2D_PATCH, MR_2D_STRIDES, "paper")
    assert [k[0] for k in derived["pim_kernel_sizes"]] == [40, 20, 20, 10, 10, 5, 5]
    assert all(k[0] == k[1] for k in derived["pim_kernel_sizes"])
    official = derive_kernel_sizes(MR_2D_PATCH, MR_2D_STRIDES, "official")
    assert [p[0] for p in official["pam_pool_sizes"]] == [8, 4, 4, 2, 2, 1, 1]


def _count(network: torch.nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


@pytest.mark.parametrize("preset, config, encoder, decoder, parameters", [
    # 2D abdomen MR, 14 classes; 'official' built one block per stage before (65,151,860 parameters)
    ("paper", "abdomen_mr_2d", [1, 3, 4, 6, 6, 6, 6], [1] * 6, 131_905_076),
    ("official", "abdomen_mr_2d", [2] * 7, [2] * 6, 80_886_452),
    ("paper", "abdomen_ct_3d", [1, 3, 4, 6, 6, 6], [1] * 5, 113_972_582),
    ("official", "abdomen_ct_3d", [2] * 6, [2] * 5, 63_782_246),
])
def test_a_preset_fixes_the_block_counts(preset, config, encoder, decoder, parameters):
    with torch.device("meta"):
        network = LKMUNet.from_preset(preset, config, initialize=False, input_channels=1, num_classes=14)
    assert [len(stage.blocks) for stage in network.encoder.stages] == encoder
    assert [len(stage.blocks) for stage in network.decoder.stages] == decoder
    assert _count(network) == parameters


def test_from_preset_initialises_like_the_trainer():
    torch.manual_seed(0)
    default = LKMUNet.from_preset("official", "abdomen_mr_2d", input_channels=1, num_classes=2, features_per_stage=4)
    torch.manual_seed(0)
    plain = LKMUNet.from_preset("official", "abdomen_mr_2d", initialize=False, input_channels=1, num_classes=2,
                                features_per_stage=4)
    plain.apply(plain.initialize)
    for (name, a), b in zip(default.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    # nnU-Net's init zeroes the last norm before each residual add; PyTorch's default leaves it at 1
    assert default.encoder.stages[1].blocks[1].conv2.norm.weight.abs().sum() == 0
