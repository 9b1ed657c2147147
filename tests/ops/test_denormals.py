"""Importing lkm_unet flushes denormal floats on the CPU unless LKM_UNET_FLUSH_DENORMAL=0."""
import subprocess
import sys

import pytest

PROBE = ("import torch, lkm_unet\n"
         "x = torch.full((4096,), 1e-39)          # an fp32 denormal\n"
         "print(float((x * 1.0).max()))")


@pytest.mark.parametrize("value, flushed", [(None, True), ("0", False), ("1", True)])
def test_import_sets_flush_to_zero(value, flushed):
    env = {"PATH": ""} if value is None else {"PATH": "", "LKM_UNET_FLUSH_DENORMAL": value}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    result = float(out.stdout.strip())
    assert (result == 0.0) is flushed
    if not flushed:
        assert result == pytest.approx(1e-39, rel=1e-3)
