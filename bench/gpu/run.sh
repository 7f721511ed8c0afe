#!/usr/bin/env bash
# One GPU call: setup, then the steps named in $STEPS (default: longtail_raw_bj raydata cli
# fixed), results into $OUT.
#   STEPS="warm"              raw LLM.generate on 16 prompts: fills vLLM's torch.compile cache, so the
#                             first timed engine on a fresh machine does not pay for compiling
#   STEPS="longtail_raw_bj"   raw LLM.generate vs batchjobs, long-tailed outputs, 2000 prompts
#                             (vLLM INFO logs of the engine actor kept in longtail.log)
#   STEPS="longtail_head"     the same with batchjobs_head: raw vs batchjobs vs batchjobs joining a
#                             Ray head started before the clock (the `ray job submit` case);
#                             HEAD_MODES picks modes (FIXED_MODES and P200_MODES do so for fixed
#                             and prefix200)
#   STEPS="startup"           200 prompts x 64 tokens: raw vs batchjobs (warm engine start) vs
#                             batchjobs_spawn (vLLM's own spawn of its engine core in the actor);
#                             STARTUP_MODES and STARTUP_VARIANTS (--variants JSON) pick others
#   STEPS="trace"             bench/start_trace.py: driver start -> engine actor __init__, Ray Data's
#                             actor vs a plain actor created at join (stand-in engine, no vLLM)
#   STEPS="dp2gate"           (2 GPUs) 2 replicas, start gate off (start_timeout_s 0, the default) then on (1800)
#   STEPS="raydata cli"       Ray Data LLM processor on the same data; one `batchjobs run` CLI job
#   STEPS="fixed"             raw vs batchjobs, 256 output tokens each (FIXED_ENGINE: --spec-engine JSON,
#                             FIXED_VARIANTS: --variants JSON for FIXED_MODES such as batchjobs_head:NAME)
#   STEPS="dp tp2"            (2 GPUs) 1 vs 2 replicas; one replica with tensor_parallel_size 2
#   STEPS="dp124"             (4 GPUs) 1, 2, 4 replicas (TP=1) of the 7B shape, fixed 256 tokens
#   STEPS="prefix"            shared prefixes: raw vs batchjobs (grouped, default) vs batchjobs order=input
#   STEPS="prefix200"         200 prefixes x 10 questions (more than the KV cache holds at once):
#                             raw vs batchjobs (grouped, the default)
#   STEPS="prefix200_input"   the same, batchjobs with input.order=input (no grouping)
#   STEPS="prefix200_shard"   the same, batchjobs sorting each shard alone (prefix_group_mb 0)
#   STEPS="window"            8,000 long-tailed prompts, Llama-3-8B shape: raw vs batchjobs (per-request
#                             cap, default batch window) vs the old per-batch window (32 batches
#                             of 64); WINDOW_MODES picks modes (one call may not hold all three)
#   STEPS="tp4_70b"           (4 GPUs) one replica, TP=4, Llama-3-70B shape; NCCL topology log
#   STEPS="pytest"            tests/gpu through pytest
#   STEPS="pilot_warm"        each pilot candidate's engine once on 16 rows (fills vLLM's compile cache
#                             per configuration, so that `pilot` pays warm start-ups only)
#   STEPS="pilot"             bench/pilot_gpu.py: 4,000 long-tailed prompts (mean ~128 output tokens), the
#                             pilot over bf16 / fp8 / kv-fp8 / fp8+kv-fp8 / max_num_seqs 2048 / TensorRT-LLM
#                             on PILOT_ROWS (600) rows, then the whole job with bf16 and with the pick;
#                             PILOT_PHASES (pilot,baseline,picked) and PILOT_ORDER (baseline,picked) split or
#                             reorder it; /tmp/pilot/job/_pilot.json carries the decision between calls
# Modes: `batchjobs` starts a local Ray inside the clock (`batchjobs run` with no cluster);
# `batchjobs_head` joins a head started before the clock (the `ray job submit` case), the mode
# of the results table in docs/PERFORMANCE.md. Steps default to `batchjobs`: for the table's
# numbers ask for `batchjobs_head` (HEAD_MODES, FIXED_MODES, P200_MODES, STARTUP_MODES).
# Measure a ratio in both orders (raw first, then batchjobs first): the first engine of a call
# tends to start slowest.
set -o pipefail
cd "$(dirname "$0")/../.."
. bench/gpu/setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/bench; COMMON=(--model /tmp/llama7b --load-format dummy --max-model-len 4096 --prompt-words 550
  --n 2000 --shards 8 --workdir $W --resources '{"replicas":1,"batch_size":64,"num_cpus_per_replica":1}')
