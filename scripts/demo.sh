#!/usr/bin/env bash
# The main job: sets up ./.venv (first run: a few minutes), then runs the demo.
# Extra arguments go to `python -m lmcache demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
exec python -m lmcache demo "$@"
