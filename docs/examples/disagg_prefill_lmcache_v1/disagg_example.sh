#!/bin/bash
# Prefill/decode through a shared LMCache tier: an lm:// server, a prefiller
# (kv_producer), a decoder (kv_consumer) and a proxy that sends each request to the
# prefiller with max_tokens=1 and then to the decoder.
#   bash disagg_example.sh [model] [-- client command]
# Without a client command it sends one request through the proxy (disagg_client.py).
# Ports: LM_PORT (8100; must match remote_url in LMCACHE_CONFIG_FILE), PREFILLER_PORT
# (1100), DECODER_PORT (1200), PROXY_PORT (1000). Logs: prefiller.log, decoder.log,
# proxy.log, lm_server.log in LOG_DIR (default: this directory).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

MODEL=${1:-meta-llama/Llama-3.1-8B-Instruct}
shift || true
[[ ${1:-} == "--" ]] && shift
export LM_PORT=${LM_PORT:-8100} PREFILLER_PORT=${PREFILLER_PORT:-1100}
export DECODER_PORT=${DECODER_PORT:-1200} PROXY_PORT=${PROXY_PORT:-1000} MODEL
LOG_DIR=${LOG_DIR:-.}
PIDS=()

cleanup() {
    trap - INT TERM EXIT
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    wait 2>/dev/null
}
trap cleanup INT TERM EXIT

wait_for_server() {  # port [seconds]
    local deadline=$((SECONDS + ${2:-1200}))
    echo "Waiting for the server on port $1..."
    until curl -s -o /dev/null "http://localhost:$1/"; do
        if ((SECONDS >= deadline)); then echo "Timeout waiting for port $1"; return 1; fi
        for pid in "${PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null || { echo "A server exited early (pid $pid); see the logs"; return 1; }
        done
        sleep 1
    done
}

python3 -m lmcache.v1.server localhost "$LM_PORT" > "$LOG_DIR/lm_server.log" 2>&1 &
PIDS+=($!)
bash disagg_vllm_launcher.sh prefiller "$MODEL" > "$LOG_DIR/prefiller.log" 2>&1 &
PIDS+=($!)
if [[ ${ONE_AT_A_TIME:-0} == 1 ]]; then  # a machine that cannot start two engines at once
    wait_for_server "$PREFILLER_PORT" || exit 1
fi
bash disagg_vllm_launcher.sh decoder "$MODEL" > "$LOG_DIR/decoder.log" 2>&1 &
PIDS+=($!)
python3 disagg_proxy_server.py --port "$PROXY_PORT" --prefiller-port "$PREFILLER_PORT" \
    --decoder-port "$DECODER_PORT" > "$LOG_DIR/proxy.log" 2>&1 &
PIDS+=($!)

wait_for_server "$PREFILLER_PORT" && wait_for_server "$DECODER_PORT" && wait_for_server "$PROXY_PORT" || exit 1
echo "All servers are up."
if [[ $# -gt 0 ]]; then
    "$@"
else
    python3 disagg_client.py --port "$PROXY_PORT" --model "$MODEL"
fi
