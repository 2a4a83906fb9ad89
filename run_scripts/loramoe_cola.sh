#!/usr/bin/env bash
# LoRAMoE on cola: the LoRAMoE authors' public launcher (Ablustrund/LoRAMoE run_loramoe.sh: lora_nums=8, lora_rank=4,
# lora_alpha=32, lora_dropout=0.05, gate/up/down_proj, lr=0.0002, blc_weight=blc_alpha=0 so the balancing constraint is
# off), the IMSM paper's global batch 16 and 3 epochs. The constraint on: --loramoe_balance_weight B
# --loramoe_balance_delta D; world-knowledge data (type 1): --knowledge_file F [--knowledge_share S]
# Override anything: MODEL=... NNODES=2 GPUS=4 HOSTFILE=h bash run_scripts/loramoe_cola.sh --num_train_epochs 1
set -euo pipefail
MODEL=${MODEL:-meta-llama/Llama-2-7b-hf}
NNODES=${NNODES:-1}
GPUS=${GPUS:-8}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-2}
DATA_DIR=${DATA_DIR:-data}
OUTPUT_DIR=${OUTPUT_DIR:-runs/loramoe_cola}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
HOSTFILE=${HOSTFILE:-}
GLOBAL_BATCH=16
source "$(dirname "$0")/common.sh"  # checks the numbers above; ACCUMULATION = GLOBAL_BATCH / all devices' batch

deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} --num_nodes "$NNODES" --num_gpus "$GPUS" train.py \
    --deepspeed "$DS_CONFIG" --model_name_or_path "$MODEL" \
    --train_file "$DATA_DIR/cola/train.jsonl" --output_dir "$OUTPUT_DIR" \
    --peft loramoe --gate none \
    --loramoe_num_experts 8 --loramoe_r 4 --loramoe_alpha 32 --loramoe_dropout 0.05 \
    --loramoe_balance_weight 0 --loramoe_balance_delta 0 \
    --optim adamw_torch --learning_rate 2e-4 --lr_scheduler_type cosine --warmup_steps 0.03 --weight_decay 0.0 \
    --num_train_epochs 3 --per_device_train_batch_size "$PER_DEVICE_BATCH" \
    --gradient_accumulation_steps "$ACCUMULATION" \
    --max_input_length 256 --max_output_length 8 --bf16 --gradient_checkpointing \
    --save_strategy epoch --logging_steps 10 --report_to tensorboard --seed 42 \
    "$@"
