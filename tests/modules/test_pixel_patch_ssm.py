"""PiM and PaM: partition round trips, which pixels share a sequence, and the shape policies."""
import itertools

import pytest
import torch

from lkm_unet import PatchSSM, PixelSSM
from lkm_unet.modules.partition import partition, reassemble


@pytest.mark.parametrize("shape, k", [
    ((2, 3, 8, 12), (4, 3)),            # 2D, anisotropic window
    ((1, 2, 6, 8, 10), (3, 4, 5)),      # 3D, anisotropic window
    ((2, 1, 4, 4), (4, 4)),             # one window covers the map
    ((1, 2, 5, 7, 3), (1, 1, 1)),       # every pixel its own window
])
@pytest.mark.parametrize("grouping", ["window", "strided"])
def test_partition_round_trip(shape, k, grouping):
    x = torch.randn(shape)
    tokens = partition(x, k, grouping)
    n_blocks = 1
    for s, w in zip(shape[2:], k):
        n_blocks *= s // w
    window_len = 1
    for w in k:
        window_len *= w
    expected = (shape[0] * n_blocks, window_len, shape[1]) if grouping == "window" \
        else (shape[0] * window_len, n_blocks, shape[1])
    assert tokens.shape == expected
    assert torch.equal(reassemble(tokens, k, grouping, shape), x)


def test_window_sequence_is_a_block_of_adjacent_pixels_in_raster_order():
    x = torch.arange(4 * 6.).reshape(1, 1, 4, 6)
    tokens = partition(x, (2, 3), "window")[..., 0]
    assert tokens.tolist() == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11],
                               [12, 13, 14, 18, 19, 20], [15, 16, 17, 21, 22, 23]]


def test_strided_sequence_holds_pixels_spaced_k_apart():
    x = torch.arange(4 * 6.).reshape(1, 1, 4, 6)
    tokens = partition(x, (2, 3), "strided")[..., 0]
    # offset (0, 0): rows 0, 2 and columns 0, 3; then offset (0, 1), ...
    assert tokens[0].tolist() == [0, 3, 12, 15]
    assert tokens[1].tolist() == [1, 4, 13, 16]
    assert tokens.shape == (6, 4)


def _support(module, shape, pixel):
    """Pixels whose input influences the output at ``pixel`` (all channels)."""
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    module(x)[(0, slice(None), *pixel)].sum().backward()
    return {tuple(i) for i in (x.grad[0].abs().sum(0) > 0).nonzero().tolist()}


def test_window_grouping_support_is_the_window():
    support = _support(PixelSSM(4, (2, 3), grouping="window"), (1, 4, 4, 6), (1, 4))
    assert support == {(r, c) for r in (0, 1) for c in (3, 4, 5)}


def test_strided_grouping_support_spans_the_map():
    support = _support(PixelSSM(4, (2, 3), grouping="strided"), (1, 4, 4, 6), (1, 4))
    assert support == {(r, c) for r in (1, 3) for c in (1, 4)}


def test_window_grouping_support_3d():
    support = _support(PixelSSM(2, (2, 2, 3), grouping="window"), (1, 2, 4, 4, 6), (3, 0, 5))
    assert support == set(itertools.product((2, 3), (0, 1), (3, 4, 5)))


def test_patch_ssm_support_is_the_whole_map():
    support = _support(PatchSSM(4, (2, 3)), (1, 4, 4, 6), (0, 0))
    assert support == set(itertools.product(range(4), range(6)))


def test_patch_ssm_pools_scans_and_upsamples():
    torch.manual_seed(1)
    pam = PatchSSM(3, (2, 2))
    x = torch.randn(2, 3, 4, 6)
    pooled = torch.nn.functional.avg_pool2d(x, 2)                   # (2, 3, 2, 3)
    tokens = pooled.flatten(2).transpose(1, 2)                      # raster order
    mixed = pam.mixer(tokens).transpose(1, 2).reshape(2, 3, 2, 3)
    expected = x + mixed.repeat_interleave(2, 2).repeat_interleave(2, 3)
    torch.testing.assert_close(pam(x), expected)


