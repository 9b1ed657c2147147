#!/usr/bin/env bash
# The GPU checks of the triton scan backend and of the memory options, in one command that fits a
# ~9-minute device budget. On a machine with internet, fill .gpu/ once (sdists and pure-Python packages):
#
#   bash scripts/gpu_prepare.sh
#
# then, on the CUDA machine (nvcc, torch, triton; no internet needed), from the repository root:
#
#   OUT=/path/for/results bash scripts/gpu_check.sh [arguments for scripts/gpu_check.py]
#
# Timeline (GPU_CHECK_BUDGET_S, default 540 s; each later step shrinks or skips when time runs short):
#   1. mamba-ssm and causal-conv1d build in the background, for sm_$CUDA_ARCH only, causal-conv1d's
#      one-file backward split into parts that compile in parallel (scripts/gpu_patch_sdist.py);
#      meanwhile the triton tests run compiled on the GPU and the `warmup` section JIT-compiles the
#      triton kernels of the later sections (triton's disk cache keeps them for the other processes).
#   2. tests/ops/test_cuda_backend.py, then scripts/gpu_check.py: parity, bench (the scan: triton, cuda,
#      torch, fp64), train (the paper's 2D and 3D steps, one process each: cuda with each memory option,
#      triton, triton without causal-conv1d, the backbone without PiM/PaM),
#   3. scripts/gpu_check.py --sections compile (torch.compile of the 2D step, triton then cuda).
#
# Inputs (in $GPU_DIR, default .gpu/, which git ignores, so the device call must carry it):
#   mamba_ssm-*.tar.gz, causal_conv1d-*.tar.gz   source distributions (built with --no-build-isolation)
#   pylib/                                        pure-Python packages missing on the machine, on PYTHONPATH
#   prebuilt/site.tar.xz.*                        optional: an earlier run's packed build; unpacked, not built
# Environment: CUDA_ARCH (default 90), MAX_JOBS (default: all cores), GPU_CHECK_BUDGET_S (default 540),
#   GPU_CHECK_COMPILE_S (default 120: seconds kept for the compile section; 0 skips it),
#   GPU_CHECK_PYTEST=0 skips the pytest runs, GPU_CHECK_PACK=0 skips packing the build.
# Outputs in $OUT (at most 8 files): log, build.log, results.json, site.tar.xz.NN
set -uo pipefail
export GPU_CHECK_T0=$(date +%s)
export GPU_CHECK_BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
OUT=${OUT:-$PWD/gpu_check_out}
GPU_DIR=${GPU_DIR:-.gpu}
ARCH=${CUDA_ARCH:-90}
SITE=/tmp/lkm_gpu_site
COMPILE_S=${GPU_CHECK_COMPILE_S:-120}
mkdir -p "$OUT"
GPU_DIR=$(cd "$GPU_DIR" && pwd) || { echo "no $GPU_DIR: run scripts/gpu_prepare.sh and carry it"; exit 1; }

remaining() {  # seconds left of GPU_CHECK_BUDGET_S
    echo $(( GPU_CHECK_T0 + GPU_CHECK_BUDGET_S - $(date +%s) ))
}

build_one() {  # name sdist-glob env-var-prefix [split arguments for gpu_patch_sdist.py]
    local name=$1 glob=$2 prefix=$3 src t0 rc
    shift 3
    src=/tmp/lkm_gpu_build/$name
    rm -rf "$src" && mkdir -p "$src"
    tar -xzf $GPU_DIR/$glob -C "$src" --strip-components=1 || return 1
    python3 scripts/gpu_patch_sdist.py "$src" --arch "$ARCH" "$@" || return 1
    t0=$(date +%s)
    (cd "$src" && env "${prefix}_FORCE_BUILD=TRUE" MAMBA_KEEP_CUDA_BUILD=TRUE TORCH_CUDA_ARCH_LIST="${ARCH:0:1}.${ARCH:1}" \
        MAX_JOBS=${MAX_JOBS:-$(nproc)} python3 -m pip install -v --no-build-isolation --no-deps --no-index \
        --no-cache-dir --target "$SITE/$name" .) > "/tmp/lkm_gpu_build/$name.log" 2>&1
    rc=$?
    echo "$(( $(date +%s) - t0 ))" > "/tmp/lkm_gpu_build/$name.seconds"
    echo "build $name: exit $rc after $(cat /tmp/lkm_gpu_build/$name.seconds) s"
    [ $rc -eq 0 ] || tail -40 "/tmp/lkm_gpu_build/$name.log"
    return $rc
}

while_building() {  # GPU work that needs no mamba-ssm: the triton tests compiled, and triton's JIT cache
    if [ "${GPU_CHECK_PYTEST:-1}" = 1 ]; then
        echo "== [during the build] pytest tests/ops/test_selective_scan_triton.py (compiled on the GPU) =="
        timeout 120 python3 -m pytest -q -rs -p no:cacheprovider --noconftest tests/ops/test_selective_scan_triton.py
        echo "pytest (triton) exit $?"
    fi
    echo "== [during the build] scripts/gpu_check.py --sections warmup =="
    timeout 150 python3 scripts/gpu_check.py --out "$OUT" --sections warmup || echo "warmup exit $?"
}

