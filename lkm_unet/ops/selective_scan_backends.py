"""The selective-scan backends: where each lives, whether it can run here, and why not.

A fast backend is a module ``lkm_unet.ops.selective_scan_<name>`` exposing ``states_shape``, ``scan_fwd``
and ``scan_bwd`` (see :mod:`lkm_unet.ops.selective_scan_op`); :data:`MODULES` maps each name to its
module. Optional dependencies (mamba-ssm's compiled kernel, triton, numba) are imported only here, behind
guards whose messages say how to install what is missing; ``import lkm_unet`` imports none of them.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

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


#: worst relative difference from the torch scan that the triton self-test accepts (fp32; see below)
SELF_TEST_TOLERANCE = 1e-3


def _relative_error(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want|, in fp64."""
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


@functools.lru_cache(maxsize=None)
def _triton_compiles(device: str) -> str:
    """'ok' when the triton kernels compile and run on ``device`` AND agree with the torch scan there.

    A self-test, once per device: forward and backward with every option (z, D, delta_bias, softplus)
    on a sequence longer than two of the longest chunks, against the torch backend on the same inputs.
    The kernels are proven against the fp64 oracle in the CPU interpreter; this catches a compiler or
    device that executes them differently, so that auto never trains with a wrong scan.
    """
    mod, reference = module("triton"), module("torch")
    g = torch.Generator().manual_seed(0)
    b, d, n = 2, 4, 16
    length = 37 if device == "cpu" else 2100  # the interpreter is slow; on a GPU, > 2 chunks of 1024
    inputs = [torch.randn(b, d, length, generator=g), 0.5 * torch.randn(b, d, length, generator=g) - 1.0,
              -torch.exp(0.5 * torch.randn(d, n, generator=g)), torch.randn(b, n, length, generator=g),
              torch.randn(b, n, length, generator=g), torch.randn(d, generator=g),
              torch.randn(b, d, length, generator=g), 0.3 * torch.randn(d, generator=g)]
    inputs = [t.to(device) for t in inputs]
    dout = torch.randn(b, d, length, generator=g).to(device)
    try:
        out, states = mod.scan_fwd(*inputs, True)
        grads = mod.scan_bwd(dout, *inputs, True, states)
    except Exception as error:  # compiler or driver errors come in many types
        return f"its kernels do not compile or run here: {type(error).__name__}: {str(error)[:300]}"
    want_out, want_states = reference.scan_fwd(*inputs, True)
    want = (want_out, *reference.scan_bwd(dout, *inputs, True, want_states))
    worst = max(_relative_error(x, y) for x, y in zip((out, *grads), want))
    if not worst <= SELF_TEST_TOLERANCE:  # also catches NaN
        return (f"its self-test on {device} disagrees with the torch scan (worst relative difference {worst:.1e}, "
                f"accepted {SELF_TEST_TOLERANCE:.0e}); please report it with the output of `lkm-unet doctor`")
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


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def _no_gpu_detail() -> str:
    """Why torch sees no CUDA device: a CPU-only torch build, or a CUDA build that finds no GPU."""
    if torch.version.cuda is None:
        return f"this torch {torch.__version__} is a CPU-only build"
    return (f"this torch is built for CUDA {torch.version.cuda} but finds no GPU: check the driver "
            "(nvidia-smi) and CUDA_VISIBLE_DEVICES")


def report(name: str) -> str:
    """What ``available_backends`` says about ``name``: 'ok', or why not here and how to fix it."""
    if name in ("torch", "ref"):
        return "ok"
    where = DEVICES[name]
    if where == "cuda" and not torch.cuda.is_available():
        lib = {"cuda": "mamba-ssm", "triton": "triton"}[name]
        have = installed("mamba_ssm" if name == "cuda" else "triton")
        reason = "torch sees no CUDA device" + ("" if have else f" and {lib} is not installed")
        if name == "triton":
            reason += f" ({_no_gpu_detail()})"
            if have:
                reason += (f"; triton {_version('triton')} is installed, its kernels need a CUDA GPU "
                           f"({INTERPRET_ENV}=1 runs them on CPU tensors, slowly, for tests)")
        return reason  # no install helps without a GPU
    reason = status(name, where)
    if reason == "ok" or name not in INSTALL_HINTS or "not installed" not in reason and name != "cuda":
        return reason
    return f"{reason}: {INSTALL_HINTS[name]}"


def check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 z: Optional[Tensor], delta_bias: Optional[Tensor]) -> None:
    """A ValueError naming the argument whose shape the scan cannot take, and the shape it needs: the
    contract every backend shares (:func:`lkm_unet.ops.selective_scan` checks it before any backend runs;
    the triton launches, which the AOT compiler builds without it, check it again)."""
    if u.dim() != 3 or u.shape[2] == 0:
        raise ValueError(f"selective_scan: u must be (b, d, l) with l >= 1; got shape {tuple(u.shape)}")
    b, d, l = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"selective_scan: A must be (d, n) with d = {d} (u is {tuple(u.shape)}); "
                         f"got shape {tuple(A.shape)}")
    n = A.shape[1]
    wanted = {"delta": (delta, (b, d, l)), "B": (B, (b, n, l)), "C": (C, (b, n, l)), "D": (D, (d,)),
              "z": (z, (b, d, l)), "delta_bias": (delta_bias, (d,))}
    for name, (x, shape) in wanted.items():
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"selective_scan: {name} must be {shape} (b, d, l = {b}, {d}, {l} from u, n = {n} "
                             f"from A); got shape {tuple(x.shape)}")
