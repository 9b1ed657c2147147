"""The numba backend of the selective scan against the sequential oracle: values, gradients, stability.

Same tolerance table and inputs as the torch backend's tests (``test_selective_scan.py``, mamba-ssm's
fp32 figures). The first run compiles the kernels (tens of seconds); later runs load numba's disk cache.
"""
from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("numba", reason="the numba backend needs numba (pip install 'numba>=0.60,<0.69')")

import lkm_unet.ops.selective_scan_numba as numba_scan  # noqa: E402
from lkm_unet.ops import selective_scan, selective_scan_ref  # noqa: E402
from test_selective_scan import NAMES, OPTIONAL, assert_matches_ref, make_inputs, run, tolerance  # noqa: E402


def numba_backend(*args, **kwargs) -> torch.Tensor:
    return selective_scan(*args, **kwargs, backend="numba")


@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize("present", list(itertools.product([False, True], repeat=3)),
                         ids=lambda p: "+".join(k for k, on in zip(OPTIONAL, p) if on) or "bare")
def test_fp32_matches_ref_every_option(present: tuple[bool, ...], softplus: bool) -> None:
    inputs = make_inputs(2, 3, 67, 4, softplus=softplus)  # 67 = a chunk of 64 and a remainder of 3
    for name, on in zip(OPTIONAL, present):
        if not on:
            inputs[name] = None
    assert_matches_ref(inputs, softplus, torch.float32, fn=numba_backend)


@pytest.mark.parametrize("shape", [(2, 3, 1, 4), (1, 4, 2, 16), (3, 5, 130, 16), (1, 2, 4096, 4), (3, 40, 70, 4)],
                         ids=lambda s: "b{}-d{}-l{}-n{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_ref_shapes(shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    # d = 40: a full block of 32 channels and a partial one of 8 per batch row, so that each thread's
    # buffers go from a full block to a partial one and back (the padding lanes must read zeros again)
    assert_matches_ref(make_inputs(*shape), True, dtype, fn=numba_backend)


def test_all_threads_give_what_one_thread_gives() -> None:
    """Jobs are split into one contiguous run per thread, each thread with its own buffers: all of numba's
    threads and a single one give bit-identical outputs and gradients (b = 5, d = 40: ten jobs, full and
    partial channel blocks in turn)."""
    numba = pytest.importorskip("numba")
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here")
    inputs = {k: v.float() for k, v in make_inputs(5, 40, 45, 4).items()}
    before = numba.get_num_threads()
    results = []
    for count in (numba.config.NUMBA_NUM_THREADS, 1):
        numba.set_num_threads(count)
        try:
            leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
            y = numba_backend(*(leaves.get(k) for k in NAMES), delta_softplus=True)
            y.backward(torch.ones_like(y))
            results.append([y.detach()] + [leaves[k].grad for k in sorted(leaves)])
        finally:
            numba.set_num_threads(before)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transpose_block_moves_one_square_and_nothing_else(dtype: torch.dtype) -> None:
    """One square from rows of a (b, d, l) array into a time-major tile and back, at offsets inside both
    arrays: the tile's square is the transposed rows exactly, every element around it is untouched."""
    from numba import njit

    from lkm_unet.ops.selective_scan_numba_kernels import BLOCK, LANES, transpose_block

    @njit
    def move(src, src_start, src_stride, dst, dst_start, dst_stride):
        transpose_block(src, src_start, src_stride, dst, dst_start, dst_stride)

    src = torch.randn(2, 40, 37, dtype=dtype)
    tile = torch.full((3 * BLOCK, LANES), -7.0, dtype=dtype)
    bi, d0, t0, j0, w0 = 1, 5, 19, 17, 16  # unaligned rows, a square in the tile's second half of lanes
    move(src.numpy(), (bi * 40 + d0) * 37 + t0, 37, tile.numpy(), j0 * LANES + w0, LANES)
    want = torch.full_like(tile, -7.0)
    want[j0:j0 + BLOCK, w0:w0 + BLOCK] = src[bi, d0:d0 + BLOCK, t0:t0 + BLOCK].t()
    assert torch.equal(tile, want)
    back = torch.zeros_like(src)
    move(tile.numpy(), j0 * LANES + w0, LANES, back.numpy(), (bi * 40 + d0) * 37 + t0, 37)
    want_back = torch.zeros_like(src)
    want_back[bi, d0:d0 + BLOCK, t0:t0 + BLOCK] = src[bi, d0:d0 + BLOCK, t0:t0 + BLOCK]
    assert torch.equal(back, want_back)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 16, 1600), (3, 37, 21), (1, 5, 3), (2, 1600, 16)])
