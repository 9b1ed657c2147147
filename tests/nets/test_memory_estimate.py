"""compute_conv_feature_map_size tracks what a training step saves for backward (nnU-Net batch sizing).

Relation tested: saved bytes under bf16 autocast ~= CONV_BYTES_PER_ELEMENT x compute_conv_feature_map_size,
within 25%, for the conv-only residual U-Net (the calibration) and for LKM-UNet with each memory option.
"""
import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

from lkm_unet import LKMUNet
from lkm_unet.memory import saved_bytes
from lkm_unet.nets.lkm_encoder import CONV_BYTES_PER_ELEMENT


def _kwargs(ndim):
    conv = torch.nn.Conv3d if ndim == 3 else torch.nn.Conv2d
    norm = torch.nn.InstanceNorm3d if ndim == 3 else torch.nn.InstanceNorm2d
    return dict(input_channels=1, n_stages=4, features_per_stage=[8, 16, 32, 32], conv_op=conv, kernel_sizes=3,
                strides=[1, 2, 2, 2], n_blocks_per_stage=[1, 2, 2, 2], num_classes=3, n_conv_per_stage_decoder=1,
                norm_op=norm, norm_op_kwargs={"affine": True}, nonlin=torch.nn.LeakyReLU,
                nonlin_kwargs={"inplace": True}, deep_supervision=True, conv_bias=True)


PATCH = {3: [16, 32, 32], 2: [64, 64]}
LKM = {3: {"pim_kernel_sizes": [[8, 8, 8], [4, 4, 4], [4, 4, 4], [2, 2, 2]],
           "pam_pool_sizes": [[8, 8, 8], [4, 4, 4], [4, 4, 4], [2, 2, 2]]},
       2: {"pim_kernel_sizes": [16, 8, 8, 4], "pam_pool_sizes": [16, 8, 8, 4], "pim_grouping": "strided"}}


def _ratio(net, patch):
    torch.manual_seed(0)
    counted, _ = saved_bytes(net, torch.randn(1, 1, *patch), torch.bfloat16)
    return counted.total / (CONV_BYTES_PER_ELEMENT * int(net.compute_conv_feature_map_size(patch)))


@pytest.mark.parametrize("ndim", [2, 3])
def test_conv_backbone_calibration(ndim):
    assert abs(_ratio(ResidualEncoderUNet(**_kwargs(ndim)), PATCH[ndim]) - 1) < 0.25


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("checkpointing, autocast", [(False, False), (True, False), (True, True), (False, True)])
def test_lkm_unet_estimate_within_25_percent_of_saved_bytes(ndim, checkpointing, autocast):
    net = LKMUNet(**_kwargs(ndim), **LKM[ndim], ssm_checkpointing=checkpointing, ssm_autocast=autocast)
    assert abs(_ratio(net, PATCH[ndim]) - 1) < 0.25


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("checkpointing, autocast", [(False, False), (True, False), (False, True)])
def test_fake_tensor_count_matches_the_real_count(ndim, dtype, checkpointing, autocast):
    """The benchmark counts configurations too large for the machine on fake tensors: same graph, same
    storages. In fp32 the counts are equal; under bf16 autocast the real count is a few hundred bytes to
    a few KiB higher (per-stage differences of 64-1344 bytes, in the conv stages and the decoder)."""
    net = LKMUNet(**_kwargs(ndim), **LKM[ndim], ssm_checkpointing=checkpointing, ssm_autocast=autocast)
    x = torch.randn(2, 1, *PATCH[ndim])
    real, _ = saved_bytes(net, x, dtype)
    fake, out = saved_bytes(net, x, dtype, fake=True)
    assert sorted(fake.per_block) == sorted(real.per_block)
    if dtype is None:
        assert fake.per_block == real.per_block
    else:
        assert 0 <= real.total - fake.total < 2e-3 * real.total   # measured at most 0.12%
    assert all(type(o).__name__ == "FakeTensor" for o in out)


def test_recompute_working_memory_is_bounded_by_the_run_size():
    small = LKMUNet(**_kwargs(3), **LKM[3], ssm_checkpoint_elements=1024)
    large = LKMUNet(**_kwargs(3), **LKM[3], ssm_checkpoint_elements=2 ** 24)
    plain = LKMUNet(**_kwargs(3), **LKM[3], ssm_checkpointing=False)
    assert plain.encoder.recompute_working_bytes(PATCH[3]) == 0
    assert 0 < small.encoder.recompute_working_bytes(PATCH[3]) < large.encoder.recompute_working_bytes(PATCH[3])
