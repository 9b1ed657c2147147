"""Mamba's causal depthwise conv1d + SiLU: the fused numba kernels against torch's conv1d, and which one runs.

The reference is ``silu(F.conv1d(x, w[:, None], bias, padding=k - 1, groups=d)[..., :l])``, what the
mixer computed before the kernels existed; in fp64 the kernels must agree with it to rounding.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba", reason="the fused CPU conv needs numba (pip install 'numba>=0.60,<0.69')")

import lkm_unet  # noqa: E402
from lkm_unet.ops import causal_conv1d as conv  # noqa: E402
from lkm_unet.ops.selective_scan import ENV_VAR  # noqa: E402


def inputs(b, d, length, k, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, length, generator=g, dtype=dtype)
    w = torch.randn(d, k, generator=g, dtype=dtype) * 0.7
    bb = torch.randn(d, generator=g, dtype=dtype) if bias else None
    return [t if t is None else t.requires_grad_() for t in (x, w, bb)]


def value_and_grads(fn, x, w, b, dy):
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    y = fn(x, w, b)
    y.backward(dy)
    return [y.detach()] + [None if t is None else t.grad.clone() for t in (x, w, b)]


@pytest.mark.parametrize("shape", [(2, 3, 1, 4), (2, 3, 2, 4), (1, 2, 3, 4), (2, 5, 7, 4), (3, 4, 600, 4),
                                   (2, 3, 9, 2), (2, 3, 9, 5), (1, 2, 3, 6)],
                         ids=lambda s: "b{}-d{}-l{}-k{}".format(*s))
@pytest.mark.parametrize("bias", [True, False])
def test_fp64_matches_torch_conv1d_to_rounding(shape, bias):
    """Lengths shorter than the kernel included: taps before the sequence start are zeros."""
    b, d, length, k = shape
    x, w, bb = inputs(b, d, length, k, bias=bias)
    dy = torch.randn(b, d, length, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with lkm_unet.scan_backend("numba"):
        assert conv.conv_backend(x.device) == "numba"
        got = value_and_grads(conv.causal_conv1d_silu, x, w, bb, dy)
    want = value_and_grads(conv.causal_conv1d_silu_torch, x, w, bb, dy)
    for name, g, r in zip(("y", "dx", "dweight", "dbias"), got, want):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == torch.float64, name
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_fp32_matches_fp64_torch_within_fp32_rounding():
    x, w, bb = inputs(4, 64, 300, 4)
    dy = torch.randn(4, 64, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = value_and_grads(conv.causal_conv1d_silu_torch, x, w, bb, dy)
    x32, w32, b32 = (t.detach().float().requires_grad_() for t in (x, w, bb))
    with lkm_unet.scan_backend("numba"):
        got = value_and_grads(conv.causal_conv1d_silu, x32, w32, b32, dy.float())
    for name, g, r in zip(("y", "dx", "dweight", "dbias"), got, want):
        assert g.dtype == torch.float32, name
        rel = float((g.double() - r).abs().max() / r.abs().max())
        assert rel < 2e-6, f"{name}: relative error {rel:.1e}"


def test_gradcheck_through_the_custom_op():
    x, w, bb = inputs(2, 3, 6, 4)
    with lkm_unet.scan_backend("numba"):
        assert torch.autograd.gradcheck(conv.causal_conv1d_silu, (x, w, bb))


def test_custom_op_passes_torch_library_checks():
    x, w, bb = inputs(2, 3, 6, 4, dtype=torch.float32)
    torch.library.opcheck(torch.ops.lkm_unet.causal_conv1d_silu_fwd.default, (x, w, bb))
    dy = torch.randn(2, 3, 6)
    torch.library.opcheck(torch.ops.lkm_unet.causal_conv1d_silu_bwd.default,
                          tuple(t.detach() for t in (dy, x, w, bb)))


def test_bf16_input_gives_bf16_output_and_gradients_in_each_input_dtype():
    """Under ssm_autocast the conv gets bf16 activations and fp32 weights; it computes in fp32."""
    x, w, bb = inputs(2, 8, 40, 4, dtype=torch.float32)
    xb = x.detach().bfloat16().requires_grad_()
    with lkm_unet.scan_backend("numba"):
        y = conv.causal_conv1d_silu(xb, w, bb)
        y.float().sum().backward()
    assert (y.dtype, xb.grad.dtype, w.grad.dtype, bb.grad.dtype) == (torch.bfloat16, torch.bfloat16,
                                                                      torch.float32, torch.float32)
    want = conv.causal_conv1d_silu_torch(xb.detach().float(), w.detach(), bb.detach())
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)


def test_the_conv_follows_the_scan_backend(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert conv.conv_backend(cpu) == "numba"  # auto on the CPU picks the numba scan, so the numba conv
    with lkm_unet.scan_backend("torch"):
        assert conv.conv_backend(cpu) == "torch"
    monkeypatch.setenv(ENV_VAR, "torch")
    assert conv.conv_backend(cpu) == "torch"
    assert conv.conv_backend(torch.device("meta")) == "torch"


def test_mamba_mixer_is_the_same_function_with_either_conv():
    """The whole mixer (it computes in fp32): numba conv + numba scan against torch conv + torch scan."""
    torch.manual_seed(0)
    model = lkm_unet.Mamba(16)
    x = torch.randn(3, 50, 16)
    results = []
    for backend in ("numba", "torch"):
        model.zero_grad(set_to_none=True)
        with lkm_unet.scan_backend(backend):
            out = model(x)
        out.square().sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
    for got, want in zip(*results):
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5
