"""The selective-scan backends: where each lives, whether it can run here, and why not.

A fast backend is a module ``lkm_unet.ops.selective_scan_<name>`` exposing ``states_shape``, ``scan_fwd``
and ``scan_bwd`` (see :mod:`lkm_unet.ops.selective_scan_op`); :data:`MODULES` maps each name to its
module. Optional dependencies (mamba-ssm's compiled kernel, triton, numba) are imported only here, behind
guards whose messages say how to install what is missing; ``import lkm_unet`` imports none of them.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Optional

import torch

# name -> module; a backend added later (e.g. a CPU kernel) only needs an entry here
MODULES = {
    "cuda": "lkm_unet.ops.selective_scan_cuda",
    "triton": "lkm_unet.ops.selective_scan_triton",
    "numba": "lkm_unet.ops.selective_scan_numba",
    "torch": "lkm_unet.ops.selective_scan_torch",
}
# the device type each fast backend computes on ("any": every device torch runs on)
DEVICES = {"cuda": "cuda", "triton": "cuda", "numba": "cpu", "torch": "any"}
# the third-party module each optional backend needs
REQUIRES = {"cuda": "selective_scan_cuda", "triton": "triton", "numba": "numba"}

CUDA_INSTALL_HINT = (
    "install the CUDA kernels into this CUDA torch environment with "
    "`MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation \"mamba-ssm>=2.2,<2.4\"` and "
    "`CAUSAL_CONV1D_FORCE_BUILD=TRUE pip install --no-build-isolation \"causal-conv1d>=1.4,<1.7\"` "
    "(the 2.2/2.3 releases always build the Mamba-1 scan kernel; source trees after 2.3.2.post1 build it "
    "only with MAMBA_KEEP_CUDA_BUILD=TRUE added); `lkm-unet doctor` shows what is missing"
)
INSTALL_HINTS = {
    "cuda": CUDA_INSTALL_HINT,
    "triton": "`pip install \"triton>=3.1,<3.10\"` (CUDA builds of torch on Linux ship it)",
    "numba": "`pip install \"numba>=0.60\"`",
}
INTERPRET_ENV = "TRITON_INTERPRET"


def installed(module: str) -> bool:
    """Whether ``module`` could be imported, without importing it (slow, and odd without a GPU)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: blocked with sys.modules[module] = None
        return False


def _import_reason(name: str, error: BaseException) -> str:
    missing = getattr(error, "name", None) or ""
    if name == "cuda" and isinstance(error, ModuleNotFoundError) and missing.startswith("selective_scan_cuda"):
        if installed("mamba_ssm"):
            return "mamba-ssm is installed without its compiled selective_scan_cuda kernel"
        return "mamba-ssm is not installed"
    if isinstance(error, ModuleNotFoundError) and missing == REQUIRES.get(name):
        return f"{missing} is not installed"
    if isinstance(error, ModuleNotFoundError) and missing == MODULES[name]:
        return f"this lkm-unet has no {name} backend module ({MODULES[name]})"
    label = "mamba-ssm's selective_scan_cuda" if name == "cuda" else MODULES[name]
    return f"{label} does not import: {type(error).__name__}: {error}"


@functools.lru_cache(maxsize=None)
def load(name: str) -> tuple[Optional[ModuleType], str]:
    """The backend's module and 'ok', or None and why it does not import."""
    if name == "cuda" and not installed("selective_scan_cuda"):
        return None, _import_reason(name, ModuleNotFoundError(name="selective_scan_cuda"))
    try:
        return importlib.import_module(MODULES[name]), "ok"
    except Exception as error:  # a broken build raises ImportError/OSError with a linker message
        return None, _import_reason(name, error)


def module(name: str) -> ModuleType:
    """The backend's module; raises ``RuntimeError`` with the install hint when it does not import."""
    mod, reason = load(name)
    if mod is None:
        hint = INSTALL_HINTS.get(name)
        raise RuntimeError(f"selective_scan backend {name!r} is unusable: {reason}" + (f"; {hint}" if hint else ""))
    return mod


def interpreting() -> bool:
    """Whether triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``, set before import)."""
    return os.environ.get(INTERPRET_ENV, "0").strip() not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_compiles(device: str) -> str:
    """'ok' when the triton kernels compile and run on ``device`` (a tiny forward), else the error."""
    mod = module("triton")
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(1, 2, 3, generator=g), torch.rand(1, 2, 3, generator=g)
    A, B, C = -torch.rand(2, 2, generator=g), torch.randn(1, 2, 3, generator=g), torch.randn(1, 2, 3, generator=g)
    try:
        out, _ = mod.scan_fwd(*(t.to(device) for t in (u, delta, A, B, C)), None, None, None, True)
        if not bool(torch.isfinite(out).all()):
            return "its test forward gave non-finite values"
    except Exception as error:  # compiler or driver errors come in many types
        return f"its kernels do not compile or run here: {type(error).__name__}: {str(error)[:300]}"
    return "ok"


def status(name: str, device_type: str) -> str:
    """'ok' when backend ``name`` can compute on tensors of ``device_type``, else the reason."""
    if name in ("torch", "ref"):
        return "ok"
    where = DEVICES[name]
    if device_type != where and not (name == "triton" and device_type == "cpu" and interpreting()):
        return f"it computes on {where} tensors, these are {device_type} tensors"
    if where == "cuda" and device_type == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA device"
    mod, reason = load(name)
    if mod is None:
        return reason
    if name == "triton":
        index = torch.cuda.current_device() if device_type == "cuda" else None
        return _triton_compiles("cpu" if index is None else f"cuda:{index}")
    return "ok"


def report(name: str) -> str:
    """What ``available_backends`` says about ``name``: 'ok', or why not here and how to fix it."""
    if name in ("torch", "ref"):
        return "ok"
    where = DEVICES[name]
    if where == "cuda" and not torch.cuda.is_available():
        lib = {"cuda": "mamba-ssm", "triton": "triton"}[name]
        have = installed("mamba_ssm" if name == "cuda" else "triton")
        reason = "torch sees no CUDA device" + ("" if have else f" and {lib} is not installed")
        if name == "triton" and have:
            reason += f" ({INTERPRET_ENV}=1 runs its kernels on CPU tensors, slowly, for tests)"
        return reason  # no install helps without a GPU
    reason = status(name, where)
    if reason == "ok" or name not in INSTALL_HINTS or "not installed" not in reason and name != "cuda":
        return reason
    return f"{reason}: {INSTALL_HINTS[name]}"
