"""Mamba's depthwise causal conv1d followed by SiLU, on every device.

``causal_conv1d_silu(x, weight, bias)`` with ``x: (b, d, l)``, ``weight: (d, k)``, ``bias: (d,)`` or None
returns ``silu(bias + sum_i weight[:, i] x[..., t - (k - 1) + i])`` (zeros before the sequence start):

- CUDA tensors: causal-conv1d's fused kernel when it is installed.
- CPU tensors: the fused numba kernels (:mod:`lkm_unet.ops.causal_conv1d_numba`) whenever the selective
  scan on them resolves to its numba backend, so ``LKM_UNET_SCAN_BACKEND=torch`` (or ``scan_backend``)
  keeps the whole mixer free of numba. Through one ``torch.library`` custom op pair, like the scan, so
  torch.compile sees one opaque node; the backward recomputes the pre-activation from ``x``.
- otherwise :func:`causal_conv1d_silu_torch`, torch's conv1d, which is also the tests' reference.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lkm_unet.ops.selective_scan import resolve_backend, resolve_constant


@functools.lru_cache(maxsize=None)
def _cuda_kernel():
    """causal-conv1d's fused depthwise conv, or None when it is not installed or has no kernel."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # missing package or a build without its CUDA extension
        return None
    return causal_conv1d_fn


def _numba_kernels():
    from lkm_unet.ops import causal_conv1d_numba
    return causal_conv1d_numba


def causal_conv1d_silu_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The reference: torch's grouped conv1d padded by ``k - 1`` on both sides, cut to the first ``l`` steps."""
    k = weight.shape[1]
    return F.silu(F.conv1d(x, weight[:, None], bias, padding=k - 1, groups=x.shape[1])[..., :x.shape[2]])


@torch.library.custom_op("lkm_unet::causal_conv1d_silu_fwd", mutates_args=())
def _fwd(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return _numba_kernels().conv_silu_fwd(x, weight, bias)


@_fwd.register_fake
def _fwd_fake(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("lkm_unet::causal_conv1d_silu_bwd", mutates_args=())
def _bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _numba_kernels().conv_silu_bwd(dy, x, weight, bias)


@_bwd.register_fake
def _bwd_fake(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx: Any, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd(dy.contiguous(), *ctx.saved_tensors)


torch.library.register_autograd("lkm_unet::causal_conv1d_silu_fwd", _backward, setup_context=_setup_context)


def conv_backend(device: torch.device) -> str:
    """'cuda', 'numba' or 'torch': which implementation :func:`causal_conv1d_silu` uses on ``device``."""
    if device.type == "cuda":
        return "cuda" if _cuda_kernel() is not None else "torch"
    if device.type != "cpu":
        return "torch"
    scan = resolve_constant("auto", "cpu") if torch.compiler.is_compiling() else resolve_backend("auto", device)
    return "numba" if scan == "numba" else "torch"


def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``silu(causal depthwise conv1d(x))``: ``x: (b, d, l)``, ``weight: (d, k)``, ``bias: (d,)`` or None."""
    backend = conv_backend(x.device)
    if backend == "cuda":
        return _cuda_kernel()(x.contiguous(), weight, bias, activation="silu")
    if backend == "numba":
        if bias is None:
            bias = weight.new_zeros(weight.shape[0])
        return _fwd(x.contiguous(), weight, bias)
    return causal_conv1d_silu_torch(x, weight, bias)
