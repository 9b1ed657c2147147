"""LKM-UNet: shape table (2D/3D, both presets, deep supervision on/off), gradients, autocast, errors."""
import pytest
import torch

from lkm_unet import LKMUNet, derive_kernel_sizes, load_config

TINY = {"features_per_stage": 4, "n_blocks_per_stage": 1, "n_conv_per_stage_decoder": 1}


def tiny_net(preset, config, patch=None, **overrides):
    """The stored preset's tables with tiny widths (and, optionally, derived sizes for a smaller patch)."""
    cfg = load_config(config)
    kwargs = dict(TINY)
    if patch is not None:
        kwargs.update(derive_kernel_sizes(patch, cfg["architecture"]["strides"], preset))
    kwargs.update(overrides)
    return LKMUNet.from_preset(preset, config, input_channels=1, num_classes=3, **kwargs)


# (preset, config, input patch, deep supervision, expected output shapes)
SHAPES = [
    ("paper", "abdomen_mr_2d", (320, 320), True,
     [(1, 3, 320, 320), (1, 3, 160, 160), (1, 3, 80, 80), (1, 3, 40, 40), (1, 3, 20, 20), (1, 3, 10, 10)]),
    ("official", "abdomen_mr_2d", (320, 320), False, [(1, 3, 320, 320)]),
    ("paper", "abdomen_ct_3d", (8, 64, 64), True,
     [(1, 3, 8, 64, 64), (1, 3, 8, 32, 32), (1, 3, 4, 16, 16), (1, 3, 2, 8, 8), (1, 3, 1, 4, 4)]),
    ("official", "abdomen_ct_3d", (8, 64, 64), False, [(1, 3, 8, 64, 64)]),
    # the paper's own 3D patch: about 45 s each on 2 cores
    pytest.param("paper", "abdomen_ct_3d", (40, 224, 192), True,
                 [(1, 3, 40, 224, 192), (1, 3, 40, 112, 96), (1, 3, 20, 56, 48), (1, 3, 10, 28, 24),
                  (1, 3, 5, 14, 12)], marks=pytest.mark.slow),
    pytest.param("official", "abdomen_ct_3d", (40, 224, 192), False, [(1, 3, 40, 224, 192)],
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("preset, config, patch, ds, expected", SHAPES)
def test_shape_table(preset, config, patch, ds, expected):
    torch.manual_seed(0)
    full = tuple(load_config(config)["patch_size"]) == patch
    net = tiny_net(preset, config, None if full else patch, deep_supervision=ds)
    with torch.no_grad():
        out = net(torch.randn(1, 1, *patch))
    shapes = [tuple(o.shape) for o in out] if ds else [tuple(out.shape)]
    assert shapes == expected


def test_presets_build_the_paper_tables():
    net = tiny_net("paper", "abdomen_ct_3d")
    assert [list(s.pim.kernel_size) for s in net.encoder.lkm_stages] == \
        [[20, 28, 24], [20, 28, 24], [10, 14, 12], [10, 14, 12], [5, 7, 6], [5, 7, 6]]
    assert all(s.pim.kernel_size == s.pam.pool_size for s in net.encoder.lkm_stages)
    assert {s.pim.grouping for s in net.encoder.lkm_stages} == {"window"}
    official = tiny_net("official", "abdomen_mr_2d")
    assert [s.pim.kernel_size[0] for s in official.encoder.lkm_stages] == [40, 20, 20, 10, 10, 5, 5]
    assert [s.pam.pool_size[0] for s in official.encoder.lkm_stages] == [8, 4, 4, 2, 2, 1, 1]
    assert {s.pim.grouping for s in official.encoder.lkm_stages} == {"strided"}


def test_paper_patch_validates_without_padding():
    for config in ("abdomen_ct_3d", "abdomen_mr_2d"):
        for preset in ("paper", "official"):
            rows = tiny_net(preset, config).validate_input_size(load_config(config)["patch_size"])
            assert all(not any(r["pim_padding"]) and not any(r["pam_padding"]) for r in rows)


def small_net(ndim, grouping, ds=True, **overrides):
    conv = "torch.nn.Conv2d" if ndim == 2 else "torch.nn.Conv3d"
    norm = "torch.nn.InstanceNorm2d" if ndim == 2 else "torch.nn.InstanceNorm3d"
    kwargs = dict(input_channels=2, n_stages=3, features_per_stage=[4, 8, 8], conv_op=conv, kernel_sizes=3,
                  strides=[1, 2, 2], n_blocks_per_stage=[1, 2, 1], num_classes=3, n_conv_per_stage_decoder=1,
                  conv_bias=True, norm_op=norm, norm_op_kwargs={"affine": True}, nonlin="torch.nn.LeakyReLU",
                  deep_supervision=ds, pim_kernel_sizes=[[4] * ndim, [2] * ndim, [2] * ndim],
                  pam_pool_sizes=[[2] * ndim, [2] * ndim, [1] * ndim], pim_grouping=grouping)
    kwargs.update(overrides)
    net = LKMUNet(**kwargs)
    net.apply(net.initialize)
    return net


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("grouping", ["window", "strided"])
@pytest.mark.parametrize("ds", [True, False])
def test_every_parameter_gets_a_finite_gradient(ndim, grouping, ds):
    torch.manual_seed(1)
    net = small_net(ndim, grouping, ds)
    out = net(torch.randn(2, 2, *([8] * ndim)))
    loss = sum(o.square().mean() for o in out) if ds else out.square().mean()
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    # BN-before-add is zero-initialised, so conv grads may vanish; the SSM parts must not
    ssm_grads = [p.grad.abs().sum() for n, p in net.named_parameters() if ".lkm_stages." in n]
    assert sum(g > 0 for g in ssm_grads) / len(ssm_grads) > 0.9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_has_no_nan_and_returns_the_autocast_dtype(dtype):
    torch.manual_seed(2)
    net = small_net(2, "window")
    with torch.autocast("cpu", dtype=dtype):
        out = net(torch.randn(2, 2, 16, 16))
        loss = sum(o.float().square().mean() for o in out)
    loss.backward()
    assert all(o.dtype == dtype for o in out)
    assert all(torch.isfinite(o).all() for o in out)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    pim = net.encoder.lkm_stages[0].pim
    assert pim.mixer.forward_mixer.A_log.dtype == torch.float32


def test_parameter_names_do_not_depend_on_deep_supervision():
    assert list(small_net(2, "window", True).state_dict()) == list(small_net(2, "window", False).state_dict())


def test_deep_supervision_checkpoint_loads_strictly_without_it():
    torch.manual_seed(3)
    trained = small_net(3, "window", ds=True)
    inference = small_net(3, "window", ds=False)
    inference.load_state_dict(trained.state_dict(), strict=True)
    trained.eval(), inference.eval()
    x = torch.randn(1, 2, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(inference(x), trained(x)[0])


def test_compute_conv_feature_map_size_counts_ssm_activations():
    net = small_net(2, "window")
    plain = super(type(net.encoder), net.encoder).compute_conv_feature_map_size([16, 16])
    assert net.compute_conv_feature_map_size([16, 16]) > plain + net.decoder.compute_conv_feature_map_size([16, 16])


@pytest.mark.parametrize("overrides, message", [
    ({"pim_kernel_sizes": [[4, 4], [2, 2]]}, r"pim_kernel_sizes has 2 entries but n_stages=3: pim_kernel_sizes=\[\[4, 4\], \[2, 2\]\]"),
    ({"pam_pool_sizes": [[2, 2], [2, 0], [1, 1]]}, r"pam_pool_sizes\[1\] \(stage 1\)=\[2, 0\]: axis 1 has 0; sizes must be positive ints"),
    ({"pim_kernel_sizes": [[4, 4, 4], [2, 2], [2, 2]]}, r"pim_kernel_sizes\[0\] \(stage 0\)=\[4, 4, 4\] has 3 entries; this is a 2D network"),
    ({"pim_kernel_sizes": [[4, 4], [2, "2"], [2, 2]]}, r"pim_kernel_sizes\[1\] \(stage 1\)=\[2, '2'\]: axis 1 has '2'"),
    ({"pim_grouping": "grid"}, r"pim_grouping='grid' is not valid; valid: 'window', 'strided'"),
    ({"shape_policy": "ignore"}, r"shape_policy='ignore' is not valid; valid: 'pad', 'error'"),
    ({"strides": [1, 2]}, r"strides has 2 entries but n_stages=3: strides=\[1, 2\]"),
    ({"conv_op": "torch.nn.NoSuchConv"}, r"conv_op='torch.nn.NoSuchConv' does not name an importable class"),
])
def test_invalid_kwargs(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_net(2, "window", **overrides)


def test_error_policy_rejects_a_patch_that_does_not_divide():
    net = small_net(2, "window", shape_policy="error")
    with pytest.raises(ValueError) as error:
        net.validate_input_size([8, 12])
    assert str(error.value) == (
        "stage 2 PiM (pim_kernel_sizes[2]): kernel size 2 does not divide axis 1 of the feature map (2, 3) "
        "(size 3); kernel sizes that divide it: 1 or 3; or a patch size of 8 or 16 on axis 1; or shape_policy='pad'")
    with pytest.raises(ValueError, match=r"^stage 2 PiM \(pim_kernel_sizes\[2\]\): kernel size 2 does not divide axis 1"):
        net(torch.randn(1, 2, 8, 12))


def test_pad_policy_accepts_windows_that_do_not_divide():
    net = small_net(3, "strided", ds=False, pim_kernel_sizes=[[3, 3, 3], [3, 2, 2], [2, 2, 2]])
    assert net.validate_input_size([8, 12, 20])[0]["pim_padding"] == [1, 0, 1]
    assert net(torch.randn(1, 2, 8, 12, 20)).shape == (1, 3, 8, 12, 20)
