"""The paper's ablations as LKMUNet kwargs: each removes exactly its parameters, and no-Mamba is the backbone."""
import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet, ResidualUNet

from lkm_unet import LKMUNet
from lkm_unet.ablations import ABLATIONS, ablation_kwargs, shrink_windows

from test_lkm_unet import small_net


def _keys(net):
    return set(net.state_dict())


def _expected_removed(full_keys, ablation):
    """Keys an ablation must remove, named from the ablation's definition."""
    fragments = {"no-pim": [".pim."], "no-pam": [".pam."], "no-bim": [".mixer.backward_mixer."],
                 "no-mamba": [".pim.", ".pam."]}[ablation]
    return {k for k in full_keys if any(f in k for f in fragments)}


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_each_switch_removes_exactly_the_named_parameters(ndim, ablation):
    full = small_net(ndim, "window")
    ablated = small_net(ndim, "window", **ablation_kwargs(ablation))
    removed = _keys(full) - _keys(ablated)
    assert _keys(ablated) <= _keys(full)
    assert removed == _expected_removed(_keys(full), ablation)
    assert removed  # the switch did something
    shapes = {k: v.shape for k, v in full.state_dict().items()}
    assert all(v.shape == shapes[k] for k, v in ablated.state_dict().items())


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_ablated_networks_train(ablation):
    torch.manual_seed(0)
    net = small_net(2, "window", **ablation_kwargs(ablation))
    out = net(torch.randn(2, 2, 8, 8))
    assert [tuple(o.shape) for o in out] == [(2, 3, 8, 8), (2, 3, 4, 4)]
    sum(o.square().mean() for o in out).backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_no_bim_keeps_one_out_proj_and_one_mixer():
    net = small_net(2, "window", bidirectional=False)
    mixer = net.encoder.lkm_stages[0].pim.mixer
    assert mixer.backward_mixer is None
    assert mixer.out_proj.weight.shape == (4, 8)
    # one direction: the output at the first token depends on that token only
    x = torch.randn(1, 6, 4, requires_grad=True)
    mixer(x)[0, 0].sum().backward()
    assert x.grad[0, 1:].abs().sum() == 0
    assert x.grad[0, 0].abs().sum() > 0


@pytest.mark.parametrize("ndim", [2, 3])
def test_no_mamba_is_the_residual_backbone(ndim):
    """LKM-UNet's backbone is DNA's ResidualUNet (residual encoder AND residual decoder). nnU-Net's ResEnc
    presets use ResidualEncoderUNet, whose decoder is plain convs: it differs only in the decoder."""
    kwargs = dict(input_channels=2, n_stages=3, features_per_stage=[4, 8, 8],
                  conv_op=torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d, kernel_sizes=3, strides=[1, 2, 2],
                  n_blocks_per_stage=[1, 2, 1], num_classes=3, n_conv_per_stage_decoder=1, conv_bias=True,
                  norm_op=torch.nn.InstanceNorm2d if ndim == 2 else torch.nn.InstanceNorm3d,
                  norm_op_kwargs={"affine": True}, nonlin=torch.nn.LeakyReLU, deep_supervision=True)
    backbone = ResidualUNet(**kwargs)
    no_mamba = LKMUNet(**kwargs, **ablation_kwargs("no-mamba"))
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(no_mamba) == count(backbone) == (6610 if ndim == 2 else 18_370)
    res_enc = ResidualEncoderUNet(**kwargs)
    assert count(res_enc) == (5670 if ndim == 2 else 15_990)
    assert {k for k in res_enc.state_dict() if not k.startswith("decoder.")} == \
        {k for k in no_mamba.state_dict() if not k.startswith("decoder.")}
    # the same state_dict: a backbone checkpoint loads into the no-Mamba ablation and computes the same
    no_mamba.load_state_dict(backbone.state_dict(), strict=True)
    backbone.eval(), no_mamba.eval()
    x = torch.randn(1, 2, *([8] * ndim))
    with torch.no_grad():
        torch.testing.assert_close(no_mamba(x)[0], backbone(x)[0])


def test_window_sizes_of_an_ablated_block_are_not_needed():
    net = small_net(2, "window", use_pim=False, pim_kernel_sizes=[])
    rows = net.validate_input_size([8, 8])
    assert rows[0]["pim_kernel_size"] is None and rows[0]["pam_pool_size"] == [2, 2]


def test_shrink_windows_is_the_kernel_size_sweep():
    # the paper's 3D windows on its 40x224x192 patch (feature maps of its six stages)
    windows = [[20, 28, 24], [20, 28, 24], [10, 14, 12], [10, 14, 12], [5, 7, 6], [5, 7, 6]]
    maps = [[40, 224, 192], [40, 112, 96], [20, 56, 48], [10, 28, 24], [5, 14, 12], [5, 7, 6]]
    assert shrink_windows(windows, maps, 2) == \
        [[10, 14, 12], [10, 14, 12], [5, 7, 6], [5, 7, 6], [1, 2, 3], [1, 1, 3]]
    assert shrink_windows(windows, maps, 1) == windows
    with pytest.raises(ValueError, match=r"window divisor must be a positive int, got 0"):
        shrink_windows(windows, maps, 0)
