#!/usr/bin/env bash
# Command 2: set up (first time), lint, and run the test suite: unit tests, then the
# integration tests that drive a real local Ray and the real vLLM CPU engine.
# GPU tests (tests/gpu) run only where BATCHJOBS_GPU_TESTS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_airflow.sh  # Airflow 3 in .venv-airflow, for tests/integration/test_airflow.py
.venv/bin/ruff check batchjobs tests bench
.venv/bin/ruff format --check batchjobs tests bench
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec .venv/bin/python -m pytest "$@"
