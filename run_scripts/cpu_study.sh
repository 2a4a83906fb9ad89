#!/usr/bin/env bash
# The forgetting study on the embedded SmolLM2-135M-Instruct (MODEL=DIR for another backbone), on CPU: SEEDS seeds
# of vanilla LoRA and of IMSM-LoRA (ABLATIONS=1 adds the `equal` and `token` gates; BASELINES=1 adds LoRAMoE,
# CorDA-LoRA and PiSSA-LoRA, and evaluates every vanilla LoRA-family run at the adapter scales SCALES; FORGETTING=1 adds
# the options against forgetting, REPLAY_EXAMPLES rows for replay; METHODS=LoRA,OSF,... picks any set) tuned on TARGET,
# then ONE evaluation of the untuned model and every run on the target and the general benchmarks (WebQ, FreebaseQA,
# MultiRC, MRPC) with decoded metrics and answer likelihood, seeds grouped by label, paired bootstrap intervals and the
# learning-forgetting chart.
# It prints its expected duration first (measured on this machine) and shows progress. A finished run is kept and
# skipped when the script is started again, so an interrupted study resumes with the next run.
# Every size is an environment variable, handed to scripts/cpu_study.py (the scheduler) as the option of its name in
# lower case (SEEDS=2 JOBS=3 is --seeds 2 --jobs 3; `.venv/bin/python scripts/cpu_study.py --help` lists them with
# their defaults). PY is the Python that runs it all; extra arguments go to every train.py run. The tests run it at
# toy sizes on a tiny model in one process at a time (MODEL=DIR JOBS=1 EVAL_PROCS=1).
set -euo pipefail
cd "$(dirname "$0")/.."
OPTIONS=()
for name in DATA_DIR OUTPUT_DIR MODEL TARGET TEMPLATE SEEDS FIRST_SEED ABLATIONS BASELINES FORGETTING METHODS \
            REPLAY_EXAMPLES SCALES CORDA_SKIP CORDA_EXAMPLES \
            TRAIN_EXAMPLES STEPS BATCH LR EVAL_EXAMPLES SCORE RESAMPLES JOBS THREADS EVAL_PROCS EVALUATE \
            MEASURE_TASKS MEASURE_SCALES CHECKPOINT_STEPS TARGET_ROWS THRESHOLD_EXAMPLES GENERAL_EXAMPLES \
            KL_EXAMPLES GENERAL_TEXT; do
    if [ -n "${!name:-}" ]; then OPTIONS+=("--${name,,}" "${!name}"); fi
done
exec "${PY:-.venv/bin/python}" scripts/cpu_study.py "${OPTIONS[@]}" -- "$@"
