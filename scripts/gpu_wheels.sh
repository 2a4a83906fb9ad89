#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh installs on a bare GPU machine with no network (CPython 3.12, manylinux x86-64):
# our pinned transformers, peft, accelerate and deepspeed, and every package they need besides torch and numpy,
# which the GPU image brings. Run here, with network (PyPI only); writes .whl/ (ignored by git), prints the total
# size and refuses above 60 MiB.
#
#     bash scripts/gpu_wheels.sh            # into .whl/
#     WHEEL_DIR=/tmp/w bash scripts/gpu_wheels.sh
#
# Versions: requirements.txt's pins where it has one, else the version installed beside them in .venv (tested
# together). deepspeed has no wheel on PyPI: it is built here from its sdist with DS_BUILD_OPS=0 (pure Python; it
# compiles an op at run time only when one is used, and the check's ZeRO-2/3 step with a torch optimizer uses none).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${WHEEL_DIR:-.whl}
LIMIT_MIB=60
# the closure of transformers, peft, accelerate and deepspeed's requirements, less torch and numpy
PACKAGES="transformers peft accelerate deepspeed tokenizers safetensors huggingface-hub hf-xet httpx2 httpcore2 h11
anyio idna click typer rich shellingham markdown-it-py mdurl pygments annotated-doc regex pyyaml tqdm packaging
truststore filelock fsspec typing-extensions einops hjson msgpack ninja psutil py-cpuinfo pydantic pydantic-core
annotated-types typing-inspection"

version_of() {  # requirements.txt's pin, else the installed version
    local pin
    pin=$(grep -i -E "^$1==" requirements.txt | head -n1 | cut -d= -f3 || true)
    if [ -n "$pin" ]; then echo "$pin"; return; fi
    "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"
}

rm -rf "$OUT" && mkdir -p "$OUT"
for pkg in $PACKAGES; do
    ver=$(version_of "$pkg")
    if [ "$pkg" = deepspeed ]; then
        build=$(mktemp -d)
        "$PY" -m pip download --quiet --no-deps --no-binary :all: --dest "$build" "deepspeed==$ver"
        tar -xzf "$build"/deepspeed-*.tar.gz -C "$build"
        # DeepSpeed's setup.py imports torch: build with this venv's torch (no isolation); no op is compiled
        (cd "$build"/deepspeed-"$ver" && DS_BUILD_OPS=0 "$OLDPWD/$PY" -m pip wheel --quiet --no-deps \
            --no-build-isolation --wheel-dir "$OLDPWD/$OUT" .)
        rm -rf "$build"
    else
        "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
            --implementation cp --abi cp312 --abi abi3 --abi none --dest "$OUT" "$pkg==$ver"
    fi
done
ls -1 "$OUT"
bytes=$(du -cb "$OUT"/*.whl | tail -n1 | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
echo "$(ls "$OUT"/*.whl | wc -l) wheels, $mib MiB in $OUT"
if [ "$mib" -gt "$LIMIT_MIB" ]; then
    echo "error: $OUT holds $mib MiB, above the $LIMIT_MIB MiB a device run carries with the code" >&2
    exit 1
fi
