"""Triton kernels of the selective scan, forward and backward (see :mod:`lkm_unet.ops.selective_scan_triton`).

One program owns one batch row and a block of ``BLOCK_D`` channels. It walks the sequence in chunks of
``CHUNK`` steps; a chunk is a ``(BLOCK_D, CHUNK)`` tile loaded along ``l`` (coalesced), and for each of
the ``DSTATE`` states the recurrence ``h_t = a_t h_{t-1} + b_t`` over the chunk is one parallel
``tl.associative_scan`` of ``(a, b)`` pairs, started from the chunk-start state. So the state lives in
registers one ``(BLOCK_D, CHUNK)`` slice at a time, never as a ``(b, d, l, n)`` history in memory.

The forward writes every chunk-start state (``states``, ``(b, d, n_chunks, n)`` fp32) and reads it back
for the next chunk. The backward walks the chunks in reverse: it recomputes the chunk's states from
``states``, runs the adjoint ``g_t = C_t dy_t + a_{t+1} g_{t+1}`` as a reverse scan, and carries ``g`` at
the chunk's first step to the chunk before through a small double-buffered scratch. Reductions over
programs (dA, dB, dC, dD, ddelta_bias) are written as per-program partial sums that the caller adds up
with torch: no atomics, so the backward is deterministic.

A value a program stores and later reloads may be held by other threads of the program, so each chunk
ends with a barrier (``tl.debug_barrier``) before the next chunk reads it.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _sum(x, axis: tl.constexpr):
    # tl.sum and tl.sigmoid are jit functions of triton's standard library: under TRITON_INTERPRET=1 they
    # work only if triton itself was imported with the variable set, which torch (importing triton from
    # torch._dynamo) does not allow a test to arrange. These local twins have no such condition.
    return tl.reduce(x, axis, _add)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _softplus(x):
    # log1p(exp(x)) as torch computes it (linear above 20); log(w) * y / (w - 1) is an accurate log1p(y)
    y = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + y
    log1p = tl.where(w == 1.0, y, tl.log(w) * y / (w - 1.0))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _time_step(delta_ptr, offs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """``(dt, d dt / d raw)`` for a tile; zero outside ``mask`` (a zero step neither decays nor feeds)."""
    raw = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias[:, None]
    if SOFTPLUS:
        dt = _softplus(raw)
        slope = _sigmoid(raw)
    else:
        dt = raw
        slope = tl.full(raw.shape, 1.0, tl.float32)
    return tl.where(mask, dt, 0.0), slope


@triton.jit
def scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, states_ptr,
                    dim, length, n_chunks,
                    DSTATE: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, HAS_D: tl.constexpr,
                    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    d_offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d_offs < dim
    t_loc = tl.arange(0, CHUNK)
    rows = (pid_b * dim + d_offs) * length  # (b, d, 0) of u, delta, z, out
    bc_row = pid_b * DSTATE * length  # (b, 0, 0) of B, C
    st_rows = (pid_b * dim + d_offs) * n_chunks * DSTATE  # (b, d, 0, 0) of states
    Dv = tl.load(D_ptr + d_offs, mask=d_mask, other=0.0).to(tl.float32) if HAS_D else 0.0
    bias = tl.load(bias_ptr + d_offs, mask=d_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    c = 0
    while c < n_chunks:
        t = c * CHUNK + t_loc
        t_mask = t < length
        mask = d_mask[:, None] & t_mask[None, :]
        offs = rows[:, None] + t[None, :]
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dt, _ = _time_step(delta_ptr, offs, mask, bias, HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        y = tl.full((BLOCK_D, CHUNK), 0.0, tl.float32)
        for n in range(DSTATE):
            a_n = tl.load(A_ptr + d_offs * DSTATE + n, mask=d_mask, other=0.0).to(tl.float32)
            B_n = tl.load(B_ptr + bc_row + n * length + t, mask=t_mask, other=0.0).to(tl.float32)
            C_n = tl.load(C_ptr + bc_row + n * length + t, mask=t_mask, other=0.0).to(tl.float32)
            h0 = tl.load(states_ptr + st_rows + c * DSTATE + n, mask=d_mask, other=0.0)
            decay_prod, inputs = tl.associative_scan((tl.exp(dt * a_n[:, None]), dtu * B_n[None, :]), 1, _combine)
            h = decay_prod * h0[:, None] + inputs
            y += h * C_n[None, :]
            h_last = _sum(tl.where(t_loc[None, :] == CHUNK - 1, h, 0.0), 1)
            tl.store(states_ptr + st_rows + (c + 1) * DSTATE + n, h_last,
                     mask=d_mask & (d_offs * 0 + c + 1 < n_chunks))
        if HAS_D:
            y += u * Dv[:, None]
        if HAS_Z:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y *= z * _sigmoid(z)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # the chunk-start states just stored are read by the next chunk
        c += 1


@triton.jit
def scan_bwd_kernel(dout_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr,
                    du_ptr, ddelta_ptr, dz_ptr, dA_part_ptr, dB_part_ptr, dC_part_ptr, dD_part_ptr, dbias_part_ptr,
                    carry_ptr, batch, dim, length, n_chunks,
                    DSTATE: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, HAS_D: tl.constexpr,
                    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d_offs < dim
    t_loc = tl.arange(0, CHUNK)
    rows = (pid_b * dim + d_offs) * length
    bc_row = pid_b * DSTATE * length
    st_rows = (pid_b * dim + d_offs) * n_chunks * DSTATE  # states and the dA partials share this layout
    part_row = (pid_d * batch + pid_b) * DSTATE * length  # this program's (n, l) slab of dB, dC partials
    carry_row = (pid_b * dim + d_offs) * DSTATE  # + parity * batch * dim * DSTATE
    parity_stride = batch * dim * DSTATE
    Dv = tl.load(D_ptr + d_offs, mask=d_mask, other=0.0).to(tl.float32) if HAS_D else 0.0
    bias = tl.load(bias_ptr + d_offs, mask=d_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    dD_acc = tl.full((BLOCK_D,), 0.0, tl.float32)
    dbias_acc = tl.full((BLOCK_D,), 0.0, tl.float32)
    c = n_chunks - 1
    while c >= 0:
        t = c * CHUNK + t_loc
        t_mask = t < length
        mask = d_mask[:, None] & t_mask[None, :]
        offs = rows[:, None] + t[None, :]
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dt, slope = _time_step(delta_ptr, offs, mask, bias, HAS_BIAS, SOFTPLUS)
        # the adjoint runs backwards in time and needs the decay of the following step, a_{t+1}
        next_mask = d_mask[:, None] & (t + 1 < length)[None, :]
        dt_next, _ = _time_step(delta_ptr, offs + 1, next_mask, bias, HAS_BIAS, SOFTPLUS)
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            z_sig = _sigmoid(z)
            dy = dout * z * z_sig  # gradient of the pre-gate output
            y = tl.full((BLOCK_D, CHUNK), 0.0, tl.float32)
        else:
            dy = dout
        dtu = dt * u
        du = tl.full((BLOCK_D, CHUNK), 0.0, tl.float32)
        ddt = tl.full((BLOCK_D, CHUNK), 0.0, tl.float32)
        read = carry_ptr + ((c + 1) % 2) * parity_stride + carry_row
        write = carry_ptr + (c % 2) * parity_stride + carry_row
        for n in range(DSTATE):
            a_n = tl.load(A_ptr + d_offs * DSTATE + n, mask=d_mask, other=0.0).to(tl.float32)
            B_n = tl.load(B_ptr + bc_row + n * length + t, mask=t_mask, other=0.0).to(tl.float32)
            C_n = tl.load(C_ptr + bc_row + n * length + t, mask=t_mask, other=0.0).to(tl.float32)
            h0 = tl.load(states_ptr + st_rows + c * DSTATE + n, mask=d_mask, other=0.0)
            b_in = dtu * B_n[None, :]
            decay_prod, inputs = tl.associative_scan((tl.exp(dt * a_n[:, None]), b_in), 1, _combine)
            h = decay_prod * h0[:, None] + inputs
            a_next = tl.where(next_mask, tl.exp(dt_next * a_n[:, None]), 0.0)
            g_prod, g_in = tl.associative_scan((a_next, dy * C_n[None, :]), 1, _combine, reverse=True)
            g_after = tl.load(read + n, mask=d_mask, other=0.0)  # g at the next chunk's first step
            g = g_in + g_prod * g_after[:, None]
            tl.store(write + n, _sum(tl.where(t_loc[None, :] == 0, g, 0.0), 1), mask=d_mask)
            gB = g * B_n[None, :]
            x = g * (h - b_in)  # g_t a_t h_{t-1}, without dividing by a possibly underflowed a_t
            du += gB
            ddt += gB * u + x * a_n[:, None]
            if HAS_Z:
                y += h * C_n[None, :]
            tl.store(dA_part_ptr + st_rows + c * DSTATE + n, _sum(x * dt, 1), mask=d_mask)
            tl.store(dB_part_ptr + part_row + n * length + t, _sum(g * dtu, 0), mask=t_mask)
            tl.store(dC_part_ptr + part_row + n * length + t, _sum(h * dy, 0), mask=t_mask)
        du *= dt
        if HAS_D:
            du += dy * Dv[:, None]
            dD_acc += _sum(dy * u, 1)
        if HAS_Z:
            if HAS_D:
                y += u * Dv[:, None]
            tl.store(dz_ptr + offs, (dout * y * z_sig * (1.0 + z * (1.0 - z_sig))).to(dz_ptr.dtype.element_ty),
                     mask=mask)
        ddt = tl.where(mask, ddt * slope, 0.0)
        dbias_acc += _sum(ddt, 1)
        tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + offs, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # the carried adjoint just stored is read by the chunk before
        c -= 1
    if HAS_D:
        tl.store(dD_part_ptr + pid_b * dim + d_offs, dD_acc, mask=d_mask)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + pid_b * dim + d_offs, dbias_acc, mask=d_mask)
