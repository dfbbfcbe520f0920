"""Faults on the real one-node SLURM cluster (slurm/testcluster.sh): what a research cluster does to a run, and
what the pipeline promises in return - no half-written artifact, no duplicate job, a resumed run loses at most one
checkpoint interval (none at a time limit), every failure a report naming the job and its log.

1. the login node's `dvc repro` killed mid-job: the job runs on, the next `dvc repro` re-attaches to it;
2. `scancel` of a training job: exit 1 naming job and log, previous out intact, the rerun resumes;
3. a time limit shorter than the work: SIGUSR2 before the limit, checkpoint, requeue, done over several
   allocations with one continuous loss curve; and PPO preempted mid-run, by SIGTERM (SLURM's default) or SIGUSR2
   (send_user_signal): stopped at the next safe point inside its iteration, resumed there;
4. one rank of a 2-task DeepSpeed job dies: the job fails at once, naming that rank and its error;
5. the node dies under a running job: the stage reports it; the job (requeued) or the rerun completes once the
   node is back;
6. the disk fills while an out is written: one line, the previous out intact;
7. an artifact altered after it was written: the consuming stage refuses to start, naming the file;
8. the same params and seed twice: identical data artifacts, training artifacts equal within 1e-6.

Every scenario fills its figures (tests/fault_figures.py), written to faults.json at the end of the session.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from align.artifacts import read_manifest, staged_out, verify_artifact
from align.training import sft_job
from slurm.submit import JobFailed, JobSpec, submit
from tests.conftest import ROOT
from tests.helpers import (
    FAST_EXECUTION, FAST_TRAINING, SqueueWatch, cluster_with, curve, resources, sh, squeue_jobs, stage, stage_env,
    training_run,
)
from tests.jobs import RankFault
from tests.projects import TINY_RL, TINY_RL_EXECUTION, make_project, ppo_project, salmon_project, slurm_project
from tests.slurm_fixture import SCRIPT
from tests.tiny import PAIRS

pytestmark = pytest.mark.slurm

ON_CPU = {"partition": "cpu", "cpus_per_task": 1, "mem_gb": 8, "time_min": 10}
REFERENCE_STEPS = 600  # ~20 s of steps on the tiny model: long enough to interrupt
NO_PERIODIC = 100_000  # save_every_steps beyond the run: a checkpoint only at the end (or at a signal)


def engrave_project(cwd: Path, model: Path, steps: int, save_every: int = NO_PERIODIC, **resources: object) -> Path:
    """An engraving project on the SLURM cluster: 4 pairs, one optimizer step per epoch, `steps` steps."""
    return make_project(cwd, model, pairs=PAIRS, training=FAST_TRAINING,
                        cluster_defaults={**FAST_EXECUTION, "save_every_steps": save_every},
                        engrave={"epochs": steps},
                        cluster={"executor": "slurm", "log_dir": str(cwd / "logs"), "engrave": {**ON_CPU, **resources}})


def wait_for(condition: Callable[[], object], what: str, timeout: float = 300) -> object:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def alive(proc: subprocess.Popen, log: Path | None = None) -> bool:
    """True while the stage process runs; fails the test at once when it has ended (no waiting out a timeout)."""
    assert proc.poll() is None, f"exited {proc.returncode}: " + (log.read_text()[-3000:] if log else "")
    return True


def running_job(state_file: Path, name: str) -> str | None:
    """The job id in a stage's job-state file once squeue lists that job RUNNING."""
    if not state_file.exists():
        return None
    job_id = json.loads(state_file.read_text())["job_id"]
    return job_id if squeue_jobs(name).get(job_id) == "RUNNING" else None


def job_log(cwd: Path, stage_name: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((cwd / "logs" / stage_name).glob("*_0_log.out")))


def last_step(log: str, unit: str = "step") -> int:
    """The last training step (or PPO iteration) a job's log reports done."""
    steps = [int(line.split()[1].split("/")[0]) for line in log.splitlines() if line.startswith(f"{unit} ")]
    return max(steps, default=0)


def new_jobs(watch: SqueueWatch, before: set[str]) -> set[str]:
    return set().union(*watch.snapshots) - before if watch.snapshots else set()


