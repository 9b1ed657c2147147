#!/usr/bin/env bash
# Creates .venv (once) and installs lkm-unet with nnU-Net into it. Sourced by quickstart.sh and test.sh.
#
# torch comes first, so that pip never swaps it for another build while resolving nnU-Net:
#   - a machine with an NVIDIA driver gets PyPI's default (CUDA) torch within the tested range;
#   - any other machine gets torch 2.13.0; set LKM_TORCH_INDEX to a CPU-only wheel index
#     (e.g. PyTorch's "whl/cpu" index) if your pip would otherwise fetch the CUDA build.
# Then `lkm-unet doctor --fix` makes nnU-Net's trainer lookup work where torchvision cannot load
# (see README, Troubleshooting).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LKM_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "[setup] installing torch (CUDA build) into $venv"
    "${pip[@]}" install "torch>=2.4,<2.14"
  else
    echo "[setup] installing torch 2.13.0 (CPU) into $venv"
    "${pip[@]}" install torch==2.13.0 ${LKM_TORCH_INDEX:+--index-url "$LKM_TORCH_INDEX"}
  fi
fi
# (Re)install when the package is missing or pyproject.toml changed since the last install, so an
# existing .venv picks up new dependencies.
stamp="$venv/.lkm_unet_pyproject.sha256"
wanted="$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1) $repo"
if ! "$venv/bin/python" -c "import lkm_unet, nnunetv2, pytest" 2>/dev/null \
    || [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "[setup] installing lkm-unet[dev] and nnU-Net into $venv"
  "${pip[@]}" install -e "$repo[dev]"
  echo "$wanted" > "$stamp"
fi
"$venv/bin/lkm-unet" doctor --fix >/dev/null || "$venv/bin/lkm-unet" doctor
export PATH="$venv/bin:$PATH"
# LKM-UNet's trainers first; folders the caller already listed stay after them
export nnUNet_extTrainer="$("$venv/bin/lkm-unet" trainer-path)${nnUNet_extTrainer:+:$nnUNet_extTrainer}"
