#!/usr/bin/env bash
# Build mamba-ssm's selective-scan kernel and causal-conv1d for one GPU architecture against the
# installed torch, then run the CUDA tests and scripts/gpu_check.py. Run from the repository root on a
# CUDA machine with nvcc:
#
#   OUT=/path/for/results bash scripts/gpu_check.sh [arguments for scripts/gpu_check.py]
#
# Inputs (in $GPU_DIR, default .gpu/, which git ignores):
#   mamba_ssm-*.tar.gz, causal_conv1d-*.tar.gz   source distributions (built with --no-build-isolation)
#   pylib/                                        pure-Python packages missing on the machine
#                                                 (dynamic_network_architectures), put on PYTHONPATH
#   prebuilt/site.tar.xz.*                        optional: the packed build of an earlier run of this
#                                                 script on the same image; unpacked instead of building
# Environment: CUDA_ARCH (default 90: sm_90 only), MAX_JOBS (default: all cores),
#   GPU_CHECK_BUDGET_S (seconds the whole command may take, default 570; later sections skip when short),
#   GPU_CHECK_PYTEST=0 to skip the pytest run,
#   GPU_CHECK_MEMORY_S (default 120): seconds kept at the end for scripts/benchmark_memory.py --device cuda,
#   when that script exists (0 skips it).
# Outputs in $OUT: log (everything), build_mamba.log, build_causal.log, results.json, memory.log (the
# memory benchmark's output, when it ran), and site.tar.xz.NN
# (the build, packed, to reuse as prebuilt/ in a later run).
set -uo pipefail
export GPU_CHECK_T0=$(date +%s)
export GPU_CHECK_BUDGET_S=${GPU_CHECK_BUDGET_S:-570}
OUT=${OUT:-$PWD/gpu_check_out}
GPU_DIR=${GPU_DIR:-.gpu}
ARCH=${CUDA_ARCH:-90}
SITE=/tmp/lkm_gpu_site
mkdir -p "$OUT"
GPU_DIR=$(cd "$GPU_DIR" && pwd)

build_one() {  # name sdist-glob env-var-prefix
    local name=$1 glob=$2 prefix=$3 src t0
    src=/tmp/lkm_gpu_build/$name
    rm -rf "$src" && mkdir -p "$src"
    tar -xzf $GPU_DIR/$glob -C "$src" --strip-components=1 || return 1
    # compile for sm_$ARCH only (the upstream list covers sm_75..sm_121)
    sed -i "s/^    # HACK: The compiler flag/    cc_flag = [f for f in cc_flag if f != \"-gencode\" and not f.startswith(\"arch=\")] + [\"-gencode\", \"arch=compute_${ARCH},code=sm_${ARCH}\"]  # one arch only\n&/" "$src/setup.py"
    grep -q "# one arch only" "$src/setup.py" || { echo "$name: setup.py patch did not apply"; return 1; }
    t0=$(date +%s)
    (cd "$src" && env "${prefix}_FORCE_BUILD=TRUE" MAMBA_KEEP_CUDA_BUILD=TRUE TORCH_CUDA_ARCH_LIST="${ARCH:0:1}.${ARCH:1}" \
        MAX_JOBS=${MAX_JOBS:-$(nproc)} python3 -m pip install -v --no-build-isolation --no-deps --no-index \
        --no-cache-dir --target "$SITE/$name" .) > "$OUT/build_$name.log" 2>&1
    local rc=$?
    echo "$(( $(date +%s) - t0 ))" > "/tmp/lkm_gpu_build/$name.seconds"
    echo "build $name: exit $rc after $(cat /tmp/lkm_gpu_build/$name.seconds) s"
    [ $rc -eq 0 ] || tail -40 "$OUT/build_$name.log"
    return $rc
}

