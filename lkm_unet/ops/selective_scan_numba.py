"""Fused CPU selective scan (numba): forward and backward kernels parallel over (batch row, channel block).

The scan backend functions of the dispatcher's contract (``states_shape``, ``scan_fwd``, ``scan_bwd``)
with the semantics of :func:`lkm_unet.ops.selective_scan_ref.selective_scan_ref`. Each job runs the
recurrence of one batch row and :data:`~lkm_unet.ops.selective_scan_numba_kernels.LANES` channels in one
pass, with their states in a local array (no Python per step); the forward keeps the
state entering every chunk of :data:`CHUNK` steps and the backward recomputes one chunk at a time, so
memory stays ``O(b d l)``. The kernels are in :mod:`lkm_unet.ops.selective_scan_numba_kernels`;
this module prepares their inputs' layouts in torch and reduces their partial sums. numba is
imported with the kernels; the dispatcher imports this module only when the numba backend is chosen, so
``import lkm_unet`` does not import numba.

Arithmetic is fp32, or fp64 for fp64 inputs; gradients come back in each input's dtype.
"""
from __future__ import annotations

from typing import Optional

import numba
import torch
from torch import Tensor

from lkm_unet.ops import selective_scan_numba_kernels as kernels

# Steps per chunk between saved states: the backward's recompute buffers, (CHUNK + 1) x n x LANES and
# CHUNK x n x LANES, stay in a 512 KiB L2 for n = 16 (2 x 128 KiB in fp32), and the saved states are
# 1/CHUNK of the (b, d, l, n) history. Measured fwd+bwd against 32: 0.93-0.96x at l >= 64 (fewer chunk
# starts; the same at l = 16), while 128 was no faster than 64.
CHUNK = 64


def states_shape(batch: int, dim: int, seqlen: int, dstate: int) -> tuple[int, ...]:
    """Shape of the chunk-start states :func:`scan_fwd` returns: ``(b, ceil(l / CHUNK) - 1, n, d)`` for
    ``l >= 1``, the state entering every chunk after the first (the first starts from zero; at ``l <= CHUNK``
    nothing is kept)."""
    return (batch, (seqlen - 1) // CHUNK, dstate, dim)  # integer arithmetic: sizes may be symbolic


def _compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _dense(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.detach().to(dtype).contiguous()


def _operands(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              z: Optional[Tensor], delta_bias: Optional[Tensor]) -> dict[str, Tensor]:
    """The kernels' inputs in the compute dtype, contiguous: ``delta, u, z: (b, d, l)``, ``bias: (d,)``,
    ``At: (n, d)``, ``Bt, Ct: (b, l, n)``, ``D: (d,)`` and the typed constants. The kernels add the bias
    and apply the softplus per tile. An absent ``z`` is an empty ``(b, d, 0)`` array, absent ``D`` and
    ``delta_bias`` zeros."""
    dtype = _compute_dtype(u)
    batch, dim, _ = u.shape
    return {
        "delta": _dense(delta, dtype), "u": _dense(u, dtype),
        "bias": torch.zeros(dim, dtype=dtype) if delta_bias is None else _dense(delta_bias, dtype),
        "z": torch.empty(batch, dim, 0, dtype=dtype) if z is None else _dense(z, dtype),
        "At": _dense(A.t(), dtype), "Bt": _swap_last_axes(_dense(B, dtype)), "Ct": _swap_last_axes(_dense(C, dtype)),
        "D": torch.zeros(dim, dtype=dtype) if D is None else _dense(D, dtype),
        "consts": torch.tensor([0.0, 1.0], dtype=dtype),
    }


def _np(*tensors: Tensor) -> list:
    return [t.numpy() for t in tensors]


def _swap_last_axes(x: Tensor) -> Tensor:
    """Contiguous ``(b, c, r)`` from contiguous ``(b, r, c)``: numba's square transposes, several times
    faster than torch's strided copy of ``x.transpose(1, 2)``."""
    out = x.new_empty(x.shape[0], x.shape[2], x.shape[1])
    kernels.swap_last_axes(x.numpy(), out.numpy())
    return out


def scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool) -> tuple[Tensor, Tensor]:
    """``(out, states)``: ``out: (b, d, l)`` in ``u``'s dtype, ``states`` of shape :func:`states_shape`.

    ``u, delta, z: (b, d, l)``, ``A: (d, n)``, ``B, C: (b, n, l)``, ``D, delta_bias: (d,)``. ``states``
    is in the compute dtype (fp32; fp64 for fp64 inputs, so that the fp64 backward stays exact).
    """
    op = _operands(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    out = torch.empty(batch, dim, length, dtype=op["u"].dtype)
    states = torch.empty(states_shape(batch, dim, length, A.shape[1]), dtype=op["u"].dtype)
    kernels.scan_fwd_kernel(op["delta"].numpy(), op["bias"].numpy(), bool(delta_softplus),
                            *_np(op["u"], op["z"], op["At"], op["Bt"], op["Ct"], op["D"], op["consts"], out, states),
                            CHUNK, numba.get_num_threads())
    return out.to(u.dtype), states


def channel_blocks(dim: int) -> int:
    """Channel blocks per batch row: the parallel jobs are (batch row, block) pairs, each with its own
    dB, dC partial sums of shape ``(b, l, n)``."""
    return -(-dim // kernels.LANES)


def scan_bwd(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, states: Tensor,
             ) -> tuple[Optional[Tensor], ...]:
    """``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)`` for ``dout: (b, d, l)``; None for absent inputs."""
    op = _operands(u, delta, A, B, C, D, z, delta_bias)
    dtype = op["u"].dtype
    batch, dim, length = u.shape
    n = A.shape[1]
    blocks = channel_blocks(dim)
    du, ddt = torch.empty(batch, dim, length, dtype=dtype), torch.empty(batch, dim, length, dtype=dtype)
    dz = torch.empty(batch, dim, length if z is not None else 0, dtype=dtype)
    dA = torch.empty(batch, n, dim, dtype=dtype)
    dD, ddelta_bias = torch.empty(batch, dim, dtype=dtype), torch.empty(batch, dim, dtype=dtype)
    dB, dC = torch.empty(blocks, batch, length, n, dtype=dtype), torch.empty(blocks, batch, length, n, dtype=dtype)
    kernels.scan_bwd_kernel(
        op["delta"].numpy(), op["bias"].numpy(), bool(delta_softplus),
        *_np(op["u"], op["z"], op["At"], op["Bt"], op["Ct"], op["D"], _dense(dout, dtype), _dense(states, dtype),
             op["consts"]),
        CHUNK, *_np(du, ddt, dz, dA, dD, ddelta_bias, dB, dC), numba.get_num_threads())

    def summed(partial: Tensor) -> Tensor:
        return partial[0] if len(partial) == 1 else partial.sum(0)

    def reduced(partial: Tensor, like: Optional[Tensor]) -> Optional[Tensor]:
        return None if like is None else summed(partial).to(like.dtype)

    # dB, dC back as contiguous (b, n, l), as B and C usually are; swapped in the compute dtype (numba's)
    dB, dC = (_swap_last_axes(summed(partial)).to(like.dtype) for partial, like in ((dB, B), (dC, C)))
    return (du.to(u.dtype), ddt.to(delta.dtype), reduced(dA, A).t(), dB, dC, reduced(dD, D),
            None if z is None else dz.to(z.dtype), reduced(ddelta_bias, delta_bias))
