"""The selective scan as one ``torch.library`` custom op pair, for every fast backend.

``lkm_unet::selective_scan_fwd`` and ``lkm_unet::selective_scan_bwd`` take the backend's name as a
string argument and call its module (:data:`lkm_unet.ops.selective_scan_backends.MODULES`). A fake
(meta) implementation gives ``torch.compile`` the output shapes without running a kernel, and
``register_autograd`` ties the backward to the forward, so every backend is one opaque node to
torch.compile and ``fullgraph=True`` traces a network without a graph break.

A backend module exposes three plain functions (no autograd of its own):

- ``states_shape(batch, dim, seqlen, dstate) -> tuple``: shape of the states ``scan_fwd`` keeps for the
  backward (chunk-start states); integer arithmetic only, since the fake implementation calls it with
  symbolic sizes.
- ``scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> (out, states)``: ``out`` in ``u``'s
  dtype, ``states`` in the compute dtype (fp64 for fp64 inputs, else fp32).
- ``scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, states)`` -> the eight gradients
  ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)``, each in its input's dtype, None for a None input.

A module with ``SAVES_PRE_GATE = True`` (mamba-ssm's kernel, whose backward needs the output before the
``silu(z)`` gate) returns ``(out, states, pre_gate)`` and takes ``pre_gate=`` in ``scan_bwd``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from lkm_unet.ops import selective_scan_backends as backends

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _states_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _saves_pre_gate(backend: str) -> bool:
    return bool(getattr(backends.module(backend), "SAVES_PRE_GATE", False))


@torch.library.custom_op("lkm_unet::selective_scan_fwd", mutates_args=())
def scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], delta_softplus: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(out: (b, d, l), states, pre_gate)``; ``pre_gate`` is empty unless the backend saves it."""
    result = backends.module(backend).scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    out, states = result[0], result[1]
    pre_gate = result[2] if len(result) > 2 else u.new_empty(0)
    return out, states, pre_gate


@scan_fwd.register_fake
def _scan_fwd_fake(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                   z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    batch, dim, length = u.shape
    shape = backends.module(backend).states_shape(batch, dim, length, A.shape[1])
    states = u.new_empty(shape, dtype=_states_dtype(u))
    pre_gate = u.new_empty(u.shape) if z is not None and _saves_pre_gate(backend) else u.new_empty(0)
    return u.new_empty(u.shape), states, pre_gate


@torch.library.custom_op("lkm_unet::selective_scan_bwd", mutates_args=())
def scan_bwd(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, states: Tensor,
             pre_gate: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The eight gradients; an empty tensor stands for the gradient of a None input."""
    mod = backends.module(backend)
    extra = {"pre_gate": pre_gate} if getattr(mod, "SAVES_PRE_GATE", False) else {}
    grads = mod.scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, states, **extra)
    return tuple(u.new_empty(0) if g is None else g for g in grads)  # type: ignore[return-value]


@scan_bwd.register_fake
def _scan_bwd_fake(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                   z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, states: Tensor,
                   pre_gate: Tensor, backend: str) -> tuple[Tensor, ...]:
    return tuple(u.new_empty(0) if x is None else x.new_empty(x.shape) for x in (u, delta, A, B, C, D, z, delta_bias))


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend = inputs
    _, states, pre_gate = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states, pre_gate)
    ctx.delta_softplus, ctx.backend = delta_softplus, backend
    ctx.present = tuple(x is not None for x in (u, delta, A, B, C, D, z, delta_bias))
    # states and pre_gate are internal outputs that nothing differentiates: without this, autograd would
    # allocate and zero-fill a tensor of each one's size for every backward
    ctx.set_materialize_grads(False)


def _backward(ctx: Any, dout: Tensor, _dstates: Optional[Tensor], _dpre_gate: Optional[Tensor]) -> tuple:
    u, delta, A, B, C, D, z, delta_bias, states, pre_gate = ctx.saved_tensors
    if dout is None:  # the output itself was not used (only possible through the internal outputs)
        dout = torch.zeros_like(u)
    grads = scan_bwd(dout.contiguous(), u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, states, pre_gate,
                     ctx.backend)
    out = [g if present and need else None for g, present, need in zip(grads, ctx.present, ctx.needs_input_grad)]
    return (*out, None, None)


torch.library.register_autograd("lkm_unet::selective_scan_fwd", _backward, setup_context=_setup_context)


def selective_scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                      z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, backend: str) -> Tensor:
    """``y: (b, d, l)`` from backend ``backend`` through the custom op (autograd and torch.compile ready)."""
    out, _, _ = scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend)
    return out