main() {
    echo "== $(date -u +%FT%TZ) $(hostname) =="
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    nvcc --version | tail -2
    python3 -c 'import torch, triton, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())'
    export PYTHONPATH="$SITE/mamba:$SITE/causal:$GPU_DIR/pylib:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TRITON_DEFAULT_FP_FUSION=1
    local prebuilt=( $GPU_DIR/prebuilt/site.tar.xz.* ) built=0
    if [ -e "${prebuilt[0]}" ]; then
        echo "using the prebuilt kernels in $GPU_DIR/prebuilt (not building)"
        mkdir -p "$SITE" && cat "${prebuilt[@]}" | xz -d | tar -x -C "$SITE" || return 1
        export BUILD_NOTE="prebuilt: $(cat "$SITE/build_seconds.txt" 2>/dev/null)"
        while_building
    else
        mkdir -p /tmp/lkm_gpu_build
        local t0=$(date +%s)
        build_one mamba 'mamba_ssm-*.tar.gz' MAMBA > /tmp/lkm_gpu_build/mamba.out 2>&1 & local pm=$!
        build_one causal 'causal_conv1d-*.tar.gz' CAUSAL_CONV1D --split csrc/causal_conv1d_bwd.cu:2 \
            --split csrc/causal_conv1d_fwd.cu:6 > /tmp/lkm_gpu_build/causal.out 2>&1 & local pc=$!
        while_building
        wait $pm; local rm=$?
        wait $pc; local rc=$?
        cat /tmp/lkm_gpu_build/mamba.out /tmp/lkm_gpu_build/causal.out
        if [ $rc -ne 0 ]; then  # the split has not been built on a GPU machine before: fall back to one file
            echo "causal-conv1d failed with its backward split; building it unsplit"
            cp /tmp/lkm_gpu_build/causal.log /tmp/lkm_gpu_build/causal_split.log
            build_one causal 'causal_conv1d-*.tar.gz' CAUSAL_CONV1D; rc=$?
            export BUILD_NOTE="${BUILD_NOTE:-} causal-conv1d split build failed, built unsplit"
        fi
        cat /tmp/lkm_gpu_build/mamba.log /tmp/lkm_gpu_build/causal_split.log /tmp/lkm_gpu_build/causal.log \
            > "$OUT/build.log" 2>/dev/null
        export BUILD_S_MAMBA=$(cat /tmp/lkm_gpu_build/mamba.seconds) BUILD_S_CAUSAL=$(cat /tmp/lkm_gpu_build/causal.seconds)
        echo "builds (in parallel, sm_$ARCH, MAX_JOBS=${MAX_JOBS:-$(nproc)}): mamba-ssm ${BUILD_S_MAMBA} s, causal-conv1d ${BUILD_S_CAUSAL} s, wall $(( $(date +%s) - t0 )) s"
        [ $rm -eq 0 ] && [ $rc -eq 0 ] || { echo "BUILD FAILED (build.log)"; return 1; }
        echo "mamba-ssm ${BUILD_S_MAMBA} s, causal-conv1d ${BUILD_S_CAUSAL} s (sm_$ARCH, built in parallel)" > "$SITE/build_seconds.txt"
        built=1
    fi
    python3 -c 'import torch, selective_scan_cuda, causal_conv1d_cuda; print("kernels import: ok")' || return 1
    if ! python3 -c 'import mamba_ssm, causal_conv1d; print("mamba_ssm", mamba_ssm.__version__, "causal_conv1d", causal_conv1d.__version__)'; then
        echo "import mamba_ssm failed (above); its __init__ imports every model: trimming it to the Mamba-1 parts"
        printf '__version__ = "%s"\n' "$(sed -n 's/^__version__ = "\(.*\)"/\1/p' $SITE/mamba/mamba_ssm/__init__.py)" > /tmp/init.py
        mv /tmp/init.py "$SITE/mamba/mamba_ssm/__init__.py"
        export BUILD_NOTE="${BUILD_NOTE:-} mamba_ssm/__init__.py trimmed"
        python3 -c 'from mamba_ssm.modules.mamba_simple import Mamba; print("mamba_simple imports")' || return 1
    fi
    if [ "$built" = 1 ] && [ "${GPU_CHECK_PACK:-1}" = 1 ]; then
        # pack the build (files of at most 15 MiB) for a later run's prebuilt/, at low priority alongside the checks
        (tar -C "$SITE" -cf - . | nice -n 19 xz -T2 -6 | split -b 15M -d - "$OUT/site.tar.xz."; echo "packed the build: $(du -ch $OUT/site.tar.xz.* | tail -1)") &
    fi
    python3 -c 'import lkm_unet; print("lkm_unet backends:", lkm_unet.available_backends())'
    if [ "${GPU_CHECK_PYTEST:-1}" = 1 ]; then
        echo "== pytest tests/ops/test_cuda_backend.py =="
        timeout 60 python3 -m pytest -q -rs -p no:cacheprovider --noconftest tests/ops/test_cuda_backend.py
        echo "pytest (cuda) exit $?"
    fi
    echo "== scripts/gpu_check.py (keeping ${COMPILE_S} s for compile) =="
    GPU_CHECK_RESERVE_S=$COMPILE_S python3 scripts/gpu_check.py --out "$OUT" --append "$@" \
        || echo "gpu_check.py exit $? (sections record their own failures in results.json)"
    if [ "$COMPILE_S" -gt 0 ]; then
        echo "== scripts/gpu_check.py --sections compile ($(remaining) s left) =="
        python3 scripts/gpu_check.py --out "$OUT" --append --sections compile --compile-limit $(( $(remaining) * 11 / 20 )) \
            || echo "gpu_check.py compile exit $?"
    fi
    wait  # the packing
    echo "== done after $(( $(date +%s) - GPU_CHECK_T0 )) s =="
}

main "$@" 2>&1 | tee "$OUT/log"
