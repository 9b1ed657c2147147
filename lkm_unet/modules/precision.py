"""Run the state-space parts of the network in fp32, whatever autocast does around them.

The selective scan accumulates products of many decays; in fp16/bf16 that loses the signal (SPEC 4).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def run_in_fp32(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn(x)`` with autocast off and ``x`` in fp32; the result comes back in the dtype the rest of
    the network expects (the autocast dtype inside an autocast region, else ``x.dtype``)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        out_dtype = torch.get_autocast_dtype(device_type)
    else:
        out_dtype = x.dtype
    with torch.autocast(device_type, enabled=False):
        y = fn(x.float())
    return y.to(out_dtype)
