"""The triton scan backend against the fp64 oracle: values, every input's gradient, dtypes, chunk edges.

On a machine without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set
here before the kernels are first imported), on tiny shapes with chunks of 16 steps, so that ``l`` covers
one step, a partial chunk, and more than two chunks. With a CUDA device the same tests run compiled.

Tolerances (``rtol, atol`` against ``selective_scan_ref`` in fp64 on the same rounded inputs), as in
tests/ops/test_selective_scan.py with fp16 added:

| input dtype | y, all gradients | why                                               |
|-------------|------------------|---------------------------------------------------|
| fp32        | 6e-4, 2e-3       | mamba-ssm's fp32 figures (du, ddelta: 1e-3, 4e-3) |
| fp16        | 3e-3, 5e-3       | fp32 compute, results rounded to fp16 (2^-11)     |
| bf16        | 2e-2, 5e-2       | fp32 compute, results rounded to bf16 (2^-8)      |
"""
from __future__ import annotations

import functools
import importlib.util
import itertools
import os
import sys

import pytest
import torch

from test_selective_scan import NAMES, OPTIONAL, assert_matches_ref, make_inputs, run

ON_GPU = torch.cuda.is_available()
if not sys.platform.startswith("linux"):
    pytest.skip("the triton backend is tested on Linux only (triton ships Linux wheels)", allow_module_level=True)
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install -e '.[dev]' installs it on Linux)", allow_module_level=True)
if not ON_GPU:
    if "lkm_unet.ops.selective_scan_triton_kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton kernels were compiled for a GPU earlier in this process", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, i.e. first imported

from lkm_unet.ops import selective_scan, selective_scan_ref  # noqa: E402
from lkm_unet.ops import selective_scan_triton as triton_scan  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
scan = functools.partial(selective_scan, backend="triton")


@pytest.fixture(autouse=True)
def small_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 16 steps and 4-channel blocks, so tiny shapes cross chunk and block edges."""
    monkeypatch.setattr(triton_scan, "MAX_CHUNK", 16)
    monkeypatch.setattr(triton_scan, "TARGET_PROGRAMS", 1)
    monkeypatch.setattr(triton_scan, "MAX_BLOCK_D", 4)


def check(inputs: dict, softplus: bool, dtype: torch.dtype) -> None:
    """The triton backend against the fp64 oracle, both on ``DEVICE``, from the same rounded inputs."""
    assert_matches_ref({k: None if v is None else v.to(DEVICE) for k, v in inputs.items()}, softplus, dtype, fn=scan)


def test_backend_is_used_not_a_fallback() -> None:
    from lkm_unet.ops.selective_scan import resolve_backend

    assert resolve_backend("triton", torch.device(DEVICE)) == "triton"


@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize("present", list(itertools.product([False, True], repeat=3)),
                         ids=lambda p: "+".join(k for k, on in zip(OPTIONAL, p) if on) or "bare")
def test_fp32_matches_ref_every_option(present: tuple[bool, ...], softplus: bool) -> None:
    inputs = make_inputs(2, 3, 37, 2, softplus=softplus)  # 37 = two chunks of 16 and a remainder of 5
    for name, on in zip(OPTIONAL, present):
        if not on:
            inputs[name] = None
    check(inputs, softplus, torch.float32)


@pytest.mark.parametrize("shape", [(2, 3, 1, 4), (1, 2, 16, 3), (1, 5, 20, 2), (1, 4, 50, 3), (1, 2, 5, 64)],
                         ids=lambda s: "b{}-d{}-l{}-n{}".format(*s))
def test_matches_ref_shapes(shape: tuple[int, int, int, int]) -> None:
    """l = 1, exactly one chunk, a partial second chunk, four chunks; d not a multiple of the block;
    d_state = 64."""
    check(make_inputs(*shape, seed=sum(shape)), True, torch.float32)


def test_one_channel_blocks_and_long_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launch a thin sequence gets on a GPU: one channel per program, one long chunk."""
    monkeypatch.setattr(triton_scan, "TARGET_PROGRAMS", 10**6)
    monkeypatch.setattr(triton_scan, "MAX_CHUNK", 64)
    assert triton_scan.plan(1, 3, 40) == (1, 1, 64)
    check(make_inputs(1, 3, 40, 4, seed=7), True, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_half_results_and_gradients(dtype: torch.dtype) -> None:
    check(make_inputs(2, 3, 21, 4, seed=11), True, dtype)


def test_bf16_activations_with_fp32_parameters_keep_each_dtype() -> None:
    """mamba keeps A, D and delta_bias in fp32 while the activations are bf16."""
    inputs = make_inputs(1, 3, 20, 4, seed=5)
    leaves = {k: v.to(DEVICE, torch.float32 if k in ("A", "D", "delta_bias") else torch.bfloat16).requires_grad_()
              for k, v in inputs.items()}
    y = scan(*(leaves[k] for k in NAMES), delta_softplus=True)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16
    assert {k: v.grad.dtype for k, v in leaves.items()} == {k: v.dtype for k, v in leaves.items()}
    y_ref = selective_scan(*(leaves[k].detach().double() for k in NAMES), delta_softplus=True, backend="ref")
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=5e-2)


