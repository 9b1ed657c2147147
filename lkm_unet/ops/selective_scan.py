"""Public selective scan: one signature (mamba-ssm's ``selective_scan_fn``), three backends.

- ``cuda``: mamba-ssm's fused kernel, for CUDA tensors when mamba-ssm imports with its kernel built.
- ``torch``: the chunked pure-PyTorch scan (:mod:`lkm_unet.ops.selective_scan_torch`), any device.
- ``ref``: the sequential oracle (:mod:`lkm_unet.ops.selective_scan_ref`).

The backend is chosen per call. Precedence: the ``backend`` argument, then :func:`scan_backend` (a
context manager), then the environment variable ``LKM_UNET_SCAN_BACKEND``, then ``auto`` (cuda for
CUDA tensors when the kernel is usable, torch otherwise).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import warnings
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from lkm_unet.ops.selective_scan_ref import selective_scan_ref
from lkm_unet.ops.selective_scan_torch import selective_scan_torch

logger = logging.getLogger("lkm_unet")

ENV_VAR = "LKM_UNET_SCAN_BACKEND"
BACKENDS = ("auto", "torch", "cuda", "ref")

CUDA_INSTALL_HINT = (
    "install the CUDA kernels into this CUDA torch environment with "
    "`MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation \"mamba-ssm>=2.2,<2.4\"` and "
    "`CAUSAL_CONV1D_FORCE_BUILD=TRUE pip install --no-build-isolation \"causal-conv1d>=1.4,<1.7\"` "
    "(the 2.2/2.3 releases always build the Mamba-1 scan kernel; source trees after 2.3.2.post1 build it "
    "only with MAMBA_KEEP_CUDA_BUILD=TRUE added); `lkm-unet doctor` shows what is missing"
)

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


def _installed(module: str) -> bool:
    """Whether ``module`` could be imported, without importing it (slow, and odd without a GPU)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: blocked with sys.modules[module] = None
        return False


@functools.lru_cache(maxsize=None)
def _cuda_scan() -> tuple[Optional[Callable[..., Tensor]], str]:
    """mamba-ssm's ``selective_scan_fn`` and 'ok', or None and why it is unusable."""
    if not torch.cuda.is_available():
        return None, "torch sees no CUDA device" + ("" if _installed("mamba_ssm") else " and mamba-ssm is not installed")
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ModuleNotFoundError as error:
        missing = error.name or "mamba_ssm"
        if missing.startswith("mamba_ssm"):
            return None, "mamba-ssm is not installed"
        if missing.startswith("selective_scan_cuda"):
            return None, "mamba-ssm is installed without its compiled selective_scan_cuda kernel"
        return None, f"mamba-ssm does not import ({missing} is missing)"
    except Exception as error:  # a broken build raises ImportError/OSError with a linker message
        return None, f"mamba-ssm does not import: {type(error).__name__}: {error}"
    return selective_scan_fn, "ok"


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def available_backends() -> dict[str, str]:
    """Each backend mapped to 'ok' or the reason it cannot run here (with the fix, where a GPU is seen)."""
    fn, reason = _cuda_scan()
    if fn is not None:
        cuda = "ok"
    elif not torch.cuda.is_available():
        cuda = reason  # no kernel build helps without a GPU
    else:
        cuda = f"{reason}: {CUDA_INSTALL_HINT}"
    return {"torch": "ok", "ref": "ok", "cuda": cuda}


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend a call with ``backend`` on tensors living on ``device`` will use."""
    requested = _check_name(backend, "backend")
    if requested == "auto" and _context_backend is not None:
        requested = _context_backend
    if requested == "auto" and os.environ.get(ENV_VAR):
        requested = _check_name(os.environ[ENV_VAR], ENV_VAR)
    if requested in ("torch", "ref"):
        return requested
    explicit = requested == "cuda"
    if device.type != "cuda":
        if explicit:
            _warn_once("cpu", f"selective_scan: backend 'cuda' was asked for {device.type} tensors; "
                              "using the torch backend (mamba-ssm's kernel needs CUDA tensors)")
        return "torch"
    fn, reason = _cuda_scan()
    if fn is None:
        _warn_once("cuda", f"selective_scan: using the torch backend on CUDA because {reason}; "
                           f"for the faster fused kernel, {CUDA_INSTALL_HINT}")
        return "torch"
    return "cuda"


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
    name = resolve_backend(backend, u.device)
    if name == "cuda":
        fn, _ = _cuda_scan()
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    impl = selective_scan_torch if name == "torch" else selective_scan_ref
    return impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
