#!/usr/bin/env bash
# One GPU call: setup, then the steps named in $STEPS (default: all), results into $OUT.
#   STEPS="longtail_raw_bj"   raw LLM.generate vs batchjobs, long-tailed outputs, 2000 prompts
#   STEPS="raydata cli"       Ray Data LLM processor on the same data; one `batchjobs run` CLI job
#   STEPS="fixed"             raw vs batchjobs, 256 output tokens each
#   STEPS="dp tp2"            (2 GPUs) 1 vs 2 replicas; one replica with tensor_parallel_size 2
set -o pipefail
cd "$(dirname "$0")/../.."
. bench/gpu/setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/bench; COMMON=(--model /tmp/llama7b --load-format dummy --max-model-len 4096 --prompt-words 550
  --n 2000 --shards 8 --workdir $W --resources '{"replicas":1,"batch_size":64,"max_inflight_batches":32,"num_cpus_per_replica":1}')
for step in ${STEPS:-longtail_raw_bj raydata cli fixed}; do
  echo "=== $step $(date +%T)"
  case $step in
    longtail_raw_bj) python3 bench/bench.py run "${COMMON[@]}" --workload longtail --modes raw,batchjobs --out $OUT/longtail.json 2>&1 | tee $OUT/longtail.log | grep -v "^(\|^\[" | tail -40 ;;
    raydata) python3 bench/bench.py run "${COMMON[@]}" --workload longtail --modes raydata --out $OUT/longtail-raydata.json 2>&1 | tee $OUT/raydata.log | tail -30 ;;
    fixed) python3 bench/bench.py run "${COMMON[@]}" --workload fixed --max-tokens 256 --modes raw,batchjobs --out $OUT/fixed.json 2>&1 | tee $OUT/fixed.log | grep -v "^(\|^\[" | tail -30 ;;
    dp) # data parallel: 1 vs 2 replicas (TP=1) of the 7B shape, fixed 256 output tokens
        for r in 1 2; do
          python3 bench/bench.py run "${COMMON[@]}" --workload fixed --max-tokens 256 --modes batchjobs \
            --resources "{\"replicas\":$r,\"batch_size\":64,\"max_inflight_batches\":16,\"num_cpus_per_replica\":1}" \
            --out $OUT/dp$r.json 2>&1 | tee $OUT/dp$r.log | grep -v "^(\|^\[" | tail -3
        done ;;
    tp2) python3 bench/bench.py run "${COMMON[@]}" --workload fixed --max-tokens 256 --modes batchjobs \
           --spec-engine '{"tensor_parallel_size": 2}' --out $OUT/tp2.json 2>&1 | tee $OUT/tp2.log | grep -v "^(\|^\[" | tail -3 ;;
    cli) /usr/bin/time -v python3 -m batchjobs.cli run jobs/nightly_scoring.yaml \
           --set engine.model=/tmp/llama7b --set engine.tensor_parallel_size=1 --set resources.replicas=1 \
           --set engine.args.load_format=dummy --set engine.max_model_len=4096 --set input.path=$W/data-longtail-2000 \
           --set input.id_column=id --set output.path=/tmp/cli-out --set resources.num_cpus_per_replica=1 \
           --summary-json $OUT/cli-summary.json 2>&1 | tee $OUT/cli.log | grep -v "^(\|^\[36m" | tail -25
         python3 -m batchjobs.cli manifest /tmp/cli-out | tee $OUT/cli-manifest.txt ;;
  esac
done
