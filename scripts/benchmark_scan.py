"""Benchmark the selective scan on the CPU: the fused numba kernel and the torch backend against the
sequential oracle and two floors, whole training steps against the conv backbone, and numba's JIT cost.

Prints markdown tables and writes them into ``docs/benchmarks.md`` (section "Selective scan (CPU)").
Every scan input is fp32 with ``delta_softplus``, ``D``, ``z`` and ``delta_bias`` (the network's call),
n = 16. The step table comes from ``scripts/benchmark_step.py``.

    python scripts/benchmark_scan.py            # full run, about half an hour, updates docs/benchmarks.md
    python scripts/benchmark_scan.py --quick    # smoke run on small shapes, writes nothing
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchmark_step  # noqa: E402
from lkm_unet.ops import available_backends, selective_scan  # noqa: E402
from lkm_unet.ops.selective_scan_ref import selective_scan_ref  # noqa: E402
from lkm_unet.ops.selective_scan_torch import selective_scan_torch  # noqa: E402

selective_scan_numba = functools.partial(selective_scan, backend="numba")

N_STATE = 16
# The scan's fp32 flops per b d l n element, an exp counted as 12. Forward 18: dt A (1), exp (12),
# a h + dt u B (3), C h into the output (2). Backward 32: the recompute (18 again), then the adjoint's
# C dy + a g (2), sums into dB, du, ddelta, dA and dC (2 each, 10), a g and x = a g h (2).
FLOPS_PER_ELEMENT = 50
# A fixed fp32 peak measured once on this machine type (matrix multiply, 2 threads), which the earlier
# tables' floor used: 50 flops at it are 0.27 ns per element. The table now takes the floor at the peak
# measured in turn with each row's scans, and keeps this one's ratio beside it.
REFERENCE_GFLOPS = 182.0
PEAK_SIZE = 2048  # square fp32 matrix multiply timed for the peak
SECTION = "## Selective scan (CPU)"
# (b, d, l) and how often to time the oracle's fwd+bwd (0: not tried; about 100 s at (64, 64, 1600) on an
# idle machine, and at l = 26880 its backward does not finish)
FULL = [((2, 64, 1600), 3), ((4, 64, 1600), 3), ((64, 64, 1600), 0), ((1600, 64, 64), 1),
        ((400, 256, 16), 1), ((1, 64, 26880), 0), ((1, 640, 840), 1)]
QUICK = [((2, 64, 256), 1), ((1, 64, 2000), 0)]
STEP_CASES = {"full": (("demo", 5), ("paper2d", 3)), "quick": (("demo", 1),)}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(b: int, d: int, l: int, requires_grad: bool = True) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = N_STATE
    x = [torch.randn(b, d, l, generator=g), 0.5 * torch.randn(b, d, l, generator=g) - 1.0,
         -torch.exp(0.5 * torch.randn(d, n, generator=g)), torch.randn(b, n, l, generator=g),
         torch.randn(b, n, l, generator=g), torch.randn(d, generator=g), torch.randn(b, d, l, generator=g),
         0.3 * torch.randn(d, generator=g)]
    return [t.requires_grad_(requires_grad) for t in x]


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    return statistics.median(rotated_ms({"fn": fn}, repeats, warmup)["fn"])


def training_step(scan: Callable[..., torch.Tensor], inputs: list[torch.Tensor], dy: torch.Tensor) -> None:
    for t in inputs:
        t.grad = None
    scan(*inputs, delta_softplus=True).backward(dy)


def moved_elements(b: int, d: int, l: int) -> int:
    """Elements a fwd+bwd must read and write at least once (the bytes-moved floor, in fp32 elements).

    Forward: read u, delta, z (b d l each) and B, C (b n l each), write y (b d l). Backward: read them
    again with dy, write du, ddelta, dz, dB, dC. Total 11 b d l + 6 b n l.
    """
    return 11 * b * d * l + 6 * b * N_STATE * l


def rotated_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Each function once per round, for ``repeats`` rounds after ``warmup`` untimed ones: every function's
    times (ms). Run in turn like this, a drift of the machine during the rounds reaches every function
    alike, so ratios between them hold where absolute times drift."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - start))
    return times


def matmul() -> Callable[[], object]:
    """A ``PEAK_SIZE`` square fp32 matrix multiply into a preallocated output: the peak's measure."""
    a, b = torch.randn(PEAK_SIZE, PEAK_SIZE), torch.randn(PEAK_SIZE, PEAK_SIZE)
    out = torch.empty(PEAK_SIZE, PEAK_SIZE)
    return lambda: torch.mm(a, b, out=out)