def test_per_axis_attributes():
    assert PixelSSM(4, (4, 2, 1)).kernel_size == (4, 2, 1)
    assert PixelSSM(4, 5, spatial_dims=3).kernel_size == (5, 5, 5)
    assert PixelSSM(4, 5).grouping == "window"
    assert PatchSSM(4, (2, 3)).pool_size == (2, 3)
    m = PixelSSM(4, 2)
    m(torch.randn(1, 4, 4, 4, 4))
    assert m.kernel_size == (2, 2, 2)


def test_error_policy_names_place_axis_size_window_and_valid_sizes():
    pim = PixelSSM(4, (4, 5), shape_policy="error", where="stage 1 PiM", input_stride=(2, 2))
    with pytest.raises(ValueError) as error:
        pim(torch.randn(1, 4, 8, 12))
    assert str(error.value) == (
        "stage 1 PiM: kernel size 5 does not divide axis 1 of the feature map (8, 12) (size 12); kernel sizes "
        "that divide it: 4 or 6; or a patch size of 20 or 30 on axis 1; or shape_policy='pad'")
    with pytest.raises(ValueError, match=r"PatchSSM: pool size 3 does not divide axis 0"):
        PatchSSM(4, 3, shape_policy="error")(torch.randn(1, 4, 8, 9))


def test_pad_policy_equals_scanning_the_real_pixels_alone():
    """A 1 x 5 map with windows of 4: the second window holds one real pixel and three padded ones.
    Padded tokens must not reach the real one, in either scan direction."""
    torch.manual_seed(2)
    pim = PixelSSM(3, (1, 4), shape_policy="pad")
    x = torch.randn(1, 3, 1, 5)
    y = pim(x)
    assert y.shape == x.shape
    first = pim.mixer(x[0, :, 0, :4].T[None])[0].T
    last = pim.mixer(x[0, :, 0, 4:].T[None])[0].T
    torch.testing.assert_close(y[0, :, 0, :4], x[0, :, 0, :4] + first)
    torch.testing.assert_close(y[0, :, 0, 4:], x[0, :, 0, 4:] + last)


def test_pad_policy_patch_tokens_average_only_real_pixels():
    torch.manual_seed(3)
    pam = PatchSSM(2, (1, 4), shape_policy="pad")
    x = torch.randn(1, 2, 1, 6)
    tokens = torch.stack([x[0, :, 0, :4].mean(-1), x[0, :, 0, 4:].mean(-1)])[None]   # (1, 2, C)
    mixed = pam.mixer(tokens)[0]
    expected = x[0, :, 0] + torch.cat([mixed[0:1].expand(4, 2), mixed[1:2].expand(2, 2)]).T
    torch.testing.assert_close(pam(x)[0, :, 0], expected)


@pytest.mark.parametrize("kwargs, message", [
    ({"kernel_size": (4, 0)}, r"kernel_size=\[4, 0\]: axis 1 has 0; sizes must be positive ints"),
    ({"kernel_size": 2, "spatial_dims": 3, "grouping": "rows"}, r"grouping='rows' is not valid; valid: 'window', 'strided'"),
    ({"kernel_size": 2, "shape_policy": "crop"}, r"shape_policy='crop' is not valid; valid: 'pad', 'error'"),
    ({"kernel_size": (2, 2, 2), "spatial_dims": 2}, r"kernel_size=\[2, 2, 2\] has 3 entries; this is a 2D network"),
])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PixelSSM(4, **kwargs)


def test_dimension_mismatch_is_reported():
    with pytest.raises(ValueError, match=r"PixelSSM: built for 2D maps \(kernel_size=\(2, 2\)\), got a 3D map"):
        PixelSSM(4, (2, 2))(torch.randn(1, 4, 2, 2, 2))
