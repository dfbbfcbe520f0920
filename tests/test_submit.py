"""The submission layer with the executors that run here without a cluster: inline and local (real
subprocesses through submitit), multi-task distributed environment, failures, and re-attach after the
submitting process dies; what a SLURM task exports (rendezvous port, its GPU, the collective timeout)."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align.artifacts import JOB_KEY, JOB_STARTED, verify_artifact
from align.errors import UserError
from align.params import Resources
from align.progress import progress
from slurm import submit as submit_module
from slurm.submit import COLLECTIVE_TIMEOUT, JobFailed, JobSpec, _Task, job_name, state_path, submit
from align import progress as progress_module
from tests import helpers
from tests.conftest import ROOT
from tests.helpers import cluster_with, resources


def dist_env() -> dict:
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {k: os.environ.get(k) for k in keys}


def all_reduce_ranks() -> tuple[int, int, float]:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    result = (dist.get_rank(), dist.get_world_size(), total.item())
    dist.destroy_process_group()
    return result


def fail(message: str) -> None:
    raise ValueError(message)


def counting_job(steps: int) -> int:
    """A loop that writes a progress line to the job log every 0.2 s (set here: the job is its own process)."""
    progress_module.LOG_INTERVAL = 0.2
    for _ in progress(range(steps), desc="Counting", unit="step", delay=0.1):
        time.sleep(0.1)
    return steps


def spec(fn, tmp_path: Path, **resources) -> JobSpec:
    return JobSpec(stage="t", fn=fn, resources=helpers.resources(time_min=5, **resources), target=tmp_path / "out", key={})


def test_inline_runs_in_process_with_a_single_rank_env(tmp_path: Path) -> None:
    env = submit(spec(dist_env, tmp_path), cluster_with(executor="inline", log_dir=str(tmp_path / "logs")))
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["LOCAL_RANK"] == "0"
    assert not (tmp_path / "logs").exists()


def test_inline_refuses_more_than_one_task(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cluster.t: the inline executor runs one task"):
        submit(spec(dist_env, tmp_path, tasks_per_node=2), cluster_with(executor="inline"))


def test_local_two_tasks_form_one_torch_distributed_group(tmp_path: Path) -> None:
    cluster = cluster_with(executor="local", log_dir=str(tmp_path / "logs"))
    rank, world, total = submit(spec(all_reduce_ranks, tmp_path, tasks_per_node=2), cluster)
    assert (rank, world, total) == (0, 2, 3.0)
    logs = sorted(p.name for p in (tmp_path / "logs" / "t").iterdir())
    assert any(name.endswith("_0_log.out") for name in logs) and any(name.endswith("_1_log.err") for name in logs)
    assert not state_path(tmp_path / "out").exists()


def test_local_failure_names_job_error_and_log(tmp_path: Path) -> None:
    cluster = cluster_with(executor="local", log_dir=str(tmp_path / "logs"))
    with pytest.raises(JobFailed) as exc:
        submit(spec(functools.partial(fail, "tokenizer exploded"), tmp_path), cluster)
    message = str(exc.value)
    first = message.splitlines()[0]
    assert first.startswith("t: job ") and "failed on rank 0" in first
    assert "ValueError: tokenizer exploded" in message
    log = message.splitlines()[-1].split("log: ")[1]
    assert Path(log).is_file() and log.endswith("_0_log.err")
    assert not state_path(tmp_path / "out").exists()


def test_a_waiting_submitter_names_the_log_once_and_shows_the_job_s_progress(
        tmp_path: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(submit_module, "PROGRESS_EVERY", 0.5)
    cluster = cluster_with(executor="local", log_dir=str(tmp_path / "logs"))
    assert submit(spec(functools.partial(counting_job, 30), tmp_path), cluster) == 30
    err = capfd.readouterr().err.splitlines()
    log = next((tmp_path / "logs" / "t").glob("*_0_log.err"))
    assert err[0].startswith("t: submitted local job") and err[0].endswith(f"(log: {log})")
    assert sum(str(log) in line for line in err) == 1
    shown = [line for line in err if line.startswith("t: Counting: ")]
    assert shown and len(shown) == len(err) - 1, err  # nothing else is said while waiting
    assert all(before != after for before, after in zip(shown, shown[1:]))


def test_local_nodes_above_one_is_a_params_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cluster.t.nodes: the local executor runs on one node, got 2"):
        submit(spec(dist_env, tmp_path, nodes=2), cluster_with(executor="local", log_dir=str(tmp_path / "logs")))


def test_local_job_survives_the_submitter_and_is_re_attached(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tests.stage_sleep", "local", str(tmp_path / "logs"), "6"]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    line = first.stderr.readline()
    assert "submitted local job" in line, line
    job_id = line.split("local job ")[1].split()[0]
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (tmp_path / ".out.job.json").exists() and not (tmp_path / "out").exists()

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert f"re-attached to local job {job_id}" in second.stderr
    assert "submitted" not in second.stderr
    assert f"result: {job_id}" in second.stdout
    verify_artifact(tmp_path / "out")
    assert not (tmp_path / ".out.job.json").exists()
    logs = {p.name.split("_")[0] for p in (tmp_path / "logs" / "sleep").glob("*_log.out")}
    assert logs == {job_id}  # one job only


def test_a_changed_submission_is_not_re_attached(tmp_path: Path) -> None:
    """Also where the first submitter ran as a shell's background job (`nohup dvc repro &`), with SIGINT ignored."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "tests.stage_sleep", "local", "logs", "30"], cwd=tmp_path,
                             env=env, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    line = first.stderr.readline()
    assert "submitted local job" in line
    stale_pid = int(line.split("local job ")[1].split()[0])
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = subprocess.run([sys.executable, "-m", "tests.stage_sleep", "local", "logs", "0.1"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert f"cancelled stale local job {stale_pid}" in second.stderr
    assert "submitted local job" in second.stderr and "re-attached" not in second.stderr
    deadline = time.monotonic() + 15  # SIGINT was sent; on a loaded machine the job takes a moment to exit
    while time.monotonic() < deadline:
        try:
            os.kill(stale_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(stale_pid, 0)


def test_job_names_hold_nothing_a_job_script_would_read_as_syntax() -> None:
    assert job_name("verbose_clone_answers") == "verbose_clone_answers"
    assert job_name("a b;c$(id)`x`\n'q'") == "a_b_c__id__x___q_"
    assert job_name("") == "stage" and len(job_name("x" * 200)) == 64


def test_site_options_reach_the_job_script(tmp_path: Path) -> None:
    """Typed GPUs, memory per GPU, exclusive nodes, a reservation, a passed-through sbatch option, srun arguments
    and a container's python land in the script submitit writes; keys left null write nothing (no --wckey)."""
    import submitit

    from slurm.submit import sbatch_parameters

    res = resources(partition="gpu", gpus_per_node=4, gpu_type="a100", mem_gb=None, mem_per_gpu_gb=80, exclusive=True,
                    reservation="maint", sbatch={"gres-flags": "enforce-binding", "requeue": True},
                    srun_args=["--mpi=pmix"], python=["apptainer", "exec", "--nv", "/shared/img.sif", "python"])
    executor = submitit.SlurmExecutor(folder=tmp_path, python=" ".join(res.python))
    executor.update_parameters(**sbatch_parameters("engrave", res))
    script = executor._make_submission_file_text(executor._submitit_command_str, "uid")  # what sbatch reads
    for line in ("#SBATCH --gpus-per-node=a100:4", "#SBATCH --mem-per-gpu=80GB", "#SBATCH --exclusive",
                 "#SBATCH --reservation=maint", "#SBATCH --gres-flags=enforce-binding", "#SBATCH --requeue",
                 "#SBATCH --partition=gpu", "#SBATCH --ntasks-per-node=4"):
        assert line in script.splitlines(), line
    assert "--wckey" not in script and "--mem=" not in script and "--account" not in script
    assert "--kill-on-bad-exit=1 --mpi=pmix apptainer exec --nv /shared/img.sif python -u -m submitit" in script
    assert "#SBATCH --mem=0" in submitit_script(tmp_path, resources(mem_gb=0))  # all of the node's memory
    assert "--partition" not in submitit_script(tmp_path, resources(mem_gb=None))  # the cluster's default partition


def submitit_script(folder: Path, res: Resources) -> str:
    import submitit

    from slurm.submit import sbatch_parameters

    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**sbatch_parameters("stage", res))
    return executor._make_submission_file_text(executor._submitit_command_str, "uid")


SLURM_TASK = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0",
              "SLURM_JOB_NODELIST": "localhost"}  # one of 4 tasks of a one-node SLURM job, as srun starts it
TASK_EXPORTS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                "CUDA_VISIBLE_DEVICES", COLLECTIVE_TIMEOUT, JOB_STARTED, JOB_KEY)


