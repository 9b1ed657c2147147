"""Compile the triton scan kernels for a CUDA GPU ahead of time, on a machine without one.

Triton's CPU interpreter (the tests' correctness proof) accepts code that the GPU compiler rejects or
compiles badly. This module takes the exact launch :mod:`lkm_unet.ops.selective_scan_triton` makes for a
scan (grid, arguments, constexprs, ``num_warps``), lets triton's own JIT binder turn it into the
signature, constants and alignment attributes a launch on a GPU would compile, and runs triton's
compiler for a chosen target (``sm_80``, ``sm_90``) down to a cubin with the ``ptxas`` that triton's
wheel carries. It reports each kernel's registers, spills and shared memory.

The binder and ``_pack_args`` are triton internals (3.2 to 3.9 keep them; :func:`unsupported` says when
they are missing). Run ``python -m lkm_unet.ops.selective_scan_triton_aot`` for a table.
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

#: the six scan shapes of docs/benchmarks.md (b, d, l); their launch plans cover every block/chunk regime
BENCH_SHAPES = ((2, 64, 1600), (64, 64, 1600), (1600, 64, 64), (400, 256, 16), (1, 64, 26880), (1, 640, 840))
#: input dtypes: "fp16" and "bf16" are LKM-UNet under autocast (activations in that dtype, A, D and the
#: dt bias in fp32); "bf16-all" has every input in bf16
DTYPES = {"fp32": (torch.float32, torch.float32), "fp16": (torch.float16, torch.float32),
          "bf16": (torch.bfloat16, torch.float32), "bf16-all": (torch.bfloat16, torch.bfloat16)}


@dataclass
class Compiled:
    """One kernel compiled for one target: where it came from and what ptxas reported."""

    kernel: str
    arch: int
    shape: tuple[int, int, int]
    dstate: int
    dtype: str
    flags: str
    meta: dict
    cubin_bytes: int
    registers: int
    stack: int  # bytes of stack frame: where ptxas spills registers (0: no spills, no local arrays)
    shared: int
    seconds: float


def _tool(name: str, arch: int) -> str:
    """Path of a CUDA binary triton's wheel carries (``ptxas``, ``cuobjdump``) for ``sm_<arch>``."""
    from triton.backends.nvidia.compiler import get_ptxas

    # triton >= 3.6 picks a ptxas per architecture; older ones have one
    ptxas = get_ptxas(arch) if "arch" in inspect.signature(get_ptxas).parameters else get_ptxas()
    path = str(getattr(ptxas, "path", ptxas))
    return path if name == "ptxas" else os.path.join(os.path.dirname(path), name)


