"""`slurm_cluster`: the real one-node SLURM cluster of slurm/testcluster.sh, installed and started once per test
session and stopped at its end when this session started it. Tests that use it are skipped where it cannot run
(not root, no apt-get, the slurm-wlm/munge packages cannot be installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "testcluster.sh"


@dataclass(frozen=True)
class SlurmCluster:
    state_dir: Path  # SLURM_TEST_DIR: config, logs, daemon state
    conf: Path  # the slurm.conf every slurm command of the session reads (exported as SLURM_CONF)
    node: str

    def squeue(self, *args: str) -> str:
        return subprocess.run(["squeue", *args], capture_output=True, text=True, check=True, timeout=30).stdout


def _tail(proc: subprocess.CompletedProcess, lines: int = 15) -> str:
    text = (proc.stderr or "") + (proc.stdout or "")
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    if os.geteuid() != 0:
        pytest.skip("slurm tests need root: slurm/testcluster.sh installs slurm-wlm and munge and starts the daemons")
    if shutil.which("apt-get") is None and not shutil.which("slurmctld", path="/usr/sbin:/usr/bin"):
        pytest.skip("slurm tests need apt-get to install slurm-wlm and munge (or them installed)")
    state_dir = Path(os.environ.get("SLURM_TEST_DIR", "/tmp/slurm-test"))
    env = {**os.environ, "SLURM_TEST_DIR": str(state_dir)}
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    install = subprocess.run([str(SCRIPT), "install"], env=env, capture_output=True, text=True, timeout=1200)
    if install.returncode != 0:
        pytest.skip(f"slurm-wlm/munge unavailable (slurm/testcluster.sh install failed):\n{_tail(install)}")
    was_running = subprocess.run([str(SCRIPT), "status"], env=env, capture_output=True, timeout=60).returncode == 0
    start = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=300)
    if start.returncode != 0:
        pytest.fail(f"slurm/testcluster.sh start failed:\n{_tail(start, 40)}", pytrace=False)

    # The code under test finds the cluster as it would a real one: sbatch/squeue on PATH, SLURM_CONF set. Jobs
    # inherit this environment (sbatch --export=ALL), so they can unpickle functions from this repository.
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH", "PYTHONPATH")}
    os.environ["SLURM_CONF"] = str(state_dir / "etc" / "slurm.conf")
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join(path + [d for d in ("/usr/bin", "/usr/sbin") if d not in path])
    pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in pythonpath if p != str(ROOT)])
    assert shutil.which("sbatch") and shutil.which("squeue"), "sbatch/squeue not on PATH after install"
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    try:
        yield SlurmCluster(state_dir=state_dir, conf=state_dir / "etc" / "slurm.conf", node=node)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if not was_running:
            subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


TWO_NODE_ENV = {"SLURM_TEST_DIR": "/tmp/slurm-test-2node", "SLURM_TEST_NODES": "2", "SLURM_TEST_CTLD_PORT": "6827",
                "SLURM_TEST_SLURMD_PORT": "17001"}


@pytest.fixture(scope="session")
def slurm_two_nodes(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The two-node variant of the test cluster (nodes n1 and n2: two slurmd daemons on this machine), beside the
    one-node one (own state folder and ports). Tests point SLURM_CONF at `conf` for the commands they run."""
    env = {**os.environ, **TWO_NODE_ENV}
    was_running = subprocess.run([str(SCRIPT), "status"], env=env, capture_output=True, timeout=60).returncode == 0
    start = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=300)
    if start.returncode != 0:
        pytest.fail(f"SLURM_TEST_NODES=2 slurm/testcluster.sh start failed:\n{_tail(start, 40)}", pytrace=False)
    state_dir = Path(TWO_NODE_ENV["SLURM_TEST_DIR"])
    try:
        yield SlurmCluster(state_dir=state_dir, conf=state_dir / "etc" / "slurm.conf", node="n1,n2")
    finally:
        if not was_running:
            subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
