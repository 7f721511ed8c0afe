#!/usr/bin/env bash
# On the GPU host: join the bundle parts copied to /root/stash, unpack vLLM 0.24 + Ray 2.60
# to /tmp/site (once per machine) and build the dummy-weight 7B-shaped model.
# Source it: `. bench/gpu/setup.sh`
set -eo pipefail
if [ ! -d /tmp/site/vllm ]; then
  cat /root/stash/part* > /tmp/b.tar.xz
  mkdir -p /tmp/site && tar -C /tmp/site -xJf /tmp/b.tar.xz && rm -f /tmp/b.tar.xz
fi
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import vllm, ray; print('vllm', vllm.__version__, 'ray', ray.__version__)"
[ -f /tmp/llama7b/config.json ] || python3 -m batchjobs.cli make-model /tmp/llama7b --shape llama-7b
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
