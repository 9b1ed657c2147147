"""The ``triton`` scan backend: mamba-ssm's selective scan as Triton kernels, no CUDA build step.

Semantics of :func:`lkm_unet.ops.selective_scan_ref.selective_scan_ref`. Inputs fp32, fp16 or bf16;
state and accumulation in fp32, as in mamba-ssm; every gradient in its input's dtype. Any ``l >= 1``
and any ``d_state`` (tuned for up to 64). The kernels are in
:mod:`lkm_unet.ops.selective_scan_triton_kernels`; this module sizes the launches and reduces the
backward's per-program partial sums.

Memory: the forward keeps the state entering each chunk, ``(b, d, n_chunks, n)`` fp32; the backward
recomputes each chunk from it. Deterministic: the backward's reductions over programs are partial sums
added up here with torch (same inputs and launch sizes, same bits), unlike mamba-ssm's atomics.

Launch sizes: a program owns one batch row and ``BLOCK_D`` channels; ``BLOCK_D`` shrinks (down to one
channel) until there are about :data:`TARGET_PROGRAMS` programs, and the chunk grows as the block
shrinks, so thin long sequences (a PaM scan at ``(1, 64, 26880)``) still fill a GPU.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from lkm_unet.ops import selective_scan_triton_kernels as kernels

TARGET_PROGRAMS = 512  # a GPU runs ~100-150 programs at once; a few waves hide the sequential chunk loop
MAX_BLOCK_D = 32
FWD_TILE = 2048  # elements of the forward's (BLOCK_D, CHUNK) tile
BWD_TILE = 1024  # the backward holds about twice as many live tiles
MIN_CHUNK, MAX_CHUNK = 16, 1024


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def plan(batch: int, dim: int, seqlen: int) -> tuple[int, int, int]:
    """``(block_d_fwd, block_d_bwd, chunk)`` for a scan of this size (powers of two)."""
    batch, dim, seqlen = int(batch), int(dim), int(seqlen)
    block_d = min(MAX_BLOCK_D, _next_pow2(dim))
    while block_d > 1 and batch * -(-dim // block_d) < TARGET_PROGRAMS:
        block_d //= 2
    chunk = max(MIN_CHUNK, min(MAX_CHUNK, FWD_TILE // block_d, _next_pow2(seqlen)))
    return block_d, max(1, min(block_d, BWD_TILE // chunk)), chunk


def states_shape(batch: int, dim: int, seqlen: int, dstate: int) -> tuple[int, ...]:
    """``(batch, dim, n_chunks, dstate)``: the fp32 state entering each chunk."""
    chunk = plan(batch, dim, seqlen)[2]
    return (batch, dim, -(-seqlen // chunk), dstate)


def _warps(tile: int) -> int:
    # four tile elements per thread: compiled for sm_90 (ptxas in triton's wheel), the backward then needs
    # 137-235 registers and no spill; at eight per thread it spilled 296 bytes of stack
    return max(1, min(16, tile // 128))


def _flags(D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], softplus: bool) -> dict:
    return {"HAS_D": D is not None, "HAS_Z": z is not None, "HAS_BIAS": delta_bias is not None,
            "SOFTPLUS": bool(softplus)}


def _check(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    b, d, l = u.shape
    n = A.shape[1]
    if delta.shape != u.shape or A.shape != (d, n) or B.shape != (b, n, l) or C.shape != (b, n, l):
        raise ValueError(f"selective_scan (triton): expected u, delta (b, d, l), A (d, n), B, C (b, n, l); got "
                         f"u {tuple(u.shape)}, delta {tuple(delta.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, "
                         f"C {tuple(C.shape)}")
    if A.is_complex():
        raise TypeError("selective_scan (triton): complex A is not supported (LKM-UNet's Mamba uses real A)")


def _c(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.contiguous()


def scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], delta_softplus: bool) -> tuple[Tensor, Tensor]:
    """``(out: (b, d, l)`` in ``u``'s dtype, ``states: (b, d, n_chunks, n)`` fp32``)``."""
    _check(u, delta, A, B, C)
    u, delta, A, B, C, D, z, delta_bias = (_c(x) for x in (u, delta, A, B, C, D, z, delta_bias))
    batch, dim, length = u.shape
    dstate = A.shape[1]
    block_d, _, chunk = plan(batch, dim, length)
    states = torch.zeros(states_shape(batch, dim, length, dstate), device=u.device, dtype=torch.float32)
    out = torch.empty_like(u)
    grid = (batch, -(-dim // block_d))
    with torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext():
        kernels.scan_fwd_kernel[grid](
            u, delta, A, B, C, D, z, delta_bias, out, states, dim, length, states.shape[2],
            DSTATE=dstate, BLOCK_D=block_d, CHUNK=chunk, **_flags(D, z, delta_bias, delta_softplus),
            num_warps=_warps(block_d * chunk))
    return out, states


def scan_bwd(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
             states: Tensor) -> tuple[Optional[Tensor], ...]:
    """``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)`` in the inputs' dtypes; None for None inputs."""
    _check(u, delta, A, B, C)
    dout, u, delta, A, B, C, D, z, delta_bias = (_c(x) for x in (dout, u, delta, A, B, C, D, z, delta_bias))
    batch, dim, length = u.shape
    dstate = A.shape[1]
    _, block_d, chunk = plan(batch, dim, length)
    n_chunks = states.shape[2]
    d_blocks = -(-dim // block_d)
    f32 = {"device": u.device, "dtype": torch.float32}
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    dA_part = torch.empty(batch, dim, n_chunks, dstate, **f32)
    dB_part = torch.empty(d_blocks, batch, dstate, length, **f32)
    dC_part = torch.empty(d_blocks, batch, dstate, length, **f32)
    dD_part = torch.empty(batch, dim, **f32) if D is not None else None
    dbias_part = torch.empty(batch, dim, **f32) if delta_bias is not None else None
    carry = torch.zeros(2, batch, dim, dstate, **f32)
    with torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext():
        kernels.scan_bwd_kernel[(batch, d_blocks)](
            dout, u, delta, A, B, C, D, z, delta_bias, states, du, ddelta, dz, dA_part, dB_part, dC_part, dD_part,
            dbias_part, carry, batch, dim, length, n_chunks,
            DSTATE=dstate, BLOCK_D=block_d, CHUNK=chunk, **_flags(D, z, delta_bias, delta_softplus),
            num_warps=_warps(block_d * chunk))
    dA = dA_part.sum(dim=(0, 2)).to(A.dtype)
    dB = (dB_part[0] if d_blocks == 1 else dB_part.sum(dim=0)).to(B.dtype)
    dC = (dC_part[0] if d_blocks == 1 else dC_part.sum(dim=0)).to(C.dtype)
    dD = None if D is None else dD_part.sum(dim=0).to(D.dtype)
    dbias = None if delta_bias is None else dbias_part.sum(dim=0).to(delta_bias.dtype)
    return du, ddelta, dA, dB.contiguous(), dC.contiguous(), dD, dz, dbias

