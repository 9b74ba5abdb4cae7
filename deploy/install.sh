#!/bin/sh
# Install framecast-server, framecast-client and framecast-oip (the Open Inference Protocol's
# generated code) into the virtual environment given as $1, at the
# versions uv.lock pins. The images run exactly this (deploy/cpu.Dockerfile), and so does
# tests/deploy/test_images.py into a fresh virtual environment, so a broken step fails CI even
# though no image is built there. Needs uv (the one running us under `uv run`, else `uv` on the
# PATH, else `python3 -m uv`) and the repository (pyproject.toml, uv.lock, client/, server/,
# oip/). The bench (bench/) is not installed: a server never runs it.
set -eu
venv=${1:?usage: deploy/install.sh VENV}
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${UV:-}" ]; then
    uv=$UV
elif command -v uv >/dev/null 2>&1; then
    uv=uv
else
    uv="python3 -m uv"
fi
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
$uv export --project "$root" --frozen --no-dev --no-emit-workspace --no-hashes \
    --no-header --package framecast-server --output-file "$requirements" --quiet
$uv pip install --python "$venv/bin/python" --quiet -r "$requirements"
$uv pip install --python "$venv/bin/python" --quiet --no-deps \
    "$root/client" "$root/oip" "$root/server"
