"""Flush denormal floats to zero on the CPU (FTZ/DAZ), once, when lkm_unet is imported.

The scan multiplies states by decays exp(dt * A) < 1 step after step, so states, their adjoints and
products of decays drift into the denormal range (below ~1.2e-38 in fp32), where x86 arithmetic is
one to two orders of magnitude slower. Measured on the 2-core CPU: the first training steps of the
quickstart's 2D net took 29 s and 17 s with IEEE denormals and 6 s and 5 s with them flushed
(batch 4 x 96 x 96, another process running); docs/benchmarks.md. Values that small carry no
information for training. Threads created after the call inherit the setting, hence import time.

Set ``LKM_UNET_FLUSH_DENORMAL=0`` before importing lkm_unet to keep IEEE denormals.
"""
from __future__ import annotations

import os

import torch

ENV_VAR = "LKM_UNET_FLUSH_DENORMAL"


def flush_denormals_on_cpu() -> bool:
    """Turn on FTZ/DAZ for this thread and the threads it starts later, unless the variable says 0.
    Returns whether denormals are now flushed."""
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return torch.set_flush_denormal(True)


FLUSHING = flush_denormals_on_cpu()
