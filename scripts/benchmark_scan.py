"""Benchmark the selective scan on the CPU: the torch backend against the sequential oracle and two floors.

Prints a markdown table and writes it into ``docs/benchmarks.md`` (section "Selective scan (CPU)").
Every input is fp32 with ``delta_softplus``, ``D``, ``z`` and ``delta_bias`` (the network's call), n = 16.

    python scripts/benchmark_scan.py            # full run, a few minutes, updates docs/benchmarks.md
    python scripts/benchmark_scan.py --quick    # smoke run on small shapes, writes nothing
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lkm_unet.ops.selective_scan_ref import selective_scan_ref  # noqa: E402
from lkm_unet.ops.selective_scan_torch import selective_scan_torch  # noqa: E402

N_STATE = 16
SECTION = "## Selective scan (CPU)"
# (b, d, l) and how often to time the oracle's fwd+bwd (0: not tried; about 100 s at (64, 64, 1600) on an
# idle machine, and at l = 26880 its backward does not finish)
FULL = [((2, 64, 1600), 3), ((4, 64, 1600), 3), ((64, 64, 1600), 0), ((1600, 64, 64), 1),
        ((400, 256, 16), 1), ((1, 64, 26880), 0), ((1, 640, 840), 1)]
QUICK = [((2, 64, 256), 1), ((1, 64, 2000), 0)]
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
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


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


def floors_ms(b: int, d: int, l: int, repeats: int) -> tuple[float, float]:
    """(bytes-moved floor, eager floor) for fwd+bwd, both measured here and now.

    Bytes moved: a copy of moved_elements / 2 fp32 elements (a copy reads and writes each element once).
    Eager: torch.exp over b d l n elements into a preallocated output, twice (forward and backward).
    """
    src = torch.rand(moved_elements(b, d, l) // 2)
    dst = torch.empty_like(src)
    copy = median_ms(lambda: dst.copy_(src), repeats)
    del src, dst
    x = torch.rand(b * d * l * N_STATE)
    out = torch.empty_like(x)
    return copy, 2 * median_ms(lambda: torch.exp(x, out=out), repeats)


_PEAK_SCRIPT = """
import re, sys, torch
sys.path[:0] = [{root!r}, {scripts!r}]
torch.set_num_threads({threads})
import benchmark_scan as bs
def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
bs.training_step(bs.selective_scan_torch, bs.make_inputs(1, 8, 300), torch.randn(1, 8, 300))  # one-time init
x = bs.make_inputs({b}, {d}, {l})
dy = torch.randn({b}, {d}, {l})
open("/proc/self/clear_refs", "w").write("5")  # resets the peak RSS (VmHWM) to the current RSS
before = status("VmRSS")
bs.training_step(bs.selective_scan_torch, x, dy)
print((status("VmHWM") - before) / 1024)
"""


def peak_memory_mib(b: int, d: int, l: int, threads: int) -> Optional[float]:
    """Growth of the peak RSS during one torch-backend fwd+bwd, in a fresh process (Linux only)."""
    code = _PEAK_SCRIPT.format(root=str(ROOT), scripts=str(ROOT / "scripts"), threads=threads, b=b, d=d, l=l)
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
                ref_limit_s: float) -> dict:
    b, d, l = shape
    inputs = make_inputs(b, d, l)
    dy = torch.randn(b, d, l, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fwd = median_ms(lambda: selective_scan_torch(*inputs, delta_softplus=True), repeats)
    fwd_bwd = median_ms(lambda: training_step(selective_scan_torch, inputs, dy), repeats)
    ref = ref_ms(b, d, l, ref_repeats, threads, ref_limit_s) if ref_repeats else None
    copy, eager = floors_ms(b, d, l, repeats)
    return {"shape": shape, "ref": ref, "fwd": fwd, "fwd_bwd": fwd_bwd, "copy": copy, "eager": eager,
            "peak_mib": peak_memory_mib(b, d, l, threads)}


def table(rows: list[dict]) -> str:
    lines = ["| shape (b, d, l) | ref fwd+bwd ms | torch fwd ms | torch fwd+bwd ms | speed-up vs ref "
             "| bytes-moved floor ms | x floor | eager floor ms | x eager | peak extra MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = "—" if r["ref"] is None else f"{r['ref']:.0f}"
        speedup = "—" if r["ref"] is None else f"{r['ref'] / r['fwd_bwd']:.0f}x"
        peak = "—" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(
            f"| ({', '.join(map(str, r['shape']))}) | {ref} | {r['fwd']:.1f} | {r['fwd_bwd']:.1f} | {speedup} "
            f"| {r['copy']:.2f} | {r['fwd_bwd'] / r['copy']:.0f}x | {r['eager']:.1f} "
            f"| {r['fwd_bwd'] / r['eager']:.1f}x | {peak} |")
    return "\n".join(lines)


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
    parser.add_argument("--quick", action="store_true", help="small shapes, one repeat, nothing written")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats of the torch backend (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ref-limit", type=float, default=150.0,
                        help="seconds allowed for all of one shape's oracle repeats; '—' when exceeded")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = QUICK if args.quick else FULL
    repeats = 1 if args.quick else args.repeats
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows = []
    for shape, ref_repeats in shapes:
        rows.append(bench_shape(shape, ref_repeats, repeats, args.threads, args.ref_limit))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    minutes = (time.perf_counter() - started) / 60
    command = "python scripts/benchmark_scan.py" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))
    load = ", ".join(f"{a:.1f}" for a in load_before) + " -> " + ", ".join(f"{a:.1f}" for a in os.getloadavg())
    body = "\n".join([
        SECTION, "",
        f"Produced by `{command}` ({minutes:.1f} min) on {machine()}. 1-minute load average before and after "
        f"(1, 5, 15 min): {load}; other processes share the cores, so read ratios within a row, not absolute "
        "times across runs.", "",
        f"fp32, n = {N_STATE}, `delta_softplus=True` with `D`, `z` and `delta_bias` (the network's call). "
        f"Medians of {repeats} repeats after a warm-up (the oracle: the repeats given in the script, no "
        "warm-up, in a fresh process; — where it was not tried (minutes; at l = 26880 its backward does not "
        f"finish) or did not finish within {args.ref_limit:.0f} s). fwd is under `torch.no_grad()`; "
        "fwd+bwd is one forward and `backward()` of every input's gradient.", "",
        "- bytes-moved floor: the time, measured in the same run, of `copy_` between two fp32 buffers of "
        "(11 b d l + 6 b n l) / 2 elements each: the forward reads u, delta, z, B, C and writes y; the backward "
        "reads them again with dy and writes du, ddelta, dz, dB, dC. The copy is repeated on the same buffers, "
        "so for the small shapes it runs from cache: a cache-bandwidth floor there, a memory one for the large.",
        "- eager floor: `torch.exp` over b d l n fp32 elements into a preallocated output, timed in the same "
        "run, x2 for fwd+bwd (the decay exp(dt A) is needed once in the forward and once in the recomputing "
        "backward).",
        "- peak extra MiB: growth of the peak resident set size during one fwd+bwd in a fresh process, over "
        "the resident size with the inputs allocated (VmHWM reset through /proc/self/clear_refs).", "",
        table(rows), "",
    ])
    print()
    print(body)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if not args.quick:
        write_section(args.output, body)


if __name__ == "__main__":
    main()
