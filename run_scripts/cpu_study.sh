#!/usr/bin/env bash
# The forgetting study on the embedded SmolLM2-135M-Instruct, on CPU: SEEDS seeds of vanilla LoRA and of IMSM-LoRA
# (ABLATIONS=1 adds the `equal` and `token` gates; BASELINES=1 adds LoRAMoE, CorDA-LoRA and PiSSA-LoRA, and evaluates
# every vanilla LoRA-family run at the adapter scales SCALES) tuned on TARGET, then ONE evaluation of the untuned model
# and every run on the target and the general benchmarks (WebQ, FreebaseQA, MultiRC, MRPC) with decoded metrics and
# answer likelihood, seeds grouped by label, paired bootstrap intervals and the learning-forgetting chart.
# It prints its expected duration first (measured on this machine) and shows progress. A finished run is kept and
# skipped when the script is started again, so an interrupted study resumes with the next run.
# Every size is an environment variable; extra arguments go to every train.py run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA_DIR=${DATA_DIR:-../shared/data}
OUTPUT_DIR=${OUTPUT_DIR:-runs/cpu_study}
TARGET=${TARGET:-mrpc}
TEMPLATE=${TEMPLATE:-chat}
SEEDS=${SEEDS:-3}
ABLATIONS=${ABLATIONS:-0}
BASELINES=${BASELINES:-0}
SCALES=${SCALES:-0.5,1}
CORDA_SKIP=${CORDA_SKIP:-1000}  # CorDA calibrates on CORDA_EXAMPLES WebQ test prompts from this row on
CORDA_EXAMPLES=${CORDA_EXAMPLES:-64}
TRAIN_EXAMPLES=${TRAIN_EXAMPLES:-800}
STEPS=${STEPS:-60}
BATCH=${BATCH:-8}
LR=${LR:-3e-4}
EVAL_EXAMPLES=${EVAL_EXAMPLES:-200}
SCORE=${SCORE:-both}
RESAMPLES=${RESAMPLES:-2000}
TASKS="$TARGET,webq,freebaseqa,multirc,mrpc"

[ -f "$DATA_DIR/$TARGET/train.jsonl" ] || {
    echo "cpu_study: $DATA_DIR/$TARGET/train.jsonl not found; build the task files with" \
         "'.venv/bin/python scripts/prepare_data.py --out_dir data' and run with DATA_DIR=data" >&2
    exit 1
}

METHODS="LoRA IMSM-LoRA"
[ "$ABLATIONS" = 1 ] && METHODS="$METHODS IMSM-equal-LoRA IMSM-token-LoRA"
[ "$BASELINES" = 1 ] && METHODS="$METHODS LoRAMoE CorDA-LoRA PiSSA-LoRA"
LORA="--peft lora --lora_r 16 --lora_alpha 16"
# CorDA's calibration prompts lie past the evaluated WebQ rows by default; evaluate.py skips them for every model anyway.
declare -A METHOD_ARGS=(
    [LoRA]="$LORA --gate none"
    [IMSM-LoRA]="$LORA --gate query_aware --gate_rank 8 --gate_dropout 0.1"
    [IMSM-equal-LoRA]="$LORA --gate equal"
    [IMSM-token-LoRA]="$LORA --gate token --gate_rank 8 --gate_dropout 0.1"
    [LoRAMoE]="--peft loramoe --gate none"
    [CorDA-LoRA]="$LORA --gate none --init_lora_weights corda --corda_calibration_file $DATA_DIR/webq/test.jsonl
                  --corda_calibration_skip $CORDA_SKIP --corda_calibration_examples $CORDA_EXAMPLES"
    [PiSSA-LoRA]="$LORA --gate none --init_lora_weights pissa"
)

RUNS=() LABELS=(untuned) TO_TRAIN=()
for method in $METHODS; do
    for seed in $(seq 1 "$SEEDS"); do
        RUNS+=("$OUTPUT_DIR/$method/seed$seed") LABELS+=("$method") TO_TRAIN+=("$method:$seed")
    done
done

JOBS=${JOBS:-2}
"$PY" scripts/estimate_time.py --label cpu_study --data_dir "$DATA_DIR" --target "$TARGET" --tasks "$TASKS" \
    --template "$TEMPLATE" --train_examples "$TRAIN_EXAMPLES" --batch "$BATCH" --steps "$STEPS" \
    --eval_examples "$EVAL_EXAMPLES" --score "$SCORE" --runs "${TO_TRAIN[@]}" --jobs "$JOBS" \
    --skip_done_in "$OUTPUT_DIR" --scales "$([ "$BASELINES" = 1 ] && echo "$SCALES")"