P200=(--model /tmp/llama7b --load-format dummy --max-model-len 4096 --prompt-words 1200 --n 2000
  --prefixes 200 --shards 8 --workdir $W --workload prefix --max-tokens 64 --out $OUT/prefix200.json --append
  --resources '{"replicas":1,"batch_size":64,"num_cpus_per_replica":1}')
# The engine actor's vLLM logs at INFO in longtail_raw_bj and (by default) longtail_head, so each
# run's log shows where its engine start went (it varies by several seconds between runs); no
# per-step logging (log stats are off).
INFO_ENGINE='{"env":{"VLLM_LOGGING_LEVEL":"INFO"}}'
HEAD_ENGINE=${HEAD_ENGINE:-$INFO_ENGINE}
for step in ${STEPS:-longtail_raw_bj raydata cli fixed}; do
  echo "=== $step $(date +%T)"
  case $step in
    longtail_raw_bj) python3 bench/bench.py run "${COMMON[@]}" --workload longtail --modes raw,batchjobs \
           --spec-engine "$INFO_ENGINE" --out $OUT/longtail.json 2>&1 | tee $OUT/longtail.log | grep -v "^(\|^\[" | tail -5
         echo "teardown: $(grep -ac 'EngineDeadError\|exited unexpectedly' $OUT/longtail.log) EngineDeadError/exited-unexpectedly lines" ;;
    longtail_head) python3 bench/bench.py run "${COMMON[@]}" --workload longtail --modes "${HEAD_MODES:-raw,batchjobs,batchjobs_head}" \
           --spec-engine "$HEAD_ENGINE" --out $OUT/longtail-head.json 2>&1 | tee $OUT/longtail-head.log | grep -v "^(\|^\[" | tail -5 ;;
    warm) python3 bench/bench.py run "${COMMON[@]}" --n 16 --workload fixed --max-tokens 16 --modes raw \
           --workdir /tmp/warm 2>&1 | tail -2 ;;
    startup) python3 bench/bench.py run "${COMMON[@]}" --n 200 --workload fixed --max-tokens 64 \
           --modes "${STARTUP_MODES:-raw,batchjobs,batchjobs_spawn}" --variants "${STARTUP_VARIANTS:-{\}}" \
           --spec-engine "$HEAD_ENGINE" --out $OUT/startup.json 2>&1 | tee $OUT/startup.log | grep -v "^(\|^\[" | tail -12 ;;
    trace) python3 bench/start_trace.py --rounds 3 --model /tmp/llama7b --data $(ls -d $W/data-fixed-200-* | head -1) \
           --out $OUT/start-trace.json 2>&1 | tail -9 ;;
    dp2gate)
        for t in 0 1800; do
          python3 bench/bench.py run "${COMMON[@]}" --workload fixed --max-tokens 256 --modes batchjobs \
            --resources "{\"replicas\":2,\"batch_size\":64,\"num_cpus_per_replica\":1,\"start_timeout_s\":$t}" \
            --out $OUT/dp2gate.json --append 2>&1 | tee -a $OUT/dp2gate.log | grep -v "^(\|^\[" | tail -3
        done ;;
    raydata) python3 bench/bench.py run "${COMMON[@]}" --workload longtail --modes raydata --out $OUT/longtail-raydata.json 2>&1 | tee $OUT/raydata.log | tail -30 ;;
    fixed) python3 bench/bench.py run "${COMMON[@]}" --workload fixed --max-tokens 256 --modes "${FIXED_MODES:-raw,batchjobs}" \
           --spec-engine "${FIXED_ENGINE:-{\}}" --variants "${FIXED_VARIANTS:-{\}}" --out $OUT/fixed.json 2>&1 | tee $OUT/fixed.log | grep -v "^(\|^\[" | tail -30 ;;
    dp) # data parallel: 1 vs 2 replicas (TP=1) of the 7B shape, fixed 256 output tokens
        for r in 1 2; do
          python3 bench/bench.py run "${COMMON[@]}" --workload fixed --max-tokens 256 --modes batchjobs \
            --resources "{\"replicas\":$r,\"batch_size\":64,\"num_cpus_per_replica\":1}" \
            --out $OUT/dp$r.json 2>&1 | tee $OUT/dp$r.log | grep -v "^(\|^\[" | tail -3
        done ;;
    dp124)
        for r in 1 2 4; do
          python3 bench/bench.py run "${COMMON[@]}" --workload fixed --max-tokens 256 --modes batchjobs \
            --resources "{\"replicas\":$r,\"batch_size\":64,\"max_inflight_batches\":16,\"num_cpus_per_replica\":1}" \
            --out $OUT/dp.json --append 2>&1 | tee -a $OUT/dp.log | grep -v "^(\|^\[" | tail -4
        done ;;
    prefix) # 20 prefixes of ~1200 words x 100 questions, shuffled; short answers (prefill-bound)
        P=(--model /tmp/llama7b --load-format dummy --max-model-len 4096 --prompt-words 1200 --n 2000
           --shards 8 --workdir $W --workload prefix --max-tokens 64 --out $OUT/prefix.json --append
           --resources '{"replicas":1,"batch_size":64,"num_cpus_per_replica":1}')
        python3 bench/bench.py run "${P[@]}" --modes raw,batchjobs 2>&1 | tee -a $OUT/prefix.log | grep -v "^(\|^\[" | tail -4
        python3 bench/bench.py run "${P[@]}" --modes batchjobs --spec-input '{"order":"input"}' 2>&1 | tee -a $OUT/prefix.log | grep -v "^(\|^\[" | tail -5 ;;
    prefix200) python3 bench/bench.py run "${P200[@]}" --modes "${P200_MODES:-raw,batchjobs}" 2>&1 | tee -a $OUT/prefix200.log | grep -v "^(\|^\[" | tail -4 ;;
    prefix200_shard) # the same, each shard sorted alone (the behaviour before read groups)
        python3 bench/bench.py run "${P200[@]}" --modes batchjobs --spec-input '{"prefix_group_mb":0}' 2>&1 | tee -a $OUT/prefix200.log | grep -v "^(\|^\[" | tail -5 ;;
    window) # Llama-3-8B shape (GQA: the KV cache holds ~1024 sequences, so the engine is slot-bound);
            # window2048 stands for a per-batch cap: 32 batches of 64 rows, no per-request cap
        [ -f /tmp/llama8b/config.json ] || python3 -m batchjobs.cli make-model /tmp/llama8b --shape llama3-8b
        python3 bench/bench.py run --model /tmp/llama8b --load-format dummy --max-model-len 4096 --prompt-words 100 \
           --n 8000 --shards 16 --workdir /tmp/bench8b --workload longtail \
           --resources '{"replicas":1,"batch_size":64,"num_cpus_per_replica":1}' \
           --variants '{"window2048": {"max_inflight_batches": 32, "max_inflight_requests": 100000}}' \
           --modes "${WINDOW_MODES:-raw,batchjobs,batchjobs:window2048}" --out $OUT/window.json --append 2>&1 | tee -a $OUT/window.log | grep -v "^(\|^\[" | tail -5 ;;
    prefix200_input) # the same, batchjobs in file order (no grouping)
        python3 bench/bench.py run "${P200[@]}" --modes batchjobs --spec-input '{"order":"input"}' 2>&1 | tee -a $OUT/prefix200.log | grep -v "^(\|^\[" | tail -5 ;;
    tp4_70b)
        nvidia-smi topo -m | tee $OUT/topo.txt
        [ -f /tmp/llama70b/config.json ] || python3 -m batchjobs.cli make-model /tmp/llama70b --shape llama3-70b
        python3 bench/bench.py run --model /tmp/llama70b --load-format dummy --max-model-len 2048 --prompt-words 550 \
          --n 512 --shards 4 --workdir /tmp/bench70 --workload fixed --max-tokens 128 --modes batchjobs \
          --spec-engine '{"tensor_parallel_size": 4, "env": {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,GRAPH"}}' \
          --resources '{"replicas":1,"batch_size":64,"max_inflight_batches":16,"num_cpus_per_replica":1}' \
          --out $OUT/tp4-70b.json > $OUT/tp4-70b.log 2>&1; grep -v "NCCL INFO\|^(\|^\[" $OUT/tp4-70b.log | tail -4
        grep -a "NCCL INFO" $OUT/tp4-70b.log | grep -a "via P2P\|NVLS\|Connected all\|comm 0x\|Trees\|Channel 00" | head -40 > $OUT/nccl.txt || true; wc -l $OUT/nccl.txt ;;
    pilot_warm) python3 bench/pilot_gpu.py --model /tmp/llama7b --load-format dummy --n 64 --pilot-rows 16 \
           --phases pilot --workdir /tmp/pilot-warm --out $OUT/pilot-warm.json 2>$OUT/pilot-warm.log
         grep -a "^pilot: \|^  candidate\|^[* ] [a-z]\|^total" $OUT/pilot-warm.log | tail -12 ;;
    pilot) # the table goes to stdout, progress (and the pilot's own table) to pilot.log
         python3 bench/pilot_gpu.py --model /tmp/llama7b --load-format dummy --n ${PILOT_N:-4000} \
           --pilot-rows ${PILOT_ROWS:-600} --phases ${PILOT_PHASES:-pilot,baseline,picked} \
           --order ${PILOT_ORDER:-baseline,picked} --workdir /tmp/pilot --out $OUT/pilot-gpu.json \
           2>$OUT/pilot.log | tee $OUT/pilot-table.txt
         grep -a "^data\|^pilot: \|^  candidate\|^[* ] [a-z]\|^total" $OUT/pilot.log | tail -16 ;;
    pytest) BATCHJOBS_GPU_TESTS=1 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -5 ;;
    tp2) python3 bench/bench.py run "${COMMON[@]}" --workload fixed --max-tokens 256 --modes batchjobs \
           --spec-engine '{"tensor_parallel_size": 2}' --out $OUT/tp2.json 2>&1 | tee $OUT/tp2.log | grep -v "^(\|^\[" | tail -3 ;;
    cli) /usr/bin/time -v python3 -m batchjobs.cli run jobs/nightly_scoring.yaml \
           --set engine.model=/tmp/llama7b --set engine.tensor_parallel_size=1 --set resources.replicas=1 \
           --set engine.args.load_format=dummy --set engine.max_model_len=4096 --set input.path=$(ls -d $W/data-longtail-2000-* | head -1) \
           --set input.id_column=id --set output.path=/tmp/cli-out --set resources.num_cpus_per_replica=1 \
           --summary-json $OUT/cli-summary.json 2>&1 | tee $OUT/cli.log | grep -v "^(\|^\[36m" | tail -25
         python3 -m batchjobs.cli manifest /tmp/cli-out | tee $OUT/cli-manifest.txt ;;
  esac
  # Nothing may hold a GPU between steps (a leaked engine core would fail the next engine).
  echo "after $step: teardown tracebacks in this call's logs: $(cat $OUT/*.log 2>/dev/null | grep -ac 'EngineDeadError\|exited unexpectedly\|KeyError: ')"
  sleep 2; echo "after $step: GPU MiB used $(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | paste -sd/)," \
    "fork servers/engine cores left: $(pgrep -fc 'multiprocessing.forkserver|VLLM::Engine' || true)"
done
