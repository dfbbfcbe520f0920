"""The submission layer on a real one-node SLURM cluster (slurm/testcluster.sh, started by the `slurm_cluster`
session fixture): a 2-task torch.distributed job on the gpu partition, a failing job, a cancelled job, a stage
whose submitter is killed and re-attached, import_model end to end, and the checks before any work (a misspelt
partition, GPUs the job cannot use), and the DAG run as a job of its own."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import submitit
import yaml

from align.artifacts import MANIFEST, verify_artifact
from slurm.submit import JobFailed, JobSpec, _attach, state_path, submit
from tests.helpers import SqueueWatch, cluster_with, new_repo, resources, squeue_jobs, stage_env
from tests.jobs import all_reduce_rank, device_of_job, fail
from tests.projects import slurm_project

pytestmark = pytest.mark.slurm


def job_ids(folder: Path) -> set[str]:
    return {p.name.split("_")[0] for p in folder.glob("*_submitted.pkl")}


def test_two_tasks_on_the_gpu_partition_form_one_gloo_group(slurm_cluster, tmp_path: Path) -> None:
    cluster = cluster_with(executor="slurm", log_dir=str(tmp_path / "logs"))
    two_gpus = resources(partition="gpu", gpus_per_node=2, cpus_per_task=1, mem_gb=1, time_min=5)
    spec = JobSpec(stage="allreduce", fn=all_reduce_rank, resources=two_gpus, target=tmp_path / "out", key={})

    rank, world_size, reduced, cuda = submit(spec, cluster)
    assert (rank, world_size, reduced) == (0, 2, 3.0)
    assert cuda == "0"  # one GPU per task: rank 0 sees the node's first GPU
    assert not state_path(tmp_path / "out").exists()

    folder = tmp_path / "logs" / "allreduce"
    (job_id,) = job_ids(folder)
    results = submitit.SlurmJob(folder=folder, job_id=job_id, tasks=[0, 1]).results()
    assert results == [(0, 2, 3.0, "0"), (1, 2, 3.0, "1")]
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    assert "Partition=gpu" in shown and "gpu:2" in shown and "NumTasks=2" in shown, shown


def test_a_failing_job_names_its_id_error_and_log(slurm_cluster, tmp_path: Path) -> None:
    cluster = cluster_with(executor="slurm", log_dir=str(tmp_path / "logs"))
    spec = JobSpec(stage="failing", fn=functools.partial(fail, "tokenizer exploded on the cluster"),
                   resources=resources(partition="cpu", mem_gb=1, time_min=5), target=tmp_path / "out", key={})
    with pytest.raises(JobFailed) as exc:
        submit(spec, cluster)
    (job_id,) = job_ids(tmp_path / "logs" / "failing")
    message = str(exc.value)
    assert message.splitlines()[0].startswith(f"failing: job {job_id} failed on rank 0")
    assert "RuntimeError: tokenizer exploded on the cluster" in message
    log = Path(message.splitlines()[-1].split("log: ")[1])
    assert log == tmp_path / "logs" / "failing" / f"{job_id}_0_log.err" and log.is_file()
    assert not state_path(tmp_path / "out").exists()


def test_a_job_cancelled_before_its_result_fails_instead_of_waiting_forever(slurm_cluster, tmp_path: Path) -> None:
    cluster = cluster_with(executor="slurm", log_dir=str(tmp_path / "logs"))
    spec = JobSpec(stage="cancelled", fn=functools.partial(time.sleep, 120),
                   resources=resources(partition="cpu", mem_gb=1, time_min=5), target=tmp_path / "out", key={})
    raised: list[BaseException] = []

    def run() -> None:
        try:
            submit(spec, cluster)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    state_file = state_path(tmp_path / "out")
    deadline = time.monotonic() + 60
    while not (state_file.exists() and squeue_jobs("cancelled").get(json.loads(state_file.read_text())["job_id"]) == "RUNNING"):
        assert time.monotonic() < deadline, "the job never ran"
        time.sleep(0.1)
    job_id = json.loads(state_file.read_text())["job_id"]
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    thread.join(timeout=90)
    assert not thread.is_alive(), "submit() still waits for a cancelled job"
    assert len(raised) == 1 and isinstance(raised[0], JobFailed), raised
    assert f"job {job_id} failed" in str(raised[0]) and "CANCELLED" in str(raised[0])
    assert not state_file.exists()
    # a job-state file naming a cancelled job, or one slurmctld does not know, is not re-attached
    folder = str(tmp_path / "logs" / "cancelled")
    assert _attach({"folder": folder, "job_id": job_id, "tasks": 1}, "slurm") is None
    assert _attach({"folder": folder, "job_id": "987654", "tasks": 1}, "slurm") is None


def test_a_killed_submitter_is_re_attached_to_its_running_job(slurm_cluster, tmp_path: Path, tiny_model: Path) -> None:
    cwd = slurm_project(tmp_path, tiny_model)
    cmd = [sys.executable, "-m", "stages.import_model"]
    state_file = cwd / "models" / ".base.job.json"
    before = set(squeue_jobs("import_model"))
    with SqueueWatch("import_model") as watch:
        with (tmp_path / "first.err").open("w") as err:
            first = subprocess.Popen(cmd, cwd=cwd, env=stage_env(), stdout=subprocess.DEVNULL, stderr=err)
        job_id, deadline = None, time.monotonic() + 120
        while True:
            assert first.poll() is None, (tmp_path / "first.err").read_text()
            assert time.monotonic() < deadline, "the import job never ran"
            if state_file.exists():
                job_id = json.loads(state_file.read_text())["job_id"]
                if squeue_jobs("import_model").get(job_id) == "RUNNING":
                    break
            time.sleep(0.1)
        first.kill()
        first.wait()
        assert not (cwd / "models" / "base").exists(), "the job finished before the submitter was killed"
        assert state_file.exists()

        second = subprocess.run(cmd, cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert f"import_model: re-attached to slurm job {job_id}" in second.stderr
    assert "submitted" not in second.stderr
    new = set().union(*watch.snapshots) - before
    assert new == {job_id}, f"squeue showed {sorted(new)} for import_model"
    assert all(len(set(snapshot) - before) <= 1 for snapshot in watch.snapshots)
    out = cwd / "models" / "base"
    assert second.stdout.strip() == f"import_model: models/base {verify_artifact(out)}"
    assert json.loads((out / MANIFEST).read_text())["slurm_job_id"] == job_id
    assert not state_file.exists()


def test_import_model_end_to_end_through_slurm(slurm_cluster, tmp_path: Path, tiny_model: Path) -> None:
    cwd = slurm_project(tmp_path, tiny_model)
    proc = subprocess.run([sys.executable, "-m", "stages.import_model"], cwd=cwd, env=stage_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "import_model: submitted slurm job " in proc.stderr
    job_id = proc.stderr.split("submitted slurm job ")[1].split()[0]
    out = cwd / "models" / "base"
    artifact_id = verify_artifact(out)
    assert proc.stdout.strip() == f"import_model: models/base {artifact_id}"
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["slurm_job_id"] == job_id
    assert manifest["stage"] == "import_model" and manifest["inputs"]["model"]["path"] == str(tiny_model)
    assert "accounting storage is disabled" not in proc.stderr  # job states come from squeue, quietly
    assert job_ids(tmp_path / "logs" / "import_model") == {job_id}


def test_a_misspelt_partition_stops_in_seconds_naming_the_real_ones(slurm_cluster, tmp_path: Path,
                                                                     tiny_model: Path) -> None:
    cwd = slurm_project(tmp_path, tiny_model)
    raw = yaml.safe_load((cwd / "params.yaml").read_text())
    raw["cluster"]["defaults"]["partition"] = "gpus"
    (cwd / "params.yaml").write_text(yaml.safe_dump(raw))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "stages.import_model"], cwd=cwd, env=stage_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and time.monotonic() - started < 30, proc.stderr
    assert proc.stderr.strip() == ("params.yaml: cluster.defaults.partition: 'gpus' is not a partition of this "
                                   "cluster; it has cpu, gpu")
    assert not (cwd / "logs").exists() and not (cwd / "models").exists()  # no job, no hashing, nothing written

    raw["cluster"]["defaults"]["partition"] = None
    raw["cluster"]["engrave"] = {"partition": "gpu", "gpus_per_node": 1, "gpu_type": "h100"}
    (cwd / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "stages.import_model"], cwd=cwd, env=stage_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(
        "params.yaml: cluster.engrave.gpu_type: no node offers GPUs of type 'h100'"), proc.stderr


def test_a_job_given_gpus_it_cannot_use_fails_at_once(slurm_cluster, tmp_path: Path) -> None:
    """The test cluster's GPUs are files: torch sees no CUDA, as in a job whose venv has a CPU-only torch."""
    cluster = cluster_with(executor="slurm", log_dir=str(tmp_path / "logs"))
    one_gpu = resources(partition="gpu", gpus_per_node=1, cpus_per_task=1, mem_gb=1, time_min=5)
    spec = JobSpec(stage="needs_cuda", fn=device_of_job, resources=one_gpu, target=tmp_path / "out", key={})
    with pytest.raises(JobFailed, match=r"SLURM gave this job GPUs \(\S+\) but torch \S+ cannot use CUDA here"):
        submit(spec, cluster)
    spec = JobSpec(stage="cpu_only", fn=device_of_job, resources=resources(partition="cpu", cpus_per_task=1,
                   mem_gb=1, time_min=5), target=tmp_path / "cpu_out", key={})
    assert submit(spec, cluster) == "cpu"


