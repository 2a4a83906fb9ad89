#!/usr/bin/env bash
# Which paper target does the embedded SmolLM2-135M-Instruct learn most within the CPU study's budget (issue 29
# item 3)? One LoRA run (r 16, 60 steps x batch 8 on the first 800 training rows, seed 1: the study's settings) per
# target with a training split here (MRPC, CoLA, GSM8K; ROPES's training split is not in ../shared/data), each
# against the untuned model on its own test rows:
#   - MRPC and CoLA: the threshold-free AUROC of the yes/no log-odds (all test rows) and the general-text NLL and KL
#     (evaluate.py --measures, through scripts/cpu_study.py with METHODS=LoRA);
#   - GSM8K: the answer NLL per token of the first 300 test solutions (teacher-forced; a 135M model's decoded accuracy
#     on GSM8K is a few percent, too few right answers to read a change in CPU minutes).
# MRPC's run is the forgetting study's LoRA seed 1 (runs/forgetting_mrpc), measured there. Sizes as environment
# variables like cpu_study.sh: OUTPUT_DIR (runs/target_probe), DATA_DIR, PY.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
OUT="${OUTPUT_DIR:-runs/target_probe}"
DATA="${DATA_DIR:-../shared/data}"
METHODS=LoRA TARGET=cola SEEDS=1 JOBS=1 EVAL_PROCS=1 EVALUATE=measures MEASURE_SCALES=1 THRESHOLD_EXAMPLES=300 \
    GENERAL_EXAMPLES=300 KL_EXAMPLES=150 EVAL_EXAMPLES=100 OUTPUT_DIR="$OUT/cola" DATA_DIR="$DATA" PY="$PY" \
    bash run_scripts/cpu_study.sh
# GSM8K: the same run but for the solution length (160 answer tokens: most solutions fit; a cut one keeps its EOS)
if [ ! -f "$OUT/gsm8k/LoRA/seed1/final/imsm_config.json" ]; then
    OMP_NUM_THREADS=1 "$PY" train.py --train_file "$DATA/gsm8k/train.jsonl" --max_train_examples 800 \
        --output_dir "$OUT/gsm8k/LoRA/seed1" --peft lora --lora_r 16 --lora_alpha 16 --gate none \
        --prompt_template chat --learning_rate 3e-4 --lr_scheduler_type cosine --warmup_steps 0.03 --max_steps 60 \
        --per_device_train_batch_size 8 --max_input_length 256 --max_output_length 160 --save_strategy no \
        --logging_steps 10 --report_to none --seed 1 --data_seed 1
fi
OMP_NUM_THREADS=1 "$PY" evaluate.py --untuned --run_dir "$OUT/gsm8k/LoRA/seed1" --labels untuned,LoRA \
    --prompt_template chat --target gsm8k --tasks gsm8k --data_dir "$DATA" --max_examples 300 --score likelihood \
    --max_input_length 256 --output_dir "$OUT/gsm8k/eval" --overwrite