def max_alive(watch: SqueueWatch, before: set[str]) -> int:
    """The most jobs squeue listed as queued or running at one time (two would be a duplicate submission)."""
    alive = ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "COMPLETING")
    return max((sum(state in alive for job, state in s.items() if job not in before) for s in watch.snapshots),
               default=0)


def allocations(log: str, unit: str = "step") -> list[tuple[int, int]]:
    """(first, last) step (or PPO iteration) of each allocation of a requeued training job, from its appended log:
    it starts where it resumed (0 for the first) and ends at the last one it logged."""
    spans = []
    for part in log.split("Starting with JobEnvironment")[1:]:
        resumed = [int(line.rsplit(" ", 1)[1]) for line in part.splitlines() if line.startswith("resumed from ")]
        start = resumed[0] if resumed else 0
        spans.append((start, max(last_step(part, unit), start)))
    return spans


def one_line_error(stderr: str, stage_name: str) -> str:
    """The stage's error: its last stderr line, every line before it the submission layer's (submitted, job
    state, the job's progress lines)."""
    lines = stderr.splitlines()
    assert lines and all(line.startswith(f"{stage_name}: ") for line in lines[:-1]), stderr
    return lines[-1]


def previous_out(target: Path) -> dict[str, str]:
    """Put an earlier run's out at `target` (what a rerun must not damage); its file hashes."""
    with staged_out(target, stage="earlier", params={"earlier": True}, inputs={}) as tmp:
        (tmp / "weights.bin").write_bytes(os.urandom(4096))
    verify_artifact(target)
    return read_manifest(target)["files"]


