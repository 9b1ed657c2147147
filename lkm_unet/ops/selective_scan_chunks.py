"""Chunk kernels of the pure-PyTorch selective scan: the forward recurrence and its adjoint.

Layout (chosen by measurement on a 2-core CPU, see ``docs/benchmarks.md``): time-major inputs
``(l, b, d)`` / ``(l, b, n)`` and a state of shape ``(n, d)`` per batch row, so that one time step of a
batch block is a contiguous ``(bb, n, d)`` slab with ``d`` innermost. Per chunk of ``T`` steps the decay
``exp(dt * A)`` and the input ``dt * B * u`` are written by single vectorised ops into preallocated
buffers; only the recurrence itself is a Python loop of one in-place multiply-add per step. Batch rows
are processed in blocks so that a chunk buffer stays cache-sized.

Stability: every exponential is of a single step's ``dt * A``, never of a cumulative sum, so nothing
overflows that the sequential oracle would not overflow too, and the backward multiplies only finite
numbers (an underflowed decay is an exact 0, not ``inf * 0``).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch import Tensor

# Target number of elements in one (T, bb, n, d) chunk buffer (~4 MB in fp32: fits the L2/L3 caches
# well enough; 1M was the measured sweet spot, larger blocks ran slower).
BLOCK_ELEMENTS = 1 << 20


def chunk_length(length: int) -> int:
    """Steps per chunk: longer chunks amortise the per-chunk ops over more steps on long sequences."""
    return 64 if length <= 4096 else 128


def _blocks(batch: int, per_row: int) -> Iterator[tuple[int, int]]:
    """Batch row ranges ``[b0, b1)`` whose chunk buffers hold about :data:`BLOCK_ELEMENTS` elements."""
    rows = max(1, min(batch, BLOCK_ELEMENTS // max(per_row, 1)))
    for b0 in range(0, batch, rows):
        yield b0, min(batch, b0 + rows)


class _Buffers:
    """Chunk buffers ``(T, bb, n, d)`` with their per-step views, reused across chunks of one block."""

    def __init__(self, like: Tensor, chunk: int, rows: int, n: int, d: int, adjoint: bool) -> None:
        self.decay = like.new_empty(chunk, rows, n, d)  # exp(dt_t * A)
        self.states = like.new_empty(chunk + 1, rows, n, d)  # [h_{t0-1}, h_t0, ..., h_{t0+T-1}]
        # unbind once: indexing a view per step costs as much as the multiply-add itself
        self.decay_steps = self.decay.unbind(0)
        self.state_steps = self.states.unbind(0)
        if adjoint:
            self.grads = like.new_empty(chunk, rows, n, d)  # dL/dh_t
            self.grad_steps = self.grads.unbind(0)


def _buffers(cache: dict, like: Tensor, chunk: int, rows: int, n: int, d: int, adjoint: bool) -> _Buffers:
    if rows not in cache:  # at most two sizes: the full block and the remainder
        cache[rows] = _Buffers(like, chunk, rows, n, d, adjoint)
    return cache[rows]


def _run_chunk(buf: _Buffers, dt: Tensor, dtu: Tensor, B: Tensor, AT: Tensor) -> None:
    """Fill ``buf.states[1:T+1]`` with the chunk's states, given ``buf.states[0]`` (the state before).

    ``dt, dtu: (T, bb, d)``, ``B: (T, bb, n)``, ``AT: (n, d)``.
    """
    steps = dt.shape[0]
    decay = buf.decay[:steps]
    torch.mul(dt.unsqueeze(2), AT, out=decay)
    decay.exp_()
    torch.mul(dtu.unsqueeze(2), B.unsqueeze(3), out=buf.states[1 : steps + 1])
    h, a = buf.state_steps, buf.decay_steps
    for t in range(steps):
        h[t + 1].addcmul_(a[t], h[t])


def scan_forward(
    dt: Tensor, dtu: Tensor, B: Tensor, C: Tensor, AT: Tensor, keep_starts: bool
) -> tuple[Tensor, Optional[Tensor]]:
    """Chunked forward scan in time-major layout.

    ``dt, dtu: (l, b, d)`` (``dtu = dt * u``), ``B, C: (l, b, n)``, ``AT: (n, d)`` (``A`` transposed).
    Returns ``ys: (l, b, d)`` with ``ys_t = <C_t, h_t>`` and, if ``keep_starts``, the state entering each
    chunk, ``(ceil(l / T), b, n, d)`` -- all the backward needs to recompute the chunk.
    """
    length, batch, d = dt.shape
    n = AT.shape[0]
    chunk = chunk_length(length)
    n_chunks = math.ceil(length / chunk)
    ys = dt.new_empty(length, batch, d)
    starts = dt.new_empty(n_chunks, batch, n, d) if keep_starts else None
    cache: dict = {}
    for b0, b1 in _blocks(batch, chunk * n * d):
        buf = _buffers(cache, dt, chunk, b1 - b0, n, d, adjoint=False)
        buf.states[0].zero_()
        for c in range(n_chunks):
            t0, t1 = c * chunk, min(length, (c + 1) * chunk)
            if starts is not None:
                starts[c, b0:b1] = buf.states[0]
            _run_chunk(buf, dt[t0:t1, b0:b1], dtu[t0:t1, b0:b1], B[t0:t1, b0:b1], AT)
            states = buf.states[1 : t1 - t0 + 1]
            # ys_t = <C_t, h_t>: one batched (1 x n) @ (n x d) product per step, all steps at once
            ys[t0:t1, b0:b1] = torch.matmul(C[t0:t1, b0:b1].unsqueeze(2), states).squeeze(2)
            buf.states[0].copy_(buf.states[t1 - t0])
    return ys, starts


def scan_backward(
    dt: Tensor, dtu: Tensor, B: Tensor, C: Tensor, AT: Tensor, starts: Tensor, dys: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Adjoint of :func:`scan_forward`, recomputing each chunk's states from its start state.

    Inputs as in :func:`scan_forward` plus ``starts: (n_chunks, b, n, d)`` and ``dys: (l, b, d)``, the
    gradient of ``ys``. With ``g_t = dL/dh_t = C_t dys_t + exp(dt_{t+1} A) g_{t+1}`` and
    ``x_t = g_t * exp(dt_t A) * h_{t-1}``, returns (all time-major):

    - ``s: (l, b, d)``, ``sum_n g_t B_t`` (so ``dL/du += dt * s`` and ``dL/ddt += u * s``),
    - ``xa: (l, b, d)``, ``sum_n x_t A`` (the part of ``dL/ddt`` through the decay),
    - ``dB, dC: (l, b, n)`` and ``dAT: (n, d)``.
    """
    length, batch, d = dt.shape
    n = AT.shape[0]
    chunk = chunk_length(length)
    n_chunks = starts.shape[0]
    s = torch.empty_like(dt)
    xa = torch.empty_like(dt)
    dB = torch.empty_like(B)
    dC = torch.empty_like(C)
    dAT = torch.zeros_like(AT)
    cache: dict = {}
    for b0, b1 in _blocks(batch, chunk * n * d):
        buf = _buffers(cache, dt, chunk, b1 - b0, n, d, adjoint=True)
        carry = dt.new_zeros(b1 - b0, n, d)  # exp(dt_{t1} A) * g_{t1}, from the chunk after this one
        for c in reversed(range(n_chunks)):
            t0, t1 = c * chunk, min(length, (c + 1) * chunk)
            steps = t1 - t0
            rows = (slice(t0, t1), slice(b0, b1))
            buf.states[0].copy_(starts[c, b0:b1])
            _run_chunk(buf, dt[rows], dtu[rows], B[rows], AT)
            grads, decay = buf.grads[:steps], buf.decay[:steps]
            torch.mul(dys[rows].unsqueeze(2), C[rows].unsqueeze(3), out=grads)
            g, a = buf.grad_steps, buf.decay_steps
            g[steps - 1].add_(carry)
            for t in range(steps - 2, -1, -1):
                g[t].addcmul_(a[t + 1], g[t + 1])
            torch.mul(a[0], g[0], out=carry)
            s[rows] = torch.matmul(B[rows].unsqueeze(2), grads).squeeze(2)
            # x_t = g_t * exp(dt_t A) * h_{t-1}, written over the decay buffer (no longer needed).
            # The contractions below are elementwise products + sums into free buffers: batched
            # matrix-vector products ran 3-4x slower than that on CPU.
            x = decay.mul_(grads).mul_(buf.states[:steps])
            dB[rows] = torch.mul(grads, dtu[rows].unsqueeze(2), out=grads).sum(dim=3)
            states = buf.states[1 : steps + 1]
            dC[rows] = states.mul_(dys[rows].unsqueeze(2)).sum(dim=3)
            xa[rows] = torch.mul(x, AT, out=grads).sum(dim=2)
            dAT += x.mul_(dt[rows].unsqueeze(2)).sum(dim=(0, 1))
    return s, xa, dB, dC, dAT
