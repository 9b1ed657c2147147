"""The ``cuda`` scan backend (mamba-ssm's kernel) against the ``torch`` backend and the fp64 oracle, and
``lkm_unet.Mamba`` against ``mamba_ssm.modules.mamba_simple.Mamba``.

Needs a CUDA device and mamba-ssm built with its kernel; skipped otherwise (as on a CPU-only CI).
``scripts/gpu_check.py`` runs the same comparisons at the network's sizes and reports the numbers.
"""
import itertools
import math

import pytest
import torch

import lkm_unet
from lkm_unet import scan_backend, selective_scan

CUDA_STATUS = lkm_unet.available_backends()["cuda"]
pytestmark = pytest.mark.skipif(
    CUDA_STATUS != "ok", reason=f"cuda scan backend unavailable: {CUDA_STATUS.split(':')[0]}")

GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# fp32 against fp64, ||a - b|| / ||b||. Measured on an H200 (docs/benchmarks.md) at these sizes: the
# fp32 sequential loop <= 6.2e-7, the torch backend <= 5.0e-7, mamba-ssm's kernel (fast-math exp)
# <= 2.1e-6 (dA), outputs <= 5.8e-7; the bounds leave a margin of over 30x.
TOL_Y, TOL_GRAD = 2e-5, 1e-4


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a - b).norm() / b.norm()).item()


def inputs(b, d, l, n, has_z, has_D, has_bias, softplus, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    kw = {"device": "cuda", "generator": g}

    def randn(*s):
        return torch.randn(*s, **kw)

    def rand(*s):
        return torch.rand(*s, **kw)

    if softplus:
        delta = 0.5 * randn(b, d, l) + (0.0 if has_bias else -3.0)
        dt0 = torch.exp(rand(d) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        bias = dt0 + torch.log(-torch.expm1(-dt0)) if has_bias else None
    else:
        delta = 0.01 + 0.1 * rand(b, d, l)
        bias = 0.05 * rand(d) if has_bias else None
    A = -(0.5 + rand(d, n)) * torch.arange(1, n + 1, device="cuda") / 2
    return dict(u=randn(b, d, l), delta=delta, A=A, B=randn(b, n, l), C=randn(b, n, l),
                D=randn(d) if has_D else None, z=randn(b, d, l) if has_z else None,
                delta_bias=bias), softplus


def run(backend, inp, softplus, dy, dtype=torch.float32):
    leaves = {k: None if v is None else v.detach().to(dtype).requires_grad_() for k, v in inp.items()}
    y = selective_scan(*(leaves[k] for k in GRADS[:5]), leaves["D"], leaves["z"], leaves["delta_bias"],
                       softplus, backend=backend)
    names = [k for k in GRADS if leaves[k] is not None]
    grads = torch.autograd.grad(y, [leaves[k] for k in names], dy.to(dtype))
    return {"y": y, **{"d" + k: g for k, g in zip(names, grads)}}


@pytest.mark.parametrize("has_z,has_D,has_bias,softplus", list(itertools.product((False, True), repeat=4)))
def test_cuda_and_torch_match_fp64_oracle(has_z, has_D, has_bias, softplus):
    seed = 8 * has_z + 4 * has_D + 2 * has_bias + softplus
    inp, sp = inputs(2, 32, 257, 16, has_z, has_D, has_bias, softplus, seed)
    dy = torch.randn(2, 32, 257, device="cuda", generator=torch.Generator("cuda").manual_seed(100 + seed))
    ref = run("ref", inp, sp, dy, torch.float64)
    for backend in ("cuda", "torch"):
        got = run(backend, inp, sp, dy)
        assert got.keys() == ref.keys()
        for name in ref:
            err = rel(got[name], ref[name])
            assert err < (TOL_Y if name == "y" else TOL_GRAD), f"{backend} {name}: rel error {err:.2e}"


def test_cuda_matches_torch_at_network_length():
    inp, sp = inputs(2, 64, 1600, 16, True, True, True, True, seed=99)
    dy = torch.randn(2, 64, 1600, device="cuda")
    a, b = run("cuda", inp, sp, dy), run("torch", inp, sp, dy)
    for name in b:
        err = rel(a[name], b[name])
        assert err < (TOL_Y if name == "y" else TOL_GRAD), f"{name}: rel error {err:.2e}"


@pytest.fixture
def mamba_ssm_mamba():
    mamba_simple = pytest.importorskip("mamba_ssm.modules.mamba_simple")
    return mamba_simple.Mamba


@pytest.fixture
def fp32_convs():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_same_seed_gives_same_initialisation(mamba_ssm_mamba):
    torch.manual_seed(5)
    theirs = mamba_ssm_mamba(d_model=64).state_dict()
    torch.manual_seed(5)
    ours = lkm_unet.Mamba(64).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_mamba_ssm_state_dict_loads_and_matches(mamba_ssm_mamba, fp32_convs, backend):
    torch.manual_seed(0)
    theirs = mamba_ssm_mamba(d_model=64).cuda()
    ours = lkm_unet.Mamba(64).cuda()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 300, 64, device="cuda")
    w = torch.randn(2, 300, 64, device="cuda")
    grads = []
    for model, ctx in ((theirs, None), (ours, backend)):
        xx = x.clone().requires_grad_()
        if ctx is None:
            y = model(xx)
        else:
            with scan_backend(ctx):
                y = model(xx)
        (y * w).sum().backward()
        grads.append((y.detach(), xx.grad, {k: p.grad for k, p in model.named_parameters()}))
    (y_t, dx_t, dp_t), (y_o, dx_o, dp_o) = grads
    assert rel(y_o, y_t) < 1e-5
    assert rel(dx_o, dx_t) < 1e-4
    for k in dp_t:
        assert rel(dp_o[k], dp_t[k]) < 1e-4, k


def test_lkm_state_dict_loads_into_mamba_ssm(mamba_ssm_mamba, fp32_convs):
    torch.manual_seed(1)
    ours = lkm_unet.Mamba(64).cuda()
    theirs = mamba_ssm_mamba(d_model=64).cuda()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 300, 64, device="cuda")
    with torch.no_grad(), scan_backend("cuda"):
        assert rel(ours(x), theirs(x)) < 1e-5