main() {
    echo "== $(date -u +%FT%TZ) $(hostname) =="
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    nvcc --version | tail -2
    python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
    local prebuilt=( $GPU_DIR/prebuilt/site.tar.xz.* )
    if [ -e "${prebuilt[0]}" ]; then
        echo "using the prebuilt kernels in $GPU_DIR/prebuilt (not building)"
        mkdir -p "$SITE" && cat "${prebuilt[@]}" | xz -d | tar -x -C "$SITE" || return 1
        export BUILD_NOTE="prebuilt: $(cat "$SITE/build_seconds.txt" 2>/dev/null)"
    else
        mkdir -p /tmp/lkm_gpu_build
        local t0=$(date +%s)
        build_one mamba 'mamba_ssm-*.tar.gz' MAMBA & local pm=$!
        build_one causal 'causal_conv1d-*.tar.gz' CAUSAL_CONV1D & local pc=$!
        wait $pm; local rm=$?
        wait $pc; local rc=$?
        export BUILD_S_MAMBA=$(cat /tmp/lkm_gpu_build/mamba.seconds) BUILD_S_CAUSAL=$(cat /tmp/lkm_gpu_build/causal.seconds)
        echo "builds (in parallel, sm_$ARCH, MAX_JOBS=${MAX_JOBS:-$(nproc)}): mamba-ssm ${BUILD_S_MAMBA} s, causal-conv1d ${BUILD_S_CAUSAL} s, wall $(( $(date +%s) - t0 )) s"
        [ $rm -eq 0 ] && [ $rc -eq 0 ] || { echo "BUILD FAILED"; return 1; }
        echo "mamba-ssm ${BUILD_S_MAMBA} s, causal-conv1d ${BUILD_S_CAUSAL} s (sm_$ARCH, built in parallel)" > "$SITE/build_seconds.txt"
        ls -la "$SITE"/mamba/*.so "$SITE"/causal/*.so
        # pack the build so that a later run can skip it (files of at most 15 MiB)
        local tp=$(date +%s)
        tar -C "$SITE" -cf - . | xz -T0 -6 | split -b 15M -d - "$OUT/site.tar.xz."
        echo "packed the build in $(( $(date +%s) - tp )) s: $(du -ch $OUT/site.tar.xz.* | tail -1)"
    fi
    export PYTHONPATH="$SITE/mamba:$SITE/causal:$GPU_DIR/pylib:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
    python3 -c 'import torch, selective_scan_cuda, causal_conv1d_cuda; print("kernels import: ok")' || return 1
    if ! python3 -c 'import mamba_ssm, causal_conv1d; print("mamba_ssm", mamba_ssm.__version__, "causal_conv1d", causal_conv1d.__version__)'; then
        echo "import mamba_ssm failed (above); its __init__ imports every model: trimming it to the Mamba-1 parts"
        printf '__version__ = "%s"\n' "$(sed -n 's/^__version__ = "\(.*\)"/\1/p' $SITE/mamba/mamba_ssm/__init__.py)" > /tmp/init.py
        mv /tmp/init.py "$SITE/mamba/mamba_ssm/__init__.py"
        export BUILD_NOTE="${BUILD_NOTE:-} mamba_ssm/__init__.py trimmed"
        python3 -c 'from mamba_ssm.modules.mamba_simple import Mamba; print("mamba_simple imports")' || return 1
    fi
    python3 -c 'import lkm_unet; print("lkm_unet backends:", lkm_unet.available_backends())'
    if [ "${GPU_CHECK_PYTEST:-1}" = 1 ]; then
        echo "== pytest tests/ops/test_cuda_backend.py tests/ops/test_selective_scan_triton.py =="
        # the triton tests run compiled on the GPU here (no interpreter), at their tiny sizes
        timeout $(( $(remaining) / 4 )) python3 -m pytest -q -rs -p no:cacheprovider --noconftest \
            tests/ops/test_cuda_backend.py tests/ops/test_selective_scan_triton.py
        echo "pytest exit $?"
    fi
    local memory_s=0
    if [ -f scripts/benchmark_memory.py ]; then memory_s=${GPU_CHECK_MEMORY_S:-120}; fi
    echo "== scripts/gpu_check.py (keeping ${memory_s} s for the memory benchmark) =="
    GPU_CHECK_RESERVE_S=$memory_s python3 scripts/gpu_check.py --out "$OUT" "$@" \
        || echo "gpu_check.py exit $? (sections record their own failures in results.json)"
    if [ "$memory_s" -gt 0 ]; then
        local limit=$(( $(remaining) - 5 ))
        if [ "$limit" -lt 30 ]; then
            echo "== scripts/benchmark_memory.py: skipped, ${limit} s left =="
        else
            echo "== scripts/benchmark_memory.py --device cuda (limit ${limit} s) =="
            timeout "$limit" python3 scripts/benchmark_memory.py --device cuda > "$OUT/memory.log" 2>&1
            echo "benchmark_memory exit $? (output: memory.log)"
            tail -60 "$OUT/memory.log"
        fi
    fi
}

remaining() {  # seconds left of GPU_CHECK_BUDGET_S
    echo $(( GPU_CHECK_T0 + GPU_CHECK_BUDGET_S - $(date +%s) ))
}

main "$@" 2>&1 | tee "$OUT/log"
