#!/usr/bin/env bash
# Installs everything Floodwall needs on a fresh Debian machine and builds the model:
# Debian packages (redis-server; curl/openssl for tests; wrk/h2load for benchmarks), a venv in
# .venv with the package in editable mode, and the ONNX export of the embedder.
# Idempotent: a second run only checks.
#   --no-models   runtime only (no torch, no export): for images that run the processor and
#                 Envoy while Triton runs elsewhere (see Dockerfile)
set -euo pipefail
MODELS=1
[ "${1:-}" = "--no-models" ] && MODELS=0
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need=()
for pair in redis-server:redis-server curl:curl openssl:openssl wrk:wrk h2load:nghttp2-client; do
  cmd=${pair%%:*}; pkg=${pair##*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: 2.13.0 is the local CPU build on these machines; any other spec pulls
# gigabytes of CUDA packages. Only the model export (`floodwall models build`) needs it.
if [ "$MODELS" = 1 ]; then
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e '.[export,dev]'
  # The example third-party policy (docs/writing-a-filter.md): its tests run with the suite.
  .venv/bin/pip install -q -e examples/model-allowlist
  HF_HUB_OFFLINE=1 .venv/bin/floodwall models build
  echo "setup: done (.venv ready, models built)"
else
  .venv/bin/pip install -q -e .
  echo "setup: done (.venv ready, runtime only)"
fi
