#!/usr/bin/env bash
# Download what scripts/gpu_check.sh installs on a GPU host without network, for CPython 3.12 on
# x86-64 Linux (TARGET_PYTHON=3.11 etc. for another): pycuda's source distribution, its build and
# run dependencies, and the wheels Framecast's server and test suites need beyond what such a
# host already has.
#
#   scripts/download_gpu_wheels.sh [--full] DIR
#
# Default: the small set a CUDA machine with PyTorch, numpy, onnx, onnxruntime, grpcio, protobuf,
# pillow and pytest lacks (a few MB). --full adds those big ones too (about 70 MB), for a bare
# Python. Runs on any machine that reaches PyPI; uses pip's own download.
set -euo pipefail

full=0
if [[ "${1:-}" == "--full" ]]; then
    full=1
    shift
fi
if [[ $# -ne 1 ]]; then
    echo "usage: scripts/download_gpu_wheels.sh [--full] DIR" >&2
    exit 2
fi
dir=$1
mkdir -p "$dir"
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
target_python=${TARGET_PYTHON:-3.12}
abi="cp${target_python/./}"

# The pycuda the workspace locks (uv.lock), so the GPU host builds the version we test with.
pycuda=$(awk '/^name = "pycuda"$/ {getline; gsub(/"/, "", $3); print $3; exit}' uv.lock)
if [[ -z "$pycuda" ]]; then
    echo "download_gpu_wheels: pycuda is not in uv.lock" >&2
    exit 1
fi

# Binary wheels for the target, not for this machine.
target=(
    --only-binary=:all: --python-version "$target_python" --implementation cp --abi "$abi" --abi abi3
    --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform any
)

small=(
    # framecast-server's own dependencies a CUDA/PyTorch host does not have
    "onnxconverter-common>=1.14" "filelock>=3.15" "safetensors>=0.4" "uvloop>=0.21"
    "grpcio-health-checking>=1.66" "grpcio-reflection>=1.66" "prometheus-client>=0.20"
    # the test suites' pytest plugins (pyproject's pytest settings name them)
    "pytest-asyncio>=0.24" "pytest-timeout>=2.3"
    # pycuda's run dependencies, and its build dependencies besides numpy
    "pytools>=2011.2" "platformdirs>=2.2.0" mako setuptools wheel
)
big=(numpy onnx "onnxruntime>=1.19" "grpcio>=1.66" protobuf pillow "pytest>=8.3")

echo "downloading pycuda $pycuda (source) and the wheels for CPython $target_python x86-64 into $dir"
# The source distribution: pip reads its metadata (setup.py egg_info), which needs no CUDA.
"$python" -m pip download --quiet --no-deps --no-binary pycuda "pycuda==$pycuda" -d "$dir"
if [[ $full -eq 1 ]]; then
    # Everything, with dependencies resolved for the target.
    "$python" -m pip download --quiet "${target[@]}" -d "$dir" "${small[@]}" "${big[@]}"
else
    # Dependencies resolved too, except onnxconverter-common's (numpy, onnx, protobuf: on the
    # host); grpcio and protobuf come along for grpcio-health-checking in case the host's are old.
    "$python" -m pip download --quiet "${target[@]}" -d "$dir" "${small[@]:1}"
    "$python" -m pip download --quiet "${target[@]}" --no-deps -d "$dir" "${small[0]}"
fi
count=$(find "$dir" -maxdepth 1 -type f \( -name '*.whl' -o -name '*.tar.gz' \) | wc -l)
size=$(du -sh "$dir" | cut -f1)
echo "download_gpu_wheels: $count files, $size in $dir"
echo "next, on the GPU host: scripts/gpu_check.sh $dir LOG_DIR"
