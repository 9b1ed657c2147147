"""Stop training at the first non-finite loss or gradient, naming the block where it starts.

While everything is finite the trainer only looks at the loss value nnU-Net already copies to the
host, and at one fused norm of the gradients. Only when something is non-finite does
:func:`locate_non_finite` run the batch forward again with hooks, to name the first block (in
forward order) whose output is non-finite, and the first parameter that is non-finite.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import Tensor, nn

from lkm_unet.memory import block_labels


class NonFiniteTrainingError(FloatingPointError):
    """A training step produced a non-finite loss or gradient; the message says where it starts."""


def unwrap(network: nn.Module) -> nn.Module:
    """The plain network inside DDP and/or torch.compile wrappers."""
    network = getattr(network, "module", network)
    return getattr(network, "_orig_mod", network)


def gradients_finite(network: nn.Module) -> bool:
    """True when every gradient is finite: one fused norm, one host sync."""
    grads = [p.grad for p in network.parameters() if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack([n.float() for n in norms]).sum()))


def _non_finite(value) -> bool:
    if isinstance(value, Tensor):
        return bool(value.is_floating_point() and not torch.isfinite(value).all())
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    return False


def locate_non_finite(network: nn.Module, data: Tensor, autocast: bool) -> tuple[Optional[str], Optional[str]]:
    """Run ``data`` forward again (no gradients) and return the label of the first block whose output is
    non-finite (``None`` if the forward pass is finite) and the name of the first non-finite parameter
    or gradient (``None`` if there is none)."""
    network = unwrap(network)
    names = {module: name for name, module in network.named_modules()}
    bad: list[str] = []
    handles = [module.register_forward_hook(
        lambda m, a, out, label=label: bad.append(f"{label} ({names[m]})") if _non_finite(out) else None)
        for module, label in block_labels(network).items()]
    context = torch.autocast(data.device.type, enabled=True) if autocast else contextlib.nullcontext()
    try:
        with torch.no_grad(), context:
            network(data)
    finally:
        for handle in handles:
            handle.remove()
    parameter = None
    for name, p in network.named_parameters():
        if not torch.isfinite(p).all():
            parameter = f"parameter {name}"
            break
        if p.grad is not None and not torch.isfinite(p.grad).all():
            parameter = parameter or f"gradient of {name}"
    return (bad[0] if bad else None), parameter


def non_finite_message(what: str, epoch: int, block: Optional[str], parameter: Optional[str]) -> str:
    where = f"first block with a non-finite output: {block}" if block else "the forward pass is finite"
    message = f"training stopped at epoch {epoch}: non-finite {what}; {where}"
    if parameter:
        message += f"; first non-finite {parameter}"
    return message + (". Try the fp32 trainer LKMUNetTrainerNoAMP, a lower learning rate, or check the input "
                      "data for NaN/Inf")


def loss_finite(loss) -> bool:
    return math.isfinite(float(loss))