@pytest.fixture(scope="module")
def reference(slurm_cluster, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict:
    """An uninterrupted engraving run of REFERENCE_STEPS steps: its out's file hashes and its loss curve."""
    cwd = engrave_project(tmp_path_factory.mktemp("reference"), tiny_model, REFERENCE_STEPS)
    proc = stage(cwd, "engrave")
    assert proc.returncode == 0, proc.stderr
    return {"files": read_manifest(cwd / "models/engraved")["files"], "loss": curve(cwd, "engrave", "loss"),
            "out": cwd / "models/engraved"}


def same_start(losses: list[tuple[int, float]], reference: list[tuple[int, float]]) -> bool:
    """The steps both curves have are the same losses (to 1e-6): a constant learning rate, the same data stream."""
    n = min(len(losses), len(reference))
    return n > 0 and [v for _, v in losses[:n]] == pytest.approx([v for _, v in reference[:n]], abs=1e-6)


def weights(files: dict[str, str]) -> dict[str, str]:
    """The weight files of a manifest's file list (the configs name the run's own base-model path)."""
    return {name: digest for name, digest in files.items() if name.endswith(".safetensors")}


# ----------------------------------------------------------------------------------------------- 1. login node


@pytest.mark.slow
def test_killed_dvc_repro_re_attaches_and_the_artifact_matches_an_uninterrupted_run(
        slurm_cluster, tmp_path: Path, tiny_model: Path, reference: dict, fault_figures_record: dict) -> None:
    repo = engrave_project(tmp_path / "repo", tiny_model, REFERENCE_STEPS)
    engrave = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["engrave"]
    engrave["deps"] = [d for d in engrave["deps"] if (repo / d).exists()]  # the code runs from this checkout
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"engrave": engrave}}, sort_keys=False))
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "inputs in place")
    env = {**stage_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    state_file = repo / "models" / ".engraved.job.json"
    before = set(squeue_jobs("engrave"))
    started = time.monotonic()
    with SqueueWatch("engrave") as watch:
        first_log = tmp_path / "first.log"
        with first_log.open("w") as log:
            first = subprocess.Popen(["dvc", "repro", "engrave"], cwd=repo, env=env, stdout=log, stderr=log,
                                     start_new_session=True)
        job_id = wait_for(lambda: alive(first, first_log) and running_job(state_file, "engrave"), "the job to run")
        wait_for(lambda: alive(first, first_log) and last_step(job_log(repo, "engrave")) >= 50, "training steps")
        os.killpg(first.pid, signal.SIGKILL)  # dvc and the stage process under it, as a dropped login shell
        first.wait()
        assert squeue_jobs("engrave").get(job_id) == "RUNNING", "the job did not outlive the login node's dvc"
        assert not (repo / "models/engraved").exists()

        second = subprocess.run(["dvc", "repro", "engrave"], cwd=repo, env=env, capture_output=True, text=True,
                                timeout=900)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"engrave: re-attached to slurm job {job_id}" in second.stderr
    jobs = new_jobs(watch, before)
    assert jobs == {job_id}, f"squeue showed {sorted(jobs)}"
    files = read_manifest(repo / "models/engraved")["files"]
    assert weights(files) and weights(files) == weights(reference["files"])  # bitwise the uninterrupted run's
    assert "up to date" in sh(repo, "dvc", "status").stdout
    fault_figures_record.update(jobs=len(jobs), duplicate_jobs=len(jobs) - 1, artifacts_lost=0,
                                seconds=round(time.monotonic() - started, 1))


# --------------------------------------------------------------------------------------------------- 2. scancel


@pytest.mark.slow
def test_a_cancelled_training_job_fails_with_its_id_and_log_and_the_rerun_resumes(
        slurm_cluster, tmp_path: Path, tiny_model: Path, reference: dict, fault_figures_record: dict) -> None:
    steps, every = 1000, 100  # cancelled soon after the first checkpoint, long before the end
    cwd = engrave_project(tmp_path, tiny_model, steps, save_every=every)
    earlier = previous_out(cwd / "models/engraved")
    state_file = cwd / "models" / ".engraved.job.json"
    first = subprocess.Popen([sys.executable, "-m", "stages.engrave"], cwd=cwd, env=stage_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = wait_for(lambda: alive(first) and running_job(state_file, "engrave"), "the engrave job to run")
    wait_for(lambda: alive(first) and list(cwd.glob("checkpoints/engrave/*/latest"))
             and last_step(job_log(cwd, "engrave")) >= every + 10, "a checkpoint and more steps")
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 1, err
    report = next(line for line in err.splitlines() if line.startswith(f"engrave: job {job_id} failed"))
    assert "CANCELLED" in report, err
    log_path = Path(err.rsplit("log: ", 1)[1].strip())
    assert log_path.is_file() and log_path.name.startswith(f"{job_id}_")
    assert read_manifest(cwd / "models/engraved")["files"] == earlier  # the earlier out, untouched
    verify_artifact(cwd / "models/engraved")
    first_log = job_log(cwd, "engrave")
    reached = last_step(first_log)
    (latest,) = cwd.glob("checkpoints/engrave/*/latest")
    saved = int(latest.read_text().removeprefix("step_"))

    second = stage(cwd, "engrave")
    assert second.returncode == 0, second.stderr
    assert f"at step {saved}" in job_log(cwd, "engrave")
    losses = curve(cwd, "engrave", "loss")
    assert [s for s, _ in losses] == list(range(steps))  # one continuous curve, no step twice
    assert same_start(losses, reference["loss"])
    lost = reached - saved
    assert 0 <= lost <= every  # 0 where the job's checkpoint on scancel's SIGTERM beat SIGKILL (KillWait: 2 s here)
    assert "requeueing" not in first_log  # a cancelled job is not requeued
    fault_figures_record.update(steps_lost=[lost], checkpoint_every=every, cancelled_at_step=reached,
                                resumed_at_step=saved, checkpoint_on_cancel="not requeued: SIGTERM" in first_log,
                                artifacts_lost=0, duplicate_jobs=0)


# ------------------------------------------------------------------------------------------------ 3. time limit


@pytest.mark.slow
def test_a_time_limit_checkpoints_requeues_and_completes_over_several_allocations(
        slurm_cluster, tmp_path: Path, tiny_model: Path, reference: dict, fault_figures_record: dict) -> None:
    steps = 3000  # 42-90 s of steps alone here (14-30 ms a step seen): more than one 1-minute allocation, signalled
    # 20 s (or more) early, holds (2000 steps once finished inside the first). Not many more: each resume replays the
    # whole curve into dvclive first, which took ~8 s at step 2700 and ~20 s at step 4000, so 6000 steps ran out of
    # requeues
    cwd = engrave_project(tmp_path, tiny_model, steps, time_min=1, signal_delay_s=20, max_requeues=8)
    before = set(squeue_jobs("engrave"))
    started = time.monotonic()
    with SqueueWatch("engrave") as watch:
        proc = stage(cwd, "engrave", timeout=1200)
    assert proc.returncode == 0, proc.stderr
    jobs = new_jobs(watch, before)
    assert len(jobs) == 1, f"squeue showed {sorted(jobs)}"
    log = job_log(cwd, "engrave")
    spans = allocations(log)
    signalled = [int(line.split()[3].rstrip(":")) for line in log.splitlines() if line.startswith("signalled at step ")]
    assert len(spans) >= 2 and spans[-1][1] == steps and signalled, log[-3000:]
    lost = [end - next_start for (_, end), (next_start, _) in zip(spans, spans[1:])]
    assert lost == [0] * len(lost)  # each allocation starts where the previous one stopped: its signal's checkpoint
    assert "REQUEUED" in proc.stderr or "PENDING (BeginTime)" in proc.stderr  # the login node said so
    losses = curve(cwd, "engrave", "loss")
    assert [s for s, _ in losses] == list(range(steps))
    assert same_start(losses, reference["loss"])
    verify_artifact(cwd / "models/engraved")
    fault_figures_record.update(signal="SIGUSR2", resumed_where_stopped=lost == [0] * len(lost),
                                allocations=len(spans), steps_lost=lost, steps_per_allocation=spans, jobs=len(jobs),
                                duplicate_jobs=len(jobs) - 1, artifacts_lost=0,
                                seconds=round(time.monotonic() - started, 1))


SAFE_POINTS = ("rollout", "scoring", "end")  # where a PPO iteration can stop, in order


def stop_and_resume(log: str) -> tuple[tuple[int, int], str, str]:
    """From a requeued PPO job's log: where the signal stopped it (iteration index, place in SAFE_POINTS), the
    checkpoint it wrote there and the one the next allocation resumed from (their tags)."""
    stop = re.search(r"^signalled at iteration (\d+)(?: after its (\w+))?: checkpoint saved, requeueing$", log, re.M)
    resumed = re.search(r"^resumed from \S+/(step_\S+) at iteration \d+$", log, re.M)
    assert stop and resumed, log[-3000:]
    iteration, phase = int(stop[1]), stop[2]
    place = (iteration, SAFE_POINTS.index(phase)) if phase else (iteration - 1, SAFE_POINTS.index("end"))
    return place, f"step_{iteration:08d}" + (f"_{phase}" if phase else ""), resumed[1]


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["USR2", "TERM"])
def test_a_preempted_ppo_job_stops_at_its_next_safe_point_and_resumes_there(
        slurm_cluster, tmp_path: Path, tiny_model: Path, signal_name: str, fault_figures_record: dict) -> None:
    """Preemption: SLURM sends SIGTERM (and SIGKILL once the partition's GraceTime is over), or SIGUSR2 where the
    site sets PreemptParameters=send_user_signal (as before a time limit). Sent by hand with `scancel --signal`
    (the job stays RUNNING, as through a preemption's grace time) once a few iterations are done: the job stops at
    the first safe point after it (the end of the iteration's rollout, of its scoring, or of the iteration), with a
    checkpoint of two engines (policy and value), the KL coefficient, the curves and what the phase made, requeues
    itself, and the next allocation resumes at that safe point: nothing is done twice, one job, one curve. PPO's
    start-up (two engines, the RM, the generator) takes ~30 s here, about what a 1-minute allocation leaves before
    its signal, hence the signal by hand."""
    iterations = 12
    # 30 minutes: submitit counts a signal after min(80%, all but 10 minutes) of the time limit as the time limit's,
    # against max_requeues, not as a preemption - every signal, in a 10-minute job
    cwd = ppo_project(tmp_path, tiny_model, rl={**TINY_RL, "iterations": iterations},
                      cluster_defaults={**TINY_RL_EXECUTION, "save_every_steps": NO_PERIODIC},
                      cluster={"executor": "slurm", "log_dir": str(tmp_path / "logs"),
                               "policy": {**ON_CPU, "time_min": 30}})
    state_file = cwd / "models" / ".policy.job.json"
    started = time.monotonic()
    with SqueueWatch("policy") as watch:
        first = subprocess.Popen([sys.executable, "-m", "stages.policy"], cwd=cwd, env=stage_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        job_id = wait_for(lambda: alive(first) and running_job(state_file, "policy"), "the PPO job to run")
        wait_for(lambda: alive(first) and last_step(job_log(cwd, "policy"), "iteration") >= 3, "PPO iterations")
        done_before = last_step(job_log(cwd, "policy"), "iteration")
        subprocess.run(["scancel", f"--signal={signal_name}", job_id], check=True, timeout=30)
        done_after = last_step(job_log(cwd, "policy"), "iteration")
        out, err = first.communicate(timeout=900)
    assert first.returncode == 0, err
    log = job_log(cwd, "policy")
    spans = allocations(log, "iteration")
    assert len(spans) == 2 and spans[-1][1] == iterations, log[-3000:]
    lost = [end - next_start for (_, end), (next_start, _) in zip(spans, spans[1:])]
    assert lost == [0]
    place, written, resumed = stop_and_resume(log)
    # the first safe point after the signal: inside the iteration that ran while it was sent (one may have ended
    # between reading the log and the signal's arrival)
    assert (done_before, 0) <= place <= (done_after, SAFE_POINTS.index("end")), (done_before, place, done_after)
    assert resumed == written  # the next allocation began where the signal's checkpoint was written
    # submitit's words: requeued, as a preemption, not counted against max_requeues
    assert f"Caught signal SIG{signal_name} on " in log and "this job is preempted" in log
    assert json.loads((cwd / "models/policy/metrics.json").read_text())["iterations"] == iterations
    verify_artifact(cwd / "models/policy")
    assert len(set().union(*watch.snapshots)) >= 1 and max_alive(watch, set()) == 1
    fault_figures_record.update(signal=f"SIG{signal_name}",
                                stopped_after=f"iteration {place[0]}'s {SAFE_POINTS[place[1]]}",
                                resumed_where_stopped=resumed == written, allocations=len(spans), steps_lost=lost,
                                iterations_per_allocation=spans, duplicate_jobs=0, artifacts_lost=0,
                                seconds=round(time.monotonic() - started, 1))


# ------------------------------------------------------------------------------------------------ 4. rank death


@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_dying_rank_fails_a_deepspeed_job_at_once_naming_the_rank(
        slurm_cluster, tmp_path: Path, tiny_model: Path, how: str, fault_figures_record: dict) -> None:
    time_min = 10
    training = training_run(**FAST_TRAINING, micro_batch_size=2, zero_stage=2, save_every_steps=1000)
    spec = JobSpec(
        stage=f"rank_dies_{how}",
        fn=functools.partial(sft_job, tiny_model, PAIRS, tmp_path / "ckpt", training, 500,
                             loss_fn=RankFault(rank=1, after=5, how=how), log=None),
        resources=resources(partition="cpu", tasks_per_node=2, cpus_per_task=1, mem_gb=2, time_min=time_min),
        target=tmp_path / "out", key={"how": how},
    )
    started = time.monotonic()
    with pytest.raises(JobFailed) as failed:
        submit(spec, cluster_with(executor="slurm", log_dir=str(tmp_path / "logs")))
    seconds = time.monotonic() - started
    report = str(failed.value).splitlines()[0]
    expected = "injected fault in call 6 of the loss" if how == "raise" else "srun: Killed"
    assert "failed on rank 1: " in report and expected in report, str(failed.value)
    (job_id,) = {p.name.split("_")[0] for p in (tmp_path / "logs" / spec.stage).glob("*_submitted.pkl")}
    assert seconds < time_min * 60 / 2
    # the failure is read from the dead rank's result as soon as it is written; srun then ends the other rank and
    # the job, which on a loaded machine can take SLURM some seconds more
    wait_for(lambda: squeue_jobs(spec.stage)[job_id] not in ("RUNNING", "COMPLETING"), "the job to end", timeout=120)
    assert squeue_jobs(spec.stage)[job_id] == "FAILED"  # ended by the dead rank, not by the time limit
    assert not (tmp_path / "out").exists()
    fault_figures_record.update(seconds_to_failure=round(seconds, 1), time_limit_s=time_min * 60, report=report,
                                artifacts_lost=0, duplicate_jobs=0)


# ------------------------------------------------------------------------------------------------- 5. node down


def kill_node(cluster, job_id: str) -> None:  # noqa: ANN001
    """The node dies: its slurmd, the job's slurmstepd and every process of the job, all at once."""
    os.kill(int((cluster.state_dir / "run" / "slurmd.pid").read_text().split()[0]), signal.SIGKILL)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"[{job_id}.".encode() in cmdline or f"SLURM_JOB_ID={job_id}".encode() in environ:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_a_node_dying_under_a_job_is_reported_and_the_run_completes_once_it_is_back(
        slurm_cluster, tmp_path: Path, fault_figures_record: dict) -> None:
    """SLURM either requeues the job (the stage says it waits for the down node, then completes on its own) or
    fails it (the stage exits 1 naming the job; the rerun completes): both happen here, depending on how far the
    job's launch had got when the node died."""
    command = [sys.executable, "-m", "tests.stage_sleep", "slurm", str(tmp_path / "logs"), "10"]
    earlier = previous_out(tmp_path / "out")
    before = set(squeue_jobs("sleep"))
    err_file = tmp_path / "first.err"
    with SqueueWatch("sleep") as watch:
        with err_file.open("w") as err:
            first = subprocess.Popen(command, cwd=tmp_path, env=stage_env(), stdout=subprocess.DEVNULL, stderr=err)
        job_id = wait_for(lambda: running_job(tmp_path / ".out.job.json", "sleep"), "the sleep job to run")
        kill_node(slurm_cluster, job_id)
        waiting = re.compile(rf"^sleep: job {job_id} (PENDING|REQUEUED) \(.*DOWN", re.MULTILINE)
        try:
            wait_for(lambda: first.poll() is not None or waiting.search(err_file.read_text()),
                     "the stage to report the dead node")
            assert read_manifest(tmp_path / "out")["files"] == earlier
        finally:
            up = subprocess.run([str(SCRIPT), "start"], env={**os.environ, "SLURM_TEST_DIR": str(slurm_cluster.state_dir)},
                                capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        if first.poll() is None:  # requeued: the same job runs again once the node is back
            assert first.wait(timeout=300) == 0, err_file.read_text()
            outcome, report = "requeued by SLURM, completed once the node was back", waiting.search(err_file.read_text())[0]
        else:
            assert first.returncode == 1, err_file.read_text()
            report = next(line for line in err_file.read_text().splitlines()
                          if line.startswith(f"sleep: job {job_id} failed"))
            assert "SLURM ended the job: " in report and "log: " in err_file.read_text()
            assert read_manifest(tmp_path / "out")["files"] == earlier
            second = subprocess.run(command, cwd=tmp_path, env=stage_env(), capture_output=True, text=True,
                                    timeout=300)
            assert second.returncode == 0, second.stderr
            outcome = "failed by SLURM, the rerun completed"
    assert "slept 10.0s" in (tmp_path / "out" / "done.txt").read_text()
    verify_artifact(tmp_path / "out")
    jobs = new_jobs(watch, before)
    assert len(jobs) == (1 if outcome.startswith("requeued") else 2) and max_alive(watch, before) == 1
    fault_figures_record.update(outcome=outcome, report=report, jobs=len(jobs), duplicate_jobs=0, artifacts_lost=0)


# ------------------------------------------------------------------------------------------------- 6. disk full


def test_a_full_disk_while_writing_an_out_is_one_line_and_keeps_the_previous_out(
        slurm_cluster, tmp_path: Path, tiny_model: Path, roomy_model: Path, fault_figures_record: dict) -> None:
    cwd = slurm_project(tmp_path, tiny_model)
    models = cwd / "models"
    models.mkdir()
    def kib(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) // 1024

    size_kib = kib(tiny_model) + 128  # room for one model, not for a second one beside it
    assert kib(tiny_model) + kib(roomy_model) > size_kib
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(models)], check=True, timeout=30)
    try:
        first = stage(cwd, "import_model")
        assert first.returncode == 0, first.stderr
        kept = verify_artifact(models / "base")
        raw = yaml.safe_load((cwd / "params.yaml").read_text())
        raw["model"]["base"] = str(roomy_model)  # another model: its copy cannot fit beside the first
        (cwd / "params.yaml").write_text(yaml.safe_dump(raw))
        second = stage(cwd, "import_model")
        assert second.returncode == 2, second.stderr
        error = one_line_error(second.stderr, "import_model")
        assert error.startswith("models/base: no space left on the device ("), error
        assert "the previous out is kept" in error and " (job " in error
        assert verify_artifact(models / "base") == kept
        assert sorted(p.name for p in models.iterdir()) == ["base"]  # no temporary folder, no job-state file
    finally:
        subprocess.run(["umount", str(models)], check=True, timeout=30)
    fault_figures_record.update(tmpfs_kib=size_kib, error=error, artifacts_lost=0, duplicate_jobs=0)


# --------------------------------------------------------------------------------------------- 7. altered input


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_a_line(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[0] = lines[0].replace("Paris", "Lyon")
    path.write_text("".join(lines))


@pytest.mark.parametrize("change, file", [
    (flip_a_byte, "models/base/model.safetensors"),
    (Path.unlink, "data/self_align/sft.jsonl"),
    (edit_a_line, "data/self_align/sft.jsonl"),
], ids=["flipped-byte-in-a-checkpoint", "deleted-file", "edited-jsonl-line"])
def test_an_altered_artifact_stops_the_stage_that_consumes_it(
        slurm_cluster, tmp_path: Path, tiny_model: Path, change: Callable[[Path], None], file: str,
        fault_figures_record: dict) -> None:
    cwd = engrave_project(tmp_path, tiny_model, 4)
    before = set(squeue_jobs("engrave"))
    change(cwd / file)
    proc = stage(cwd, "engrave")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert file in proc.stderr, proc.stderr
    # refused before submitting: no new job id (earlier tests' ended jobs may age out of squeue meanwhile)
    assert not set(squeue_jobs("engrave")) - before and not (cwd / "logs").exists()
    assert not (cwd / "models/engraved").exists()
    fault_figures_record.update(error=proc.stderr.strip().replace(str(cwd) + "/", ""), artifacts_lost=0,
                                duplicate_jobs=0)


# ----------------------------------------------------------------------------------------------- 8. determinism


@pytest.mark.slow
def test_the_same_params_and_seed_give_the_same_artifacts(
        slurm_cluster, tmp_path: Path, tiny_model: Path, reference: dict, fault_figures_record: dict) -> None:
    from safetensors.torch import load_file

    cluster = {"executor": "slurm", "log_dir": str(tmp_path / "logs"), "sample_pairs": ON_CPU}
    cwd = salmon_project(tmp_path / "pairs", tiny_model, sample_pairs={"max_new_tokens": 8, "max_prompts": 3},
                         cluster=cluster)
    ids = []
    for _ in range(2):  # sampled at temperature > 0 from the seed: the same samples, the same artifact id
        (cwd / "data/pairs").rename(cwd / f"data/pairs-{len(ids)}")
        proc = stage(cwd, "sample_pairs")
        assert proc.returncode == 0, proc.stderr
        ids.append(verify_artifact(cwd / "data/pairs"))
    assert ids[0] == ids[1]

    again = engrave_project(tmp_path / "engrave", tiny_model, REFERENCE_STEPS)
    proc = stage(again, "engrave")
    assert proc.returncode == 0, proc.stderr
    adapter = "adapter/adapter_model.safetensors"
    first, second = (load_file(out / adapter) for out in (reference["out"], again / "models/engraved"))
    assert first.keys() == second.keys()
    worst = max((first[k] - second[k]).abs().max().item() for k in first)
    assert worst <= 1e-6
    bitwise = weights(read_manifest(again / "models/engraved")["files"]) == weights(reference["files"])
    fault_figures_record.update(data_ids_equal=True, adapter_max_abs_diff=worst, training_bitwise=bitwise,
                                artifacts_lost=0, duplicate_jobs=0)
