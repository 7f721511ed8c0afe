#!/usr/bin/env bash
# Idempotent: a second virtualenv, .venv-airflow, with Airflow 3 and batchjobs (Ray's job
# client, no engine), for the Airflow tests (tests/integration/test_airflow.py) and for trying
# cluster/airflow/ locally. Kept apart from .venv: Airflow pins its own web stack.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
AIRFLOW_VERSION=3.3.2
if [ ! -x .venv-airflow/bin/python ]; then
  echo "setup: creating .venv-airflow" >&2
  "$PY" -m venv .venv-airflow
fi
STAMP=.venv-airflow/.batchjobs-pyproject.toml
if ! .venv-airflow/bin/python -c "import airflow, batchjobs.airflow" 2>/dev/null \
  || ! cmp -s pyproject.toml "$STAMP"; then
  echo "setup: installing apache-airflow==$AIRFLOW_VERSION and batchjobs into .venv-airflow" >&2
  .venv-airflow/bin/python -m pip install -q --upgrade pip
  .venv-airflow/bin/python -m pip install -q "apache-airflow==$AIRFLOW_VERSION" -e .
  cp pyproject.toml "$STAMP"
fi
