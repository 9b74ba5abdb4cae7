#!/usr/bin/env bash
# Prove Framecast's GPU path on a bare CUDA machine without network, from a clean checkout.
#
#   scripts/gpu_check.sh WHEELS_DIR LOG_DIR
#
# WHEELS_DIR comes from scripts/download_gpu_wheels.sh (run where PyPI is reachable). The script
# makes a virtual environment that sees the system's packages (and changes none of them),
# installs what is missing from WHEELS_DIR, stops with a clear message if there is no usable GPU,
# builds pycuda against the local CUDA toolkit, runs the `cuda` suite, the `gpu` suite (which
# skips with its reason where TensorRT is absent), benchmarks/gpu_throughput.py where TensorRT
# runs, and prints one summary (also LOG_DIR/summary.txt) saying what the run proved and what it
# did NOT (scripts/gpu_check_verdict.py). Each step logs to LOG_DIR/<step>.log.
#
# Environment: PYTHON (default python3; the wheels are for CPython 3.12), CUDA_HOME (default
# /usr/local/cuda), GPU_CHECK_VENV (default .gpu-venv in the checkout).
# Exit status:
#   0  every step passed and the TensorRT (`gpu`) suite ran on this GPU
#   1  a step failed
#   2  usage
#   3  stopped because this machine has no usable NVIDIA GPU
#   4  PARTIAL: nothing failed, but the TensorRT suite did not run (e.g. a GPU host without
#      TensorRT, where only the CUDA suite ran); the summary lists what was not proven
set -uo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: scripts/gpu_check.sh WHEELS_DIR LOG_DIR" >&2
    exit 2
fi
wheels=$(cd "$1" 2>/dev/null && pwd) || { echo "gpu_check: no wheels folder $1" >&2; exit 2; }
mkdir -p "$2" && logs=$(cd "$2" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
venv=${GPU_CHECK_VENV:-$root/.gpu-venv}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
# The checkout's packages straight from source: nothing to build or install for them.
export PYTHONPATH="$root/client/src:$root/oip/src:$root/server/src${PYTHONPATH:+:$PYTHONPATH}"
jobs=$(nproc 2>/dev/null || echo 4)
started=$(date +%s)
summary=()
verdict=()
failed=0

# step NAME COMMAND...: run with output to LOG_DIR/NAME.log; record status, time, last line.
step() {
    local name=$1 t0 status detail
    shift
    t0=$(date +%s)
    echo "== $name"
    "$@" >"$logs/$name.log" 2>&1
    status=$?
    detail=$(grep -v '^\s*$' "$logs/$name.log" | tail -n 1 | cut -c1-150)
    if [[ $status -eq 0 ]]; then
        summary+=("$(printf '%-10s %-5s %4ss  %s' "$name" ok "$(($(date +%s) - t0))" "$detail")")
    else
        summary+=("$(printf '%-10s %-5s %4ss  %s' "$name" FAIL "$(($(date +%s) - t0))" "$detail")")
        failed=1
    fi
    echo "   $(tail -n 1 <<<"${summary[-1]}")"
    return $status
}

note() {  # a step that did not run, and why
    summary+=("$(printf '%-10s %-5s %4ss  %s' "$1" skip 0 "$2")")
    echo "== $1: skipped: $2"
}

finish() {
    local code=$1 line
    {
        echo "gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(($(date +%s) - started)) s," \
            "logs in $logs)"
        echo "host: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null \
            | head -n 1 || echo 'no nvidia-smi'); python $("$python" -c \
            'import platform; print(platform.python_version())' 2>/dev/null)"
        for line in "${summary[@]}"; do echo "$line"; done
        for line in "${verdict[@]}"; do echo "$line"; done
        case $code in
            0) echo "result: every step passed and the TensorRT suite ran on this GPU" ;;
            3) echo "result: STOPPED before the GPU steps: $stop_reason" ;;
            4) echo "result: PARTIAL (exit 4): nothing failed, but the TensorRT suite did not" \
                "run here; see NOT proven above" ;;
            *) echo "result: FAILED (see the logs of the steps marked FAIL)" ;;
        esac
    } | tee "$logs/summary.txt"
    exit "$code"
}

# --- preflight: what this script needs before it touches anything ---------------------------
pycuda_sdist=$(find "$wheels" -maxdepth 1 -name 'pycuda-*.tar.gz' | sort | tail -n 1)
if [[ -z "$pycuda_sdist" ]]; then
    echo "gpu_check: no pycuda-*.tar.gz in $wheels; run scripts/download_gpu_wheels.sh $1" \
        "where PyPI is reachable" >&2
    exit 2
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    echo "gpu_check: note: $python is not CPython 3.12; the wheels must have been downloaded" \
        "for its version (TARGET_PYTHON=X.Y scripts/download_gpu_wheels.sh)" >&2
fi

