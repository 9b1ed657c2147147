"""Parameters and FLOPs of one forward pass of one patch, split into the conv parts, PiM and PaM.

Convolutions and linear layers (every matmul, including the Mamba projections) are counted by
``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per multiply-add and ignores
elementwise ops. It cannot see inside the selective scan (a custom op on the fast backends), so the
scan is replaced during profiling by a recorder of its shapes and counted analytically:

- per element of ``b * d * l * n`` (batch, channels, length, state): :data:`SCAN_FLOPS_PER_STATE` = 8,
  i.e. ``dt * A`` and its ``exp`` (2, an exp counted as one FLOP), ``dt * B * u`` (2),
  ``h = dA * h + dBu`` (2) and the output contraction ``C * h`` (2);
- per element of ``b * d * l``: :data:`SCAN_FLOPS_PER_CHANNEL` = 6, i.e. ``softplus(delta + bias)`` (2),
  the skip ``D * u`` (2) and the gate ``y * silu(z)`` (2).

Elementwise work outside the scan (norms, activations, residual adds) is not counted, for the conv
parts and the SSM parts alike.
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

SCAN_FLOPS_PER_STATE = 8
SCAN_FLOPS_PER_CHANNEL = 6
PARTS = ("conv", "PiM", "PaM")
_PART_OF_NAME = re.compile(r"\.lkm_stages\.\d+\.(pim|pam)(\.|$)")


def part_of(name: str) -> str:
    """'PiM', 'PaM' or 'conv' for a parameter or module name of LKM-UNet (or any other network)."""
    match = _PART_OF_NAME.search(name if name.startswith(".") else f".{name}")
    return {"pim": "PiM", "pam": "PaM"}[match.group(1)] if match else "conv"


def scan_flops(batch: int, channels: int, length: int, d_state: int) -> int:
    """Analytic FLOPs of one selective scan of ``u: (batch, channels, length)`` with ``d_state`` states."""
    return batch * channels * length * (SCAN_FLOPS_PER_STATE * d_state + SCAN_FLOPS_PER_CHANNEL)


@contextlib.contextmanager
def _recorded_scans(network: nn.Module, flops: dict[str, int]) -> Iterator[None]:
    """Replace the scan by a shape recorder that adds :func:`scan_flops` to the part it runs in."""
    import lkm_unet.modules.mamba as mamba

    current = ["conv"]

    def enter(part: str):
        return lambda module, args: current.__setitem__(0, part)

    hooks = []
    for name, module in network.named_modules():
        part = part_of(name)
        if part != "conv" and re.search(r"(pim|pam)$", name):
            hooks.append(module.register_forward_pre_hook(enter(part)))
            hooks.append(module.register_forward_hook(lambda m, a, o: current.__setitem__(0, "conv")))

    def recorder(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, *args, **kwargs) -> Tensor:
        flops[current[0]] += scan_flops(u.shape[0], u.shape[1], u.shape[2], A.shape[1])
        return u.clone()

    if not hasattr(mamba, "selective_scan"):
        raise RuntimeError("lkm_unet.modules.mamba no longer calls selective_scan; update the profiler")
    original, mamba.selective_scan = mamba.selective_scan, recorder
    try:
        yield
    finally:
        mamba.selective_scan = original
        for hook in hooks:
            hook.remove()


def profile_network(network: nn.Module, input_shape: Sequence[int]) -> dict[str, dict[str, int]]:
    """Per part (``conv``, ``PiM``, ``PaM``, ``total``): ``params``, ``flops`` (conv/linear, measured by
    FlopCounterMode), ``scan_flops`` (analytic) and ``total_flops`` for one forward pass of a zero
    input of ``input_shape`` = (batch, channels, *patch). Runs on the CPU in eval mode without grad."""
    table = {part: {"params": 0, "flops": 0, "scan_flops": 0} for part in PARTS}
    for name, parameter in network.named_parameters():
        table[part_of(name)]["params"] += parameter.numel()
    scans = dict.fromkeys(PARTS, 0)
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad(), _recorded_scans(network, scans), FlopCounterMode(display=False) as counter:
            network(torch.zeros(*input_shape))
    finally:
        network.train(was_training)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    for name, count in counts.items():
        match = re.search(r"\.lkm_stages\.\d+\.(pim|pam)$", name)
        if match:
            table[{"pim": "PiM", "pam": "PaM"}[match.group(1)]]["flops"] += count
    table["conv"]["flops"] = counter.get_total_flops() - table["PiM"]["flops"] - table["PaM"]["flops"]
    for part in PARTS:
        table[part]["scan_flops"] = scans[part]
    table["total"] = {key: sum(table[p][key] for p in PARTS) for key in ("params", "flops", "scan_flops")}
    for row in table.values():
        row["total_flops"] = row["flops"] + row["scan_flops"]
    return table


def format_profile(table: dict[str, dict[str, int]], title: str = "") -> str:
    """The table as aligned text: parameters in millions, FLOPs in GFLOPs."""
    lines = [title] if title else []
    lines.append(f"{'part':<6} {'params (M)':>11} {'conv/linear GFLOPs':>19} {'scan GFLOPs':>12} {'total GFLOPs':>13}")
    for part, row in table.items():
        lines.append(f"{part:<6} {row['params'] / 1e6:>11.3f} {row['flops'] / 1e9:>19.3f} "
                     f"{row['scan_flops'] / 1e9:>12.3f} {row['total_flops'] / 1e9:>13.3f}")
    return "\n".join(lines)