def test_the_dag_runs_as_a_job_after_the_login_shell_is_gone(slurm_cluster, tmp_path: Path, tiny_model: Path) -> None:
    """`python -m align.repro_job` returns once `dvc repro` is submitted as a job; the shell that ran it ends; the
    job submits the stage's job from inside SLURM and the DAG completes; started again meanwhile, it attaches."""
    repo = new_repo(tmp_path / "repo", {"model": {"base": str(tiny_model)}, "cluster": {
        "executor": "slurm", "log_dir": str(tmp_path / "logs"),
        "defaults": {"partition": "cpu", "cpus_per_task": 1, "mem_gb": 2, "time_min": 10}}})
    env = {**stage_env(), "PYTHONPATH": str(repo), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    shell = subprocess.run(["bash", "-c", f"{sys.executable} -m align.repro_job import_model"], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=120, start_new_session=True)
    assert shell.returncode == 0, shell.stderr
    job_id = shell.stdout.split("runs as slurm job ")[1].split(";")[0]
    again = subprocess.run([sys.executable, "-m", "align.repro_job", "import_model"], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and f"runs as slurm job {job_id};" in again.stdout, again.stderr
    assert f"repro: re-attached to slurm job {job_id}" in again.stderr  # not a second DAG run

    deadline = time.monotonic() + 600
    while squeue_jobs("repro").get(job_id) in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING") \
            and time.monotonic() < deadline:
        time.sleep(1)
    log = "".join(p.read_text(errors="replace") for p in (tmp_path / "logs" / "repro").glob(f"{job_id}_0_log.*"))
    out = repo / "models" / "base"
    assert out.is_dir(), log
    assert f"import_model: models/base {verify_artifact(out)}" in log  # the stage's own line, in the one log
    assert "import_model: submitted slurm job" in log
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "import_model"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=120)
    assert "changed" not in status.stdout, status.stdout
