#!/usr/bin/env bash
# vanilla adalora on mrpc with the paper's settings (global batch 16, 3 epochs).
# Override anything: MODEL=... NNODES=2 GPUS=4 HOSTFILE=h bash run_scripts/adalora_mrpc.sh --num_train_epochs 1
set -euo pipefail
MODEL=${MODEL:-meta-llama/Meta-Llama-3-8B}
NNODES=${NNODES:-1}
GPUS=${GPUS:-8}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-2}
DATA_DIR=${DATA_DIR:-data}
OUTPUT_DIR=${OUTPUT_DIR:-runs/adalora_mrpc}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
HOSTFILE=${HOSTFILE:-}
GLOBAL_BATCH=16
source "$(dirname "$0")/common.sh"  # checks the numbers above; ACCUMULATION = GLOBAL_BATCH / all devices' batch

# Schedule: the IMSM authors' recommended AdaLoRA settings (github.com/ECNU-Text-Computing/IMSM,
# "Recommended parameters/llama3_adalora_GSM8K.json": cosine, num_warmup_ratio 0.1, weight_decay 0.01).
deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} --num_nodes "$NNODES" --num_gpus "$GPUS" train.py \
    --deepspeed "$DS_CONFIG" --model_name_or_path "$MODEL" \
    --train_file "$DATA_DIR/mrpc/train.jsonl" --output_dir "$OUTPUT_DIR" \
    --peft adalora --gate none \
    --adalora_init_r 12 --adalora_target_r 8 --lora_alpha 16 \
    --optim adamw_torch --learning_rate 2e-3 --lr_scheduler_type cosine --warmup_steps 0.1 --weight_decay 0.01 \
    --num_train_epochs 3 --per_device_train_batch_size "$PER_DEVICE_BATCH" \
    --gradient_accumulation_steps "$ACCUMULATION" \
    --max_input_length 512 --max_output_length 8 --bf16 --gradient_checkpointing \
    --save_strategy epoch --logging_steps 10 --report_to tensorboard --seed 42 \
    "$@"
