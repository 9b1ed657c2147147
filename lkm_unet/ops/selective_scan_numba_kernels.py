"""The numba kernels of the fused CPU selective scan: forward, and the backward that recomputes chunks.

Imported only by :mod:`lkm_unet.ops.selective_scan_numba` (numba is imported here, at module level, so
``import lkm_unet`` never imports it). Compiled on first use and cached on disk (``cache=True``).

Layout: one batch row ``(b, d)`` is a sequence; its state ``h: (n,)`` lives in a small local array and
the innermost loops run over the state axis ``n`` with unit stride, so that the exponentials and
multiply-adds of one time step are SIMD lanes. ``B`` and ``C`` come in time-major per batch,
``(b, l, n)``, for the same reason.

Exponentials: a scalar libm ``exp`` per ``(b, d, l, n)`` element does not vectorise and costs as much as
the rest of the kernel several times over, so fp32 uses :func:`exp_poly`, a Cody-Waite range reduction
and a degree-6 polynomial (about 2 ulp on the range the scan uses) written with plain arithmetic and a
bit cast, which LLVM vectorises over ``n``. fp64 uses ``math.exp`` (fp64 is for checks, not speed).

Denormals: decays ``a = exp(dt A)`` below ``exp(-lo)`` are set to exact zeros and states or adjoints whose
magnitude falls below ``tiny`` are flushed to zero after every step (``lo, tiny`` per dtype in
:data:`FLUSH`), so that ``a * h`` stays a normal number or an exact zero and no multiply ever takes the
slow denormal path, without changing the process's floating-point mode. Both cut-offs are far below
what the dtype resolves next to values of order one (fp32: decays under 1e-13, states under 1e-24).
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

# dtype -> (lo, tiny): a = 0 where dt * A < -lo; |h|, |g| < tiny -> 0. exp(-lo) * tiny stays a normal
# number (fp32: 9.4e-14 * 1e-24 > 1.2e-38; fp64: 5.1e-131 * 1e-150 > 2.2e-308).
FLUSH = {np.dtype(np.float32): (30.0, 1e-24), np.dtype(np.float64): (300.0, 1e-150)}
# Cephes' expf minimax coefficients for exp(r) = 1 + r + r^2 p(r) on |r| <= ln(2) / 2
_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


@intrinsic
def _int32_as_float32(typingctx, bits):
    """Reinterpret the bits of an int32 as a float32 (no conversion)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(inline="always", fastmath=True)
def exp_poly(x):
    """exp(x) for fp32 x, branch-free so that a loop of it vectorises. x is clamped to [-86, 88]: the
    result stays a normal number (exp(-86) ~ 4e-38; exp(89) would overflow)."""
    x = max(min(x, np.float32(88.0)), np.float32(-86.0))
    k = np.floor(x * np.float32(1.44269504) + np.float32(0.5))  # x = k ln2 + r, |r| <= ln2 / 2
    r = x - k * np.float32(0.693359375) - k * np.float32(-2.12194440e-4)  # ln2 in two parts
    p = np.float32(_P[0])
    p = p * r + np.float32(_P[1])
    p = p * r + np.float32(_P[2])
    p = p * r + np.float32(_P[3])
    p = p * r + np.float32(_P[4])
    p = p * r + np.float32(_P[5])
    e = r * r * p + r + np.float32(1.0)
    return e * _int32_as_float32((np.int32(k) + np.int32(127)) << np.int32(23))  # e * 2^k


def decay(x):
    """exp(x) in the scan's dtype; replaced per dtype below (numba overload)."""


@overload(decay, inline="always", fastmath=True)
def _decay_impl(x):
    if x == types.float32:
        return lambda x: exp_poly(x)
    return lambda x: math.exp(x)


@njit(inline="always", fastmath=True)
def sigmoid(x, one):
    return one / (one + decay(-x))


@njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def scan_fwd_kernel(dt, u, z, A, Bt, Ct, D, consts, out, states, chunk):
    """``out = (<C_t, h_t> + D u_t) silu(z_t)`` and ``states[b, d, c] = h`` entering chunk ``c``.

    ``dt, u, z, out: (b, d, l)`` (``z`` with a last axis of size 0 when there is no gate), ``A: (d, n)``,
    ``Bt, Ct: (b, l, n)``, ``D: (d,)``, ``states: (b, d, ceil(l / chunk), n)`` (size 0 on the last axis to
    keep none), ``consts = (-lo, tiny, 0, 1)`` (typed constants: a
    Python literal would promote fp32 arithmetic to fp64).
    """
    batch, dim, length = u.shape
    n = A.shape[1]
    keep = states.shape[3] > 0
    gated = z.shape[2] > 0
    neg_lo, tiny, zero, one = consts[0], consts[1], consts[2], consts[3]
    for row in prange(batch * dim):
        bi, di = row // dim, row % dim
        h = np.zeros(n, dtype=u.dtype)
        for t0 in range(0, length, chunk):
            if keep:
                states[bi, di, t0 // chunk, :] = h
            for t in range(t0, min(length, t0 + chunk)):
                dtv = dt[bi, di, t]
                dtu = dtv * u[bi, di, t]
                acc = zero
                for k in range(n):
                    x = dtv * A[di, k]
                    a = decay(x) if x >= neg_lo else zero
                    hk = a * h[k] + dtu * Bt[bi, t, k]
                    hk = hk if abs(hk) >= tiny else zero
                    h[k] = hk
                    acc += hk * Ct[bi, t, k]
                out[bi, di, t] = acc + D[di] * u[bi, di, t]
        if gated:  # a separate pass over t, so that the gate's exponentials vectorise too
            for t in range(length):
                out[bi, di, t] *= z[bi, di, t] * sigmoid(z[bi, di, t], one)


@njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def scan_bwd_kernel(dt, u, z, raw, A, Bt, Ct, D, dout, states, consts, chunk, groups,
                    du, ddt, dz, dA, dD, ddelta_bias, dB, dC):
    """Adjoint of :func:`scan_fwd_kernel`, recomputing each chunk's states from ``states``.

    Inputs as the forward, plus ``raw: (b, d, l)`` = delta + delta_bias before the softplus (last axis of
    size 0 without softplus) and ``dout: (b, d, l)``. Writes ``du, ddt, dz: (b, d, l)`` (``ddt`` w.r.t. the
    raw delta), per-row partial sums ``dA: (b, d, n)``, ``dD, ddelta_bias: (b, d)``, and
    ``dB, dC: (groups, b, l, n)``: channel group ``g`` adds into slice ``g`` only, so the (batch row,
    channel group) jobs run in parallel without races. With ``dy = dout silu(z)``,
    ``g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}`` and ``x_t = g_t a_t h_{t-1}``:
    ``du = dt sum_n g B + D dy``, ``ddt = u sum_n g B + sum_n x A``, ``dB_t = sum_d g dt u``,
    ``dC_t = sum_d h dy``, ``dA = sum_t x dt``.
    """
    batch, dim, length = u.shape
    n = A.shape[1]
    n_chunks = states.shape[2]
    gated = z.shape[2] > 0
    softplus = raw.shape[2] > 0
    neg_lo, tiny, zero, one = consts[0], consts[1], consts[2], consts[3]
    per_group = (dim + groups - 1) // groups
    for job in prange(batch * groups):
        bi, grp = job // groups, job % groups
        hist = np.empty((chunk + 1, n), dtype=u.dtype)  # h entering the chunk, then h_t per step
        decays = np.empty((chunk, n), dtype=u.dtype)
        ga = np.empty(n, dtype=u.dtype)  # a_{t+1} g_{t+1}, carried backwards across chunks
        g = np.empty(n, dtype=u.dtype)  # g_t
        dy = np.empty(chunk, dtype=u.dtype)  # per step of the chunk: dout silu(z), sigmoid(z), pre-gate y,
        zsig = np.empty(chunk, dtype=u.dtype)  # sum_n g B and sum_n x A
        y = np.empty(chunk, dtype=u.dtype)
        s_b = np.empty(chunk, dtype=u.dtype)
        s_a = np.empty(chunk, dtype=u.dtype)
        for di in range(grp * per_group, min(dim, (grp + 1) * per_group)):
            ga[:] = zero
            dA_row = dA[bi, di]
            dD_acc = zero
            dbias_acc = zero
            for c in range(n_chunks - 1, -1, -1):
                t0 = c * chunk
                steps = min(length, t0 + chunk) - t0
                for j in range(steps):
                    if gated:
                        zs = sigmoid(z[bi, di, t0 + j], one)
                        zsig[j] = zs
                        dy[j] = dout[bi, di, t0 + j] * z[bi, di, t0 + j] * zs
                    else:
                        dy[j] = dout[bi, di, t0 + j]
                hist[0, :] = states[bi, di, c, :]
                for j in range(steps):  # recompute the chunk's states and pre-gate output
                    t = t0 + j
                    dtv = dt[bi, di, t]
                    dtu = dtv * u[bi, di, t]
                    acc = zero
                    for k in range(n):
                        x = dtv * A[di, k]
                        a = decay(x) if x >= neg_lo else zero
                        decays[j, k] = a
                        hk = a * hist[j, k] + dtu * Bt[bi, t, k]
                        hk = hk if abs(hk) >= tiny else zero
                        hist[j + 1, k] = hk
                        acc += hk * Ct[bi, t, k]
                    y[j] = acc
                for j in range(steps - 1, -1, -1):  # the adjoint, backwards
                    t = t0 + j
                    dtv = dt[bi, di, t]
                    dyv = dy[j]
                    dtu = dtv * u[bi, di, t]
                    sb = zero
                    sa = zero
                    for k in range(n):
                        gk = ga[k] + Ct[bi, t, k] * dyv
                        gk = gk if abs(gk) >= tiny else zero
                        dC[grp, bi, t, k] += hist[j + 1, k] * dyv
                        dB[grp, bi, t, k] += gk * dtu
                        sb += gk * Bt[bi, t, k]
                        gak = gk * decays[j, k]
                        xk = gak * hist[j, k]
                        sa += xk * A[di, k]
                        dA_row[k] += xk * dtv
                        ga[k] = gak
                    s_b[j] = sb
                    s_a[j] = sa
                for j in range(steps):  # elementwise epilogue over the chunk's steps (vectorises over t)
                    t = t0 + j
                    uv = u[bi, di, t]
                    du[bi, di, t] = dt[bi, di, t] * s_b[j] + D[di] * dy[j]
                    dD_acc += dy[j] * uv
                    gdt = uv * s_b[j] + s_a[j]
                    if softplus:
                        gdt *= sigmoid(raw[bi, di, t], one)
                    ddt[bi, di, t] = gdt
                    dbias_acc += gdt
                    if gated:
                        zv = z[bi, di, t]
                        zs = zsig[j]
                        dz[bi, di, t] = dout[bi, di, t] * (y[j] + D[di] * uv) * zs * (one + zv * (one - zs))
            dD[bi, di] = dD_acc
            ddelta_bias[bi, di] = dbias_acc
