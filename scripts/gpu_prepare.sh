#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what scripts/gpu_check.sh needs on a GPU machine that has no internet:
# the mamba-ssm and causal-conv1d source distributions, and the pure-Python packages the machine's
# image lacks (dynamic_network_architectures), copied from this environment. Run from the repository
# root, on a machine with internet and this project's environment:
#
#   bash scripts/gpu_prepare.sh
#
# Then carry .gpu to the GPU machine with the working tree (about 0.5 MB).
# Environment: LKM_VENV (default .venv), MAMBA_VERSION (2.3.2.post1), CAUSAL_VERSION (1.6.1).
set -euo pipefail
PY=${LKM_VENV:-.venv}/bin/python
MAMBA_VERSION=${MAMBA_VERSION:-2.3.2.post1}
CAUSAL_VERSION=${CAUSAL_VERSION:-1.6.1}
mkdir -p .gpu/pylib
rm -f .gpu/mamba_ssm-*.tar.gz .gpu/causal_conv1d-*.tar.gz
# the *_SKIP_CUDA_BUILD variables let pip read the sdists' metadata without nvcc or a CUDA torch
MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE "$PY" -m pip download --no-deps \
    --no-binary :all: --no-build-isolation -d .gpu "mamba-ssm==$MAMBA_VERSION" "causal-conv1d==$CAUSAL_VERSION"
for pkg in dynamic_network_architectures; do
    src=$("$PY" -c "import $pkg, os; print(os.path.dirname($pkg.__file__))")
    rm -rf ".gpu/pylib/$pkg" && cp -r "$src" ".gpu/pylib/$pkg"
    find ".gpu/pylib/$pkg" -name __pycache__ -prune -exec rm -rf {} +
done
ls -la .gpu .gpu/pylib
du -sh .gpu
