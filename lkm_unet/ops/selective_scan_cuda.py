"""The ``cuda`` scan backend: mamba-ssm's fused selective-scan kernel (``selective_scan_cuda``).

Importing this module imports mamba-ssm's compiled extension; the dispatcher only does so behind its
guard (:func:`lkm_unet.ops.selective_scan_backends.load`). The kernel keeps, per chunk of 2048 steps,
the running decay product and the state as ``(batch, dim, n_chunks, 2 * dstate)`` fp32 pairs, and its
backward also needs the output before the ``silu(z)`` gate when ``z`` is given: that is the third value
:func:`scan_fwd` returns (``SAVES_PRE_GATE``). The backward accumulates ``dA``, ``dB``, ``dC``, ``dD``
and ``ddelta_bias`` with atomics, so it is not bit-for-bit deterministic.
"""
from __future__ import annotations

from typing import Optional

import selective_scan_cuda  # mamba-ssm's extension module (absolute import: not this file)
from torch import Tensor

CHUNK = 2048  # steps per chunk of mamba-ssm's kernel (kNThreads * kNItems of its forward)
SAVES_PRE_GATE = True


def states_shape(batch: int, dim: int, seqlen: int, dstate: int) -> tuple[int, ...]:
    """``(batch, dim, n_chunks, 2 * dstate)``: mamba-ssm's ``x``, (decay product, state) per chunk."""
    return (batch, dim, -(-seqlen // CHUNK), 2 * dstate)


def _contiguous_last(x: Optional[Tensor]) -> Optional[Tensor]:
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, states, pre_gate)``; ``pre_gate`` is the ungated output when ``z`` is given, else empty."""
    u, delta, z = (_contiguous_last(t) for t in (u, delta, z))
    D = None if D is None else D.contiguous()
    # the kernel takes variable B and C as (b, groups, n, l); LKM-UNet uses one group
    B, C = _contiguous_last(B).unsqueeze(1), _contiguous_last(C).unsqueeze(1)
    out, states, *rest = selective_scan_cuda.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if z is None:
        return out, states, out.new_empty(0)
    return rest[0], states, out


def scan_bwd(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, states: Tensor,
             pre_gate: Optional[Tensor] = None) -> tuple[Optional[Tensor], ...]:
    """``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)`` in the inputs' dtypes; None for None inputs."""
    u, delta, z, dout = (_contiguous_last(t) for t in (u, delta, z, dout))
    D = None if D is None else D.contiguous()
    B4, C4 = _contiguous_last(B).unsqueeze(1), _contiguous_last(C).unsqueeze(1)
    out = pre_gate if z is not None else None
    du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = selective_scan_cuda.bwd(
        u, delta, A, B4, C4, D, z, delta_bias, dout, states, out, None, delta_softplus, False)
    dz = rest[0] if z is not None else None
    grads = (du, ddelta, dA, dB.squeeze(1), dC.squeeze(1), dD if D is not None else None, dz,
             ddelta_bias if delta_bias is not None else None)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return tuple(None if g is None else g.to(x.dtype) for g, x in zip(grads, inputs))
