#!/usr/bin/env bash
# The main job on the embedded SmolLM2-135M-Instruct, on CPU: vanilla LoRA and IMSM-LoRA on a target task, then the
# untuned model and both runs evaluated on the target and the general benchmarks (WebQ, FreebaseQA, MultiRC, MRPC),
# printed in the paper's Table 2 layout with a chart in $OUTPUT_DIR/eval/forgetting.png. About 15 minutes on 2 cores.
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

for gate in none query_aware; do
    label=$([ "$gate" = none ] && echo lora || echo imsm_lora)
    "$PY" train.py --train_file "$DATA_DIR/$TARGET/train.jsonl" --max_train_examples "$TRAIN_EXAMPLES" \
        --output_dir "$OUTPUT_DIR/$label" \
        --peft lora --lora_r 16 --lora_alpha 16 --gate "$gate" --gate_rank 8 --gate_dropout 0.1 \
        --prompt_template "$TEMPLATE" --learning_rate "$LR" --lr_scheduler_type cosine --warmup_steps 0.03 \
        --max_steps "$STEPS" --per_device_train_batch_size "$BATCH" --max_input_length 256 --max_output_length 8 \
        --save_strategy no --logging_steps 10 --report_to tensorboard --seed "$SEED" --disable_tqdm true "$@"
done

"$PY" evaluate.py --untuned --run_dir "$OUTPUT_DIR/lora" "$OUTPUT_DIR/imsm_lora" \
    --labels untuned,LoRA,IMSM-LoRA --prompt_template "$TEMPLATE" --target "$TARGET" \
    --tasks "$TARGET,webq,multirc,mrpc,freebaseqa" --data_dir "$DATA_DIR" --max_examples "$EVAL_EXAMPLES" \
    --output_dir "$OUTPUT_DIR/eval"
