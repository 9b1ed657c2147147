#!/usr/bin/env python3
"""GPU checks of the selective-scan backends and of LKM-UNet training on CUDA.

Run through ``scripts/gpu_check.sh`` (which builds mamba-ssm and causal-conv1d first), or directly when
both are installed:

    python3 scripts/gpu_check.py --out results/ [--sections parity,module,bench,train,gradcheck,compile]

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
- ``train``: one LKM-UNet training step (bf16 autocast, SGD) per config and backend, each in its own
  process with a time limit: step time, peak memory, loss/gradient agreement between backends, NaN check.
- ``gradcheck``: step-0 gradients of one network per backend, repeated, in bf16 autocast and in fp32, in
  one process: how far the backends' gradients differ beyond run-to-run nondeterminism, and where.
- ``compile``: the same step through ``torch.compile`` per backend of ``--compile-backends``, with the
  number of graph breaks (the scan is a registered custom op: expected 0).

``--smoke`` runs tiny versions of parity/module/bench on whatever device is there (CPU included), to
check the script itself.
"""
from __future__ import annotations

import argparse
import copy
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


# --------------------------------------------------------------------------------------------- module
def section_module(dev: torch.device, cuda_ok: bool, smoke: bool) -> None:
    from lkm_unet.modules import mamba as ours_mod
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
    saved = ours_mod._causal_conv1d_fn
    ours_mod._causal_conv1d_fn = lambda: None        # force the nn.Conv1d path
    try:
        with scan_backend("cuda" if cuda_ok else "torch"):
            variants[f"ours, backend {'cuda' if cuda_ok else 'torch'}, nn.Conv1d"] = fwd_bwd(ours)
    finally:
        ours_mod._causal_conv1d_fn = saved
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


def worker_train(config: str, backend: str, budget: float, compile_: bool, grad_out: Optional[str],
                 smoke: bool = False) -> dict:
    """One config/backend: step-0 loss and gradients (same weights/input in every process), then timed
    SGD steps under bf16 autocast. ``backend`` may end in ``/nocc``: causal-conv1d switched off."""
    t_start = time.time()
    variant = backend
    backend, _, option = backend.partition("/")
    from lkm_unet.modules import mamba as mamba_module
    if option == "nocc":
        mamba_module._causal_conv1d_fn = lambda: None  # the depthwise conv through nn.Conv1d (cuDNN)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, patch = TRAIN_CONFIGS[config]
    extra: dict[str, Any] = {}
    if smoke:  # a small input, padded to the windows, to check the script on a CPU
        batch, patch, extra = 1, tuple(128 if len(patch) == 2 else 32 for _ in patch), {"shape_policy": "pad"}
    torch.manual_seed(0)
    net = lkm_unet.LKMUNet.from_preset("paper", config, input_channels=1, num_classes=14,
                                       deep_supervision=True, **extra)  # built on the CPU: same init everywhere
    net = net.to(dev)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, *patch, generator=gen).to(dev)
    target = torch.randint(0, 14, (batch, 1, *patch), generator=gen).to(dev)
    torch.backends.cudnn.benchmark = True  # as nnU-Net
    model = torch.compile(net) if compile_ else net
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    res: dict[str, Any] = {"config": config, "backend": variant, "batch": batch, "patch": list(patch),
                           "compile": compile_, "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
                           "causal_conv1d": mamba_module._causal_conv1d_fn() is not None,
                           "scan_backend_resolved": resolve_backend(backend, dev)}

    def step(update: bool) -> float:
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
        grads = [p.grad.detach().float().flatten() for p in net.parameters() if p.grad is not None]
        flat = torch.cat(grads)
        res["grad_finite"] = bool(torch.isfinite(flat).all())
        res["grad_norm"] = flat.norm().item()
        if grad_out:
            torch.save(flat.cpu(), grad_out)
        del grads, flat
        log(f"train {config} {backend} compile={compile_}: first step {res['first_step_s']:.1f} s, "
            f"loss0 {loss0:.6f}")
        losses = [loss0]
        # warm-up then timed steps with the optimizer, within the budget
        t = time.time()
        losses.append(step(update=True).item())
        sync(dev)
        est = time.time() - t
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        spent = time.time() - t_start
        reps = int(max(2, min(10, (budget - spent - 5) / max(est, 1e-3) - 1)))
        times = []
        for _ in range(reps):
            if time.time() - t_start + est > budget - 3 and len(times) >= 1:
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
    if smoke:
        batch, patch, extra = 1, tuple(128 if len(patch) == 2 else 32 for _ in patch), {"shape_policy": "pad"}
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
        res = run_worker(["--worker", "gradcheck", "--config", config] + (["--smoke"] if smoke else []), budget)
        res.setdefault("config", config)
        rows.append(res)