# --- environment: a venv over the system's packages; install only what is missing ----------
venv_setup() {
    "$python" -m venv --system-site-packages "$venv" || return 1
    # Everything from the folder, offline; pip keeps the system's packages that already fit.
    "$venv/bin/python" -m pip install --no-index --find-links "$wheels" \
        "onnxconverter-common>=1.14" "filelock>=3.15" "safetensors>=0.4" "uvloop>=0.21" \
        "grpcio-health-checking>=1.66" "grpcio-reflection>=1.66" "prometheus-client>=0.20" \
        "pytest-asyncio>=0.24" \
        "pytest-timeout>=2.3" "pytools>=2011.2" "platformdirs>=2.2.0" mako setuptools wheel \
        "numpy>=1.24" "onnx>=1.16" "onnxruntime>=1.19" "grpcio>=1.66" pillow "pytest>=8.3" \
        || return 1
    "$venv/bin/python" -c 'import framecast_server.backends.tensorrt, framecast_server.process.background, grpc_health, onnxconverter_common, prometheus_client, pytest_asyncio; print("framecast imports from", framecast_server.__file__)'
}
step venv venv_setup || finish 1
py="$venv/bin/python"

# --- the point that needs a GPU --------------------------------------------------------------
stop_reason=$("$py" -c '
from framecast_server.backends.tensorrt.availability import gpu_problem
print(gpu_problem() or "")' 2>&1)
if [[ -n "$stop_reason" ]]; then
    stop_reason="this machine has no usable NVIDIA GPU ($stop_reason); nothing below needs running"
    note gpu "$stop_reason"
    finish 3
fi
summary+=("$(printf '%-10s %-5s %4ss  %s' gpu ok 0 "$(nvidia-smi -L 2>/dev/null | head -n 1)")")

# --- pycuda, built against this machine's CUDA toolkit ---------------------------------------
build_pycuda() {
    local src
    src="$logs/../pycuda-build"
    rm -rf "$src" && mkdir -p "$src" && tar -xzf "$pycuda_sdist" -C "$src" || return 1
    src=$(find "$src" -mindepth 1 -maxdepth 1 -type d | head -n 1)
    command -v nvcc || { echo "nvcc not found under $CUDA_HOME/bin"; return 1; }
    (
        cd "$src" &&
            "$py" configure.py --cuda-root="$CUDA_HOME" &&
            # Compile in parallel first; pip's in-tree build then reuses the objects.
            "$py" setup.py build_ext --parallel "$jobs" &&
            "$py" -m pip install --no-index --no-deps --no-build-isolation "$src"
    ) || return 1
    "$py" -c 'import pycuda.driver as d; d.init(); print("pycuda", __import__("pycuda").VERSION_TEXT, "on", d.Device(0).name())'
}
step pycuda build_pycuda || finish 1

availability() {
    "$py" -c '
from framecast_server.backends.tensorrt import tensorrt_unavailable_reason
print(tensorrt_unavailable_reason() or "TensorRT backend available")'
}
step trt availability
trt_reason=$(tail -n 1 "$logs/trt.log")

pytest_run() {  # NAME MARKER PATH
    "$py" -m pytest -p no:cacheprovider -m "$2" "$3" -rs -v --junitxml="$logs/$1.xml"
}
step cuda pytest_run cuda cuda tests/cuda
step gpu pytest_run gpu gpu tests/gpu

if [[ "$trt_reason" == "TensorRT backend available" ]]; then
    step bench "$py" benchmarks/gpu_throughput.py --batches 1,8,32,128 --seconds 2 \
        --cache-dir "$logs/../bench-cache"
else
    note bench "needs TensorRT: $trt_reason"
fi

# --- GPU STAND-IN BENCHMARK (issue #22, item 3) ----------------------------------------------
# Beside the cuda suite: the benchmark's GPU stand-in (ResNet-50 FP16 through PyTorch, a
# benchmark-only backend, benchmarks/gpu_standin.py) measures front-end-to-GPU feeding for both
# serving designs, per-worker and shared: frames/s, batch sizes, GPU busy fraction, p99. It
# needs PyTorch with CUDA, not TensorRT; without PyTorch it is reported as not run.
standin_reason=$("$py" -c 'import sys; sys.path.insert(0, "benchmarks")
from gpu_standin import torch_unavailable_reason
print(torch_unavailable_reason() or "")' 2>&1)
if [[ -z "$standin_reason" ]]; then
    step standin "$py" benchmarks/gpu_feeding.py --standin torch --counts 1,2,4,8,14 \
        --seconds 5 --rounds 2 --no-null --cache-dir "$logs/../bench-cache" \
        --out "$logs/gpu_feeding.json"
else
    note standin "needs PyTorch with CUDA: $standin_reason; front-end-to-GPU feeding not measured"
fi
# --- end of the stand-in's place --------------------------------------------------------------

if [[ $failed -ne 0 ]]; then
    finish 1
fi
# What the run proved and what it did not; 0 only when the TensorRT suite ran, else 4.
verdict_text=$("$py" scripts/gpu_check_verdict.py "$logs")
code=$?
mapfile -t verdict <<<"$verdict_text"
finish "$code"
