"""Mamba mixer: mamba-ssm's parameter layout, and the Mamba-1 equations computed independently in fp64."""
import math

import pytest
import torch
import torch.nn.functional as F

from lkm_unet import BiMamba, Mamba, scan_backend

# mamba_ssm.modules.mamba_simple.Mamba(d_model=64) with its defaults (d_state 16, d_conv 4, expand 2,
# dt_rank ceil(64 / 16) = 4, conv_bias True, bias False): key -> shape.
MAMBA_SSM_LAYOUT_D64 = {
    "A_log": (128, 16),
    "D": (128,),
    "in_proj.weight": (256, 64),
    "conv1d.weight": (128, 1, 4),
    "conv1d.bias": (128,),
    "x_proj.weight": (4 + 2 * 16, 128),
    "dt_proj.weight": (128, 4),
    "dt_proj.bias": (128,),
    "out_proj.weight": (64, 128),
}


def test_state_dict_matches_mamba_ssm_layout():
    state = Mamba(64).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == MAMBA_SSM_LAYOUT_D64


def test_initialisation_follows_mamba_ssm():
    torch.manual_seed(0)
    m = Mamba(48, dt_min=0.001, dt_max=0.1)
    assert torch.equal(m.A_log, torch.log(torch.arange(1, 17, dtype=torch.float32)).repeat(96, 1))
    assert torch.equal(m.D, torch.ones(96))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    bound = m.dt_rank ** -0.5
    assert m.dt_proj.weight.abs().max() <= bound and m.dt_rank == math.ceil(48 / 16)


def mamba_equations_fp64(m: Mamba, x: torch.Tensor) -> torch.Tensor:
    """The Mamba-1 block written out step by step in fp64, independent of the module's code path."""
    p = {k: v.detach().double() for k, v in m.state_dict().items()}
    x = x.double()
    b, length, _ = x.shape
    d_inner, n = p["A_log"].shape
    xz = x @ p["in_proj.weight"].T
    xs, z = xz[..., :d_inner], xz[..., d_inner:]
    w, k = p["conv1d.weight"][:, 0, :], p["conv1d.weight"].shape[-1]
    conv = torch.zeros_like(xs)
    for t in range(length):  # causal depthwise conv: output t sees inputs t-k+1 .. t
        for j in range(k):
            src = t - (k - 1) + j
            if src >= 0:
                conv[:, t] += w[:, j] * xs[:, src]
    xc = F.silu(conv + p["conv1d.bias"])
    dbc = xc @ p["x_proj.weight"].T
    r = m.dt_rank
    dt = F.softplus(dbc[..., :r] @ p["dt_proj.weight"].T + p["dt_proj.bias"])
    Bm, Cm = dbc[..., r:r + n], dbc[..., r + n:]
    A = -torch.exp(p["A_log"])
    h = torch.zeros(b, d_inner, n, dtype=torch.float64)
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * Bm[:, t, None, :] * xc[:, t, :, None]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + p["D"] * xc[:, t])
    y = torch.stack(ys, 1) * F.silu(z)
    return y @ p["out_proj.weight"].T


@pytest.mark.parametrize("backend", ["torch", "ref"])
def test_output_equals_equations(backend):
    torch.manual_seed(1)
    m = Mamba(24, d_state=8)
    x = torch.randn(2, 37, 24)
    with scan_backend(backend):
        y = m(x)
    expected = mamba_equations_fp64(m, x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-5)


def test_state_dict_round_trip_strict():
    torch.manual_seed(2)
    a, b = Mamba(32), Mamba(32)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(1, 9, 32)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_mamba_without_out_proj_has_no_such_parameter():
    m = Mamba(16, out_proj=False)
    assert not any(k.startswith("out_proj") for k in m.state_dict())
    assert m.mix(torch.randn(1, 5, 16)).shape == (1, 5, 32)
    with pytest.raises(RuntimeError, match="out_proj=False"):
        m(torch.randn(1, 5, 16))


def test_bimamba_is_forward_plus_flipped_backward_through_one_out_proj():
    torch.manual_seed(3)
    bi = BiMamba(16)
    assert sorted({k.split(".")[0] for k in bi.state_dict()}) == ["backward_mixer", "forward_mixer", "norm", "out_proj"]
    x = torch.randn(2, 11, 16)
    h = bi.norm(x)
    expected = bi.out_proj(bi.forward_mixer.mix(h) + bi.backward_mixer.mix(h.flip(1)).flip(1))
    torch.testing.assert_close(bi(x), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bimamba_runs_in_fp32_under_autocast(dtype):
    torch.manual_seed(4)
    bi = BiMamba(16)
    x = torch.randn(2, 13, 16)
    with torch.autocast("cpu", dtype=dtype):
        y = bi(x)
    assert y.dtype == dtype
    # computed in fp32 inside: the only rounding is the final cast to the autocast dtype
    torch.testing.assert_close(y.float(), bi(x).to(dtype).float(), rtol=0, atol=0)


def test_padding_mask_keeps_padded_tokens_out_of_the_scan():
    torch.manual_seed(5)
    m = Mamba(16, out_proj=False)
    real = torch.randn(1, 6, 16)
    padded = torch.cat([real, torch.randn(1, 4, 16)], 1)   # garbage after the real tokens
    mask = torch.tensor([[True] * 6 + [False] * 4])
    flipped = m.mix(padded.flip(1), mask.flip(1)).flip(1)  # padded tokens come FIRST in this direction
    torch.testing.assert_close(flipped[:, :6], m.mix(real.flip(1)).flip(1), rtol=1e-5, atol=1e-6)