def run_worker(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve())] + args
    log("run:", " ".join(args), f"(limit {timeout:.0f} s)")
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=max(timeout, 1))
    except subprocess.TimeoutExpired as error:
        text = error.stdout or ""
        text = text.decode() if isinstance(text, bytes) else text
        print(text[-3000:], flush=True)
        return {"error": f"did not finish within its {timeout:.0f} s limit", "tail": text[-1500:]}
    out = proc.stdout
    print("\n".join(line for line in out.splitlines() if not line.startswith("RESULT ")), flush=True)
    for line in reversed(out.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": f"exit code {proc.returncode}", "tail": out[-3000:]}


def worker_main(ns: argparse.Namespace) -> None:
    import logging
    logging.getLogger("torch.utils._sympy.interp").setLevel(logging.ERROR)  # dynamic-shape chatter
    try:
        if ns.worker == "gradcheck":
            print("RESULT " + json.dumps(worker_gradcheck(ns.config, ns.smoke), default=str), flush=True)
            return
        res = worker_train(ns.config, ns.backend, ns.budget, ns.worker == "compile", ns.grad_out, ns.smoke)
    except Exception as error:  # noqa: BLE001 -- report any failure with its text
        res = {"config": ns.config, "backend": ns.backend, "compile": ns.worker == "compile",
               "error": f"{type(error).__name__}: {error}"[:4000],
               "traceback": traceback.format_exc()[-6000:]}
        if isinstance(error, torch.OutOfMemoryError):
            res["error"] = "OOM: " + str(error)[:500]
    if ns.worker == "compile":
        try:
            from torch._dynamo.utils import counters
            res["graph_breaks"] = {k: v for k, v in sorted(counters["graph_break"].items(),
                                                           key=lambda kv: -kv[1])[:15]}
            res["graph_break_total"] = sum(counters["graph_break"].values())
        except Exception:  # noqa: BLE001
            pass
    print("RESULT " + json.dumps(res, default=str), flush=True)


def section_train(configs: list[str], backends: list[str], limits: dict[str, float], smoke: bool) -> None:
    rows = RESULTS.setdefault("train", [])
    for config in configs:
        got = {}
        for backend in backends:
            budget = min(limits.get(f"{config}:{backend}", 120.0), left() - 30)
            if budget < 30:
                rows.append({"config": config, "backend": backend, "skipped": "out of time"})
                continue
            grad_file = f"/tmp/lkm_grad_{config}_{backend.replace('/', '_')}.pt"
            res = run_worker(["--worker", "train", "--config", config, "--backend", backend,
                              "--budget", str(budget - 15), "--grad-out", grad_file]
                             + (["--smoke"] if smoke else []), budget)
            res.setdefault("config", config)
            res.setdefault("backend", backend)
            rows.append(res)
            if "loss0" in res:
                got[backend] = (res["loss0"], grad_file)
        first = next(iter(got), None)
        for other in list(got)[1:]:
            (la, ga), (lb, gb) = got[other], got[first]
            g_a, g_b = torch.load(ga), torch.load(gb)
            agree = {"config": config, "pair": f"{other} vs {first}", "loss_a": la, "loss_b": lb,
                     "loss_rel_diff": abs(la - lb) / abs(lb), "grad_rel_diff": rel(g_a, g_b)}
            RESULTS.setdefault("train_agreement", []).append(agree)
            log("train agreement:", agree)
        for _, g in got.values():
            Path(g).unlink(missing_ok=True)


def section_compile(configs: list[str], backends: list[str], limit: float, smoke: bool) -> None:
    rows = RESULTS.setdefault("compile", [])
    for config, backend in itertools.product(configs, backends):
        budget = min(limit, left() - 20)
        if budget < 60:
            rows.append({"config": config, "backend": backend, "skipped": "out of time"})
            continue
        res = run_worker(["--worker", "compile", "--config", config, "--backend", backend,
                          "--budget", str(budget - 15)] + (["--smoke"] if smoke else []), budget)
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
        lines += ["", "| config | backend | step ms (median) | steps | first step s | peak GiB | loss0 | finite |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in RESULTS["train"]:
            if "step_ms_median" not in r:
                lines.append(f"| {r['config']} | {r['backend']} | {r.get('skipped') or r.get('error', '')[:200]} |")
                continue
            lines.append(f"| {r['config']} | {r['backend']} | {r['step_ms_median']:.1f} | {len(r['step_ms_all'])} | "
                         f"{r['first_step_s']:.1f} | {r['peak_gib']:.2f} | {r['loss0']:.6f} | {r['all_finite']} |")
        for a in RESULTS.get("train_agreement", []):
            lines.append(f"agreement {a['config']} {a['pair']}: loss {a['loss_a']:.6f} vs {a['loss_b']:.6f} "
                         f"rel {a['loss_rel_diff']:.1e}; grads rel {a['grad_rel_diff']:.1e}")
    for r in RESULTS.get("gradcheck", []):
        for k, v in r.items():
            if isinstance(v, dict) and "grad_rel" in v:
                lines.append(f"gradcheck {r['config']} {k}: grads rel {v['grad_rel']:.2e}, loss rel {v['loss_rel']:.1e}")
        if "error" in r:
            lines.append(f"gradcheck {r['config']}: {r['error'][:500]}")
    for r in RESULTS.get("compile", []):
        if "step_ms_median" in r:
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
    p.add_argument("--sections", default="parity,bench,train,compile",
                   help="any of parity,bench,train,compile,module,gradcheck, run in the order given")
    p.add_argument("--bench-backends", default="cuda,triton")
    p.add_argument("--train-configs", default="abdomen_mr_2d,abdomen_ct_3d")
    p.add_argument("--train-backends", default="cuda,triton,triton/nocc",
                   help="/nocc: with causal-conv1d switched off (nn.Conv1d through cuDNN)")
    p.add_argument("--train-limits", default="abdomen_mr_2d:cuda=60,abdomen_mr_2d:triton=75,"
                                             "abdomen_mr_2d:triton/nocc=60,abdomen_mr_2d:torch=90,"
                                             "abdomen_ct_3d:cuda=90,abdomen_ct_3d:triton=100,"
                                             "abdomen_ct_3d:triton/nocc=90,abdomen_ct_3d:torch=120",
                   help="seconds per config:backend process")
    p.add_argument("--compile-configs", default="abdomen_mr_2d")
    p.add_argument("--compile-backends", default="triton,cuda")
    p.add_argument("--gradcheck-configs", default="abdomen_mr_2d")
    p.add_argument("--compile-limit", type=float, default=150)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, any device: checks the script")
    # worker mode (one training step per process)
    p.add_argument("--worker", choices=["train", "compile", "gradcheck"])
    p.add_argument("--config")
    p.add_argument("--backend")
    p.add_argument("--budget", type=float, default=120)
    p.add_argument("--grad-out")
    ns = p.parse_args()
    if ns.worker:
        worker_main(ns)
        return

    ns.out.mkdir(parents=True, exist_ok=True)
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
    limits = {}
    for item in ns.train_limits.split(","):
        k, v = item.rsplit("=", 1)
        limits[k] = float(v)
    jobs = {
        "parity": lambda: section_parity(dev, cuda_ok, ns.smoke, triton_ok),
        "module": lambda: section_module(dev, cuda_ok, ns.smoke),
        "bench": lambda: section_bench(dev, cuda_ok, ns.smoke, ns.bench_backends.split(",")),
        "train": lambda: section_train(ns.train_configs.split(","), ns.train_backends.split(","), limits, ns.smoke),
        "gradcheck": lambda: section_gradcheck(ns.gradcheck_configs.split(","), 150, ns.smoke),
        "compile": lambda: section_compile(ns.compile_configs.split(","), ns.compile_backends.split(","),
                                           ns.compile_limit, ns.smoke),
    }
    for name in sections:
        if name in ("train", "compile", "gradcheck") and dev.type != "cuda" and not ns.smoke:
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
