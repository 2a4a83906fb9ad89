#!/usr/bin/env bash
# IMSM-(IA)3 on cola with the paper's settings (global batch 8, 3 epochs, gate rank 8).
# Override anything: MODEL=... NNODES=2 GPUS=4 HOSTFILE=h bash run_scripts/imsm_ia3_cola.sh --num_train_epochs 1
set -euo pipefail
MODEL=${MODEL:-meta-llama/Meta-Llama-3-8B}
NNODES=${NNODES:-1}
GPUS=${GPUS:-8}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-1}
DATA_DIR=${DATA_DIR:-data}
OUTPUT_DIR=${OUTPUT_DIR:-runs/imsm_ia3_cola}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
HOSTFILE=${HOSTFILE:-}
GLOBAL_BATCH=8
source "$(dirname "$0")/common.sh"  # checks the numbers above; ACCUMULATION = GLOBAL_BATCH / all devices' batch

# Schedule: the IMSM authors' recommended (IA)3 settings (github.com/ECNU-Text-Computing/IMSM,
# "Recommended parameters/llama3_ia3_GSM8K.json": linear, num_warmup_ratio 0.03, weight_decay 0.0).
# Gate dropout 0.0: "dropout_prob" in the same file (0.1 in the LoRA and AdaLoRA files).
deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} --num_nodes "$NNODES" --num_gpus "$GPUS" train.py \
    --deepspeed "$DS_CONFIG" --model_name_or_path "$MODEL" \
    --train_file "$DATA_DIR/cola/train.jsonl" --output_dir "$OUTPUT_DIR" \
    --peft ia3 --gate query_aware --gate_rank 8 --gate_dropout 0.0 --gate_learning_rate 1e-3 \
    --frozen_memory_cache on \
    --optim adafactor --learning_rate 3e-3 --lr_scheduler_type linear --warmup_steps 0.03 --weight_decay 0.0 \
    --num_train_epochs 3 --per_device_train_batch_size "$PER_DEVICE_BATCH" \
    --gradient_accumulation_steps "$ACCUMULATION" \
    --max_input_length 256 --max_output_length 8 --bf16 --gradient_checkpointing \
    --save_strategy epoch --logging_steps 10 --report_to tensorboard --seed 42 \
    "$@"
