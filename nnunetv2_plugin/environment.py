"""What `lkm-unet doctor` reports: versions, scan backends, and whether nnU-Net can find trainers."""
from __future__ import annotations

import importlib
import importlib.metadata
import site
import subprocess
import sys
from pathlib import Path

from nnunetv2_plugin.torchvision_guard import PTH_LINE, PTH_NAME

PACKAGES = ("lkm-unet", "torch", "torchvision", "nnunetv2", "dynamic-network-architectures", "SimpleITK",
            "mamba-ssm", "causal-conv1d", "triton")


def trainer_path() -> Path:
    """The folder to put in ``nnUNet_extTrainer``."""
    return Path(__file__).resolve().parent / "ext_trainers"


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def torchvision_problem() -> str | None:
    """Why ``import torchvision`` fails in a fresh interpreter (None if it works or is absent)."""
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    if probe.returncode == 0:
        return None
    last = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "unknown error"
    if "No module named 'torchvision'" in last:
        return None
    return last


def guard_path() -> Path:
    return Path(site.getsitepackages()[0]) / PTH_NAME


def install_torchvision_guard() -> Path:
    path = guard_path()
    path.write_text(PTH_LINE)
    return path


def nnunet_finds(trainer: str = "LKMUNetTrainer") -> str:
    """'ok' if nnU-Net's own lookup finds ``trainer`` with nnUNet_extTrainer set, else the error."""
    code = ("import os; os.environ['nnUNet_extTrainer'] = %r\n"
            "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name\n"
            "recursive_find_trainer_class_by_name(%r)") % (str(trainer_path()), trainer)
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if probe.returncode == 0:
        return "ok"
    lines = probe.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit code {probe.returncode}"
