#!/usr/bin/env python3
"""GPU checks of the selective-scan backends and of LKM-UNet training on CUDA.

Run through ``scripts/gpu_check.sh`` (which builds mamba-ssm and causal-conv1d first), or directly when
both are installed:

    python3 scripts/gpu_check.py --out results/ [--sections warmup,parity,bench,train,compile,module,gradcheck]

Backends compared: ``cuda`` (mamba-ssm's kernel), ``triton`` (this package's Triton kernels), ``torch``.
A training-step backend written ``triton/nocc`` runs with causal-conv1d switched off (the depthwise conv
through cuDNN's grouped ``nn.Conv1d``), to judge whether that path is within 20% of causal-conv1d.

Sections (results go to ``<out>/results.json`` after each one; a short table is printed last):

- ``parity``: ``selective_scan`` with ``backend="cuda"`` (mamba-ssm's kernel), ``"triton"``, ``"torch"`` and
  ``"ref"`` (fp64) on the six shapes of docs/benchmarks.md: output and the gradient of every input, ``||a - b|| / ||b||``, with and without z, D,
  delta_bias and softplus.
- ``module``: ``mamba_ssm.modules.mamba_simple.Mamba`` against ``lkm_unet.Mamba`` (state_dict both ways
  with ``strict=True``, same-seed initialisation, outputs and gradients).
- ``bench``: scan forward and forward+backward time (CUDA events, median) and peak memory, per backend.
- ``warmup``: runs every triton kernel variant the later sections launch once (scan shapes and the 2D and
  3D networks), so that triton's disk cache serves them; ``gpu_check.sh`` runs it while mamba-ssm builds.
- ``train``: LKM-UNet training steps (bf16 autocast, SGD), one process per config running each variant
  ``backend[/nocc][@memory option]`` in turn (issue 7: cuda vs triton vs triton without causal-conv1d;
  issue 8: the memory options ``none``, ``autocast``, ``checkpointing``, ``both`` with the cuda scan, and
  ``backbone``, the same ResidualEncoderUNet without PiM/PaM):
  step time, peak memory, step-0 loss/gradient agreement between variants of one memory option, NaN check.
- ``gradcheck``: step-0 gradients of one network per backend, repeated, in bf16 autocast and in fp32, in
  one process: how far the backends' gradients differ beyond run-to-run nondeterminism, and where.
- ``compile``: the same step through ``torch.compile`` per backend of ``--compile-backends``, with the
  number of graph breaks (the scan is a registered custom op: expected 0).

``--smoke`` runs tiny versions of every section on whatever device is there (CPU included), to check
the script itself: ``python scripts/gpu_check.py --smoke --sections warmup,parity,bench,train,compile
--train-variants torch@none,torch --compile-backends torch`` (with ``TRITON_INTERPRET=1`` the triton
variants run in the interpreter too).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout: this checkout's lkm_unet

import lkm_unet  # noqa: E402
from lkm_unet import scan_backend, selective_scan  # noqa: E402
from lkm_unet.ops.selective_scan import resolve_backend  # noqa: E402

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
TENSOR_NAMES = ("y",) + tuple("d" + n for n in GRAD_NAMES)
T0 = float(os.environ.get("GPU_CHECK_T0", time.time()))
# GPU_CHECK_RESERVE_S: seconds kept for what gpu_check.sh runs after this script
DEADLINE = T0 + float(os.environ.get("GPU_CHECK_BUDGET_S", "1e9")) - float(os.environ.get("GPU_CHECK_RESERVE_S", "0"))
# flag combinations (z, D, bias, softplus) the triton backend is checked on: each one is a separately
# compiled kernel variant, so not all 16 (compile time counts against the device budget)
TRITON_FLAGS = [(True, True, True, True), (False, False, False, False), (True, False, True, True),
                (False, True, False, False)]
RESULTS: dict[str, Any] = {}


def left() -> float:
    """Seconds left before the command's deadline."""
    return DEADLINE - time.time()


