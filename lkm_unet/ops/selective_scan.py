"""Public selective scan: one signature (mamba-ssm's ``selective_scan_fn``), several backends.

- ``cuda``: mamba-ssm's fused kernel, for CUDA tensors when its compiled extension imports.
- ``triton``: Triton kernels (:mod:`lkm_unet.ops.selective_scan_triton`), for CUDA tensors, no build step.
- ``numba``: a fused CPU kernel (``lkm_unet.ops.selective_scan_numba``), when that module and numba import.
- ``torch``: the chunked pure-PyTorch scan (:mod:`lkm_unet.ops.selective_scan_torch`), any device.
- ``ref``: the sequential oracle (:mod:`lkm_unet.ops.selective_scan_ref`), plain autograd.

All but ``ref`` run through one custom op (:mod:`lkm_unet.ops.selective_scan_op`), so torch.compile sees
the same opaque node whatever the backend. The backend is chosen per call. Precedence: the ``backend``
argument, then :func:`scan_backend` (a context manager), then the environment variable
``LKM_UNET_SCAN_BACKEND``, then ``auto``: for CUDA tensors cuda, else triton, else torch; for CPU tensors
numba, else torch. A backend that cannot run on the tensors' device falls back along that order with
one warning.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Iterator, Optional

import torch
from torch import Tensor

from lkm_unet.ops import selective_scan_backends as backends
from lkm_unet.ops.selective_scan_backends import CUDA_INSTALL_HINT, check_shapes
from lkm_unet.ops.selective_scan_op import selective_scan_op
from lkm_unet.ops.selective_scan_ref import selective_scan_ref

logger = logging.getLogger("lkm_unet")

ENV_VAR = "LKM_UNET_SCAN_BACKEND"
BACKENDS = ("auto", "cuda", "triton", "numba", "torch", "ref")
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("numba", "torch")}

__all__ = ["BACKENDS", "CUDA_INSTALL_HINT", "ENV_VAR", "available_backends", "check_shapes", "resolve_backend",
           "scan_backend", "selective_scan"]

_context_backend: Optional[str] = None
_warned: set[str] = set()


def _check_name(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a scan backend; valid: {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def scan_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` for every :func:`selective_scan` call with ``backend="auto"`` inside."""
    global _context_backend
    previous, _context_backend = _context_backend, _check_name(name, "scan_backend")
    try:
        yield
    finally:
        _context_backend = previous


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def available_backends() -> dict[str, str]:
    """Each backend mapped to 'ok' or the reason it cannot run here (with the fix, where one helps)."""
    return {name: backends.report(name) for name in ("torch", "ref", "cuda", "triton", "numba")}


def _auto(device_type: str) -> tuple[str, list[str]]:
    """The first usable backend of the auto order for ``device_type``, and why each earlier one is not."""
    skipped = []
    for name in AUTO_ORDER.get(device_type, ("torch",)):
        reason = backends.status(name, device_type)
        if reason == "ok":
            return name, skipped
        skipped.append(f"{name}: {reason}")
    return "torch", skipped


def _announce(device_type: str, name: str, skipped: list[str], requested: str) -> None:
    """One line, once per process and device type, when the scan on CUDA is not mamba-ssm's kernel."""
    if device_type != "cuda" and requested == "auto":
        return  # numba or torch on the CPU: the expected choice
    why = "; ".join(skipped)
    if requested != "auto":
        _warn_once(f"{requested}:{device_type}",
                   f"selective_scan: backend {requested!r} cannot run on {device_type} tensors here ({why}); "
                   f"using the {name} backend")
    elif name == "torch":
        _warn_once("cuda", f"selective_scan: using the torch backend on CUDA because {why}; for a faster scan, "
                           f"{CUDA_INSTALL_HINT}, or install triton")
    elif name == "triton" and "triton" not in _warned:
        _warned.add("triton")
        logger.warning("selective_scan: using the triton backend on CUDA because %s", why)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend a call with ``backend`` on tensors living on ``device`` will use."""
    requested = _check_name(backend, "backend")
    if requested == "auto" and _context_backend is not None:
        requested = _context_backend
    if requested == "auto" and os.environ.get(ENV_VAR):
        requested = _check_name(os.environ[ENV_VAR], ENV_VAR)
    if requested in ("torch", "ref"):
        return requested
    device_type = torch.device(device).type
    if requested != "auto":
        reason = backends.status(requested, device_type)
        if reason == "ok":
            return requested
        name, skipped = _auto(device_type)
        _announce(device_type, name, [f"{requested}: {reason}"], requested)
        return name
    name, skipped = _auto(device_type)
    _announce(device_type, name, skipped, requested)
    return name


def resolve_constant(backend: str, device_type: str) -> str:
    """:func:`resolve_backend`, which torch.compile evaluates once while tracing instead of tracing it."""
    return resolve_backend(backend, torch.device(device_type))


# What `torch.compiler.assume_constant_result` does, without importing torch._dynamo (which imports
# triton) when lkm_unet is imported; tests/ops/test_selective_scan_op.py fails if torch stops honouring it.
resolve_constant._dynamo_marked_constant = True  # type: ignore[attr-defined]


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    *,
    backend: str = "auto",
) -> Tensor:
    """Selective scan with the semantics and layout of mamba-ssm's ``selective_scan_fn``.

    ``u, delta, z: (b, d, l)``, ``A: (d, n)``, ``B, C: (b, n, l)``, ``D, delta_bias: (d,)``;
    returns ``y: (b, d, l)``. See :func:`lkm_unet.ops.selective_scan_ref.selective_scan_ref` for the
    recurrence.
    """
    if torch.compiler.is_compiling():
        name = resolve_constant(backend, u.device.type)
    else:
        check_shapes(u, delta, A, B, C, D, z, delta_bias)
        name = resolve_backend(backend, u.device)
    if name == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if name in ("cuda", "triton") and u.dtype == torch.float64:
        name = "torch"  # the GPU kernels compute in fp32; fp64 keeps fp64 arithmetic
    return selective_scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, name)
