#!/usr/bin/env bash
# The GPU test suite (tests marked `gpu`) on one GPU machine, in under 8 minutes, where the image has CUDA, Python,
# torch and transformers but not the rest of this project's stack and no network.
#
#   bash bench/gpu_check.sh fetch   # here, with PyPI: wheels for what such an image lacks -> .whl/ (git-ignored)
#   bash bench/gpu_check.sh         # there, .whl/ carried beside the checkout: install them, run the suite
#
# The versions fetched are this checkout's .venv's (the pins of requirements.txt); DeepSpeed has no wheel on PyPI
# and is built here without its C++ ops (DS_BUILD_OPS=0, as install.sh does). The suite writes its log and a JUnit
# file to $OUT (or bench/results/) so the numbers reach the note.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.12}  # the GPU image's python3
# What the job code imports beyond torch, transformers and the packages such an image ships (numpy, yaml, jinja2,
# safetensors, tokenizers, accelerate, psutil, ...): found with `python -X importtime` over the stages' jobs.
NEEDED=(peft transformers deepspeed pydantic pydantic_core annotated-types typing-inspection blake3 submitit dvclive
        dvc dvc-render dvc-studio-client funcy flatten-dict voluptuous ruamel.yaml hjson pydot wcwidth)

if [[ "${1:-}" == "fetch" ]]; then
    mkdir -p "$WHEELS"  # git-ignored
    freeze=$(.venv/bin/python -m pip freeze)
    pins=()
    for name in "${NEEDED[@]}"; do
        key=$(echo "$name" | tr '_.' '--' | tr 'A-Z' 'a-z')
        line=$(echo "$freeze" | awk -F'==' -v k="$key" 'tolower($1) ~ /./ { n=tolower($1); gsub(/[_.]/, "-", n); if (n == k) print }')
        [[ -n "$line" ]] || { echo "gpu_check: $name is not installed in .venv (run install.sh first)"; exit 1; }
        pins+=("$line")
    done
    binary=() && for pin in "${pins[@]}"; do [[ "$pin" == deepspeed==* ]] || binary+=("$pin"); done
    platforms=()
    for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
        --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d "$WHEELS" "${binary[@]}"
    DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" \
        "$(printf '%s\n' "${pins[@]}" | grep '^deepspeed==')"
    du -sh "$WHEELS" && ls "$WHEELS"
    exit 0
fi

PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
if [[ -d "$WHEELS" ]]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site \
        "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
set -o pipefail
PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 timeout 450 "$PYTHON" -m pytest -m gpu tests/test_gpu.py -q -rA --durations=0 \
    --junitxml "$OUT_DIR/gpu_suite.xml" -p no:cacheprovider 2>&1 | tee "$OUT_DIR/gpu_suite.log"
