"""What the side-by-side benches share: each side runs in a worker process of the bench script itself (`--worker
NAME --spec FILE --result FILE`), so its imports, threads and peak memory are its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def absolute(arg: str) -> Path:
    """A folder argument as an absolute path (argparse `type`): the workers run in a scratch folder."""
    return Path(arg).resolve()


def run_worker(script: str, name: str, spec_path: Path, result: Path, cwd: Path, threads: int | None = None) -> dict:
    """Run `script --worker name` offline in `cwd` (with `threads` OpenMP/MKL threads when given) and return the
    JSON it wrote to `result`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    subprocess.run([sys.executable, script, "--worker", name, "--spec", str(spec_path), "--result", str(result)],
                   check=True, env=env, cwd=cwd)
    return json.loads(result.read_text())
