"""Activation memory of LKM-UNet per memory option, next to the same backbone without PiM/PaM.

CPU mode (default; device-independent numbers): for each configuration, precision and memory option,
one fresh subprocess builds the network, runs one training forward pass counting the bytes autograd
saves for backward (unique storages, per block: ``lkm_unet.memory``), then the backward pass, and
reports its peak resident set size (VmHWM) above the resident size before the forward pass.

    python scripts/benchmark_memory.py                     # the docs table (2D paper, reduced 3D)
    python scripts/benchmark_memory.py --quick             # tiny shapes, a check that it works
    python scripts/benchmark_memory.py --fake --patch-3d 40x224x192 --batch-3d 2   # saved bytes only

``--fake`` counts the saved bytes on fake tensors (``lkm_unet.memory.saved_bytes(fake=True)``): no data,
no arithmetic, no backward and so no peak RSS, but the paper's full 3D patch and bf16 convolutions
(which a CPU without bf16 instructions runs 10-35x slower than fp32) take seconds. Every run also
prints the batch-sizing estimate, ``CONV_BYTES_PER_ELEMENT x compute_conv_feature_map_size(patch) x
batch`` (calibrated for bf16 autocast), next to the count.

CUDA mode: the paper's training steps (bf16 autocast, SGD, deep supervision), per memory option, each in
its own process: ``torch.cuda.max_memory_allocated`` and the median step time, within a time budget.

    python scripts/benchmark_memory.py --device cuda --budget-s 300
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {
    "none": {"ssm_checkpointing": False, "ssm_autocast": False},
    "autocast": {"ssm_checkpointing": False, "ssm_autocast": True},
    "checkpointing": {"ssm_checkpointing": True, "ssm_autocast": False},
    "both": {"ssm_checkpointing": True, "ssm_autocast": True},
}
CONFIGS = {"2d": "abdomen_mr_2d", "3d": "abdomen_ct_3d"}
GIB = 2 ** 30


def build(spec: dict[str, Any]):
    """The network of a run: LKM-UNet (a preset with memory options) or its ResidualEncoderUNet backbone."""
    import torch
    from lkm_unet import LKMUNet, load_config

    torch.manual_seed(0)
    config = CONFIGS[spec["config"]]
    if spec["network"] == "backbone":
        from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
        from lkm_unet.nets.lkm_unet import _resolve

        from lkm_unet.presets import preset_kwargs

        # the preset fixes the block counts (encoder blocks, decoder convs) as well as the LKM sizes
        blocks = {k: v for k, v in preset_kwargs(spec["preset"], config).items()
                  if k in ("n_blocks_per_stage", "n_conv_per_stage_decoder")}
        arch = {**load_config(config)["architecture"], **blocks}
        for key in ("shape_policy", "d_state", "d_conv", "expand"):
            arch.pop(key)
        for key in ("conv_op", "norm_op", "nonlin", "dropout_op"):
            arch[key] = _resolve(arch[key], key)
        net = ResidualEncoderUNet(input_channels=1, num_classes=14, deep_supervision=True, **arch)
    else:
        net = LKMUNet.from_preset(spec["preset"], config, input_channels=1, num_classes=14,
                                  deep_supervision=True, shape_policy="pad", **OPTIONS[spec["option"]])
    net.apply(LKMUNet.initialize)
    return net


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _loss(out) -> Any:
    return sum(o.float().square().mean() for o in out)


def run_cpu(spec: dict[str, Any]) -> dict[str, Any]:
    """One CPU measurement (runs inside the subprocess)."""
    import torch
    from lkm_unet.memory import saved_bytes

    torch.set_num_threads(spec.get("threads", 2))
    net = build(spec)
    x = torch.randn(spec["batch"], 1, *spec["patch"])
    dtype = {"fp32": None, "bf16": torch.bfloat16}[spec["precision"]]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    counted, out = saved_bytes(net, x, dtype, fake=spec.get("fake", False))
    result = {"saved": counted.total, "per_block": counted.per_block, "estimate": estimate(net, spec)}
    if spec.get("fake"):
        return result
    if spec.get("backward", True):
        _loss(out).backward()
        missing = [n for n, p in net.named_parameters() if p.grad is None]
        result["params_without_grad"] = len(missing)
    result["peak_extra"] = (_rss_kib("VmHWM") - before) * 1024
    result["seconds"] = time.perf_counter() - start
    return result


def estimate(net, spec: dict[str, Any]) -> int:
    """Bytes the batch-sizing estimate expects the run to save (nnU-Net's feature map size, in the
    bytes per element measured under bf16 autocast)."""
    from lkm_unet.nets.lkm_encoder import CONV_BYTES_PER_ELEMENT

    return int(CONV_BYTES_PER_ELEMENT * int(net.compute_conv_feature_map_size(spec["patch"])) * spec["batch"])


def run_cuda(spec: dict[str, Any]) -> dict[str, Any]:
    """One CUDA training-step measurement (runs inside the subprocess)."""
    import torch

    torch.backends.cudnn.benchmark = True
    net = build(spec).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    x = torch.randn(spec["batch"], 1, *spec["patch"], device="cuda")
    times, losses = [], []
    deadline = time.perf_counter() + spec["seconds"]
    for step in range(spec.get("max_steps", 12)):
        if step == 1:
            torch.cuda.reset_peak_memory_stats()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = _loss(net(x))
        loss.backward()
        opt.step()
        end.record()
        torch.cuda.synchronize()
        losses.append(loss.item())
        if step > 0:
            times.append(begin.elapsed_time(end))
        if time.perf_counter() > deadline and step >= 1:
            break
    times.sort()
    return {"step_ms": times[len(times) // 2] if times else None, "steps": len(times),
            "peak": torch.cuda.max_memory_allocated(), "finite": all(map(lambda v: v == v and abs(v) < 1e30, losses))}


def measure(spec: dict[str, Any], timeout: Optional[float] = None) -> dict[str, Any]:
    """Run one spec in a fresh interpreter (so each peak is its own) and return its result; a fake
    count has no peak, so it runs in this process."""
    if spec.get("fake"):
        try:
            return run_cpu(spec)
        except Exception as error:  # reported in its table row, as a subprocess's error is
            return {"error": f"{type(error).__name__}: {error}"}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True,
                              text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def cpu_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    specs = []
    for config in args.configs:
        patch = args.patch_2d if config == "2d" else args.patch_3d
        batch = args.batch_2d if config == "2d" else args.batch_3d
        for precision in args.precisions:
            base = {"config": config, "patch": patch, "batch": batch, "precision": precision,
                    "backward": not (args.no_backward or args.fake), "preset": args.preset, "fake": args.fake}
            specs.append({**base, "network": "backbone", "option": "-"})
            specs += [{**base, "network": "lkm", "option": option} for option in args.options]
    return specs


def cpu_table(rows: list[tuple[dict, dict]]) -> str:
    lines = ["| config | input | precision | network | memory option | saved GiB | x backbone | "
             "PiM+PaM saved GiB | estimate GiB | peak RSS extra GiB |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    backbone: dict[tuple, float] = {}
    for spec, res in rows:
        key = (spec["config"], spec["precision"])
        shape = f"{spec['batch']} x 1 x {' x '.join(map(str, spec['patch']))}"
        name = "ResidualEncoderUNet" if spec["network"] == "backbone" else f"LKM-UNet ({spec['preset']})"
        if "error" in res:
            lines.append(f"| {CONFIGS[spec['config']]} | {shape} | {spec['precision']} | {name} | {spec['option']} "
                         f"| {res['error']} | | | | |")
            continue
        if spec["network"] == "backbone":
            backbone[key] = res["saved"]
        ssm = sum(v for k, v in res["per_block"].items() if k.endswith(("PiM", "PaM")))
        ratio = f"{res['saved'] / backbone[key]:.2f}" if key in backbone else "-"
        peak = f"{res['peak_extra'] / GIB:.2f}" if "peak_extra" in res else "-"
        lines.append(f"| {CONFIGS[spec['config']]} | {shape} | {spec['precision']} | {name} | {spec['option']} | "
                     f"{res['saved'] / GIB:.2f} | {ratio} | {ssm / GIB:.2f} | {res['estimate'] / GIB:.2f} | {peak} |")
    return "\n".join(lines)


def block_table(rows: list[tuple[dict, dict]]) -> str:
    """Saved MiB per block, one column per run."""
    runs = [(s, r) for s, r in rows if "per_block" in r]
    labels: list[str] = []
    for _, r in runs:
        labels += [k for k in r["per_block"] if k not in labels]
    head = [f"{s['config']} {s['precision']} {s['network'] if s['network'] == 'backbone' else s['option']}"
            for s, _ in runs]
    lines = ["| block | " + " | ".join(head) + " |", "|---|" + "---:|" * len(runs)]
    for label in labels:
        cells = [f"{r['per_block'].get(label, 0) / 2 ** 20:.0f}" for _, r in runs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cuda_main(args: argparse.Namespace) -> None:
    runs = [("3d", [40, 224, 192], 2), ("2d", [320, 320], 2)]
    specs = [{"config": c, "patch": p, "batch": b, "network": "lkm", "preset": args.preset, "option": o}
             for c, p, b in runs for o in args.options]
    specs += [{"config": c, "patch": p, "batch": b, "network": "backbone", "option": "-", "preset": "-"}
              for c, p, b in runs]
    print("| config | input | network | memory option | step ms (median) | steps | peak GiB | finite |")
    print("|---|---|---|---|---:|---:|---:|---|")
    t_end = time.perf_counter() + args.budget_s
    for i, spec in enumerate(specs):
        left = t_end - time.perf_counter()
        if left < 20:
            print(f"<!-- budget spent: {len(specs) - i} runs skipped -->")
            break
        spec["seconds"] = max(5.0, min(60.0, left / (len(specs) - i) - 15))
        res = measure({**spec, "device": "cuda"}, timeout=left)
        shape = f"{spec['batch']} x 1 x {' x '.join(map(str, spec['patch']))}"
        name = "ResidualEncoderUNet" if spec["network"] == "backbone" else f"LKM-UNet ({spec['preset']})"
        if "error" in res:
            print(f"| {CONFIGS[spec['config']]} | {shape} | {name} | {spec['option']} | {res['error']} | | | |")
        else:
            step = "-" if res["step_ms"] is None else f"{res['step_ms']:.1f}"
            print(f"| {CONFIGS[spec['config']]} | {shape} | {name} | {spec['option']} | {step} | {res['steps']} | "
                  f"{res['peak'] / GIB:.2f} | {res['finite']} |", flush=True)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--options", nargs="+", choices=tuple(OPTIONS), default=list(OPTIONS))
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--preset", choices=("paper", "official"), default="paper")
    parser.add_argument("--patch-2d", type=lambda s: [int(v) for v in s.split("x")], default=[320, 320])
    parser.add_argument("--patch-3d", type=lambda s: [int(v) for v in s.split("x")], default=[40, 224, 96],
                        help="reduced from the paper's 40x224x192 to fit a 24 GiB CPU machine; windows that do not "
                        "divide a feature map are padded (shape_policy 'pad')")
    parser.add_argument("--batch-2d", type=int, default=2)
    parser.add_argument("--batch-3d", type=int, default=1)
    parser.add_argument("--no-backward", action="store_true", help="saved bytes only (no peak RSS)")
    parser.add_argument("--fake", action="store_true", help="count saved bytes on fake tensors (no peak RSS)")
    parser.add_argument("--per-block", action="store_true", help="also print saved MiB per block")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks that the script works")
    parser.add_argument("--budget-s", type=float, default=300, help="CUDA mode: seconds for all runs")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(run_cuda(spec) if spec.get("device") == "cuda" else run_cpu(spec)))
        return
    if args.device == "cuda":
        cuda_main(args)
        return
    if args.quick:
        args.patch_2d, args.patch_3d = [128, 128], [16, 64, 64]   # the paper nets' bottlenecks stay 2 wide
    rows = []
    for spec in cpu_specs(args):
        rows.append((spec, measure(spec)))
        print(json.dumps({**spec, **{k: v for k, v in rows[-1][1].items() if k != "per_block"}}),
              file=sys.stderr, flush=True)
    print(cpu_table(rows))
    if args.per_block:
        print()
        print(block_table(rows))
    if args.json:
        args.json.write_text(json.dumps([{"spec": s, "result": r} for s, r in rows], indent=1))


if __name__ == "__main__":
    main()
