"""The sequential selective scan: the oracle every faster backend is tested against.

Structured like mamba-ssm's ``selective_scan_ref``: discretise every step at once, then loop over the
sequence. Its autograd backward is slow and memory-hungry for long sequences; it exists to be obviously
right, not fast.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Selective scan (Mamba-1, Gu & Dao 2023, Algorithm 2) as a plain loop.

    Shapes: ``u, delta, z: (b, d, l)``, ``A: (d, n)``, ``B, C: (b, n, l)``, ``D, delta_bias: (d,)``.
    Returns ``y: (b, d, l)`` in the dtype of ``u``; the arithmetic runs in fp32 (or fp64 for fp64 inputs).

        dt_t = softplus(delta_t + delta_bias)          (softplus only if delta_softplus)
        h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   h_0 = 0
        y_t  = <C_t, h_t> + D * u_t;   y = y * silu(z) if z is given
    """
    dtype_in = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        h = deltaA[:, :, t] * h + deltaB_u[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D.to(compute)[..., None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(dtype_in)