def task_environment() -> dict[str, str | None]:
    return {key: os.environ.get(key) for key in TASK_EXPORTS}


def in_slurm_task(monkeypatch: pytest.MonkeyPatch, job_id: str, rank: int, gpus_per_task: int = 1,
                  **env: str | None) -> dict[str, str | None]:
    """What the submission layer's task exports in task `rank` of SLURM job `job_id` (SLURM's variables set as srun
    sets them, and `env`), read by the task's function; the test's environment is restored afterwards."""
    for key in TASK_EXPORTS:  # monkeypatch restores whatever the task sets
        monkeypatch.delenv(key, raising=False)
    for key, value in {**SLURM_TASK, "SLURM_JOB_ID": job_id, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
                       **env}.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    return _Task(task_environment, gpus_per_task, "key", 30)()


def test_the_rendezvous_port_is_below_the_ephemeral_range_and_the_same_in_every_task(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit drew MASTER_PORT from 20000-60000 (seeded by the job id): two jobs in three listened on a port of
    Linux's ephemeral range, where any outgoing connection on the node may already hold it."""
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ephemeral.read_text().split()[0]) if ephemeral.is_file() else 32768
    ports = {}
    for job_id in map(str, range(1000, 1100)):
        ranks = {in_slurm_task(monkeypatch, job_id, rank)["MASTER_PORT"] for rank in (0, 3)}
        assert len(ranks) == 1, (job_id, ranks)  # every task of the job finds the same rendezvous
        ports[job_id] = int(ranks.pop())
    assert all(1024 <= port < min(low, 32768) for port in ports.values()), sorted(ports.values())[-5:]
    assert len(set(ports.values())) > 90  # jobs sharing a node rarely share a port