def peak_gflops(matmul_ms: list[float]) -> float:
    """The fp32 peak in GFLOP/s from timed ``matmul()`` calls: the fastest of them (a higher peak only
    lowers the floor)."""
    return 2 * PEAK_SIZE ** 3 / (min(matmul_ms) * 1e6)


def arithmetic_floor_ms(b: int, d: int, l: int, gflops: float) -> float:
    """fwd+bwd flops of a (b, d, l) scan at ``gflops``, in ms."""
    return FLOPS_PER_ELEMENT * b * d * l * N_STATE / (gflops * 1e6)


def copy_floor_ms(b: int, d: int, l: int, repeats: int) -> float:
    """The bytes-moved floor for fwd+bwd, measured here and now: a copy of moved_elements / 2 fp32
    elements (a copy reads and writes each element once)."""
    src = torch.rand(moved_elements(b, d, l) // 2)
    dst = torch.empty_like(src)
    return median_ms(lambda: dst.copy_(src), repeats)


_PEAK_SCRIPT = """
import re, sys, torch
sys.path[:0] = [{root!r}, {scripts!r}]
torch.set_num_threads({threads})
import benchmark_scan as bs
def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
scan = getattr(bs, {scan!r})
bs.training_step(scan, bs.make_inputs(1, 8, 300), torch.randn(1, 8, 300))  # one-time init (and JIT)
x = bs.make_inputs({b}, {d}, {l})
dy = torch.randn({b}, {d}, {l})
open("/proc/self/clear_refs", "w").write("5")  # resets the peak RSS (VmHWM) to the current RSS
before = status("VmRSS")
bs.training_step(scan, x, dy)
print((status("VmHWM") - before) / 1024)
"""


def peak_memory_mib(b: int, d: int, l: int, threads: int, scan: str) -> Optional[float]:
    """Growth of the peak RSS during one fwd+bwd of ``scan`` (a name in this module), in a fresh process
    (Linux only)."""
    code = _PEAK_SCRIPT.format(root=str(ROOT), scripts=str(ROOT / "scripts"), threads=threads, b=b, d=d, l=l,
                               scan=scan)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    return float(result.stdout.strip()) if result.returncode == 0 else None


_REF_SCRIPT = """
import sys, torch
sys.path[:0] = [{root!r}, {scripts!r}]
torch.set_num_threads({threads})
import benchmark_scan as bs
x = bs.make_inputs({b}, {d}, {l})
dy = torch.randn({b}, {d}, {l}, generator=torch.Generator().manual_seed(1))
print(bs.median_ms(lambda: bs.training_step(bs.selective_scan_ref, x, dy), {repeats}, warmup=0))
"""


def ref_ms(b: int, d: int, l: int, repeats: int, threads: int, limit_s: float) -> Optional[float]:
    """Median fwd+bwd time of the oracle, run in a subprocess; None if it exceeds ``limit_s`` in all."""
    code = _REF_SCRIPT.format(root=str(ROOT), scripts=str(ROOT / "scripts"), threads=threads, b=b, d=d, l=l,
                              repeats=repeats)
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return None
    return float(result.stdout.strip()) if result.returncode == 0 else None


def bench_shape(shape: tuple[int, int, int], ref_repeats: int, repeats: int, threads: int,
                ref_limit_s: float, fused: bool) -> dict:
    """One row: the scans' fwd, then their fwd+bwd in one rotation with the two floors' measures
    (``torch.exp`` over b d l n elements, the peak's matrix multiply), so that a row's ratios compare
    times taken in turn."""
    b, d, l = shape
    inputs = make_inputs(b, d, l)
    dy = torch.randn(b, d, l, generator=torch.Generator().manual_seed(1))
    scans = {"torch": selective_scan_torch, **({"numba": selective_scan_numba} if fused else {})}
    with torch.no_grad():
        fwd = rotated_ms({name: functools.partial(scan, *inputs, delta_softplus=True)
                          for name, scan in scans.items()}, repeats)
    x = torch.rand(b * d * l * N_STATE)
    exp_out = torch.empty_like(x)
    both = rotated_ms({**{name: functools.partial(training_step, scan, inputs, dy) for name, scan in scans.items()},
                       "exp": lambda: torch.exp(x, out=exp_out), "matmul": matmul()}, repeats)
    del x, exp_out
    row = {"shape": shape, "numba_fwd": None, "numba": None, "numba_peak_mib": None}
    for name in scans:
        row[f"{name}_fwd"] = statistics.median(fwd[name])
        row[name] = statistics.median(both[name])
        row[f"{name}_peak_mib"] = peak_memory_mib(b, d, l, threads, f"selective_scan_{name}")
    row["eager"] = 2 * statistics.median(both["exp"])  # the decay's exponentials, forward and backward
    row["gflops"] = peak_gflops(both["matmul"])
    row["arithmetic"] = arithmetic_floor_ms(b, d, l, row["gflops"])
    row["arithmetic_ref"] = arithmetic_floor_ms(b, d, l, REFERENCE_GFLOPS)
    row["copy"] = copy_floor_ms(b, d, l, repeats)
    row["ref"] = ref_ms(b, d, l, ref_repeats, threads, ref_limit_s) if ref_repeats else None
    return row


def _ms(value: Optional[float], digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ratio(a: Optional[float], b: Optional[float], digits: int = 1) -> str:
    return "—" if a is None or b is None else f"{a / b:.{digits}f}x"


def table(rows: list[dict]) -> str:
    lines = ["| shape (b, d, l) | ref fwd+bwd ms | torch fwd ms | torch fwd+bwd ms | numba fwd ms "
             "| numba fwd+bwd ms | numba vs torch | peak GFLOP/s | arithmetic floor ms | numba x arithmetic "
             f"| numba x arithmetic at {REFERENCE_GFLOPS:.0f} GFLOP/s | eager floor ms "
             "| numba x eager | torch x eager | peak extra MiB torch / numba |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| ({', '.join(map(str, r['shape']))}) | {_ms(r['ref'], 0)} | {_ms(r['torch_fwd'])} | {_ms(r['torch'])} "
            f"| {_ms(r['numba_fwd'])} | {_ms(r['numba'])} | {_ratio(r['torch'], r['numba'])} "
            f"| {r['gflops']:.0f} | {r['arithmetic']:.2f} | {_ratio(r['numba'], r['arithmetic'])} "
            f"| {_ratio(r['numba'], r['arithmetic_ref'])} | {r['eager']:.1f} "
            f"| {_ratio(r['numba'], r['eager'])} | {_ratio(r['torch'], r['eager'])} "
            f"| {_ms(r['torch_peak_mib'], 0)} / {_ms(r['numba_peak_mib'], 0)} |")
    return "\n".join(lines)


_JIT_SCRIPT = """
import sys, time
start = time.perf_counter()
import torch
sys.path[:0] = [{root!r}, {scripts!r}]
torch.set_num_threads({threads})
import benchmark_scan as bs
x, dy = bs.make_inputs(2, 4, 70), torch.randn(2, 4, 70)
timed = []
for _ in range(2):
    t = time.perf_counter()
    bs.training_step(bs.selective_scan_numba, x, dy)
    timed.append(time.perf_counter() - t)
print(timed[0] - timed[1])
"""


def jit_seconds(threads: int) -> tuple[Optional[float], Optional[float]]:
    """Seconds the first numba fwd+bwd of a process costs beyond a warm call (import of numba, compiling
    or loading the fp32 kernels): with an empty on-disk cache, then with the cache that run filled."""
    code = _JIT_SCRIPT.format(root=str(ROOT), scripts=str(ROOT / "scripts"), threads=threads)
    results = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for _ in range(2):
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
            results.append(float(run.stdout.strip()) if run.returncode == 0 else None)
    return results[0], results[1]


def machine() -> str:
    model = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        model = names[0] if names else model
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{model}, {cores} cores usable, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()}), torch.set_num_threads({torch.get_num_threads()})")