def resource_usage(cubin: bytes, arch: int) -> dict[str, int]:
    """``{"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}`` of the cubin's kernel, from ``cuobjdump -res-usage``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([_tool("cuobjdump", arch), "-res-usage", path], check=True, capture_output=True,
                              text=True).stdout
    line = next(x for x in text.splitlines() if "REG:" in x)
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def unsupported(archs: tuple[int, ...] = (80, 90)) -> Optional[str]:
    """None when this triton can compile for a CUDA target here, else why not (for a test's skip)."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ImportError as error:
        return f"this triton cannot compile ahead of time ({type(error).__name__}: {error})"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: the kernels were decorated for the CPU interpreter in this process"
    from triton.backends.nvidia.compiler import get_ptxas
    for arch in archs:
        try:
            ptxas, cuobjdump = _tool("ptxas", arch), _tool("cuobjdump", arch)
        except Exception as error:  # no bundled ptxas and none on PATH
            return f"triton {triton.__version__} finds no ptxas for sm_{arch} ({type(error).__name__}: {error})"
        for path in (ptxas, cuobjdump):
            if not os.path.exists(path):
                return f"triton {triton.__version__} has no {os.path.basename(path)} for sm_{arch} ({path})"
    return None


def inputs(shape: tuple[int, int, int], dstate: int, dtype: str, flags: str) -> tuple:
    """Uninitialised CPU scan inputs (only shapes, dtypes and alignment reach the compiler).

    ``flags``: ``"all"`` (z, D, dt bias, softplus: LKM-UNet's Mamba), ``"masked"`` (z and D, the dt
    precomputed: Mamba with a padding mask) or ``"bare"`` (none).
    """
    (b, d, l), n = shape, dstate
    act, par = DTYPES[dtype]
    has = {"all": (True, True, True), "masked": (True, True, False), "bare": (False, False, False)}[flags]
    u, delta, z = (torch.empty(b, d, l, dtype=act) for _ in range(3))
    A, B, C = torch.empty(d, n, dtype=par), torch.empty(b, n, l, dtype=act), torch.empty(b, n, l, dtype=act)
    D, bias = torch.empty(d, dtype=par), torch.empty(d, dtype=par)
    return (u, delta, A, B, C, D if has[1] else None, z if has[0] else None, bias if has[2] else None,
            flags == "all")


def compile_launch(launch: Any, arch: int) -> tuple[Any, float]:
    """``(triton CompiledKernel, seconds)`` of ``launch`` (a ``selective_scan_triton.Launch``) for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.meta)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.meta, bound, specialization, options)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return compiled, time.perf_counter() - start


def compile_scan(shape: tuple[int, int, int], dstate: int, dtype: str, flags: str, arch: int) -> list[Compiled]:
    """Forward and backward kernels of one scan, compiled for ``sm_<arch>`` exactly as they would launch."""
    from lkm_unet.ops import selective_scan_triton as scan

    args = inputs(shape, dstate, dtype, flags)
    fwd = scan.fwd_launch(*args)
    dout = torch.empty_like(args[0])
    bwd = scan.bwd_launch(dout, *args, fwd.buffers["states"])
    results = []
    for launch in (fwd, bwd):
        kernel, seconds = compile_launch(launch, arch)
        usage = resource_usage(kernel.asm["cubin"], arch)
        meta = {k: v for k, v in launch.meta.items() if k in ("BLOCK_D", "CHUNK", "num_warps")}
        results.append(Compiled(launch.kernel.__name__, arch, shape, dstate, dtype, flags, meta,
                                len(kernel.asm["cubin"]), usage["REG"], usage["STACK"], usage["SHARED"], seconds))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    p.add_argument("--dstate", default="16,64")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--flags", default="all,masked,bare")
    p.add_argument("--shapes", default="all", help="'all' (the six benchmark shapes) or e.g. 2x64x1600,1x64x26880")
    ns = p.parse_args()
    archs = tuple(int(a) for a in ns.arch.split(","))
    reason = unsupported(archs)
    if reason:
        raise SystemExit(f"selective_scan_triton_aot: {reason}")
    shapes = BENCH_SHAPES if ns.shapes == "all" else [tuple(int(x) for x in s.split("x")) for s in ns.shapes.split(",")]
    print("kernel          arch shape              n  dtype    flags  BLOCK_D CHUNK warps regs stack smem   s")
    failures = 0
    for arch in archs:
        for shape in shapes:
            for dstate in (int(n) for n in ns.dstate.split(",")):
                for dtype in ns.dtypes.split(","):
                    for flags in ns.flags.split(","):
                        try:
                            compiled = compile_scan(shape, dstate, dtype, flags, arch)
                        except Exception as error:  # keep going: the table shows every variant that fails
                            failures += 1
                            print(f"FAILED sm_{arch} {shape} n={dstate} {dtype} {flags}: {type(error).__name__}: "
                                  f"{str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}", flush=True)
                            continue
                        for r in compiled:
                            print(f"{r.kernel:15s} sm_{r.arch} {str(r.shape):18s} {r.dstate:2d} {r.dtype:8s} "
                                  f"{r.flags:6s} {r.meta['BLOCK_D']:7d} {r.meta['CHUNK']:5d} {r.meta['num_warps']:5d} "
                                  f"{r.registers:4d} {r.stack:5d} {r.shared:5d} {r.seconds:5.1f}", flush=True)
    if failures:
        raise SystemExit(f"{failures} variant(s) failed to compile")


if __name__ == "__main__":
    main()
