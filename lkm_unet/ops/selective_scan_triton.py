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
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from lkm_unet.ops import selective_scan_triton_kernels as kernels
from lkm_unet.ops.selective_scan_backends import check_shapes

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
    # four tile elements per thread, at most 8 warps. Compiled ahead of time (selective_scan_triton_aot,
    # ptxas of triton's wheel): the backward needs 119-179 registers (8 bytes of stack in one all-bf16
    # variant without options, none with them); a 16-warp forward
    # (a 2048-element tile) was held to 64 registers by ptxas and spilled 8-24 bytes for fp16/bf16 inputs,
    # while 8 warps (8 elements per thread) use 107-119 registers and spill nothing
    return max(1, min(8, tile // 128))


def _flags(D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], softplus: bool) -> dict:
    return {"HAS_D": D is not None, "HAS_Z": z is not None, "HAS_BIAS": delta_bias is not None,
            "SOFTPLUS": bool(softplus)}


def _check(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
           delta_bias: Optional[Tensor]) -> None:
    check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if A.is_complex():
        raise TypeError("selective_scan (triton): complex A is not supported (LKM-UNet's Mamba uses real A)")


def _c(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.contiguous()


class Launch(NamedTuple):
    """One kernel launch: ``kernel[grid](*args, **meta)``; ``buffers`` are the tensors it writes."""

    kernel: Any
    grid: tuple[int, int]
    args: tuple
    meta: dict
    buffers: dict

    def run(self, like: Tensor) -> None:
        """Launch on ``like``'s device (the current CUDA device must be the tensors' one)."""
        with torch.cuda.device(like.device) if like.is_cuda else contextlib.nullcontext():
            self.kernel[self.grid](*self.args, **self.meta)


def fwd_launch(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
               z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool) -> Launch:
    """The forward kernel's launch (grid, arguments, constexprs and ``num_warps``) with its outputs allocated.

    ``scan_fwd`` runs it; :mod:`lkm_unet.ops.selective_scan_triton_aot` compiles the same launch for a GPU
    target without one. ``buffers``: ``out`` (b, d, l) and ``states`` (b, d, n_chunks, n).
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    u, delta, A, B, C, D, z, delta_bias = (_c(x) for x in (u, delta, A, B, C, D, z, delta_bias))
    batch, dim, length = u.shape
    dstate = A.shape[1]
    block_d, _, chunk = plan(batch, dim, length)
    states = torch.zeros(states_shape(batch, dim, length, dstate), device=u.device, dtype=torch.float32)
    out = torch.empty_like(u)
    return Launch(kernels.scan_fwd_kernel, (batch, -(-dim // block_d)),
                  (u, delta, A, B, C, D, z, delta_bias, out, states, dim, length, states.shape[2]),
                  dict(DSTATE=dstate, BLOCK_D=block_d, CHUNK=chunk, **_flags(D, z, delta_bias, delta_softplus),
                       num_warps=_warps(block_d * chunk)),
                  {"out": out, "states": states})


def scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], delta_softplus: bool) -> tuple[Tensor, Tensor]:
    """``(out: (b, d, l)`` in ``u``'s dtype, ``states: (b, d, n_chunks, n)`` fp32``)``."""
    launch = fwd_launch(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    launch.run(u)
    return launch.buffers["out"], launch.buffers["states"]


def bwd_launch(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
               z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, states: Tensor) -> Launch:
    """The backward kernel's launch (see :func:`fwd_launch`) with its gradients and partial sums allocated."""
    _check(u, delta, A, B, C, D, z, delta_bias)
    dout, u, delta, A, B, C, D, z, delta_bias = (_c(x) for x in (dout, u, delta, A, B, C, D, z, delta_bias))
    batch, dim, length = u.shape
    dstate = A.shape[1]
    _, block_d, chunk = plan(batch, dim, length)
    n_chunks = states.shape[2]
    d_blocks = -(-dim // block_d)
    f32 = {"device": u.device, "dtype": torch.float32}
    buffers = {
        "du": torch.empty_like(u), "ddelta": torch.empty_like(delta),
        "dz": torch.empty_like(z) if z is not None else None,
        "dA_part": torch.empty(batch, dim, n_chunks, dstate, **f32),
        "dB_part": torch.empty(d_blocks, batch, dstate, length, **f32),
        "dC_part": torch.empty(d_blocks, batch, dstate, length, **f32),
        "dD_part": torch.empty(batch, dim, **f32) if D is not None else None,
        "dbias_part": torch.empty(batch, dim, **f32) if delta_bias is not None else None,
        "carry": torch.zeros(2, batch, dim, dstate, **f32),
    }
    args = (dout, u, delta, A, B, C, D, z, delta_bias, states, *buffers.values(), batch, dim, length, n_chunks)
    return Launch(kernels.scan_bwd_kernel, (batch, d_blocks), args,
                  dict(DSTATE=dstate, BLOCK_D=block_d, CHUNK=chunk, **_flags(D, z, delta_bias, delta_softplus),
                       num_warps=_warps(block_d * chunk)),
                  buffers)


def scan_bwd(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
             states: Tensor) -> tuple[Optional[Tensor], ...]:
    """``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)`` in the inputs' dtypes; None for None inputs."""
    launch = bwd_launch(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, states)
    launch.run(u)
    buf = launch.buffers
    d_blocks = launch.grid[1]
    dA = buf["dA_part"].sum(dim=(0, 2)).to(A.dtype)
    dB = (buf["dB_part"][0] if d_blocks == 1 else buf["dB_part"].sum(dim=0)).to(B.dtype)
    dC = (buf["dC_part"][0] if d_blocks == 1 else buf["dC_part"].sum(dim=0)).to(C.dtype)
    dD = None if D is None else buf["dD_part"].sum(dim=0).to(D.dtype)
    dbias = None if delta_bias is None else buf["dbias_part"].sum(dim=0).to(delta_bias.dtype)
    return buf["du"], buf["ddelta"], dA, dB.contiguous(), dC.contiguous(), dD, buf["dz"], dbias
