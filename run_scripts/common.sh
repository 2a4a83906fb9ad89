# Sourced by every launcher in run_scripts/ once its settings are read: refuses a device or batch count that is not a
# positive integer and a global batch the devices cannot split, then sets the gradient accumulation that makes it,
#   ACCUMULATION = GLOBAL_BATCH / (NNODES x GPUS x PER_DEVICE_BATCH).
# The numbers are checked as text first: bash arithmetic reads "abc" as a variable name, "08" as bad octal and "2.5"
# as a syntax error, and takes "-2" at face value (16 / (-2 x 2) = -4 divides evenly, so it would launch).
# shellcheck shell=bash

_require_positive_integer() {
    local name=$1 value=${!1-}
    [[ $value =~ ^[1-9][0-9]*$ ]] || {
        echo "$(basename "$0"): $name must be a positive integer (1, 2, 3, ... without a leading zero)," \
            "got '$value'" >&2
        exit 1
    }
}
for _name in NNODES GPUS PER_DEVICE_BATCH GLOBAL_BATCH; do _require_positive_integer "$_name"; done

PER_PASS=$(( NNODES * GPUS * PER_DEVICE_BATCH ))  # examples per forward pass, all nodes together
(( GLOBAL_BATCH % PER_PASS == 0 )) || { echo "global batch $GLOBAL_BATCH is not a multiple of" \
    "NNODES x GPUS x PER_DEVICE_BATCH = $PER_PASS: change NNODES, GPUS or PER_DEVICE_BATCH" >&2; exit 1; }
ACCUMULATION=$(( GLOBAL_BATCH / PER_PASS ))
