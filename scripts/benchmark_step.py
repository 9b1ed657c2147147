"""Whole training steps on the CPU: LKM-UNet against the same residual backbone without PiM and PaM (and, with
``--inference``, one patch's forward pass as nnU-Net predicts it).

Used by ``scripts/benchmark_scan.py --steps`` (which prints the table) and runnable alone for one case:

    python scripts/benchmark_step.py demo --backend numba --steps 5
    python scripts/benchmark_step.py demo --profile       # torch.profiler table of one step
    python scripts/benchmark_step.py demo --breakdown     # where PiM and PaM spend their time, by kind of op
    python scripts/benchmark_step.py demo --conv          # the causal conv1d + SiLU, torch against numba
    python scripts/benchmark_step.py demo --inference     # one patch's forward pass, as nnUNetv2_predict on the CPU
    python scripts/benchmark_step.py paper2d --options none checkpointing both --steps 5

``--options`` times the LKM-UNet step once per memory option (``scripts/benchmark_memory.py``'s names:
``none`` = no recomputation, the step before the memory options existed and what the default ``"auto"``
does on the CPU; ``checkpointing`` = recomputation, what ``"auto"`` does on a GPU;
``both`` = checkpointing and ``ssm_autocast``, which acts only under autocast, so on the CPU's fp32 step it
times like ``checkpointing``) and adds "x none", the step's cost relative to ``none``.

The networks:

- ``demo``: the quickstart's 2D network as ``lkm-unet plans 990 -c 2d --preset auto`` writes it for the
  demo dataset: a 96 x 96 patch, 5 stages of 32-512 features, one residual block per stage, two decoder
  convs, windows and pools 24, 12, 12, 6, 6; batch 4 (the quickstart's CPU batch).
- ``paper2d``: ``LKMUNet.from_preset("paper", "abdomen_mr_2d")``, 320 x 320, batch 2.

Three networks per case (``NETS``):

- ``LKM-UNet``: the network above.
- ``backbone``: the same network without PiM and PaM (``use_pim=False, use_pam=False``, the ``noMamba``
  ablation): the same residual encoder and the same residual decoder (two residual blocks per decoder
  stage), so ``x backbone`` is the cost of PiM and PaM alone.
- ``ResidualEncoderUNet``: dynamic-network-architectures' ``ResidualEncoderUNet`` (what nnU-Net's ResEnc
  plans train) with the same encoder, but its plain decoder (``n_conv_per_stage_decoder`` convolutions per
  stage, no residual blocks): lighter than the backbone, so ``x ResEnc`` is the larger ratio.

A step is nnU-Net's: forward, deep-supervised cross-entropy, backward, SGD (lr 1e-2, momentum
0.99, Nesterov), in fp32 (CPU training runs without autocast).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lkm_unet import LKMUNet  # noqa: E402
from lkm_unet.ops import scan_backend  # noqa: E402
from lkm_unet.presets import derive_kernel_sizes, load_config  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from benchmark_memory import OPTIONS  # noqa: E402

DEMO = {
    "n_stages": 5, "features_per_stage": [32, 64, 128, 256, 512], "conv_op": "torch.nn.modules.conv.Conv2d",
    "kernel_sizes": [[3, 3]] * 5, "strides": [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]],
    "n_blocks_per_stage": [1, 1, 1, 1, 1], "n_conv_per_stage_decoder": [2, 2, 2, 2], "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
}
# name -> (patch, batch, classes)
CASES = {"demo": ((96, 96), 4, 4), "paper2d": ((320, 320), 2, 14)}
BACKBONE_KEYS = ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_blocks_per_stage",
                 "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs", "nonlin", "nonlin_kwargs")


def architecture(case: str) -> dict:
    """LKM-UNet constructor kwargs of ``case`` (without input_channels / num_classes)."""
    if case == "demo":
        return {**DEMO, **derive_kernel_sizes(CASES["demo"][0], DEMO["strides"], "paper")}
    stored = load_config("abdomen_mr_2d")
    return {**stored["architecture"], **stored["presets"]["paper"]}


NETS = ("ResidualEncoderUNet", "backbone", "LKM-UNet")


def build(case: str, net: str, option: Optional[str] = None, deep_supervision: bool = True) -> nn.Module:
    """Network ``net`` of :data:`NETS` for ``case``; LKM-UNet with memory option ``option`` of :data:`OPTIONS`
    (else the defaults). ``deep_supervision=False`` builds what nnU-Net predicts with (one output)."""
    if net not in NETS:
        raise ValueError(f"net={net!r}; valid: {', '.join(NETS)}")
    kwargs = architecture(case)
    if net == "LKM-UNet" and option is not None:
        kwargs = {**kwargs, **OPTIONS[option]}
    classes = CASES[case][2]
    torch.manual_seed(0)
    if net == "LKM-UNet":
        return LKMUNet(input_channels=1, num_classes=classes, deep_supervision=deep_supervision, **kwargs)
    if net == "backbone":
        return LKMUNet(input_channels=1, num_classes=classes, deep_supervision=deep_supervision, use_pim=False,
                       use_pam=False, **kwargs)
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    from pydoc import locate

    backbone = {k: kwargs[k] for k in BACKBONE_KEYS}
    for key in ("conv_op", "norm_op", "nonlin"):
        backbone[key] = locate(backbone[key])
    return ResidualEncoderUNet(input_channels=1, num_classes=classes, deep_supervision=deep_supervision, **backbone)


def make_step(net: nn.Module, case: str):
    """A closure running one training step (forward, deep-supervised CE, backward, SGD)."""
    patch, batch, classes = CASES[case]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, *patch, generator=g)
    target = torch.randint(0, classes, (batch, *patch), generator=g)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        outputs = net(x)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        weights = [1 / 2 ** i for i in range(len(outputs))]
        if len(weights) > 1:
            weights[-1] = 0.0
        total = sum(weights)
        loss = sum(w / total * nn.functional.cross_entropy(
            out, nn.functional.interpolate(target[:, None].float(), size=out.shape[2:], mode="nearest")[:, 0].long())
            for w, out in zip(weights, outputs))
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def time_steps(case: str, net: str, backend: str, steps: int, option: Optional[str] = None) -> dict:
    """Median wall time of ``steps`` training steps of network ``net`` (:data:`NETS`) after one warm-up step
    (which includes any JIT)."""
    mamba = net == "LKM-UNet"
    model = build(case, net, option)
    step = make_step(model, case)
    with scan_backend(backend if mamba else "auto"):
        start = time.perf_counter()
        loss = step()
        first = time.perf_counter() - start
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return {"case": case, "net": net, "backend": backend if mamba else "—",
            "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "steps": steps,
            "first_s": first, "loss0": loss, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            **({"option": option} if mamba and option is not None else {})}


#: the forward passes of ``--inference``: (net, scan backend of LKM-UNet)
INFERENCE_RUNS = (("ResidualEncoderUNet", "—"), ("backbone", "—"), ("LKM-UNet", "numba"), ("LKM-UNet", "torch"))


def time_inference(case: str, repeats: int) -> list[dict]:
    """One row per :data:`INFERENCE_RUNS` entry: the median wall time of ``repeats`` forward passes of one patch
    (batch 1) under ``torch.inference_mode``, what ``nnUNetv2_predict -device cpu`` runs per sliding-window tile
    (deep supervision off, no test-time mirroring). The networks run in turn, round after round, so that a drift
    of the machine reaches them alike; the first round (``first_s``, with numba's cache load) is not counted."""
    models = [build(case, net, deep_supervision=False).eval() for net, _ in INFERENCE_RUNS]
    x = torch.randn(1, 1, *CASES[case][0], generator=torch.Generator().manual_seed(1))
    times: list[list[float]] = [[] for _ in INFERENCE_RUNS]
    with torch.inference_mode():
        for _ in range(repeats + 1):
            for (net, backend), model, taken in zip(INFERENCE_RUNS, models, times):
                with scan_backend(backend if net == "LKM-UNet" else "auto"):
                    start = time.perf_counter()
                    model(x)
                    taken.append(time.perf_counter() - start)
    return [{"case": case, "net": net, "backend": backend, "median_s": statistics.median(taken[1:]),
             "min_s": min(taken[1:]), "max_s": max(taken[1:]), "steps": repeats, "first_s": taken[0]}
            for (net, backend), taken in zip(INFERENCE_RUNS, times)]


def inference_table(results: list[dict]) -> str:
    """One row per forward pass timed by :func:`time_inference`, in ms, against the case's backbone and
    ``ResidualEncoderUNet``."""
    lines = ["| network | net | scan backend | patch | forward ms (median) | min-max ms | passes | first pass ms "
             "| x backbone | x ResEnc |", "|---|---|---|---|" + "---:|" * 6]
    base = {(r["case"], r["net"]): r["median_s"] for r in results}

    def ratio(r: dict, net: str) -> str:
        other = base.get((r["case"], net))
        return f" {r['median_s'] / other:.2f}x |" if other else " — |"

    for r in results:
        patch = " x ".join(map(str, CASES[r["case"]][0]))
        lines.append(f"| {r['case']} | {r['net']} | {r['backend']} | {patch} | {1e3 * r['median_s']:.0f} | "
                     f"{1e3 * r['min_s']:.0f}-{1e3 * r['max_s']:.0f} | {r['steps']} | {1e3 * r['first_s']:.0f} |"
                     + ratio(r, "backbone") + ratio(r, "ResidualEncoderUNet"))
    return "\n".join(lines)


def _profiled_steps(case: str, net: str, backend: str, repeats: int = 1) -> list[torch.profiler.profile]:
    """torch.profiler (CPU) of ``repeats`` training steps of ``net``, one profile each, after two warm-up steps."""
    step = make_step(build(case, net), case)
    profiles = []
    with scan_backend(backend):
        step()
        step()
        for _ in range(repeats):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step()
            profiles.append(prof)
    return profiles


def profile(case: str, backend: str, rows: int = 30) -> str:
    """torch.profiler's table (self CPU time) of one LKM-UNet training step after warm-up steps."""
    return _profiled_steps(case, "LKM-UNet", backend)[0].key_averages().table(sort_by="self_cpu_time_total",
                                                                              row_limit=rows)


# Where a profiled op's self time is counted: the first category whose test matches its name.
CATEGORIES = (
    ("selective scan", lambda name: "selective_scan" in name),
    ("Mamba causal conv1d + SiLU (numba op)", lambda name: "causal_conv1d" in name),
    ("Mamba projections (bmm, mm)", lambda name: name in ("aten::bmm", "aten::mm", "aten::addmm", "aten::linear")),
    ("convolutions (oneDNN, forward and backward)",
     lambda name: "convolution" in name and "causal" not in name),
    ("norms, activations, pooling",
     lambda name: any(k in name for k in ("norm", "relu", "silu", "softplus", "pool", "sigmoid"))),
    ("copies, flips, concatenation", lambda name: name in ("aten::copy_", "aten::flip", "aten::cat", "aten::clone")),
    ("other elementwise and reductions",
     lambda name: name in ("aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::sum", "aten::fill_",
                           "aten::zero_", "aten::sub", "aten::div", "aten::addcmul_", "aten::addcdiv_",
                           "aten::lerp_")),
    ("everything else (allocation, dispatch, autograd, optimizer)", lambda name: True),
)


def _categorised_ms(prof: torch.profiler.profile) -> dict[str, float]:
    totals = {name: 0.0 for name, _ in CATEGORIES}
    for event in prof.key_averages():
        category = next(name for name, test in CATEGORIES if test(event.key))
        totals[category] += event.self_cpu_time_total / 1e3
    return totals


def breakdown(case: str, backend: str, repeats: int = 5) -> str:
    """Self CPU ms per category of a profiled step of LKM-UNet and of its backbone (medians of ``repeats``
    steps each), and the difference: where PiM and PaM spend their time. The profiler's own overhead is
    included, so totals exceed the timed steps."""
    medians = {}
    for net in ("LKM-UNet", "backbone"):
        runs = [_categorised_ms(prof) for prof in _profiled_steps(case, net, backend, repeats)]
        medians[net] = {name: statistics.median(run[name] for run in runs) for name, _ in CATEGORIES}
    lkm, base = medians["LKM-UNet"], medians["backbone"]
    lines = [f"| where (self CPU time, median of {repeats} steps) | LKM-UNet ms | backbone ms | PiM + PaM ms "
             "| share of PiM + PaM |", "|---|---:|---:|---:|---:|"]
    extra = sum(lkm.values()) - sum(base.values())
    for name, _ in CATEGORIES:
        diff = lkm[name] - base[name]
        lines.append(f"| {name} | {lkm[name]:.0f} | {base[name]:.0f} | {diff:.0f} | {diff / extra:.0%} |")
    lines.append(f"| total | {sum(lkm.values()):.0f} | {sum(base.values()):.0f} | {extra:.0f} | 100% |")
    return "\n".join(lines)


# (b, d, l) of the demo network's PiM mixers, stages 1-5 (batch 4 x windows per map, 2 x features, window area)
CONV_SHAPES = ((64, 64, 576), (64, 128, 144), (16, 256, 144), (16, 512, 36), (4, 1024, 36))


def conv_table(repeats: int = 9) -> str:
    """Mamba's causal conv1d + SiLU, forward and backward: torch's conv1d (what runs without numba) against the
    fused numba op, fp32, at the demo network's mixer shapes; medians of ``repeats`` after a warm-up."""
    from benchmark_scan import median_ms  # imported here: benchmark_scan imports this module

    from lkm_unet.ops import causal_conv1d as conv

    lines = ["| (b, d, l) | torch conv1d + SiLU fwd+bwd ms | numba fwd+bwd ms | speed-up |", "|---|---:|---:|---:|"]
    for shape in CONV_SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(*shape, generator=g).requires_grad_()
        w = (0.5 * torch.randn(shape[1], 4, generator=g)).requires_grad_()
        b = torch.randn(shape[1], generator=g).requires_grad_()
        dy = torch.randn(*shape, generator=g)
        times = {}
        for name, fn in (("torch", conv.causal_conv1d_silu_torch), ("numba", conv.causal_conv1d_silu)):
            with scan_backend(name):
                times[name] = median_ms(lambda: fn(x, w, b).backward(dy), repeats)
        speed_up = times["torch"] / times["numba"]
        lines.append(f"| {shape} | {times['torch']:.2f} | {times['numba']:.2f} | {speed_up:.1f}x |")
    return "\n".join(lines)


def step_table(results: list[dict]) -> str:
    """The step table: each step against the case's backbone (``x backbone``) and, where it was timed, against
    ``ResidualEncoderUNet`` (``x ResEnc``); with memory options (results with an "option"), a column for the
    option and one for the step's cost relative to the LKM-UNet step without any (``none``)."""
    options = any("option" in r for r in results)
    resenc_cases = {r["case"] for r in results if r["net"] == "ResidualEncoderUNet"}
    lines = ["| network | net | scan backend | " + ("memory option | " if options else "") + "params M | step s "
             "(median) | min-max s | steps | first step s | x backbone |" + (" x ResEnc |" if resenc_cases else "")
             + (" x none |" if options else ""),
             "|---|---|---|" + ("---|" if options else "") + "---:|" * 6 + ("---:|" if resenc_cases else "")
             + ("---:|" if options else "")]

    def ratio(r: dict, base: dict[str, float]) -> str:
        return f" {r['median_s'] / base[r['case']]:.2f}x |" if r["case"] in base else " — |"

    backbone = {r["case"]: r["median_s"] for r in results if r["net"] == "backbone"}
    resenc = {r["case"]: r["median_s"] for r in results if r["net"] == "ResidualEncoderUNet"}
    none = {r["case"]: r["median_s"] for r in results if r.get("option") == "none"}
    for r in results:
        option = f"{r.get('option', '—')} | " if options else ""
        line = (f"| {r['case']} | {r['net']} | {r['backend']} | {option}{r['params_m']:.1f} | {r['median_s']:.3f} "
                f"| {r['min_s']:.3f}-{r['max_s']:.3f} | {r['steps']} | {r['first_s']:.2f} |" + ratio(r, backbone))
        if resenc_cases:
            line += ratio(r, resenc)
        if options:
            line += ratio(r, none) if "option" in r else " — |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("--backend", default="auto", help="scan backend of the LKM-UNet steps")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table of one step")
    parser.add_argument("--breakdown", action="store_true",
                        help="print where one step's time goes, LKM-UNet against its backbone, by kind of op")
    parser.add_argument("--conv", action="store_true",
                        help="time Mamba's causal conv1d + SiLU, torch against numba, at the demo's shapes")
    parser.add_argument("--inference", action="store_true",
                        help="time one forward pass of a patch (batch 1, inference mode) instead of training steps; "
                             "LKM-UNet with the numba and the torch scan")
    parser.add_argument("--options", nargs="+", choices=tuple(OPTIONS),
                        help="time the LKM-UNet step once per memory option (default: the network's defaults)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.profile:
        print(profile(args.case, args.backend))
        return
    if args.breakdown:
        print(breakdown(args.case, args.backend))
        return
    if args.conv:
        print(conv_table())
        return
    if args.inference:
        print(inference_table(time_inference(args.case, args.steps)))
        return
    results = [time_steps(args.case, net, "—", args.steps) for net in NETS[:2]]
    for option in args.options or [None]:
        results.append(time_steps(args.case, "LKM-UNet", args.backend, args.steps, option))
    print(step_table(results))


if __name__ == "__main__":
    main()