def test_swap_last_axes_equals_torch_transpose(shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    """B and C into the kernels' layout and dB, dC back: whole squares and the rows and columns after
    them (sizes not multiples of 16) give exactly ``x.transpose(1, 2)``, contiguous."""
    x = torch.randn(*shape, dtype=dtype)
    got = numba_scan._swap_last_axes(x)
    assert got.is_contiguous() and torch.equal(got, x.transpose(1, 2))


def test_gradients_of_B_and_C_come_back_contiguous() -> None:
    """dB and dC leave the backward as contiguous (b, n, l) tensors, so autograd keeps them as they are
    instead of copying a transposed view into B's and C's layout."""
    inputs = {k: v.float() for k, v in make_inputs(2, 40, 70, 16).items()}
    args = [inputs[k] for k in NAMES]
    out, states = numba_scan.scan_fwd(*args, True)
    grads = dict(zip(NAMES, numba_scan.scan_bwd(torch.ones_like(out), *args, True, states)))
    for name in ("B", "C"):
        assert grads[name].shape == (2, 16, 70) and grads[name].is_contiguous(), name


@pytest.mark.parametrize("steps", [1, 15, 16, 33, 48])
@pytest.mark.parametrize("width", [32, 7])
def test_gather_and_scatter_move_a_chunk_exactly(steps: int, width: int) -> None:
    """A chunk of ``steps`` steps of ``width`` channel rows into a time-major tile and back: whole squares
    and the steps after them (full block), or element by element (partial block); lanes past ``width``
    and steps past ``steps`` keep the tile's zeros, and the scatter writes that chunk only."""
    from numba import njit

    from lkm_unet.ops.selective_scan_numba_kernels import LANES, _gather, _scatter

    @njit
    def round_trip(src, bi, d0, width, t0, steps, tile, dst):
        _gather(src, bi, d0, width, t0, steps, tile)
        _scatter(tile, bi, d0, width, t0, steps, dst)

    src = torch.randn(2, 45, 60)
    tile, dst = torch.zeros(48, LANES), torch.zeros_like(src)
    bi, d0, t0 = 1, 45 - width, 60 - steps
    round_trip(src.numpy(), bi, d0, width, t0, steps, tile.numpy(), dst.numpy())
    want = torch.zeros_like(tile)
    want[:steps, :width] = src[bi, d0:d0 + width, t0:t0 + steps].t()
    assert torch.equal(tile, want)
    want_dst = torch.zeros_like(src)
    want_dst[bi, d0:d0 + width, t0:t0 + steps] = src[bi, d0:d0 + width, t0:t0 + steps]
    assert torch.equal(dst, want_dst)


def test_fp64_without_options_matches_ref() -> None:
    inputs = make_inputs(2, 3, 70, 5, softplus=False)
    for name in OPTIONAL:
        inputs[name] = None
    assert_matches_ref(inputs, False, torch.float64, fn=numba_backend)


def test_bf16_activations_with_fp32_parameters() -> None:
    inputs = make_inputs(2, 4, 70, 8)
    assert_matches_ref(inputs, True, torch.bfloat16, fn=numba_backend)
    leaves = {k: v.to(torch.float32 if k in ("A", "D", "delta_bias") else torch.bfloat16).requires_grad_()
              for k, v in inputs.items()}
    y = numba_backend(*(leaves[k] for k in NAMES), delta_softplus=True)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16
    assert {k: v.grad.dtype for k, v in leaves.items()} == {k: v.dtype for k, v in leaves.items()}


def test_gradcheck_fp64(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(numba_scan, "CHUNK", 3)  # several chunks, and a partial last one
    for names, softplus in (((*NAMES,), True), (("u", "delta", "A", "B", "C"), False)):
        inputs = make_inputs(2, 3, 8, 2, softplus=softplus)
        args = tuple(inputs[k].clone().requires_grad_() if k in names else None for k in NAMES)
        assert torch.autograd.gradcheck(lambda *a: numba_backend(*a, delta_softplus=softplus), args)


@pytest.mark.parametrize("length", [130, 65, 64, 1])
def test_states_are_the_states_entering_each_chunk_after_the_first(length: int) -> None:
    """The forward keeps h entering chunks 1, 2, ... (chunk 0 starts from zero, so it is not kept): at
    l = 130 the states after steps 64 and 128 of an fp64 recurrence, within fp32 tolerance; at
    l <= CHUNK = 64 none."""
    inputs = {k: v.float() for k, v in make_inputs(2, 3, length, 4).items()}
    out, states = numba_scan.scan_fwd(*(inputs[k] for k in NAMES), True)
    chunks = (length - 1) // numba_scan.CHUNK
    assert states.shape == numba_scan.states_shape(2, 3, length, 4) == (2, chunks, 4, 3)
    assert states.dtype == torch.float32
    x = {k: v.double() for k, v in inputs.items()}
    dt = torch.nn.functional.softplus(x["delta"] + x["delta_bias"][:, None])  # (b, d, l)
    h = torch.zeros(2, 3, 4, dtype=torch.float64)  # (b, d, n)
    want = []
    for t in range(length):
        if t > 0 and t % numba_scan.CHUNK == 0:
            want.append(h.transpose(1, 2))  # kept as (b, n, d)
        h = torch.exp(dt[..., t, None] * x["A"]) * h + (dt[..., t] * x["u"][..., t])[..., None] * x["B"][:, None, :, t]
    if chunks:
        torch.testing.assert_close(states.double(), torch.stack(want, 1), rtol=1e-5, atol=1e-5)


def test_long_sequence_matches_torch_backend() -> None:
    """l = 30000 (the oracle's backward is too slow there): output and every gradient against the torch
    backend, both fp32, within the fp32 tolerance."""
    inputs = make_inputs(1, 3, 30000, 16, seed=3)
    w = torch.randn(1, 3, 30000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y, grads = run(numba_backend, inputs, True, torch.float32, w)
    y_torch, grads_torch = run(lambda *a, **k: selective_scan(*a, **k, backend="torch"), inputs, True,
                               torch.float32, w)
    torch.testing.assert_close(y, y_torch, **tolerance(torch.float32, "y"))
    for name in NAMES:
        torch.testing.assert_close(grads[name], grads_torch[name], **tolerance(torch.float32, name),
                                   msg=lambda m: f"d{name}: {m}")


def test_large_decay_is_finite_and_matches_ref() -> None:
    """|A| dt from 0.1 to 4e5: large decays become exact zeros, and nothing becomes inf or NaN."""
    inputs = make_inputs(2, 4, 150, 8, delta_shift=2.0)
    inputs["A"] = -torch.logspace(-1, 4, 32, dtype=torch.float64).view(4, 8)
    inputs["delta"][:, :, ::7] = 40.0  # softplus above its linear threshold
    y, grads = run(numba_backend, inputs, True, torch.float32, torch.ones(2, 4, 150, dtype=torch.float64))
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert_matches_ref(inputs, True, torch.float32, fn=numba_backend)


def test_in_kernel_softplus_matches_torch_in_fp32() -> None:
    """The kernels form softplus(delta + bias) per tile with a polynomial exp and log1p (fp32): within a
    few fp32 ulps of torch's softplus from -80 to 80, and exactly x above torch's threshold of 20."""
    from numba import njit

    from lkm_unet.ops.selective_scan_numba_kernels import softplus

    @njit
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = softplus(x[i])

    x = torch.cat([torch.linspace(-80, 80, 200_001), torch.tensor([0.0, 1e-6, -1e-6, 20.0, 25.0])])
    out = torch.empty_like(x)
    apply(x.numpy(), out.numpy())
    want = torch.nn.functional.softplus(x.double())
    rel = ((out.double() - want).abs() / want.abs()).max()
    assert rel < 4e-7, f"relative error {rel:.1e}"
    assert torch.equal(out[x > 20], x[x > 20])


def test_polynomial_exp_relative_error() -> None:
    """The fp32 exponential of the decays: within 2.5e-7 of fp64's exp for |x| < 20 and 4e-7 on its whole
    range [-86, 88] (a dense grid and random points), clamped to normal numbers outside it."""
    import numpy as np
    from numba import njit

    from lkm_unet.ops.selective_scan_numba_kernels import exp_poly

    @njit(fastmath=True)
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = exp_poly(x[i])

    x = np.concatenate([np.linspace(-86, 88, 2_000_001, dtype=np.float32),
                        np.random.default_rng(0).uniform(-86, 88, 1_000_000).astype(np.float32)])
    out = np.empty_like(x)
    apply(x, out)
    rel = np.abs(out.astype(np.float64) / np.exp(x.astype(np.float64)) - 1)
    assert rel[np.abs(x) < 20].max() < 2.5e-7 and rel.max() < 4e-7, f"relative error {rel.max():.2e}"
    beyond = np.array([-1e4, -100.0, 100.0, 1e4], dtype=np.float32)
    clamped = np.empty_like(beyond)
    apply(beyond, clamped)
    assert np.allclose(clamped, np.exp(np.array([-86.0, -86.0, 88.0, 88.0])), rtol=4e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_softplus_and_its_derivative_share_one_exponential(dtype: torch.dtype) -> None:
    """The backward's (softplus(x), sigmoid(x)) from one exp(-|x|): the softplus equals the forward's
    bit for bit, and sigmoid(x) is within a few ulps of torch's fp64 sigmoid on both sides of 0."""
    from numba import njit

    from lkm_unet.ops.selective_scan_numba_kernels import softplus, softplus_grad

    @njit
    def apply(x, one, sp, sig, sp_fwd):
        for i in range(x.shape[0]):
            sp[i], sig[i] = softplus_grad(x[i], one[0])
            sp_fwd[i] = softplus(x[i])

    x = torch.cat([torch.linspace(-80, 80, 200_001), torch.tensor([0.0, 1e-6, -1e-6, 20.0, 25.0])]).to(dtype)
    sp, sig, sp_fwd = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    apply(x.numpy(), torch.ones(1, dtype=dtype).numpy(), sp.numpy(), sig.numpy(), sp_fwd.numpy())
    assert torch.equal(sp, sp_fwd)
    want = torch.sigmoid(x.double())
    rel = ((sig.double() - want).abs() / want).max()
    assert rel < (4e-7 if dtype == torch.float32 else 1e-15), f"relative error {rel:.1e}"


def test_decaying_states_never_become_denormal() -> None:
    """One input at t = 0, then pure decay by exp(-0.5) per step: the oracle's fp32 state passes through
    the denormal range (below 1.2e-38) around step 175; the kernel's states, adjoints and outputs are
    either normal numbers or exact zeros, and still match the oracle."""
    b, d, l, n = 1, 2, 400, 4
    u = torch.zeros(b, d, l, dtype=torch.float64)
    u[:, :, 0] = 1.0
    ones = {"dtype": torch.float64}
    inputs = {"u": u, "delta": torch.ones(b, d, l, **ones), "A": torch.full((d, n), -0.5, **ones),
              "B": torch.ones(b, n, l, **ones), "C": torch.ones(b, n, l, **ones), "D": None, "z": None,
              "delta_bias": None}
    grad_out = torch.zeros(b, d, l, dtype=torch.float64)
    grad_out[:, :, -1] = 1.0  # the adjoint decays backwards from the last step in the same way
    y, grads = run(numba_backend, inputs, False, torch.float32, grad_out)
    smallest_normal = torch.finfo(torch.float32).tiny
    for name, value in {"y": y, **grads}.items():
        value = value.float()
        assert not bool(((value != 0) & (value.abs() < smallest_normal)).any()), name
    assert bool((y[..., 1:] <= y[..., :-1]).all()) and bool((y[..., -1] == 0).all())  # decays to an exact 0
    y_ref = selective_scan_ref(*(inputs[k] for k in NAMES), delta_softplus=False)
    assert bool(((y_ref > 0) & (y_ref < smallest_normal)).any())  # the oracle's values pass through that range
    torch.testing.assert_close(y, y_ref, **tolerance(torch.float32, "y"))


def test_callers_floating_point_mode_is_untouched() -> None:
    """The kernels turn on flush-to-zero only while their own runs last: after a forward and a backward on
    every numba thread, numpy and torch in this thread and a numba loop on the same threads still give the
    denormal 1e-38 for the normal 2e-38 halved, not 0."""
    import numba
    import numpy as np

    @numba.njit(parallel=True)
    def halve_on_every_thread(x):
        out = np.empty_like(x)
        for i in numba.prange(x.shape[0]):
            out[i] = x[i] * np.float32(0.5)
        return out

    assert numba.get_num_threads() >= 2
    inputs = {k: v.float().requires_grad_() for k, v in make_inputs(4, 64, 100, 16).items()}  # 8 jobs
    numba_backend(*(inputs[k] for k in NAMES), delta_softplus=True).sum().backward()
    tiny = np.float32(2e-38)  # above the smallest normal, 1.18e-38
    assert tiny * np.float32(0.5) != 0
    assert bool((torch.full((8,), 2e-38) * 0.5 != 0).all())
    halved = halve_on_every_thread(np.full(64 * numba.get_num_threads(), tiny))
    assert bool((halved != 0).all()), f"{int((halved == 0).sum())} of {halved.size} flushed"


def test_fp_mode_switch_is_a_no_op_off_x86(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the CPU has no MXCSR the mode switch compiles to nothing: it returns 0 and a following
    multiply still gives a denormal."""
    import numba
    import numpy as np

    from lkm_unet.ops import selective_scan_numba_kernels as kernels

    monkeypatch.setattr(kernels, "_X86", False)

    @numba.njit
    def halve_between_switches(x):
        mode = kernels.denormals_off()
        out = x * np.float32(0.5)
        kernels.restore_fp_mode(mode)
        return mode, out

    mode, out = halve_between_switches(np.float32(2e-38))
    assert mode == 0 and out != 0


def test_no_grad_forward_equals_training_forward() -> None:
    inputs = {k: v.float() for k, v in make_inputs(2, 8, 100, 16).items()}
    with torch.no_grad():
        y_eval = numba_backend(*(inputs[k] for k in NAMES), delta_softplus=True)
    y_train = numba_backend(*(inputs[k].requires_grad_() for k in NAMES), delta_softplus=True)
    torch.testing.assert_close(y_eval, y_train.detach(), rtol=0, atol=0)


_SUBPROCESS = textwrap.dedent("""
    import os, sys, warnings
    if sys.argv[1] == "blocked":
        sys.modules["numba"] = None  # as if numba were not installed
    import torch, lkm_unet
    from lkm_unet.ops import selective_scan
    from lkm_unet.ops.selective_scan import resolve_backend
    print("numba imported by import lkm_unet:", "numba" in sys.modules and sys.modules["numba"] is not None)
    print("auto on cpu:", resolve_backend("auto", torch.device("cpu")))
    os.environ["LKM_UNET_SCAN_BACKEND"] = "numba"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        print("env numba:", resolve_backend("auto", torch.device("cpu")))
    print("warnings:", " | ".join(str(w.message) for w in caught))
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(1, 2, 5, generator=g), torch.rand(1, 2, 5, generator=g), -torch.rand(2, 3, generator=g),
         torch.randn(1, 3, 5, generator=g), torch.randn(1, 3, 5, generator=g)]
    print("finite:", bool(torch.isfinite(selective_scan(*x, backend="numba")).all()))
""")


@pytest.mark.parametrize("numba_state", ["installed", "blocked"])
def test_auto_env_and_fallback_without_numba(numba_state: str) -> None:
    result = subprocess.run([sys.executable, "-c", _SUBPROCESS, numba_state], capture_output=True, text=True,
                            check=True)
    lines = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    assert lines["numba imported by import lkm_unet"] == "False"
    assert lines["finite"] == "True"
    if numba_state == "installed":
        assert lines["auto on cpu"] == lines["env numba"] == "numba"
        assert lines["warnings"] == ""
    else:
        assert lines["auto on cpu"] == lines["env numba"] == "torch"
        assert "backend 'numba' cannot run on cpu tensors here (numba: numba is not installed" in lines["warnings"]
        assert "using the torch backend" in lines["warnings"]
