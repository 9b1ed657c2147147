"""The triton scan kernels compile for real GPUs (sm_80, sm_90) on a machine without one.

The interpreter tests (test_selective_scan_triton.py) prove the kernels' arithmetic; this proves that
triton's GPU compiler accepts them, down to a cubin from the ptxas in triton's wheel, for the exact
launches ``selective_scan_triton`` makes (``lkm_unet.ops.selective_scan_triton_aot`` feeds the launcher's
arguments through triton's own JIT binder). Each compile runs in a subprocess without
``TRITON_INTERPRET`` (this test process may have decorated the kernels for the interpreter).

Variants: every launch regime of the six benchmark shapes (one channel per program with 1024-step
chunks; 8 channels x 256 steps; 32 x 64; 32 x 16), together covering fp32, fp16 and bf16 inputs (bf16
activations with fp32 parameters, as under autocast, and all-bf16), d_state 16 and 64, all options and
none, for sm_80 and sm_90: 16 kernels, about 40 s on 2 cores the first time and a few seconds afterwards
(triton's cache is keyed on the source and the options). ``python -m lkm_unet.ops.selective_scan_triton_aot``
compiles the full matrix (every shape, dtype, d_state and option).

The forward must not spill (no stack frame); the backward's registers and stack are recorded in the
test's output only.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("triton compiles for CUDA targets on Linux only", allow_module_level=True)
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install -e '.[dev]' installs it on Linux)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
# (shape, d_state, dtype, flags): each launch regime once; together every dtype, both d_states, with all
# options (LKM-UNet's Mamba) and with none
SCANS = [((2, 64, 1600), 64, "bf16", "all"), ((64, 64, 1600), 16, "fp16", "all"),
         ((1600, 64, 64), 64, "fp32", "all"), ((400, 256, 16), 16, "bf16-all", "bare")]
ARCHS = (80, 90)

COMPILE = """
import dataclasses, json, sys
from lkm_unet.ops import selective_scan_triton_aot as aot
reason = aot.unsupported(ARCHS)
if reason:
    print("UNSUPPORTED " + reason)
    sys.exit(0)
for arch in ARCHS:
    for shape, dstate, dtype, flags in SCANS:
        for r in aot.compile_scan(tuple(shape), dstate, dtype, flags, arch):
            print("COMPILED " + json.dumps(dataclasses.asdict(r)), flush=True)
"""


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when unset; 1 is its default
    code = f"ARCHS = {ARCHS!r}\nSCANS = {json.loads(json.dumps(SCANS))!r}\n" + COMPILE
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for line in result.stdout.splitlines():
        if line.startswith("UNSUPPORTED "):
            pytest.skip(line[len("UNSUPPORTED "):])
    return [json.loads(line[len("COMPILED "):]) for line in result.stdout.splitlines() if line.startswith("COMPILED ")]


def test_every_kernel_compiles_to_a_cubin_for_sm80_and_sm90(compiled: list[dict]) -> None:
    got = {(r["kernel"], r["arch"], tuple(r["shape"]), r["dstate"], r["dtype"], r["flags"]) for r in compiled}
    want = {(k, arch, shape, n, dtype, flags) for k in ("scan_fwd_kernel", "scan_bwd_kernel") for arch in ARCHS
            for shape, n, dtype, flags in SCANS}
    assert got == want
    assert all(r["cubin_bytes"] > 1000 for r in compiled)
    # the launch plans of the benchmark shapes, as compiled: (BLOCK_D, CHUNK, num_warps)
    plans = {(r["kernel"], tuple(r["shape"])): (r["meta"]["BLOCK_D"], r["meta"]["CHUNK"], r["meta"]["num_warps"])
             for r in compiled}
    assert plans[("scan_fwd_kernel", (2, 64, 1600))] == (1, 1024, 8)
    assert plans[("scan_bwd_kernel", (64, 64, 1600))] == (4, 256, 8)
    assert plans[("scan_fwd_kernel", (1600, 64, 64))] == (32, 64, 8)
    assert plans[("scan_fwd_kernel", (400, 256, 16))] == (32, 16, 4)


def test_forward_does_not_spill_and_resources_are_recorded(compiled: list[dict]) -> None:
    for r in compiled:
        print(f"{r['kernel']} sm_{r['arch']} {tuple(r['shape'])} n={r['dstate']} {r['dtype']} {r['flags']}: "
              f"{r['registers']} registers, {r['stack']} B stack, {r['shared']} B shared, {r['seconds']:.1f} s")
    fwd = [r for r in compiled if r["kernel"] == "scan_fwd_kernel"]
    assert [r for r in fwd if r["stack"] > 0] == []
    assert all(0 < r["registers"] <= 255 for r in compiled)
