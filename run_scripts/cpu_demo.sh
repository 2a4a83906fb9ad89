#!/usr/bin/env bash
# The main job on the embedded SmolLM2-135M-Instruct, on CPU: vanilla LoRA and IMSM-LoRA on a target task, then the
# untuned model and both runs evaluated on the target and the general benchmarks (WebQ, FreebaseQA, MultiRC, MRPC),
# printed in the paper's Table 2 layout with paired bootstrap 95% intervals on every change (decoded metric and answer
# likelihood) and charts in $OUTPUT_DIR/eval/{forgetting,tradeoff}.png, and beside them the measures that separate
# learning from answer format (docs/evaluation.md#measures): AUROC of the yes/no log-odds on MEASURE_EXAMPLES rows of
# each yes/no task (MCC at a threshold chosen on held-out training rows of a yes/no target), the general-text NLL of
# GENERAL_EXAMPLES passages (data/general_text.jsonl, built from DATA_DIR on first use) and KL(untuned || model) on
# KL_EXAMPLES prompts per general task; MEASURES= (empty) leaves them out. It measures and prints its expected
# duration first (23 minutes on an idle 2-core machine here, 2-3x that on slower ones). One seed:
# run_scripts/cpu_study.sh repeats this over seeds,
# with LoRA at several scales for the frontier. Every size is an environment variable; extra arguments go to both
# train.py runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA_DIR=${DATA_DIR:-../shared/data}
OUTPUT_DIR=${OUTPUT_DIR:-runs/cpu_demo}
TARGET=${TARGET:-mrpc}
TEMPLATE=${TEMPLATE:-chat}
TRAIN_EXAMPLES=${TRAIN_EXAMPLES:-800}
STEPS=${STEPS:-60}
BATCH=${BATCH:-8}
LR=${LR:-3e-4}
EVAL_EXAMPLES=${EVAL_EXAMPLES:-50}
SEED=${SEED:-42}
MEASURES=${MEASURES-auroc,general_nll,kl}
MEASURE_EXAMPLES=${MEASURE_EXAMPLES:-200}
GENERAL_EXAMPLES=${GENERAL_EXAMPLES:-200}
KL_EXAMPLES=${KL_EXAMPLES:-50}
GENERAL_TEXT=${GENERAL_TEXT:-data/general_text.jsonl}

[ -f "$DATA_DIR/$TARGET/train.jsonl" ] || {
    echo "cpu_demo: $DATA_DIR/$TARGET/train.jsonl not found; build the task files with" \
         "'.venv/bin/python scripts/prepare_data.py --out_dir data' and run with DATA_DIR=data" >&2
    exit 1
}

MEASURE_ARGS=()
ESTIMATE_ARGS=()
if [ -n "$MEASURES" ]; then
    [ -f "$GENERAL_TEXT" ] || "$PY" scripts/build_general_text.py --data_dir "$DATA_DIR" --out "$GENERAL_TEXT"
    MEASURE_ARGS=(--measures "$MEASURES" --general_text "$GENERAL_TEXT" --measure_max_examples "$MEASURE_EXAMPLES"
                  --general_examples "$GENERAL_EXAMPLES" --kl_examples "$KL_EXAMPLES")
    case "$TARGET" in  # a yes/no target: its MCC threshold on the training rows after the TRAIN_EXAMPLES trained on
        mrpc|cola|multirc) MEASURE_ARGS+=(--threshold_file "$TARGET=$DATA_DIR/$TARGET/train.jsonl"
                                          --threshold_examples "$MEASURE_EXAMPLES") ;;
    esac
    # what the estimate times: each yes/no task's rows (a yes/no target's threshold rows too), KL on every task but
    # the target
    ROWS="" KL_TASKS=""
    for task in $(printf '%s\n' "$TARGET" webq multirc mrpc freebaseqa | awk '!seen[$0]++'); do
        [ "$task" = "$TARGET" ] || KL_TASKS+="${KL_TASKS:+,}$task"
        case "$task" in
            mrpc|cola|multirc) n=$MEASURE_EXAMPLES; [ "$task" = "$TARGET" ] && n=$((2 * MEASURE_EXAMPLES))
                               ROWS+="${ROWS:+,}$task=$n" ;;
        esac
    done
    ESTIMATE_ARGS=(--measure_models 1,1 --general_text "$GENERAL_TEXT" --measure_rows "$ROWS"
                   --general_examples "$GENERAL_EXAMPLES" --kl_tasks "$KL_TASKS" --kl_examples "$KL_EXAMPLES")
fi

"$PY" scripts/estimate_time.py --label cpu_demo --data_dir "$DATA_DIR" --target "$TARGET" \
    --tasks "$TARGET,webq,multirc,mrpc,freebaseqa" --template "$TEMPLATE" --train_examples "$TRAIN_EXAMPLES" \
    --batch "$BATCH" --steps "$STEPS" --eval_examples "$EVAL_EXAMPLES" --runs LoRA:"$SEED" IMSM-LoRA:"$SEED" \
    "${ESTIMATE_ARGS[@]}"

for gate in none query_aware; do
    label=$([ "$gate" = none ] && echo lora || echo imsm_lora)
    "$PY" train.py --train_file "$DATA_DIR/$TARGET/train.jsonl" --max_train_examples "$TRAIN_EXAMPLES" \
        --output_dir "$OUTPUT_DIR/$label" \
        --peft lora --lora_r 16 --lora_alpha 16 --gate "$gate" --gate_rank 8 --gate_dropout 0.1 \
        --prompt_template "$TEMPLATE" --learning_rate "$LR" --lr_scheduler_type cosine --warmup_steps 0.03 \
        --max_steps "$STEPS" --per_device_train_batch_size "$BATCH" --max_input_length 256 --max_output_length 8 \
        --save_strategy no --logging_steps 10 --report_to tensorboard --seed "$SEED" --disable_tqdm false "$@"
done

"$PY" evaluate.py --untuned --run_dir "$OUTPUT_DIR/lora" "$OUTPUT_DIR/imsm_lora" \
    --labels untuned,LoRA,IMSM-LoRA --prompt_template "$TEMPLATE" --target "$TARGET" \
    --tasks "$TARGET,webq,multirc,mrpc,freebaseqa" --data_dir "$DATA_DIR" --max_examples "$EVAL_EXAMPLES" \
    --compare IMSM-LoRA:LoRA --output_dir "$OUTPUT_DIR/eval" --overwrite "${MEASURE_ARGS[@]}"
