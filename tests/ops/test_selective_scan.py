"""The torch backend of the selective scan against the sequential oracle: values, gradients, stability.

Tolerances of a backend run against the fp64 oracle (``selective_scan_ref`` on fp64 copies of the same
inputs), per input dtype and compared quantity, as ``(rtol, atol)``:

| input dtype | y           | du, ddelta  | other gradients | why                                   |
|-------------|-------------|-------------|-----------------|---------------------------------------|
| fp64        | 1e-9, 1e-9  | 1e-9, 1e-9  | 1e-9, 1e-9      | same arithmetic, different order      |
| fp32        | 6e-4, 2e-3  | 1e-3, 4e-3  | 6e-4, 2e-3      | mamba-ssm's fp32 figures; du / ddelta |
|             |             |             |                 | sum over the whole recurrence         |
| fp16        | 3e-3, 5e-3  | 3e-3, 5e-3  | 3e-3, 5e-3      | fp32 compute, result rounded to fp16  |
| bf16        | 2e-2, 5e-2  | 2e-2, 5e-2  | 2e-2, 5e-2      | fp32 compute, result rounded to bf16  |

Measured fp32 errors are far inside these (max abs error about 4e-5 on values up to 1e2 at l = 4096).
"""
from __future__ import annotations

import itertools
from typing import Optional

import pytest
import torch

import lkm_unet.ops.selective_scan_chunks as chunks
import lkm_unet.ops.selective_scan_torch as torch_scan
from lkm_unet.ops import selective_scan_ref
from lkm_unet.ops.selective_scan_torch import selective_scan_torch

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
TOLERANCES = {
    torch.float64: {"y": (1e-9, 1e-9), "u": (1e-9, 1e-9), "delta": (1e-9, 1e-9), "other": (1e-9, 1e-9)},
    torch.float32: {"y": (6e-4, 2e-3), "u": (1e-3, 4e-3), "delta": (1e-3, 4e-3), "other": (6e-4, 2e-3)},
    torch.float16: {"y": (3e-3, 5e-3), "u": (3e-3, 5e-3), "delta": (3e-3, 5e-3), "other": (3e-3, 5e-3)},
    torch.bfloat16: {"y": (2e-2, 5e-2), "u": (2e-2, 5e-2), "delta": (2e-2, 5e-2), "other": (2e-2, 5e-2)},
}


def tolerance(dtype: torch.dtype, name: str) -> dict[str, float]:
    rtol, atol = TOLERANCES[dtype].get(name, TOLERANCES[dtype]["other"])
    return {"rtol": rtol, "atol": atol}


