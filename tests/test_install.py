"""install.sh's decisions, without network: where the CPU build of torch comes from (the configured pip where it
already finds that build, PyTorch's CPU index otherwise: the public index hosts no `+cpu` build) and the Python
version check. A local file:// index with no torch in it stands in for the public index."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import ROOT

TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def fake_torch_wheel(folder: Path) -> Path:
    """A minimal valid wheel named like the CPU build: all pip's resolver reads is its name and metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "torch-2.13.0+cpu-py3-none-any.whl"
    info = "torch-2.13.0+cpu.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("torch/__init__.py", "")
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0+cpu\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


def install_sh(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """install.sh with pip's configuration off (no config file, no PIP_* from this machine) and an empty local
    index in place of the public one."""
    index = tmp_path / "simple"
    index.mkdir(exist_ok=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    clean.update({"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": index.as_uri(), "PYTHON": sys.executable, **env})
    return subprocess.run(["bash", str(ROOT / "install.sh"), *args], capture_output=True, text=True, env=clean,
                          timeout=120)


def test_the_public_index_alone_takes_torch_from_pytorchs_cpu_index(tmp_path: Path) -> None:
    proc = install_sh(tmp_path, "--which-index")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == TORCH_CPU_INDEX


def test_a_pip_that_finds_the_cpu_build_keeps_its_configuration(tmp_path: Path) -> None:
    wheels = fake_torch_wheel(tmp_path / "wheels").parent
    proc = install_sh(tmp_path, "--which-index", PIP_FIND_LINKS=str(wheels))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "configured"


def test_an_old_python_is_one_line_naming_both_versions(tmp_path: Path) -> None:
    fake = tmp_path / "python3.9"
    fake.write_text('#!/bin/sh\ncase "$2" in *print*) echo 3.9.2;; *) exit 1;; esac\n')
    fake.chmod(0o755)
    proc = install_sh(tmp_path, PYTHON=str(fake))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == (f"install.sh: Python 3.9.2 found ({fake}); Python 3.11 to 3.14 needed "
                                   f"(set PYTHON=/path/to/python3.11)")
