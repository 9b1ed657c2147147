"""The chunk recurrences of the pure-PyTorch selective scan, forward and adjoint.

Layout (chosen by measurement on a 2-core CPU, see ``docs/benchmarks.md``): time-major inputs
``(l, b, d)`` / ``(l, b, n)`` and a state of shape ``(n, d)`` per batch row, so that one time step of a
block of ``bb`` batch rows is a contiguous ``(bb, n, d)`` slab with ``d`` innermost. Per chunk of ``T``
steps the decay ``exp(dt * A)`` and the input ``dt * B * u`` are written by single vectorised ops into
preallocated buffers; only the recurrence itself is a Python loop of in-place multiply-adds on per-step
views, two time steps per update (see :meth:`ChunkScan.run`).

Stability: every exponential is of one step's ``dt * A``, never of a cumulative sum, so nothing overflows
that the sequential oracle would not overflow too, and the adjoint multiplies only finite numbers (an
underflowed decay is an exact 0, never ``inf * 0``).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

# Elements in one (T, bb, n, d) chunk buffer: about 1M (4 MB in fp32) ran fastest; the buffers then
# stay in the L2/L3 caches between the vectorised passes and the per-step loop.
BLOCK_ELEMENTS = 1 << 20


def chunk_length(length: int) -> int:
    """Steps per chunk: longer chunks amortise the per-chunk ops on long sequences (measured best).

    Never more than ``length``, so that short sequences get more batch rows per block instead.
    """
    return min(length, 64 if length <= 4096 else 128)


def batch_blocks(batch: int, chunk: int, n: int, d: int) -> Iterator[tuple[int, int]]:
    """Batch row ranges ``[b0, b1)`` whose chunk buffers hold about :data:`BLOCK_ELEMENTS` elements."""
    rows = max(1, min(batch, BLOCK_ELEMENTS // max(chunk * n * d, 1)))
    for b0 in range(0, batch, rows):
        yield b0, min(batch, b0 + rows)


class ChunkScan:
    """Buffers for chunks of up to ``T`` steps of ``rows`` batch rows, and the recurrences on them.

    ``states[0]`` holds the state entering the chunk; after :meth:`run`, ``states[t + 1] = h_t`` for the
    chunk's local steps ``t``. The buffers and their per-step views are reused from chunk to chunk.
    """

    def __init__(self, like: Tensor, chunk: int, rows: int, n: int, d: int, adjoint: bool) -> None:
        self.decay = like.new_empty(chunk, rows, n, d)  # a_t = exp(dt_t * A)
        self.states = like.new_empty(chunk + 1, rows, n, d)
        self.pairs = like.new_empty(chunk // 2, rows, n, d)  # a_{2p} * a_{2p+1}
        self.dtu = like.new_empty(chunk, rows, d)  # dt_t * u_t
        # unbind once: making a view per step costs about as much as the multiply-add itself
        self.state_steps = self.states.unbind(0)
        self.pair_steps = self.pairs.unbind(0)
        if adjoint:
            self.grads = like.new_empty(chunk, rows, n, d)  # g_t = dL/dh_t
            self.grad_steps = self.grads.unbind(0)

    def run(self, dt: Tensor, u: Tensor, B: Tensor, AT: Tensor) -> Tensor:
        """States ``h_t: (T, bb, n, d)`` of the chunk from ``states[0]``.

        ``dt, u: (T, bb, d)``, ``B: (T, bb, n)``, ``AT: (n, d)`` (``A`` transposed).
        """
        steps = dt.shape[0]
        a, states = self.decay[:steps], self.states
        torch.mul(dt.unsqueeze(2), AT, out=a)
        a.exp_()
        dtu = torch.mul(dt, u, out=self.dtu[:steps])
        torch.mul(dtu.unsqueeze(2), B.unsqueeze(3), out=states[1 : steps + 1])  # b_t = dt_t B_t u_t
        # Two steps per sequential update halves the per-step dispatch overhead (the cost that dominates
        # small b * d): h_{2p+1} = (a_{2p+1} a_{2p}) h_{2p-1} + (b_{2p+1} + a_{2p+1} b_{2p}); the even
        # steps h_{2p} = a_{2p} h_{2p-1} + b_{2p} then follow in one vectorised pass.
        half = steps // 2
        torch.mul(a[1 : 2 * half : 2], a[0 : 2 * half : 2], out=self.pairs[:half])
        states[2 : 2 * half + 1 : 2].addcmul_(a[1 : 2 * half : 2], states[1 : 2 * half : 2])
        h, pair = self.state_steps, self.pair_steps
        for p in range(half):
            h[2 * p + 2].addcmul_(pair[p], h[2 * p])
        even = (steps + 1) // 2
        states[1 : 2 * even : 2].addcmul_(a[0 : 2 * even : 2], states[0 : 2 * even - 1 : 2])
        return states[1 : steps + 1]

    def reverse(self, dy: Tensor, C: Tensor, carry: Tensor) -> Tensor:
        """Adjoint states ``g_t = C_t dy_t + a_{t+1} g_{t+1}: (T, bb, n, d)`` after :meth:`run`.

        ``dy: (T, bb, d)`` is the gradient of ``<C_t, h_t>``, ``C: (T, bb, n)``. ``carry: (bb, n, d)``
        enters as ``a_T g_T`` from the chunk after this one and leaves as ``a_0 g_0`` for the one before.
        Paired like :meth:`run`: for odd ``t``, ``g_t = (c_t + a_{t+1} c_{t+1}) + (a_{t+1} a_{t+2}) g_{t+2}``
        reuses ``pairs``; the even steps follow in one vectorised pass.
        """
        steps = dy.shape[0]
        a, grads = self.decay[:steps], self.grads[:steps]
        torch.mul(dy.unsqueeze(2), C.unsqueeze(3), out=grads)  # c_t
        g, pair = self.grad_steps, self.pair_steps
        g[steps - 1].add_(carry)
        grads[1 : steps - 2 : 2].addcmul_(a[2 : steps - 1 : 2], grads[2 : steps - 1 : 2])
        top = steps - 1 if steps % 2 == 0 else steps - 2  # highest odd step
        if steps % 2 == 1 and steps > 1:
            g[top].addcmul_(a[top + 1], g[top + 1])
        for t in range(top - 2, 0, -2):
            g[t].addcmul_(pair[(t + 1) // 2], g[t + 2])
        grads[0 : steps - 1 : 2].addcmul_(a[1:steps:2], grads[1:steps:2])
        torch.mul(a[0], g[0], out=carry)
        return grads
