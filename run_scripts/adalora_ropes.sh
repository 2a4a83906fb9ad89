#!/usr/bin/env bash
# vanilla adalora on ropes with the paper's settings (global batch 16, 3 epochs).
# Override anything: MODEL=... GPUS=4 bash run_scripts/adalora_ropes.sh --num_train_epochs 1
set -euo pipefail
MODEL=${MODEL:-meta-llama/Llama-2-7b-hf}
GPUS=${GPUS:-8}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-2}
DATA_DIR=${DATA_DIR:-data}
OUTPUT_DIR=${OUTPUT_DIR:-runs/adalora_ropes}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
HOSTFILE=${HOSTFILE:-}

deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} --num_gpus "$GPUS" train.py \
    --deepspeed "$DS_CONFIG" --model_name_or_path "$MODEL" \
    --train_file "$DATA_DIR/ropes/train.jsonl" --output_dir "$OUTPUT_DIR" \
    --peft adalora --gate none --gate_rank 8 --gate_dropout 0.1 --gate_learning_rate 1e-3 \
    --adalora_init_r 12 --adalora_target_r 8 --lora_alpha 16 \
    --optim adamw_torch --learning_rate 2e-3 --lr_scheduler_type cosine --warmup_steps 0.03 --weight_decay 0.0 \
    --num_train_epochs 3 --per_device_train_batch_size "$PER_DEVICE_BATCH" \
    --gradient_accumulation_steps $(( 16 / (GPUS * PER_DEVICE_BATCH) > 0 ? 16 / (GPUS * PER_DEVICE_BATCH) : 1 )) \
    --max_input_length 1024 --max_output_length 32 --bf16 --gradient_checkpointing \
    --save_strategy epoch --logging_steps 10 --report_to tensorboard --seed 42 \
    "$@"
