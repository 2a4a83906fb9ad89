#!/usr/bin/env bash
# The main job on the embedded SmolLM2-135M-Instruct, on CPU: vanilla LoRA and IMSM-LoRA on a target task, then the
# untuned model and both runs evaluated on the target and the general benchmarks (WebQ, FreebaseQA, MultiRC, MRPC),
# printed in the paper's Table 2 layout with paired bootstrap 95% intervals on every change (decoded metric and answer
# likelihood) and charts in $OUTPUT_DIR/eval/{forgetting,tradeoff}.png. It measures and prints its expected duration
# first (16-50 minutes on 2 cores, by machine). One seed: run_scripts/cpu_study.sh repeats this over seeds.
# Every size is an environment variable; extra arguments go to both train.py runs.
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

[ -f "$DATA_DIR/$TARGET/train.jsonl" ] || {
    echo "cpu_demo: $DATA_DIR/$TARGET/train.jsonl not found; build the task files with" \
         "'.venv/bin/python scripts/prepare_data.py --out_dir data' and run with DATA_DIR=data" >&2
    exit 1
}

"$PY" scripts/estimate_time.py --label cpu_demo --data_dir "$DATA_DIR" --target "$TARGET" \
    --tasks "$TARGET,webq,multirc,mrpc,freebaseqa" --template "$TEMPLATE" --train_examples "$TRAIN_EXAMPLES" \
    --batch "$BATCH" --steps "$STEPS" --eval_examples "$EVAL_EXAMPLES" --runs LoRA:"$SEED" IMSM-LoRA:"$SEED"

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
    --compare IMSM-LoRA:LoRA --output_dir "$OUTPUT_DIR/eval" --overwrite