@pytest.mark.parametrize("slurm_sets, rank, per_task, expected", [
    ("4,5,6,7", 1, 1, "5"),  # the job's GPUs on the node, not renumbered (no cgroup): task 1 takes the second of them
    ("0,1,2,3", 2, 1, "2"),  # renumbered by a cgroup: the same as the local rank
    ("GPU-aa,GPU-bb,GPU-cc,GPU-dd", 3, 1, "GPU-dd"),  # UUIDs
    ("6", 2, 1, "6"),  # one GPU per task already (--gpus-per-task=1, --gpu-bind): SLURM's choice stays
    (None, 2, 1, "2"),  # nothing set: the local rank, in the node's numbering
    ("0,1,2,3,4,5,6,7", 3, 2, "6,7"),  # two GPUs per rank (the policy stage at tensor_parallel_size 2)
    ("8,9,10,11,12,13,14,15", 1, 2, "10,11"),  # and not renumbered
    (None, 1, 2, "2,3"),
])
def test_each_task_drives_the_gpus_slurm_gave_it(monkeypatch: pytest.MonkeyPatch, slurm_sets: str | None, rank: int,
                                                   per_task: int, expected: str) -> None:
    ntasks = {"SLURM_NTASKS": str(8 // per_task)} if slurm_sets and len(slurm_sets.split(",")) == 8 else {}
    exported = in_slurm_task(monkeypatch, "77", rank, per_task, CUDA_VISIBLE_DEVICES=slurm_sets, **ntasks)
    assert exported["CUDA_VISIBLE_DEVICES"] == expected


def test_a_task_that_uses_the_node_s_gpus_keeps_them_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """A generation job (one task, vLLM over every GPU it was given) sees what SLURM set."""
    exported = in_slurm_task(monkeypatch, "78", 0, 4, CUDA_VISIBLE_DEVICES="4,5,6,7", SLURM_NTASKS="1")
    assert exported["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"


def collective_timeout() -> float:
    """The default process group's timeout in minutes, as `init_distributed` sets it up in a job."""
    import torch
    import torch.distributed as dist

    from align.training import init_distributed

    init_distributed()
    backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    return backend.options._timeout.total_seconds() / 60


def test_collectives_time_out_after_the_stage_s_setting(tmp_path: Path) -> None:
    """DeepSpeed's 10 minutes applied whatever the stage's job needed (a rank waiting on another's long start-up)."""
    cluster = cluster_with(executor="local", log_dir=str(tmp_path / "logs"))
    assert submit(spec(collective_timeout, tmp_path, collective_timeout_min=45), cluster) == 45


def wait_for_signals(ready) -> None:  # noqa: ANN001 - a multiprocessing Event
    """A helper process: says it is up, then lives 60 s unless a signal ends it."""
    ready.set()
    time.sleep(60)


@pytest.mark.parametrize("shield", [True, False])
def test_a_helper_process_started_shielded_outlives_slurm_s_signals(shield: bool) -> None:
    """SLURM signals every process of a job step. A helper started in `preemption.shielded()` (vLLM's engine) lives
    on through SIGUSR2 and SIGTERM, which the job's own process acts on at its next safe point; one started outside
    dies of them. Started by multiprocessing's spawn, as vLLM starts its engine (the first spawn also starts
    multiprocessing's resource tracker, which unblocks SIGTERM)."""
    import multiprocessing

    from slurm import preemption

    context = multiprocessing.get_context("spawn")
    with preemption.shielded() if shield else contextlib.nullcontext():
        ready = context.Event()  # in this process's first use of multiprocessing, as vLLM's may be
        helper = context.Process(target=wait_for_signals, args=(ready,))
        helper.start()
    try:
        assert ready.wait(60)
        for signum in preemption.SIGNALS:
            os.kill(helper.pid, signum)
        helper.join(3)  # a signal that ends it does so at once; a blocked one never does
        assert helper.is_alive() == shield, helper.exitcode
    finally:
        helper.kill()
        helper.join()
