"""Mamba's depthwise causal conv1d and SiLU, fused for the CPU (numba): forward, and a backward that
recomputes the pre-activation instead of storing it.

``y = silu(bias + sum_i w[:, i] x[t - (k - 1) + i])`` per channel, zeros before the sequence start: what
``silu(F.conv1d(x, w[:, None], bias, padding=k - 1, groups=d)[..., :l])`` computes. oneDNN's depthwise
conv1d backward takes about 20 ns per element on the 2-core CPU (docs/benchmarks.md); these kernels run
each ``(batch, channel)`` row as one job on all cores with the time loop vectorised. Imported only by
:mod:`lkm_unet.ops.causal_conv1d` when numba is installed, so ``import lkm_unet`` never imports numba.

Arithmetic is fp32, or fp64 for fp64 inputs (the SiLU's exp as in the scan kernels).
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from lkm_unet.ops.selective_scan_numba_kernels import exp_any


@njit(inline="always")
def _pre_activation(xr, wr, b, out):
    """``out[t] = b + sum_i wr[i] xr[t - (k - 1) + i]`` for one row ``xr`` of taps ``wr``: one pass over the
    row per tap (tap ``i`` starts at step ``k - 1 - i``). Each pass indexes shifted views from 0, so the
    indices are provably non-negative and the loop vectorises (indexing ``xr[t - shift]`` does not: numba's
    negative-index wraparound makes it 3x slower)."""
    length = xr.shape[0]
    k = wr.shape[0]
    for t in range(length):
        out[t] = b
    for i in range(k):
        shift = min(k - 1 - i, length)
        wi, src, dst = wr[i], xr[:length - shift], out[shift:]
        for t in range(length - shift):
            dst[t] += wi * src[t]


@njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def conv_silu_fwd_kernel(x, w, bias, one, y):
    """``y = silu(conv(x))``; ``x, y: (b, d, l)``, ``w: (d, k)``, ``bias: (d,)``, ``one``: 1 in the dtype."""
    batch, dim, length = x.shape
    for job in prange(batch * dim):
        bi, di = job // dim, job % dim
        yr = y[bi, di]
        _pre_activation(x[bi, di], w[di], bias[di], yr)
        for t in range(length):
            p = yr[t]
            yr[t] = p / (one + exp_any(-p))


@njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def conv_silu_bwd_kernel(x, w, bias, dy, one, dx, dw, dbias):
    """Gradients of :func:`conv_silu_fwd_kernel` for ``dy: (b, d, l)``: ``dx: (b, d, l)`` and the per-batch-row
    partial sums ``dw: (b, d, k)``, ``dbias: (b, d)`` (one job per row writes its own slice)."""
    batch, dim, length = x.shape
    k = w.shape[1]
    for job in prange(batch * dim):
        bi, di = job // dim, job % dim
        xr, dyr, dxr, wr = x[bi, di], dy[bi, di], dx[bi, di], w[di]
        g = np.empty(length, dtype=x.dtype)
        _pre_activation(xr, wr, bias[di], g)
        total = one - one
        for t in range(length):  # g = dy * silu'(pre)
            p = g[t]
            s = one / (one + exp_any(-p))
            gt = dyr[t] * s * (one + p * (one - s))
            g[t] = gt
            total += gt
        dbias[bi, di] = total
        for i in range(k):  # dw[i] = sum_t g[t] x[t - (k - 1) + i]
            shift = min(k - 1 - i, length)
            src, gs = xr[:length - shift], g[shift:]
            acc = one - one
            for t in range(length - shift):
                acc += gs[t] * src[t]
            dw[bi, di, i] = acc
        for t in range(length):
            dxr[t] = one - one
        for i in range(k):  # dx[s] += w[i] g[s + k - 1 - i] for the steps s whose tap lies inside the row
            shift = min(k - 1 - i, length)
            wi, dst, gs = wr[i], dxr[:length - shift], g[shift:]
            for t in range(length - shift):
                dst[t] += wi * gs[t]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dense(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.detach().to(dtype).contiguous().numpy()


def conv_silu_fwd(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``silu(causal depthwise conv1d)``: ``x: (b, d, l)``, ``weight: (d, k)``, ``bias: (d,)`` -> ``(b, d, l)``
    in ``x``'s dtype."""
    dtype = _compute_dtype(x)
    y = torch.empty(x.shape, dtype=dtype)
    conv_silu_fwd_kernel(_dense(x, dtype), _dense(weight, dtype), _dense(bias, dtype),
                         np.array(1, dtype=y.numpy().dtype)[()], y.numpy())
    return y.to(x.dtype)


def conv_silu_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` for ``dy: (b, d, l)``, each in its input's dtype."""
    dtype = _compute_dtype(x)
    batch, dim, length = x.shape
    dx = torch.empty(x.shape, dtype=dtype)
    dw = torch.empty(batch, dim, weight.shape[1], dtype=dtype)
    db = torch.empty(batch, dim, dtype=dtype)
    conv_silu_bwd_kernel(_dense(x, dtype), _dense(weight, dtype), _dense(bias, dtype), _dense(dy, dtype),
                         np.array(1, dtype=dx.numpy().dtype)[()], dx.numpy(), dw.numpy(), db.numpy())
    return dx.to(x.dtype), dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype)