def write_section(path: Path, body: str) -> None:
    """Replace (or append) the section starting at SECTION, keeping the other sections."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + ("" if end < 0 else text[end:])
    path.write_text(text.rstrip("\n") + "\n")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small shapes, one repeat, the demo step only, nothing written")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats of each backend (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch and numba threads")
    parser.add_argument("--ref-limit", type=float, default=150.0,
                        help="seconds allowed for all of one shape's oracle repeats; '—' when exceeded")
    parser.add_argument("--no-steps", action="store_true", help="skip the whole-step table")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    os.environ["NUMBA_NUM_THREADS"] = str(args.threads)  # before numba is imported (the first numba call)
    torch.set_num_threads(args.threads)
    fused = available_backends()["numba"] == "ok"
    shapes = QUICK if args.quick else FULL
    repeats = 1 if args.quick else args.repeats
    load_before = os.getloadavg()
    started = time.perf_counter()
    jit_cold, jit_cached = jit_seconds(args.threads) if fused else (None, None)
    print(f"numba first-call cost: {_ms(jit_cold, 1)} s with an empty cache, {_ms(jit_cached, 2)} s cached",
          flush=True)
    rows = []
    for shape, ref_repeats in shapes:
        rows.append(bench_shape(shape, ref_repeats, repeats, args.threads, args.ref_limit, fused))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    steps = []
    for case, n_steps in ([] if args.no_steps else STEP_CASES["quick" if args.quick else "full"]):
        start = len(steps)
        steps += [benchmark_step.time_steps(case, net, "—", n_steps) for net in benchmark_step.NETS[:2]]
        for backend in ("numba", "torch") if fused else ("torch",):
            steps.append(benchmark_step.time_steps(case, "LKM-UNet", backend, n_steps))
        print(benchmark_step.step_table(steps[start:]), flush=True)
    where = None if args.no_steps or args.quick or not fused else benchmark_step.breakdown("demo", "numba")
    if where:
        print(where, flush=True)
    minutes = (time.perf_counter() - started) / 60
    command = "python scripts/benchmark_scan.py" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))
    peaks = [r["gflops"] for r in rows]
    peak_range = f"{min(peaks):.0f}-{max(peaks):.0f}" if peaks else "—"
    load = ", ".join(f"{a:.1f}" for a in load_before) + " -> " + ", ".join(f"{a:.1f}" for a in os.getloadavg())
    body = "\n".join([
        SECTION, "",
        f"Produced by `{command}` ({minutes:.1f} min) on {machine()}, numba threads {args.threads}. 1-minute "
        f"load average before and after (1, 5, 15 min): {load} (the after figure counts this run's own threads). "
        "The same code's times drift by up to 45% between runs on this machine, and its fp32 peak is not "
        f"fixed either ({peak_range} GFLOP/s across the rows below, against {REFERENCE_GFLOPS:.0f} measured "
        "once earlier), so read ratios within a row, not absolute times across runs.", "",
        f"fp32, n = {N_STATE}, `delta_softplus=True` with `D`, `z` and `delta_bias` (the network's call). "
        f"Medians of {repeats} repeats after a warm-up, a row's timings taken in turn (torch, numba, the "
        "eager floor's exp, the peak's matrix multiply, then again) so that a drift reaches them alike (the "
        "oracle: the repeats given in the script, no warm-up, in a fresh process; — where it was not tried "
        "(minutes; at l = 26880 its backward does not finish) or did not finish within "
        f"{args.ref_limit:.0f} s). fwd is under `torch.no_grad()`; "
        "fwd+bwd is one forward and `backward()` of every input's gradient.", "",
        f"- arithmetic floor: the scan's {FLOPS_PER_ELEMENT} fp32 flops per b d l n element for fwd+bwd (an exp "
        "counted as 12; `FLOPS_PER_ELEMENT` in the script counts them) at peak GFLOP/s, the fp32 peak measured "
        f"in the same row: the fastest of the row's {PEAK_SIZE} x {PEAK_SIZE} matrix multiplies, timed in turn "
        "with its scans, so that the floor is taken at this machine's peak at the time of the scans rather than "
        "at another run's. The column at "
        f"{REFERENCE_GFLOPS:.0f} GFLOP/s uses the fixed peak measured once earlier on this machine type "
        f"({FLOPS_PER_ELEMENT / REFERENCE_GFLOPS:.3f} ns per element), the floor of the earlier tables.",
        "- eager floor: `torch.exp` over b d l n fp32 elements into a preallocated output, timed in turn with "
        "the row's scans, x2 for fwd+bwd (the decay exp(dt A) is needed once in the forward and once in the "
        "recomputing backward).",
        "- peak extra MiB: growth of the peak resident set size during one fwd+bwd in a fresh process, over "
        "the resident size with the inputs allocated (VmHWM reset through /proc/self/clear_refs).", "",
        table(rows), "",
        "numba's first call in a process (importing numba and compiling, or loading, the fp32 kernels; a tiny "
        f"fwd+bwd minus a warm one): {_ms(jit_cold, 1)} s with an empty on-disk cache, {_ms(jit_cached, 2)} s "
        "with the cache filled (`cache=True`; `NUMBA_CACHE_DIR` moves it).", "",
        "### Training step: LKM-UNet against its conv backbone", "",
        "From `scripts/benchmark_step.py` (its docstring describes the networks): forward, deep-supervised "
        "cross-entropy, backward and an SGD step in fp32; the median of the timed steps after one warm-up "
        "step (first step s: the warm-up, with the JIT cost where the cache is cold). The backbone is the same "
        "network without PiM and PaM (the `noMamba` ablation: the same residual encoder and residual decoder), "
        "so x backbone is the cost of PiM and PaM; `ResidualEncoderUNet` (x ResEnc) has the same encoder and "
        "nnU-Net's plain decoder, which is lighter than LKM-UNet's residual one. LKM-UNet has its "
        "default memory options: `ssm_checkpointing=\"auto\"` does not recompute on the CPU (README, Memory).", "",
        benchmark_step.step_table(steps) if steps else "(skipped)", "",
        "### Where PiM and PaM spend a demo step", "",
        "`python scripts/benchmark_step.py demo --breakdown` (run here in the same process): torch.profiler's "
        "self CPU time of LKM-UNet's step and of its backbone's, by kind of op, medians of 5 profiled steps "
        "each; the difference is the cost of PiM and PaM. The profiler adds its own overhead, so the totals "
        "exceed the timed steps above.", "",
        where or "(skipped)", "",
    ])
    print()
    print(body)
    if args.json:
        args.json.write_text(json.dumps({"scan": rows, "steps": steps, "jit_s": [jit_cold, jit_cached]}, indent=1))
    if not args.quick:
        write_section(args.output, body)


if __name__ == "__main__":
    main()