def make_inputs(b: int, d: int, l: int, n: int, *, seed: int = 0, a_scale: float = 0.5,
                delta_shift: float = -1.0, softplus: bool = True) -> dict[str, torch.Tensor]:
    """fp64 inputs in mamba's ranges: A = -exp(N(0, a_scale)), delta around softplus^-1(0.3).

    Without ``softplus`` delta and delta_bias are made positive, as a time step must be (a negative one
    makes the recurrence grow exponentially, in the oracle as well).
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    inputs = {
        "u": randn(b, d, l), "delta": 0.5 * randn(b, d, l) + delta_shift, "A": -torch.exp(a_scale * randn(d, n)),
        "B": randn(b, n, l), "C": randn(b, n, l), "D": randn(d), "z": randn(b, d, l), "delta_bias": 0.3 * randn(d),
    }
    if not softplus:
        inputs["delta"] = torch.nn.functional.softplus(inputs["delta"])
        inputs["delta_bias"] = inputs["delta_bias"].abs()
    return inputs


def run(fn, inputs: dict[str, Optional[torch.Tensor]], softplus: bool, dtype: torch.dtype, grad_out: torch.Tensor):
    """Output and gradients of every given input of ``fn`` run on ``dtype`` copies (gradients as fp64)."""
    leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in inputs.items() if v is not None}
    args = [leaves.get(k) for k in NAMES]
    y = fn(*args, delta_softplus=softplus)
    assert y.dtype == dtype
    grads = torch.autograd.grad(y, list(leaves.values()), grad_out.to(dtype))
    for (name, leaf), grad in zip(leaves.items(), grads):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, name
    return y.double(), {k: g.double() for k, g in zip(leaves, grads)}


def assert_matches_ref(inputs: dict[str, Optional[torch.Tensor]], softplus: bool, dtype: torch.dtype,
                       fn=selective_scan_torch) -> None:
    u = inputs["u"]
    grad_out = torch.randn(u.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if dtype != torch.float64:  # the oracle sees exactly the values the backend sees
        inputs = {k: None if v is None else v.to(dtype).double() for k, v in inputs.items()}
        grad_out = grad_out.to(dtype).double()
    y, grads = run(fn, inputs, softplus, dtype, grad_out)
    y_ref, grads_ref = run(selective_scan_ref, inputs, softplus, torch.float64, grad_out)
    torch.testing.assert_close(y, y_ref, **tolerance(dtype, "y"))
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], **tolerance(dtype, name),
                                   msg=lambda m: f"d{name}: {m}")


OPTIONAL = ("D", "z", "delta_bias")


@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize("present", list(itertools.product([False, True], repeat=3)),
                         ids=lambda p: "+".join(k for k, on in zip(OPTIONAL, p) if on) or "bare")
def test_fp32_matches_ref_every_option(present: tuple[bool, ...], softplus: bool) -> None:
    inputs = make_inputs(2, 3, 67, 4, softplus=softplus)  # 67 = a chunk of 64 and an odd remainder of 3
    for name, on in zip(OPTIONAL, present):
        if not on:
            inputs[name] = None
    assert_matches_ref(inputs, softplus, torch.float32)


@pytest.mark.parametrize("shape", [(2, 3, 1, 4), (1, 4, 2, 16), (3, 5, 130, 16), (1, 2, 4096, 4)],
                         ids=lambda s: "b{}-d{}-l{}-n{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_ref_shapes(shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    assert_matches_ref(make_inputs(*shape), True, dtype)


def test_bf16_inputs_give_bf16_results_and_fp32_params_keep_fp32_grads() -> None:
    inputs = make_inputs(2, 4, 70, 8)
    assert_matches_ref(inputs, True, torch.bfloat16)
    # mamba keeps A, D, delta_bias in fp32 while activations are bf16
    leaves = {k: v.to(torch.float32 if k in ("A", "D", "delta_bias") else torch.bfloat16).requires_grad_()
              for k, v in inputs.items()}
    y = selective_scan_torch(*(leaves[k] for k in NAMES), delta_softplus=True)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16
    assert {k: v.grad.dtype for k, v in leaves.items()} == {k: v.dtype for k, v in leaves.items()}


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 6, 9, 10, 11])
def test_small_chunks_and_batch_blocks(monkeypatch: pytest.MonkeyPatch, length: int) -> None:
    """Chunks of 4 or 5 steps and blocks of 2 batch rows (b = 5 leaves a remainder block of 1)."""
    for chunk in (4, 5):
        monkeypatch.setattr(torch_scan, "chunk_length", lambda _: chunk)
        monkeypatch.setattr(chunks, "BLOCK_ELEMENTS", 2 * chunk * 3 * 2)
        assert_matches_ref(make_inputs(5, 2, length, 3, seed=length), True, torch.float64)


def test_non_contiguous_inputs_match_contiguous() -> None:
    inputs = make_inputs(3, 4, 50, 6)
    views = {}
    for name, value in inputs.items():
        if value.dim() == 1:
            views[name] = torch.stack([value, value], dim=-1)[:, 0]  # stride 2
        else:  # stored with the last axis outermost
            views[name] = value.transpose(-1, -2).contiguous().transpose(-1, -2)
    views["u"] = torch.stack([inputs["u"], inputs["u"]], dim=-1)[..., 0]  # stride 2 along l
    assert not any(v.is_contiguous() for v in views.values())
    y_views = selective_scan_torch(*(views[k] for k in NAMES), delta_softplus=True)
    y = selective_scan_torch(*(inputs[k] for k in NAMES), delta_softplus=True)
    torch.testing.assert_close(y_views, y, rtol=0, atol=0)
    assert_matches_ref(views, True, torch.float32)


def test_gradcheck_fp64(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_scan, "chunk_length", lambda _: 3)  # several chunks, odd and even
    for names, softplus in (((*NAMES,), True), (("u", "delta", "A", "B", "C"), False)):
        inputs = make_inputs(2, 3, 8, 2, softplus=softplus)
        args = tuple(inputs[k].clone().requires_grad_() if k in names else None for k in NAMES)
        assert torch.autograd.gradcheck(lambda *a: selective_scan_torch(*a, delta_softplus=softplus), args)


def test_only_some_inputs_require_grad() -> None:
    inputs = make_inputs(2, 3, 20, 4)
    u = inputs["u"].clone().requires_grad_()
    y = selective_scan_torch(u, *(inputs[k] for k in NAMES[1:]), delta_softplus=True)
    (grad,) = torch.autograd.grad(y.sum(), [u])
    u_ref = inputs["u"].clone().requires_grad_()
    y_ref = selective_scan_ref(u_ref, *(inputs[k] for k in NAMES[1:]), delta_softplus=True)
    (grad_ref,) = torch.autograd.grad(y_ref.sum(), [u_ref])
    torch.testing.assert_close(grad, grad_ref, **tolerance(torch.float64, "u"))


def test_no_grad_forward_equals_training_forward() -> None:
    inputs = {k: v.float() for k, v in make_inputs(2, 8, 100, 16).items()}
    with torch.no_grad():
        y_eval = selective_scan_torch(*(inputs[k] for k in NAMES), delta_softplus=True)
    y_train = selective_scan_torch(*(inputs[k].requires_grad_() for k in NAMES), delta_softplus=True)
    assert y_eval.grad_fn is None and y_train.grad_fn is not None
    torch.testing.assert_close(y_eval, y_train.detach(), rtol=0, atol=0)


def test_backward_keeps_chunk_states_not_the_state_history() -> None:
    b, d, l, n = 1, 32, 2000, 16
    inputs = {k: v.float().requires_grad_() for k, v in make_inputs(b, d, l, n).items()}
    y = selective_scan_torch(*(inputs[k] for k in NAMES), delta_softplus=True)
    saved = sum(t.numel() for t in y.grad_fn.saved_tensors if t is not None)
    # time-major copies of u, dt, sigmoid, z (4 b d l), B, C (2 b n l), A, D and one state per chunk
    n_chunks = -(-l // chunks.chunk_length(l))
    assert saved <= 4 * b * d * l + 2 * b * n * l + 2 * d * n + d + n_chunks * b * n * d
    assert saved < b * d * l * n / 2


def test_large_decay_is_finite_and_matches_ref() -> None:
    """|A| dt from 0.1 to 4e5: large decays underflow to an exact 0, and nothing becomes inf or NaN."""
    inputs = make_inputs(2, 4, 150, 8, delta_shift=2.0)
    inputs["A"] = -torch.logspace(-1, 4, 32, dtype=torch.float64).view(4, 8)
    inputs["delta"][:, :, ::7] = 40.0  # softplus above its linear threshold
    y, grads = run(selective_scan_torch, inputs, True, torch.float32, torch.ones(2, 4, 150, dtype=torch.float64))
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert_matches_ref(inputs, True, torch.float32)


def test_long_sequence_matches_ref_forward_and_directional_derivative() -> None:
    """l = 30000: output against the oracle; gradients against the oracle's central difference.

    The oracle's own backward is quadratic in l, so the gradient check is one directional derivative
    <grad, v> of sum(w * y) along a random v in all inputs, from two fp64 oracle forwards.
    """
    b, d, l, n = 1, 2, 30000, 4
    inputs = make_inputs(b, d, l, n, seed=3)
    w = torch.randn(b, d, l, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y, grads = run(selective_scan_torch, inputs, True, torch.float32, w)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())
    with torch.no_grad():
        torch.testing.assert_close(y, selective_scan_ref(*(inputs[k] for k in NAMES), delta_softplus=True),
                                   **tolerance(torch.float32, "y"))
        gen = torch.Generator().manual_seed(5)
        v = {k: torch.randn(x.shape, generator=gen, dtype=torch.float64) for k, x in inputs.items()}
        eps = 1e-5

        def loss(sign: float) -> torch.Tensor:
            shifted = [inputs[k] + sign * eps * v[k] for k in NAMES]
            return (w * selective_scan_ref(*shifted, delta_softplus=True)).sum()

        expected = (loss(1.0) - loss(-1.0)) / (2 * eps)
    actual = sum((grads[k] * v[k]).sum() for k in NAMES)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_matches_ref_on_cpu() -> None:
    inputs = make_inputs(2, 8, 300, 16)
    cuda = {k: v.float().cuda().requires_grad_() for k, v in inputs.items()}
    y = selective_scan_torch(*(cuda[k] for k in NAMES), delta_softplus=True)
    assert y.device.type == "cuda"
    y.backward(torch.ones_like(y))
    y_ref, grads_ref = run(selective_scan_ref, inputs, True, torch.float64, torch.ones(2, 8, 300, dtype=torch.float64))
    torch.testing.assert_close(y.double().cpu(), y_ref, **tolerance(torch.float32, "y"))
    for k in NAMES:
        torch.testing.assert_close(cuda[k].grad.double().cpu(), grads_ref[k], **tolerance(torch.float32, k))


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="needs an MPS device")
def test_mps_device_matches_cpu() -> None:
    inputs = {k: v.float() for k, v in make_inputs(2, 8, 300, 16).items()}
    y = selective_scan_torch(*(inputs[k].to("mps") for k in NAMES), delta_softplus=True)
    torch.testing.assert_close(y.cpu(), selective_scan_torch(*(inputs[k] for k in NAMES), delta_softplus=True),
                               rtol=1e-4, atol=1e-4)