def test_backward_is_deterministic_and_keeps_only_chunk_states() -> None:
    b, d, l, n = 1, 3, 40, 2
    inputs = {k: v.to(DEVICE, torch.float32).requires_grad_() for k, v in make_inputs(b, d, l, n, seed=2).items()}
    grads = []
    for _ in range(2):
        y = scan(*(inputs[k] for k in NAMES), delta_softplus=True)
        grads.append(torch.autograd.grad(y, list(inputs.values()), torch.ones_like(y)))
    for first, second in zip(*grads):
        assert torch.equal(first, second)
    y = scan(*(inputs[k] for k in NAMES), delta_softplus=True)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    states = [t for t in saved if t.dim() == 4]
    assert [tuple(t.shape) for t in states] == [triton_scan.states_shape(b, d, l, n)] == [(b, d, 3, n)]
    assert states[0].dtype == torch.float32
    # the inputs and the chunk-start states, nothing of size (b, d, l, n)
    assert sum(t.numel() for t in saved) == sum(x.numel() for x in inputs.values()) + states[0].numel()


def test_large_decay_is_finite_and_matches_ref() -> None:
    """|A| dt up to 4e5: decays underflow to an exact 0 and nothing becomes inf or NaN."""
    inputs = make_inputs(1, 4, 20, 4, delta_shift=2.0)
    inputs["A"] = -torch.logspace(-1, 4, 16, dtype=torch.float64).view(4, 4)
    inputs["delta"][:, :, ::7] = 40.0  # softplus above its linear threshold
    inputs = {k: v.float().double() for k, v in inputs.items()}  # the oracle sees the fp32 values
    y, grads = run(scan, {k: v.to(DEVICE) for k, v in inputs.items()}, True, torch.float32,
                   torch.ones(1, 4, 20, dtype=torch.float64, device=DEVICE))
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())
    y_ref, grads_ref = run(selective_scan_ref, inputs, True, torch.float64, torch.ones(1, 4, 20, dtype=torch.float64))
    torch.testing.assert_close(y.cpu(), y_ref, rtol=6e-4, atol=2e-3)
    for name in grads:
        torch.testing.assert_close(grads[name].cpu(), grads_ref[name], rtol=1e-3, atol=4e-3, msg=name)



def test_opcheck_and_fullgraph_compile_with_the_triton_backend() -> None:
    inputs = {k: v.to(DEVICE, torch.float32) for k, v in make_inputs(1, 2, 18, 2, seed=9).items()}
    args = tuple(inputs[k] for k in NAMES)
    torch.library.opcheck(torch.ops.lkm_unet.selective_scan_fwd.default, (*args, True, "triton"),
                          test_utils=("test_schema", "test_faketensor"))
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: scan(*a, delta_softplus=True), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), scan(*args, delta_softplus=True), rtol=0, atol=0)


def test_self_test_accepts_these_kernels_and_refuses_a_wrong_one(monkeypatch):
    """auto picks triton only after its forward and backward agree with the torch scan on the device."""
    from lkm_unet.ops import selective_scan_backends as backends
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert backends._triton_compiles.__wrapped__(device) == "ok"
    real_fwd = triton_scan.scan_fwd
    monkeypatch.setattr(triton_scan, "scan_fwd", lambda *args: (lambda out, states: (out * 1.01, states))(*real_fwd(*args)))
    message = backends._triton_compiles.__wrapped__(device)
    assert message.startswith(f"its self-test on {device} disagrees with the torch scan (worst relative difference 1.0e-02")
