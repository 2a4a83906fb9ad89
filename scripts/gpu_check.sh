#!/usr/bin/env bash
# The GPU check in one call, for a bare GPU machine with no network: installs .whl/ (made beforehand by
# scripts/gpu_wheels.sh) into a temporary folder that shadows the image's packages, then runs bench/gpu_check.py,
# which writes OUT/gpu_check.md and OUT/gpu_check.json (docs/benchmarks.md, "The GPU check").
#
#     bash scripts/gpu_check.sh "$OUT"                    # every step, <= 8 min on one H200
#     bash scripts/gpu_check.sh "$OUT" --steps training   # any bench/gpu_check.py option after OUT
#
# Without .whl/ (a machine of one's own, with the packages installed) it runs on what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR [bench/gpu_check.py options]}
shift
PY=${PYTHON:-python3}
WHEELS=${WHEEL_DIR:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    TARGET=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_packages.XXXXXX")
    trap 'rm -rf "$TARGET"' EXIT
    echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $TARGET"
    start=$SECONDS
    "$PY" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$TARGET" "$WHEELS"/*.whl
    echo "installed in $((SECONDS - start)) s"
    export PYTHONPATH="$TARGET:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$TARGET/bin:$PATH"
else
    echo "no wheels in $WHEELS: running on the installed packages"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" bench/gpu_check.py --out "$OUT" "$@"