# JOBS runs train side by side, each on nproc/JOBS threads: a process of 2 OpenMP threads slows down several-fold
# as soon as anything else wants a core, one of 1 thread does not.
train_one() {
    local method=$1 seed=$2 out=$3 start=$SECONDS args
    read -r -a args <<< "${METHOD_ARGS[$method]//$'\n'/ }"
    OMP_NUM_THREADS=$THREADS "$PY" train.py --train_file "$DATA_DIR/$TARGET/train.jsonl" \
        --max_train_examples "$TRAIN_EXAMPLES" --output_dir "$out" "${args[@]}" \
        --prompt_template "$TEMPLATE" --learning_rate "$LR" --lr_scheduler_type cosine --warmup_steps 0.03 \
        --max_steps "$STEPS" --per_device_train_batch_size "$BATCH" --max_input_length 256 --max_output_length 8 \
        --save_strategy no --logging_steps 10 --report_to none --seed "$seed" --data_seed "$seed" \
        --disable_tqdm false "${EXTRA[@]}" > "$out.log" 2>&1 || { echo "training failed, see $out.log" >&2; return 1; }
    echo "    $method seed $seed finished in $((SECONDS - start)) s ($(date +%H:%M:%S))"
}
# Wait for a training job to end, printing every minute how far each running one is (its progress bar's last state).
wait_and_report() {
    local before
    before=$(jobs -rp | wc -l)
    while [ "$(jobs -rp | wc -l)" -eq "$before" ]; do
        sleep 10
        if [ $(( SECONDS % 60 )) -lt 10 ]; then
            for log in "$OUTPUT_DIR"/*/seed*.log; do
                [ -f "${log%.log}/final/imsm_config.json" ] && continue
                step=$(tail -c 400 "$log" 2>/dev/null | grep -o '[0-9]*/[0-9]* \[[0-9:]*<[0-9:?]*' | tail -1)
                [ -n "$step" ] && echo "    ${log#"$OUTPUT_DIR"/}: step $step left]"
            done
        fi
    done
    wait -n 2>/dev/null || [ $? -eq 127 ]
}
EXTRA=("$@")
THREADS=${THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}
i=0
for item in "${TO_TRAIN[@]}"; do
    method=${item%%:*} seed=${item##*:} i=$((i + 1))
    out="$OUTPUT_DIR/$method/seed$seed"
    if [ -f "$out/final/imsm_config.json" ]; then
        echo "[$i/${#TO_TRAIN[@]}] $method seed $seed: done before, kept ($out)"
        continue
    fi
    mkdir -p "$(dirname "$out")"
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait_and_report || exit 1; done
    echo "[$i/${#TO_TRAIN[@]}] training $method seed $seed -> $out ($(date +%H:%M:%S); progress in $out.log)"
    train_one "$method" "$seed" "$out" &
done
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait_and_report || exit 1; done
for run in "${RUNS[@]}"; do
    [ -f "$run/final/imsm_config.json" ] || { echo "cpu_study: $run did not finish" >&2; exit 1; }
done

LABEL_LIST=$(IFS=,; echo "${LABELS[*]}")
COMPARE="IMSM-LoRA:LoRA" SCALE_ARGS=()
[ "$ABLATIONS" = 1 ] && COMPARE="$COMPARE,IMSM-LoRA:IMSM-equal-LoRA,IMSM-LoRA:IMSM-token-LoRA"
if [ "$BASELINES" = 1 ]; then  # the vanilla LoRA-family runs become one row per scale: LoRA@0.5, LoRA@1, ...
    SCALE_ARGS=(--adapter_scale "$SCALES")
    REF=$(printf '%g' "${SCALES##*,}")  # IMSM is compared with each baseline at the last scale (normally 1)
    COMPARE="${COMPARE//IMSM-LoRA:LoRA/IMSM-LoRA:LoRA@$REF},IMSM-LoRA:LoRAMoE"
    COMPARE="$COMPARE,IMSM-LoRA:CorDA-LoRA@$REF,IMSM-LoRA:PiSSA-LoRA@$REF"
fi
# EVAL_PROCS processes of one thread each share every task (evaluate.py shards and gathers in input order).
EVAL_PROCS=${EVAL_PROCS:-$(nproc)}
echo "evaluating ${#LABELS[@]} models on $TASKS, $EVAL_EXAMPLES examples per task, $EVAL_PROCS processes" \
     "($(date +%H:%M:%S))"
OMP_NUM_THREADS=$(( $(nproc) / EVAL_PROCS > 0 ? $(nproc) / EVAL_PROCS : 1 )) \
"$PY" -m torch.distributed.run --standalone --nproc_per_node "$EVAL_PROCS" evaluate.py --untuned \
    --run_dir "${RUNS[@]}" --labels "$LABEL_LIST" --prompt_template "$TEMPLATE" \
    --target "$TARGET" --tasks "$TASKS" --data_dir "$DATA_DIR" --max_examples "$EVAL_EXAMPLES" --score "$SCORE" \
    --compare "$COMPARE" "${SCALE_ARGS[@]}" --bootstrap_resamples "$RESAMPLES" --output_dir "$OUTPUT_DIR/eval" --overwrite
