#!/usr/bin/env bash
# One GPU call: document embedding (bench/embed_bench.py) on the Qwen3-Embedding-0.6B shape
# with dummy weights: raw LLM.embed, batchjobs `task: embed`, sentence-transformers, in that
# order in one process, after an untimed warm-up that fills vLLM's compile cache.
#   EMBED_N       documents (10000), 64-512 tokens each, 8 Parquet shards. vLLM 0.24's one
#                 LLM.embed call slows down sharply with the number of prompts given at once
#                 (on one H100: 10,000 documents in 12 s after start-up, 25,000 not done after
#                 150 s, 50,000 not after 400 s), so raw fits one call only up to about 10,000
#   EMBED_MODES   modes (raw,batchjobs,st)
#   EMBED_ENGINE  batchjobs engine keys (default: its vLLM logs at INFO, as raw's are, so the
#                 log shows both engines' config and start-up)
#   EMBED_ARGS    more bench/embed_bench.py run arguments (e.g. --st-batch-size 256)
#   EMBED_BUDGET_S  seconds from this script's start after which st encodes no further chunk
#                 (540: a call may run 600 s); its rates then stand for the share it did
# Results: $OUT/embed.json (table, ratios, vectors check), log: $OUT/embed.log.
set -o pipefail
START=$(date +%s)
cd "$(dirname "$0")/../.."
. bench/gpu/setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=/tmp/qwen3-0.6b
INFO_ENGINE='{"env":{"VLLM_LOGGING_LEVEL":"INFO"}}'
[ -f $M/config.json ] || python3 -m batchjobs.cli make-model $M --shape qwen3-0.6b
python3 -c "import sentence_transformers as s; print('sentence-transformers', s.__version__)"
echo "commit ${BENCH_COMMIT:-$(git log -1 --format=%h 2>/dev/null)} dirty: ${BENCH_DIRTY:-?}"
# shellcheck disable=SC2086
python3 bench/embed_bench.py run --model $M --load-format dummy --n "${EMBED_N:-10000}" \
  --modes "${EMBED_MODES:-raw,batchjobs,st}" --spec-engine "${EMBED_ENGINE:-$INFO_ENGINE}" --workdir /tmp/embed \
  --st-deadline $((START + ${EMBED_BUDGET_S:-540})) --out $OUT/embed.json ${EMBED_ARGS:-} 2>&1 \
  | tee $OUT/embed.log | grep -v "^(\|^\[\|^INFO\|Loading weights" | tail -25
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