def log(*args: Any) -> None:
    print(f"[{time.time() - T0:7.1f}s]", *args, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp64 (NaN if either has a non-finite entry)."""
    a, b = a.detach().double(), b.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def save(out: Path) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(RESULTS, indent=1, default=str))
    tmp.replace(out / "results.json")


# ----------------------------------------------------------------------------------------------- scan
def scan_inputs(b: int, d: int, l: int, n: int, flags: tuple[bool, bool, bool, bool],
                device: torch.device) -> dict[str, Optional[torch.Tensor]]:
    """Fresh random scan inputs in the regime of a Mamba block (never zeros). flags = (z, D, bias, softplus)."""
    has_z, has_D, has_bias, softplus = flags
    kw = {"device": device, "dtype": torch.float32}
    if softplus:
        # pre-activation; with a bias the bias sets dt ~ U_log[1e-3, 0.1] as in Mamba's initialisation
        delta = 0.5 * torch.randn(b, d, l, **kw) + (0.0 if has_bias else -3.0)
        dt0 = torch.exp(torch.rand(d, **kw) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        bias = dt0 + torch.log(-torch.expm1(-dt0)) if has_bias else None
    else:
        delta = 0.01 + 0.1 * torch.rand(b, d, l, **kw)
        bias = 0.05 * torch.rand(d, **kw) if has_bias else None
    A = -(0.5 + torch.rand(d, n, **kw)) * torch.arange(1, n + 1, **kw) / 2
    return {
        "u": torch.randn(b, d, l, **kw), "delta": delta, "A": A,
        "B": torch.randn(b, n, l, **kw), "C": torch.randn(b, n, l, **kw),
        "D": torch.randn(d, **kw) if has_D else None,
        "z": torch.randn(b, d, l, **kw) if has_z else None,
        "delta_bias": bias, "softplus": softplus,
    }


def run_scan(backend: str, inp: dict, dy: torch.Tensor, dtype: torch.dtype = torch.float32,
             grad: bool = True) -> dict[str, torch.Tensor]:
    leaves = {k: (None if inp[k] is None else inp[k].detach().to(dtype).requires_grad_(grad))
              for k in GRAD_NAMES}
    y = selective_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"],
                       leaves["z"], leaves["delta_bias"], inp["softplus"], backend=backend)
    res = {"y": y.detach()}
    if grad:
        names = [k for k in GRAD_NAMES if leaves[k] is not None]
        grads = torch.autograd.grad(y, [leaves[k] for k in names], dy.to(y.dtype))
        res.update({"d" + k: g for k, g in zip(names, grads)})
    return res


def compare(a: dict, b: dict) -> dict[str, float]:
    return {k: rel(a[k], b[k]) for k in TENSOR_NAMES if k in a and k in b}


def flag_name(flags: tuple[bool, ...]) -> str:
    return "+".join(n for n, f in zip(("z", "D", "bias", "softplus"), flags) if f) or "none"


def section_parity(dev: torch.device, cuda_ok: bool, smoke: bool, triton_ok: bool = False) -> None:
    """Max relative error per tensor, per shape and backend pair, over flag combinations."""
    all_flags = list(itertools.product((False, True), repeat=4))
    some_flags = [(True, True, True, True), (False, False, False, False)]
    n = 16
    if smoke:
        plan = [((2, 8, 33), all_flags, True)]
    else:
        plan = [((2, 32, 257), all_flags, True), ((2, 64, 1600), some_flags, True),
                ((64, 64, 1600), some_flags, False), ((1600, 64, 64), some_flags, False),
                ((400, 256, 16), some_flags, False), ((1, 640, 840), some_flags, False),
                ((1, 64, 26880), some_flags, False)]
    rows = []
    for (b, d, l), flag_list, with_ref in plan:
        per_pair: dict[str, dict[str, float]] = {}
        worst: dict[str, dict[str, str]] = {}
        for flags in flag_list:
            inp = scan_inputs(b, d, l, n, flags, dev)
            dy = torch.randn(b, d, l, device=dev)
            outs = {"torch": run_scan("torch", inp, dy)}
            if cuda_ok:
                outs["cuda"] = run_scan("cuda", inp, dy)
            if triton_ok and flags in TRITON_FLAGS:
                outs["triton"] = run_scan("triton", inp, dy)
            if with_ref:
                outs["ref64"] = run_scan("ref", inp, dy, dtype=torch.float64)
                if l <= 300:
                    outs["ref32"] = run_scan("ref", inp, dy)
            pairs = [("cuda", "torch"), ("cuda", "ref64"), ("torch", "ref64"), ("ref32", "ref64"),
                     ("triton", "cuda"), ("triton", "torch"), ("triton", "ref64")]
            for a, bb in pairs:
                if a in outs and bb in outs:
                    key = f"{a} vs {bb}"
                    errs = compare(outs[a], outs[bb])
                    agg = per_pair.setdefault(key, {})
                    for t, e in errs.items():
                        if not (agg.get(t, -1.0) >= e):  # NaN propagates as worst
                            agg[t] = e
                            worst.setdefault(key, {})[t] = flag_name(flags)
            RESULTS.setdefault("parity_detail", []).append(
                {"shape": [b, d, l], "flags": flag_name(flags),
                 "errors": {f"{a} vs {bb}": compare(outs[a], outs[bb]) for a, bb in pairs
                            if a in outs and bb in outs}})
            del outs
        for key, agg in per_pair.items():
            rows.append({"shape": [b, d, l], "pair": key, "combos": len(flag_list), "max_rel": agg,
                         "worst_combo": worst.get(key, {})})
            log(f"parity {(b, d, l)} {key}: " + " ".join(f"{t}={e:.1e}" for t, e in agg.items()))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    RESULTS["parity"] = rows


def section_warmup(dev: torch.device, smoke: bool) -> None:
    """Compile (run once) the triton kernels that parity, bench and train will launch, while mamba-ssm builds:
    triton's disk cache then serves every later process. Also the first GPU check of the triton kernels."""
    t0 = time.time()
    shapes = [(2, 8, 33)] if smoke else [(2, 32, 257), (2, 64, 1600), (64, 64, 1600), (1600, 64, 64),
                                         (400, 256, 16), (1, 640, 840), (1, 64, 26880)]
    rows = RESULTS.setdefault("warmup", [])
    for b, d, l in shapes:
        for flags in TRITON_FLAGS:
            inp = scan_inputs(b, d, l, 16, flags, dev)
            out = run_scan("triton", inp, torch.randn(b, d, l, device=dev))
            ref = run_scan("torch", inp, torch.randn(b, d, l, device=dev), grad=False)
            rows.append({"shape": [b, d, l], "flags": flag_name(flags), "y_vs_torch": rel(out["y"], ref["y"])})
    log(f"warmup: triton scans compiled for {len(rows)} shape/flag variants in {time.time() - t0:.0f} s; "
        f"worst y vs torch {max(r['y_vs_torch'] for r in rows):.1e}")
    from lkm_unet.ops import causal_conv1d as conv_module
    causal_fn = conv_module._cuda_kernel
    conv_module._cuda_kernel = lambda: None  # causal-conv1d may be half-installed while it builds
    try:
        for config, (batch, patch) in TRAIN_CONFIGS.items():
            extra: dict[str, Any] = {}
            if smoke:  # a tiny network and input, padded to the windows, to check the script on a CPU
                batch, patch, extra = smoke_setup(config, patch)
            t = time.time()
            net = lkm_unet.LKMUNet.from_preset("paper", config, input_channels=1, num_classes=14,
                                               deep_supervision=True, **extra).to(dev)
            x = torch.randn(batch, 1, *patch, device=dev)
            with scan_backend("triton"), torch.autocast(dev.type, dtype=torch.bfloat16):
                outs = net(x)
            sum(o.float().mean() for o in (outs if isinstance(outs, (list, tuple)) else [outs])).backward()
            sync(dev)
            del net, outs
            log(f"warmup: {config} step with triton in {time.time() - t:.0f} s")
    finally:
        conv_module._cuda_kernel = causal_fn


# --------------------------------------------------------------------------------------------- module
def section_module(dev: torch.device, cuda_ok: bool, smoke: bool) -> None:
    from lkm_unet.ops import causal_conv1d as conv_module
    res: dict[str, Any] = {}
    try:
        from mamba_ssm.modules.mamba_simple import Mamba as TheirMamba
    except Exception as error:  # noqa: BLE001
        RESULTS["module"] = {"skipped": f"mamba_ssm.modules.mamba_simple does not import: {error!r}"}
        log("module: skipped,", RESULTS["module"]["skipped"])
        return
    d_model, length = 64, (64 if smoke else 1600)
    # 1. same seed -> same parameters (the initialisation draws random numbers in the same order)
    torch.manual_seed(123)
    theirs = TheirMamba(d_model=d_model)
    torch.manual_seed(123)
    ours = lkm_unet.Mamba(d_model)
    ts, os_ = theirs.state_dict(), ours.state_dict()
    res["keys_equal"] = sorted(ts) == sorted(os_)
    res["shapes_equal"] = res["keys_equal"] and all(ts[k].shape == os_[k].shape for k in ts)
    res["keys_only_theirs"] = sorted(set(ts) - set(os_))
    res["keys_only_ours"] = sorted(set(os_) - set(ts))
    res["same_seed_init_max_abs_diff"] = {k: (ts[k] - os_[k]).abs().max().item()
                                          for k in ts if k in os_ and ts[k].shape == os_[k].shape}
    # 2. theirs -> ours, strict
    torch.manual_seed(7)
    theirs = TheirMamba(d_model=d_model).to(dev)
    ours = lkm_unet.Mamba(d_model).to(dev)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, length, d_model, device=dev)
    w = torch.randn(2, length, d_model, device=dev)

    def fwd_bwd(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        xx = x.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        y = model(xx)
        (y * w).sum().backward()
        out = {"y": y.detach(), "dx": xx.grad}
        out.update({"d" + k: p.grad for k, p in model.named_parameters()})
        return out

    ref_fast = fwd_bwd(theirs)                       # mamba_inner_fn (fused path)
    theirs.use_fast_path = False
    ref_slow = fwd_bwd(theirs)                       # selective_scan_fn + causal_conv1d_fn
    theirs.use_fast_path = True
    variants: dict[str, dict[str, torch.Tensor]] = {"theirs (use_fast_path=False)": ref_slow}
    for backend in (["cuda"] if cuda_ok else []) + ["torch"]:
        with scan_backend(backend):
            variants[f"ours, backend {backend}"] = fwd_bwd(ours)
    saved = conv_module._cuda_kernel
    conv_module._cuda_kernel = lambda: None          # force the torch conv1d path
    try:
        with scan_backend("cuda" if cuda_ok else "torch"):
            variants[f"ours, backend {'cuda' if cuda_ok else 'torch'}, nn.Conv1d"] = fwd_bwd(ours)
    finally:
        conv_module._cuda_kernel = saved
    cmp = {}
    for name, v in variants.items():
        errs = {k: rel(v[k], ref_fast[k]) for k in ref_fast}
        cmp[name] = {"y": errs["y"], "dx": errs["dx"],
                     "max_dparam": max(e for k, e in errs.items() if k not in ("y", "dx")),
                     "worst_param": max(((e, k) for k, e in errs.items() if k not in ("y", "dx")))[1]}
        log(f"module vs theirs (fast path): {name}: y={errs['y']:.1e} dx={errs['dx']:.1e} "
            f"max dparam={cmp[name]['max_dparam']:.1e} ({cmp[name]['worst_param']})")
    res["theirs_to_ours"] = cmp
    # 3. ours -> theirs, strict
    torch.manual_seed(8)
    ours2 = lkm_unet.Mamba(d_model).to(dev)
    theirs2 = TheirMamba(d_model=d_model).to(dev)
    theirs2.load_state_dict(ours2.state_dict(), strict=True)
    with torch.no_grad():
        y_theirs = theirs2(x)
        back = {}
        for backend in (["cuda"] if cuda_ok else []) + ["torch"]:
            with scan_backend(backend):
                back[f"ours, backend {backend}"] = rel(ours2(x), y_theirs)
    res["ours_to_theirs_y"] = back
    log("module ours -> theirs:", back)
    RESULTS["module"] = res


# ---------------------------------------------------------------------------------------------- bench
def time_ms(fn: Callable[[int], Any], dev: torch.device, max_s: float = 2.0, min_reps: int = 5,
            max_reps: int = 50, warm: bool = True) -> dict[str, float]:
    """Median of CUDA-event times of ``fn(i)``; one warm-up call, then more while cheap."""
    reps = min_reps
    if warm:
        fn(0)
        sync(dev)
        t = time.perf_counter()
        fn(1)
        sync(dev)
        est = time.perf_counter() - t
        for i in range(2 if est < 0.2 else 0):
            fn(i)
        reps = int(max(min_reps, min(max_reps, max_s / max(est, 1e-6))))
    times = []
    for i in range(reps):
        if dev.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn(i)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t = time.perf_counter()
            fn(i)
            times.append(1e3 * (time.perf_counter() - t))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_mib(fn: Callable[[], Any], dev: torch.device) -> Optional[float]:
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def section_bench(dev: torch.device, cuda_ok: bool, smoke: bool, backends: list[str]) -> None:
    shapes = [(2, 16, 64)] if smoke else [(2, 64, 1600), (64, 64, 1600), (1600, 64, 64), (400, 256, 16),
                                         (1, 64, 26880), (1, 640, 840)]
    n = 16
    rows = RESULTS.setdefault("bench", [])
    for b, d, l in shapes:
        per_set = 4 * (4 * b * d * l + 2 * b * n * l)       # u, delta, z, y, B, C in fp32
        n_sets = max(1, min(8, (256 << 20) // per_set))       # rotate inputs past the 60 MB L2
        sets = [scan_inputs(b, d, l, n, (True, True, True, True), dev) for _ in range(n_sets)]
        dys = [torch.randn(b, d, l, device=dev) for _ in range(n_sets)]
        for backend in backends:
            if lkm_unet.available_backends().get(backend, "ok") != "ok":
                rows.append({"shape": [b, d, l], "backend": backend,
                             "skipped": lkm_unet.available_backends()[backend][:200]})
                continue
            if left() < 60:
                rows.append({"shape": [b, d, l], "backend": backend, "skipped": "out of time"})
                continue
            leaves = [{k: (None if s[k] is None else s[k].clone().requires_grad_(True)) for k in GRAD_NAMES}
                      for s in sets]

            def call(i: int, grad: bool) -> torch.Tensor:
                lv = leaves[i % n_sets]
                y = selective_scan(lv["u"], lv["delta"], lv["A"], lv["B"], lv["C"], lv["D"], lv["z"],
                                   lv["delta_bias"], True, backend=backend)
                if grad:
                    for t in lv.values():
                        if t is not None:
                            t.grad = None
                    y.backward(dys[i % n_sets])
                return y

            def fwd(i: int) -> torch.Tensor:
                with torch.no_grad():
                    return call(i, False)

            row: dict[str, Any] = {"shape": [b, d, l], "backend": backend}
            try:
                row["fwd"] = time_ms(fwd, dev, max_s=1.0)
                row["fwd_bwd"] = time_ms(lambda i: call(i, True), dev, max_s=1.0)
                row["fwd_peak_mib"] = peak_mib(lambda: fwd(0), dev)
                row["fwd_bwd_peak_mib"] = peak_mib(lambda: call(0, True), dev)
                # the fewest bytes a forward must move: read u, delta, z, B, C, write y (fp32)
                row["fwd_min_bytes"] = per_set
            except torch.OutOfMemoryError as error:
                row["error"] = f"OOM: {str(error)[:300]}"
            log(f"bench {(b, d, l)} {backend}: fwd {row.get('fwd', {}).get('median_ms', float('nan')):.3f} ms, "
                f"fwd+bwd {row.get('fwd_bwd', {}).get('median_ms', float('nan')):.3f} ms, "
                f"peak {row.get('fwd_peak_mib')} / {row.get('fwd_bwd_peak_mib')} MiB")
            rows.append(row)
            del leaves
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        del sets, dys


# ---------------------------------------------------------------------------------------------- train
TRAIN_CONFIGS = {"abdomen_mr_2d": (2, (320, 320)), "abdomen_ct_3d": (2, (40, 224, 192))}


def smoke_setup(config: str, patch: tuple[int, ...]) -> tuple[int, tuple[int, ...], dict[str, Any]]:
    """``--smoke``: batch 1, an input twice the network's total stride (128x128, 16x128x128) padded to the
    windows, 4-8 channels per stage."""
    from lkm_unet import load_config

    arch = load_config(config)["architecture"]
    stride = [math.prod(s[axis] for s in arch["strides"]) for axis in range(len(patch))]
    return 1, tuple(2 * s for s in stride), {
        "shape_policy": "pad", "features_per_stage": [4] + [8] * (len(arch["features_per_stage"]) - 1)}


def ds_loss(outs: Any, target: torch.Tensor) -> torch.Tensor:
    """nnU-Net-style deep supervision: CE per output against the nearest-downsampled labels,
    weights 1/2^i normalised, the lowest resolution weighted 0."""
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    w = [1 / 2**i for i in range(len(outs))]
    if len(w) > 1:
        w[-1] = 0.0
    total = sum(w)
    loss = 0.0
    for wi, o in zip(w, outs):
        if wi == 0:
            continue
        t = target if o.shape[2:] == target.shape[2:] else \
            F.interpolate(target.float(), size=o.shape[2:], mode="nearest").long()
        loss = loss + (wi / total) * F.cross_entropy(o.float(), t[:, 0])
    return loss


#: the memory options of issue 8 (LKMUNet kwargs); "default" is LKMUNet's own defaults
MEMORY_OPTIONS = {"none": {"ssm_checkpointing": False, "ssm_autocast": False},
                  "autocast": {"ssm_checkpointing": False, "ssm_autocast": True},
                  "checkpointing": {"ssm_checkpointing": True, "ssm_autocast": False},
                  "both": {"ssm_checkpointing": True, "ssm_autocast": True}}


def parse_variant(variant: str) -> tuple[str, bool, str]:
    """``"triton/nocc@both"`` -> ``("triton", False, "both")``: scan backend, causal-conv1d on, memory option.
    ``"backbone"``: the same ResidualEncoderUNet without PiM/PaM (scripts/benchmark_memory.py builds it)."""
    if variant == "backbone":
        return "torch", False, "-"
    head, _, option = variant.partition("@")
    backend, _, flag = head.partition("/")
    if option and option not in MEMORY_OPTIONS:
        raise ValueError(f"train variant {variant!r}: memory option {option!r} is not one of {sorted(MEMORY_OPTIONS)}")
    if flag not in ("", "nocc"):
        raise ValueError(f"train variant {variant!r}: {flag!r} is not 'nocc'")
    if not option:  # the network's defaults on a GPU, named after the option they equal
        from lkm_unet.nets.lkm_unet import DEFAULT_MEMORY_OPTIONS
        on_gpu = {k: (True if v == "auto" else v) for k, v in DEFAULT_MEMORY_OPTIONS.items()}  # "auto": on GPUs
        option = next((name for name, kw in MEMORY_OPTIONS.items()
                       if all(on_gpu[k] == v for k, v in kw.items())), "default")
    return backend, flag != "nocc", option


def worker_train(config: str, variants: list[str], budget: float, compile_: bool, smoke: bool = False,
                 emit: Callable[[dict], None] = lambda res: None) -> list[dict]:
    """One config, several variants in one process (cuDNN's autotuning is paid once): for each, step-0
    loss and gradients (same weights and input for every variant), then timed SGD steps under bf16
    autocast, and the peak memory of those steps. A variant is ``backend[/nocc][@memory option]``;
    ``/nocc`` switches causal-conv1d off (the depthwise conv through nn.Conv1d, cuDNN). ``emit`` gets each
    row as soon as it is done (a worker prints it, so that a later timeout loses only the running one)."""
    t_start = time.time()
    from lkm_unet.ops import causal_conv1d as conv_module
    causal_fn = conv_module._cuda_kernel
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, patch = TRAIN_CONFIGS[config]
    extra: dict[str, Any] = {}
    if smoke:  # a tiny network and input, padded to the windows, to check the script on a CPU
        batch, patch, extra = smoke_setup(config, patch)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, *patch, generator=gen).to(dev)
    target = torch.randint(0, 14, (batch, 1, *patch), generator=gen).to(dev)
    torch.backends.cudnn.benchmark = True  # as nnU-Net
    rows, reference_grads = [], {}
    for k, variant in enumerate(variants):
        backend, causal, option = parse_variant(variant)
        share = (budget - (time.time() - t_start)) / (len(variants) - k)
        res: dict[str, Any] = {"config": config, "backend": variant, "scan": backend, "causal_conv1d": causal,
                               "memory_option": option, "batch": batch, "patch": list(patch), "compile": compile_}
        rows.append(res)
        if share < (15 if k else 5):
            res["skipped"] = "out of time"
            emit(res)
            continue
        try:
            conv_module._cuda_kernel = causal_fn if causal else (lambda: None)
            res.update(train_variant(config, backend, option, x, target, share, compile_, extra, dev))
            res["causal_conv1d"] = conv_module._cuda_kernel() is not None
            grads = res.pop("grads")
            ref = reference_grads.get(option)
            if ref is None:
                reference_grads[option] = (variant, res["loss0"], grads)
            else:  # agreement with the first variant of the same memory option
                res["agreement"] = {"with": ref[0], "loss_rel_diff": abs(res["loss0"] - ref[1]) / abs(ref[1]),
                                    "grad_rel_diff": rel(grads, ref[2])}
        except Exception as error:  # noqa: BLE001 -- report any failure with its text, go on
            res["error"] = ("OOM: " if isinstance(error, torch.OutOfMemoryError) else "") + \
                f"{type(error).__name__}: {error}"[:3000]
            res["traceback"] = traceback.format_exc()[-4000:]
        finally:
            conv_module._cuda_kernel = causal_fn
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        log(f"train {config} {variant}: " + ", ".join(f"{key}={res[key]}" for key in
            ("first_step_s", "step_ms_median", "peak_gib", "loss0", "agreement", "error") if key in res))
        emit(res)
    return rows


def train_variant(config: str, backend: str, option: str, x: torch.Tensor, target: torch.Tensor, budget: float,
                  compile_: bool, extra: dict, dev: torch.device) -> dict[str, Any]:
    """Step-0 loss and gradients, then timed steps within ``budget`` seconds, of one fresh network."""
    t_start = time.time()
    torch.manual_seed(0)
    if option == "-":  # the backbone, as the memory benchmark builds it
        spec = importlib.util.spec_from_file_location("benchmark_memory", ROOT / "scripts" / "benchmark_memory.py")
        bench_memory = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench_memory)
        short = {v: k for k, v in bench_memory.CONFIGS.items()}[config]
        net = bench_memory.build({"config": short, "network": "backbone", "preset": "paper"})
    else:
        net = lkm_unet.LKMUNet.from_preset("paper", config, input_channels=1, num_classes=14, deep_supervision=True,
                                           **MEMORY_OPTIONS.get(option, {}), **extra)  # built on the CPU: same init
    net = net.to(dev)
    model = torch.compile(net) if compile_ else net
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    res: dict[str, Any] = {"params_M": sum(p.numel() for p in net.parameters()) / 1e6,
                           "scan_backend_resolved": resolve_backend(backend, dev)}

    def step(update: bool) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            outs = model(x)
        loss = ds_loss(outs, target)
        loss.backward()
        if update:
            opt.step()
        return loss.detach()

    with scan_backend(backend):
        t = time.time()
        loss0 = step(update=False).item()
        sync(dev)
        res["first_step_s"] = time.time() - t
        res["loss0"] = loss0
        flat = torch.cat([p.grad.detach().float().flatten() for p in net.parameters() if p.grad is not None])
        res["grad_finite"] = bool(torch.isfinite(flat).all())
        res["grad_norm"] = flat.norm().item()
        res["grads"] = flat.cpu()
        del flat
        losses = [loss0]
        t = time.time()
        losses.append(step(update=True).item())  # warm-up with the optimizer
        sync(dev)
        est = time.time() - t
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        reps = int(max(1, min(10, (budget - (time.time() - t_start) - 2) / max(est, 1e-3))))
        times = []
        for _ in range(reps):
            if times and time.time() - t_start + est > budget - 1:
                break
            times.append(time_ms(lambda i: losses.append(step(update=True).item()), dev, max_s=0,
                                 min_reps=1, max_reps=1, warm=False)["median_ms"])
        res["step_ms_median"] = statistics.median(times)
        res["step_ms_all"] = times
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
        res["losses"] = losses
        res["all_finite"] = bool(all(math.isfinite(v) for v in losses)) and res["grad_finite"]
    return res


def worker_gradcheck(config: str, smoke: bool = False) -> dict:
    """Step-0 gradients of one network under each backend, repeated, in bf16 autocast and in fp32 (no
    TF32), all in one process: separates backend differences from run-to-run nondeterminism."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, patch = TRAIN_CONFIGS[config]
    extra: dict[str, Any] = {}
    if smoke:  # a tiny network and input, padded to the windows, to check the script on a CPU
        batch, patch, extra = smoke_setup(config, patch)
    torch.manual_seed(0)
    net = lkm_unet.LKMUNet.from_preset("paper", config, input_channels=1, num_classes=14,
                                       deep_supervision=True, **extra).to(dev)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, *patch, generator=gen).to(dev)
    target = torch.randint(0, 14, (batch, 1, *patch), generator=gen).to(dev)
    torch.backends.cudnn.benchmark = True
    names = [n for n, _ in net.named_parameters()]

    def grads(backend: str, bf16: bool) -> tuple[float, list[torch.Tensor]]:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bf16
        net.zero_grad(set_to_none=True)
        with scan_backend(backend), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = ds_loss(net(x), target)
        loss.backward()
        return loss.item(), [torch.zeros(p.shape, device=dev) if p.grad is None else p.grad.detach().float().clone()
                             for p in net.parameters()]

    runs = {}
    for prec in ("bf16", "fp32"):
        for key in ("cuda", "cuda again", "torch"):
            runs[f"{key} {prec}"] = grads(key.split()[0], prec == "bf16")
    res: dict[str, Any] = {"config": config, "losses": {k: v[0] for k, v in runs.items()}}

    def cmp(a: str, b: str) -> dict[str, Any]:
        ga, gb = runs[a][1], runs[b][1]
        diff2 = torch.stack([(p - q).double().pow(2).sum() for p, q in zip(ga, gb)])
        ref2 = torch.stack([q.double().pow(2).sum() for q in gb])
        top = torch.argsort(diff2, descending=True)[:6].tolist()
        return {"grad_rel": math.sqrt(diff2.sum().item() / ref2.sum().item()),
                "loss_rel": abs(runs[a][0] - runs[b][0]) / abs(runs[b][0]),
                "share_of_diff_top_params": {names[i]: round(diff2[i].item() / max(diff2.sum().item(), 1e-300), 3)
                                             for i in top},
                "rel_of_top_params": {names[i]: math.sqrt(diff2[i].item() / max(ref2[i].item(), 1e-300))
                                      for i in top}}

    for prec in ("bf16", "fp32"):
        res[f"cuda vs cuda again, {prec}"] = cmp(f"cuda again {prec}", f"cuda {prec}")
        res[f"cuda vs torch, {prec}"] = cmp(f"cuda {prec}", f"torch {prec}")
        res[f"torch vs cuda again, {prec}"] = cmp(f"torch {prec}", f"cuda again {prec}")
    for k, v in res.items():
        if isinstance(v, dict) and "grad_rel" in v:
            log(f"gradcheck {config} {k}: grads rel {v['grad_rel']:.2e}, loss rel {v['loss_rel']:.1e}; "
                f"largest shares {v['share_of_diff_top_params']}")
    return res


def section_gradcheck(configs: list[str], limit: float, smoke: bool) -> None:
    rows = RESULTS.setdefault("gradcheck", [])
    for config in configs:
        budget = min(limit, left() - 20)
        if budget < 30:
            rows.append({"config": config, "skipped": "out of time"})
            continue
        for res in run_worker(["--worker", "gradcheck", "--config", config] + (["--smoke"] if smoke else []),
                              budget):
            res.setdefault("config", config)
            rows.append(res)


def run_worker(args: list[str], timeout: float) -> list[dict]:
    """Run this script as a worker; its ``RESULT {json}`` lines (one per finished row), even after a timeout."""
    cmd = [sys.executable, str(Path(__file__).resolve())] + args
    log("run:", " ".join(args), f"(limit {timeout:.0f} s)")
    error = None
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=max(timeout, 1))
        out = proc.stdout
        if proc.returncode:
            error = f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout or ""
        out = out.decode() if isinstance(out, bytes) else out
        error = f"did not finish within its {timeout:.0f} s limit"
    print("\n".join(line for line in out.splitlines() if not line.startswith("RESULT ")), flush=True)
    rows = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    if error:
        rows.append({"error": error, "tail": out[-3000:]})
    return rows


def worker_main(ns: argparse.Namespace) -> None:
    import logging
    logging.getLogger("torch.utils._sympy.interp").setLevel(logging.ERROR)  # dynamic-shape chatter
    if ns.worker == "gradcheck":
        print("RESULT " + json.dumps(worker_gradcheck(ns.config, ns.smoke), default=str), flush=True)
        return
    def emit(res: dict) -> None:
        if ns.worker == "compile":
            from torch._dynamo.utils import counters
            res["graph_breaks"] = {k: v for k, v in sorted(counters["graph_break"].items(),
                                                           key=lambda kv: -kv[1])[:15]}
            res["graph_break_total"] = sum(counters["graph_break"].values())
        print("RESULT " + json.dumps(res, default=str), flush=True)

    worker_train(ns.config, ns.variants.split(","), ns.budget, ns.worker == "compile", ns.smoke, emit)


def section_train(configs: list[str], variants: list[str], limits: dict[str, float], smoke: bool) -> None:
    """One process per config running every variant (see :func:`worker_train`), within its limit."""
    rows = RESULTS.setdefault("train", [])
    for i, config in enumerate(configs):
        budget = min(limits.get(config, 120.0), left() - 10 * (len(configs) - i))
        if budget < 30:
            rows.append({"config": config, "skipped": "out of time"})
            continue
        for res in run_worker(["--worker", "train", "--config", config, "--variants", ",".join(variants),
                               "--budget", str(budget - 8)] + (["--smoke"] if smoke else []), budget):
            res.setdefault("config", config)
            rows.append(res)


def section_compile(configs: list[str], backends: list[str], limit: float, smoke: bool) -> None:
    """``torch.compile`` of the step, one process per config and backend (dynamo's counters are per process)."""
    rows = RESULTS.setdefault("compile", [])
    for config, backend in itertools.product(configs, backends):
        budget = min(limit, left() - 5)
        if budget < 45:
            rows.append({"config": config, "backend": backend, "skipped": "out of time"})
            continue
        for res in run_worker(["--worker", "compile", "--config", config, "--variants", backend,
                               "--budget", str(budget - 8)] + (["--smoke"] if smoke else []), budget):
            res.setdefault("config", config)
            res.setdefault("backend", backend)
            rows.append(res)


# ---------------------------------------------------------------------------------------------- table
def fmt(x: Any, spec: str = ".1e") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else format(x, spec)
    return str(x)


def print_tables() -> None:
    lines = ["", "=" * 30 + " SUMMARY " + "=" * 30]
    env = RESULTS.get("env", {})
    lines.append(" ".join(f"{k}={v}" for k, v in env.items()))
    if RESULTS.get("parity"):
        lines += ["", "parity: max over flag combos of ||a-b||/||b||",
                  "| shape | pair | combos | " + " | ".join(TENSOR_NAMES) + " |",
                  "|---|---|---|" + "---|" * len(TENSOR_NAMES)]
        for r in RESULTS["parity"]:
            lines.append(f"| {tuple(r['shape'])} | {r['pair']} | {r['combos']} | "
                         + " | ".join(fmt(r["max_rel"].get(t)) for t in TENSOR_NAMES) + " |")
    mod = RESULTS.get("module")
    if mod:
        lines += ["", "module: " + json.dumps({k: v for k, v in mod.items()
                                              if k not in ("theirs_to_ours", "same_seed_init_max_abs_diff")})]
        lines.append("same-seed init max |diff|: " + json.dumps(mod.get("same_seed_init_max_abs_diff")))
        for name, e in mod.get("theirs_to_ours", {}).items():
            lines.append(f"  vs mamba_ssm fast path: {name}: y {fmt(e['y'])}, dx {fmt(e['dx'])}, "
                         f"max dparam {fmt(e['max_dparam'])} ({e['worst_param']})")
    if RESULTS.get("bench"):
        lines += ["", "| shape (b, d, l) | backend | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB | fwd GB/s (min bytes) |",
                  "|---|---|---|---|---|---|---|"]
        for r in RESULTS["bench"]:
            if "fwd" not in r:
                lines.append(f"| {tuple(r['shape'])} | {r['backend']} | {r.get('skipped') or r.get('error')} |")
                continue
            f, fb = r["fwd"]["median_ms"], r["fwd_bwd"]["median_ms"]
            lines.append(f"| {tuple(r['shape'])} | {r['backend']} | {f:.3f} | {fb:.3f} | "
                         f"{fmt(r['fwd_peak_mib'], '.1f')} | {fmt(r['fwd_bwd_peak_mib'], '.1f')} | "
                         f"{r['fwd_min_bytes'] / f / 1e6:.0f} |")
    if RESULTS.get("train"):
        lines += ["", "| config | scan | causal-conv1d | memory option | step ms (median) | steps | first step s | "
                      "peak GiB | loss0 | finite | vs same option: loss, grads rel |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in RESULTS["train"]:
            head = f"| {r['config']} | {r.get('scan', r.get('backend', '-'))} | {r.get('causal_conv1d', '-')} | " \
                   f"{r.get('memory_option', '-')} |"
            if "step_ms_median" not in r:
                lines.append(f"{head} {r.get('skipped') or str(r.get('error', ''))[:200]} |")
                continue
            a = r.get("agreement")
            agree = f"{a['loss_rel_diff']:.1e}, {a['grad_rel_diff']:.1e} (vs {a['with']})" if a else "-"
            lines.append(f"{head} {r['step_ms_median']:.1f} | {len(r['step_ms_all'])} | {r['first_step_s']:.1f} | "
                         f"{r['peak_gib']:.2f} | {r['loss0']:.6f} | {r['all_finite']} | {agree} |")
    for r in RESULTS.get("gradcheck", []):
        for k, v in r.items():
            if isinstance(v, dict) and "grad_rel" in v:
                lines.append(f"gradcheck {r['config']} {k}: grads rel {v['grad_rel']:.2e}, loss rel {v['loss_rel']:.1e}")
        if "error" in r:
            lines.append(f"gradcheck {r['config']}: {r['error'][:500]}")
    for r in RESULTS.get("compile", []):
        if "step_ms_median" in r and "first_step_s" in r:
            lines.append(f"compile {r['config']} {r.get('backend')}: OK, first (compiling) step {r['first_step_s']:.1f} s, "
                         f"then {r['step_ms_median']:.1f} ms/step, loss0 {r['loss0']:.6f}, "
                         f"graph breaks {r.get('graph_break_total')}")
        else:
            lines.append(f"compile {r['config']} {r.get('backend')}: FAILED/skipped: {r.get('skipped') or r.get('error', '')[:1500]}")
    lines.append(f"elapsed {time.time() - T0:.0f} s")
    print("\n".join(lines), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    # in order of priority: a section that finds too little time left is skipped
    p.add_argument("--sections", default="parity,bench,train",
                   help="any of warmup,parity,bench,train,compile,module,gradcheck, run in the order given")
    p.add_argument("--append", action="store_true", help="add to <out>/results.json instead of replacing it")
    p.add_argument("--bench-backends", default="cuda,triton")
    p.add_argument("--train-configs", default="abdomen_mr_2d,abdomen_ct_3d")
    p.add_argument("--train-variants",
                   default="cuda@none,cuda@autocast,cuda@checkpointing,cuda@both,triton,triton/nocc,backbone",
                   help="backend[/nocc][@memory option], or backbone: /nocc switches causal-conv1d off (nn.Conv1d "
                        "through cuDNN); no @option: LKMUNet's default memory options; backbone: the "
                        "ResidualEncoderUNet without PiM/PaM")
    p.add_argument("--train-limits", default="abdomen_mr_2d=100,abdomen_ct_3d=120",
                   help="seconds per config (one process runs all its variants)")
    p.add_argument("--compile-configs", default="abdomen_mr_2d")
    p.add_argument("--compile-backends", default="triton,cuda")
    p.add_argument("--gradcheck-configs", default="abdomen_mr_2d")
    p.add_argument("--compile-limit", type=float, default=150)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, any device: checks the script")
    # worker mode (one config per process)
    p.add_argument("--worker", choices=["train", "compile", "gradcheck"])
    p.add_argument("--config")
    p.add_argument("--variants")
    p.add_argument("--budget", type=float, default=120)
    ns = p.parse_args()
    if ns.worker:
        worker_main(ns)
        return

    ns.out.mkdir(parents=True, exist_ok=True)
    if ns.append and (ns.out / "results.json").exists():
        RESULTS.update(json.loads((ns.out / "results.json").read_text()))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # parity in true fp32 (cuDNN would otherwise run the nn.Conv1d path in TF32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    backends = lkm_unet.available_backends()
    cuda_ok = backends["cuda"] == "ok"
    triton_ok = backends["triton"] == "ok"
    env = {"triton_backend": backends["triton"][:300], "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "none",
           "python": sys.version.split()[0], "cuda_backend": backends["cuda"][:200]}
    for pkg in ("mamba_ssm", "causal_conv1d", "triton"):
        try:
            env[pkg] = __import__(pkg).__version__
        except Exception as error:  # noqa: BLE001
            env[pkg] = f"unavailable ({type(error).__name__}: {str(error)[:200]})"
    for key in ("BUILD_S_MAMBA", "BUILD_S_CAUSAL", "BUILD_NOTE"):
        if os.environ.get(key):
            env[key.lower()] = os.environ[key]
    RESULTS["env"] = env
    log("env:", env)
    sections = ns.sections.split(",")
    limits = {k: float(v) for k, v in (item.rsplit("=", 1) for item in ns.train_limits.split(","))}
    jobs = {
        "warmup": lambda: section_warmup(dev, ns.smoke),
        "parity": lambda: section_parity(dev, cuda_ok, ns.smoke, triton_ok),
        "module": lambda: section_module(dev, cuda_ok, ns.smoke),
        "bench": lambda: section_bench(dev, cuda_ok, ns.smoke, ns.bench_backends.split(",")),
        "train": lambda: section_train(ns.train_configs.split(","), ns.train_variants.split(","), limits, ns.smoke),
        "gradcheck": lambda: section_gradcheck(ns.gradcheck_configs.split(","), 150, ns.smoke),
        "compile": lambda: section_compile(ns.compile_configs.split(","), ns.compile_backends.split(","),
                                           ns.compile_limit, ns.smoke),
    }
    for name in sections:
        if name in ("warmup", "train", "compile", "gradcheck") and dev.type != "cuda" and not ns.smoke:
            log(f"{name}: skipped (needs CUDA)")
            continue
        log(f"--- {name} ---")
        try:
            torch.manual_seed(zlib.crc32(name.encode()))
            jobs[name]()
        except Exception as error:  # noqa: BLE001 -- keep going, record the failure
            RESULTS.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}\n{traceback.format_exc()[-4000:]}"
            log(f"{name} FAILED:", RESULTS["errors"][name])
        save(ns.out)
    print_tables()
    for name, text in RESULTS.get("errors", {}).items():
        print(f"ERROR in {name}: {text.splitlines()[0][:500]}")


if __name__ == "__main__":
    main()
