"""The submission layer: a stage hands one picklable function and its resources to `submit`, which runs it
inline, as local subprocesses, or as a SLURM job through submitit, and returns rank 0's result.

One task per GPU; inside every task the torch.distributed environment (master address/port, rank, world size,
local rank, the collective timeout) is exported from submitit's JobEnvironment, so the same function runs as 1 CPU
process, N local processes or N SLURM tasks on M nodes. A job-state file beside the stage's target records the job
id and the digest of what was submitted; a rerun with the same digest re-attaches to that job instead of submitting
again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import submitit
import submitit.helpers
from submitit.core.utils import FailedJobError, UncompletedJobError

from align.artifacts import JOB_KEY, JOB_STARTED, digest
from align.environ import environ
from align.errors import UserError
from align.params import Cluster, Resources
from align.progress import latest_progress
from slurm.watcher import GONE, SLURM_FAILED, SlurmJob

STDERR_TAIL_LINES = 20
COLLECTIVE_TIMEOUT = "ALIGN_COLLECTIVE_TIMEOUT_MIN"  # cluster.<stage>.collective_timeout_min, for init_distributed
NODE_DEVICES = "ALIGN_NODE_DEVICES"  # CUDA_VISIBLE_DEVICES as SLURM set it, before a task took its own share
# Rendezvous ports: below Linux's ephemeral range (32768-60999 unless net.ipv4.ip_local_port_range says otherwise),
# where any outgoing connection on the node may hold the port the job is about to listen on. Not read from the node:
# every task of a job must pick the same port without asking the others. The policy stage's split layout listens
# on the two ports after it too (align/placement.py).
MASTER_PORTS = range(20000, 32768 - 2)
PROGRESS_EVERY = 30.0  # seconds between looks at the job log's progress while waiting (the polling stays fast)


class JobFailed(Exception):
    """A submitted job ended without a result; the message names the job id, the error tail and the log."""


@dataclass
class JobSpec:
    stage: str
    fn: Callable[[], Any]  # picklable; runs in every task, rank 0's return value is the result
    resources: Resources
    target: Path  # the stage's out; the job-state file lives beside it
    key: dict  # everything that decides the result (params subset, input ids, code revision)


class _Task:
    """What runs inside each task: export the torch.distributed environment, then call the stage's function."""

    def __init__(self, fn: Callable[[], Any], gpus_per_task: int, job_key: str,
                 collective_timeout_min: int) -> None:
        self.fn = fn
        self.gpus_per_task = gpus_per_task  # each task's own share of the node's GPUs (0: leave SLURM's setting)
        self.job_key = job_key  # recorded in the out's manifest (align/artifacts.py JOB_KEY)
        self.collective_timeout_min = collective_timeout_min

    def __call__(self) -> Any:
        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        os.environ["MASTER_ADDR"] = node_address(os.environ["MASTER_ADDR"])
        os.environ["MASTER_PORT"] = str(master_port(submitit.JobEnvironment().job_id))
        if self.gpus_per_task:
            os.environ[NODE_DEVICES] = os.environ.get("CUDA_VISIBLE_DEVICES", "")  # a task may re-slice them
            os.environ["CUDA_VISIBLE_DEVICES"] = task_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), env.local_rank,
                                                              env.local_world_size, self.gpus_per_task)
        os.environ[COLLECTIVE_TIMEOUT] = str(self.collective_timeout_min)
        os.environ[JOB_STARTED] = str(time.time())
        os.environ[JOB_KEY] = self.job_key
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach the job log as they are printed
        return self.fn()

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """submitit calls this on the time-limit (or preemption) signal before it requeues the job: the next
        allocation runs the same task, and training stages resume from their newest checkpoint."""
        return submitit.helpers.DelayedSubmission(self)


def master_port(job_id: str) -> int:
    """The job's rendezvous port, the same in every task and every allocation of a requeued job (drawn from the job
    id), below the ephemeral ports (MASTER_PORTS). submitit's own draw (20000-60000) lands in the ephemeral range
    two times in three."""
    return MASTER_PORTS[zlib.crc32(job_id.encode()) % len(MASTER_PORTS)]


def task_devices(visible: str | None, local_rank: int, local_tasks: int, per_task: int) -> str:
    """CUDA_VISIBLE_DEVICES for a task that drives `per_task` GPUs of its own (its DeepSpeed engine on one of them,
    the vLLM engine inside it over all of them: the policy stage's ranks at tensor_parallel_size `per_task`). Where
    SLURM named the devices it keeps its names: a task given its own (`--gpus-per-task`, `--gpu-bind`) keeps them; a
    task shown the job's GPUs on the node takes its local rank's slice of that list - physical indices where no
    cgroup renumbers devices (4,5,6,7 at one GPU per task: task 1 takes 5, not the node's GPU 1, another job's).
    Only where nothing names them does the local rank (the node's numbering) choose."""
    first = local_rank * per_task
    if not visible:
        return ",".join(str(first + i) for i in range(per_task))
    devices = visible.split(",")
    return ",".join(devices[first:first + per_task]) if len(devices) == local_tasks * per_task else visible


def node_address(node: str) -> str:
    """An address the ranks can reach `node` (the job's first node, submitit's master) at: the name itself where
    it resolves, else the NodeAddr SLURM has for it (node names need not be host names)."""
    try:
        socket.getaddrinfo(node, None)
        return node
    except socket.gaierror:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return node
    found = re.search(r"\bNodeAddr=(\S+)", out)
    return found.group(1) if found else node


def free_port() -> int:
    """A TCP port nothing listens on now, for a single-process rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_answers() -> bool:
    """A SLURM controller is reachable from here (sbatch installed alone is not enough: no config, no daemon)."""
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    try:
        return subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=15).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def choose_executor(cluster: Cluster) -> str:
    """`auto`: slurm where a controller answers, else local subprocesses."""
    if cluster.executor != "auto":
        return cluster.executor
    return "slurm" if slurm_answers() else "local"


def state_path(target: Path) -> Path:
    return Path(target).parent / f".{Path(target).name}.job.json"


def log_folder(cluster: Cluster, stage: str) -> Path:
    return Path(cluster.log_dir) / stage


def job_name(stage: str) -> str:
    """The stage name as a SLURM job name: letters, digits and _ . - only (it lands in the job script)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stage)[:64] or "stage"


def sbatch_parameters(stage: str, res: Resources) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for one job: every key of `res` that sbatch or srun reads (a key left
    null is not written, so the site's default applies), `sbatch` passed through as submitit's
    `additional_parameters`."""
    gpus = f"{res.gpu_type}:{res.gpus_per_node}" if res.gpu_type else res.gpus_per_node
    return {
        "job_name": job_name(stage), "partition": res.partition, "nodes": res.nodes, "ntasks_per_node": res.tasks,
        "cpus_per_task": res.cpus_per_task, "time": res.time_min, "setup": res.setup,
        "signal_delay_s": res.signal_delay_s,
        "srun_args": ["--kill-on-bad-exit=1", *res.srun_args],  # one dead rank ends the job
        "gpus_per_node": gpus if res.gpus_per_node else None,
        "mem": None if res.mem_gb is None else f"{res.mem_gb}GB" if res.mem_gb else "0",
        "mem_per_gpu": None if res.mem_per_gpu_gb is None else f"{res.mem_per_gpu_gb}GB",
        "exclusive": True if res.exclusive else None,
        **{key: getattr(res, key) for key in ("account", "qos", "constraint", "exclude", "nodelist", "mail_type",
                                              "mail_user", "wckey")},
        "additional_parameters": {**({"reservation": res.reservation} if res.reservation else {}),
                                  **{k: v for k, v in res.sbatch.items() if v is not False}},
    }


def _make_executor(kind: str, folder: Path, stage: str, res: Resources) -> submitit.Executor:
    if kind == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, python=" ".join(res.python) if res.python else None)
        executor.job_class = SlurmJob
        executor.max_num_timeout = res.max_requeues
        executor.update_parameters(**sbatch_parameters(stage, res))
        return executor
    if res.nodes != 1:
        raise UserError(f"params.yaml: cluster.{stage}.nodes: the {kind} executor runs on one node, got {res.nodes}")
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=res.max_requeues)
    executor.update_parameters(
        timeout_min=res.time_min, tasks_per_node=res.tasks, gpus_per_node=res.gpus_per_node, setup=res.setup,
        signal_delay_s=res.signal_delay_s,
    )
    return executor


def _attach(state: dict, kind: str) -> submitit.Job | None:
    """The job a previous submission left running or finished, when it can still deliver a result."""
    folder, job_id, tasks = Path(state["folder"]), str(state["job_id"]), list(range(state["tasks"]))
    if kind == "slurm":
        job = SlurmJob(folder=folder, job_id=job_id, tasks=tasks)
        slurm_state = job.watcher.get_state(job_id, mode="force").split(" ")[0]  # sacct: "CANCELLED by 0"
        if slurm_state in SLURM_FAILED:
            return None
        if slurm_state == GONE and not _has_results(job):
            return None
        return job
    job = submitit.LocalJob(folder=folder, job_id=job_id, tasks=tasks)
    return job if _has_results(job) or _pid_alive(int(job_id)) else None


@contextlib.contextmanager
def _interruptible(kind: str) -> Iterator[None]:
    """A local job's controller ends on SIGINT (submitit's cancel, `_cancel_stale`). A shell runs its background jobs
    (`nohup dvc repro &`) with SIGINT ignored, which every process they start inherits: the controller would outlive
    its cancel and later swap a stale out into place. While the job starts, SIGINT has a handler here, which a new
    process gets as the default."""
    restore = (kind == "local" and threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGINT) is signal.SIG_IGN)
    if restore:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if restore:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _cancel_stale(state: dict) -> None:
    """A job submitted for other params or inputs must not finish later and swap a stale out into place."""
    if state.get("executor") == "slurm":
        submitit.SlurmJob(folder=Path(state["folder"]), job_id=str(state["job_id"])).cancel(check=False)
    elif state.get("executor") == "local" and _pid_alive(int(state["job_id"])):
        # as submitit's LocalJob.cancel: SIGINT ends its controller, which kills the tasks (SIGTERM is forwarded to
        # them, and a task ignores it once submitit's handlers are in place)
        os.kill(int(state["job_id"]), signal.SIGINT)
    print(f"cancelled stale {state.get('executor')} job {state.get('job_id')} (its inputs or params changed)", file=sys.stderr)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _has_results(job: submitit.Job) -> bool:
    return all(job.task(t).paths.result_pickle.exists() for t in range(job.num_tasks))


def finished(job: submitit.Job) -> bool:
    if isinstance(job, submitit.LocalJob) and getattr(job, "_process", None) is None:
        # re-attached from a new process: no Popen handle, so watch the pid and the result files
        return _has_results(job) or not _pid_alive(int(job.job_id))
    return job.done()


def progress_log(job: submitit.Job) -> Path:
    """The log that holds the job's progress lines: task 0's stderr, where rank 0 reports (a multi-task job's own
    `paths` names no task)."""
    return job.task(0).paths.stderr


def _say_state(job: submitit.SlurmJob, stage: str, said: tuple[str, str]) -> tuple[str, str]:
    """Say on stderr when a SLURM job's state or pending reason changed since `said` (queued behind a down node,
    requeued after a time limit or a node failure); return what has now been said."""
    info = job.get_info(mode="cache")
    now = (info.get("State", "UNKNOWN"), info.get("Reason", "None"))
    if now == said or now[0] in ("UNKNOWN", GONE, "COMPLETED", "COMPLETING"):
        return said
    where = f" on {info['NodeList']}" if now[0] == "RUNNING" and info.get("NodeList") else ""
    why = f" ({now[1]})" if now[1] not in ("None", "") else ""
    print(f"{stage}: job {job.job_id} {now[0]}{why}{where}", file=sys.stderr, flush=True)
    return now


def _say_progress(log: Path, stage: str, said: str | None) -> str | None:
    """Say on stderr the job log's newest progress line when it is not the one said last (a stalled job repeats
    nothing); return what has now been said."""
    line = latest_progress(log)
    if line is None or line == said:
        return said
    print(f"{stage}: {line}", file=sys.stderr, flush=True)
    return line


def _wait(job: submitit.Job, stage: str) -> None:
    """Poll fast at first, then back off to every 2 s (submitit's own wait checks once a second, which is most
    of the overhead of a short job), so a waiting login node is never silent: a SLURM job's state changes as they
    come, and the job's newest progress line at most every PROGRESS_EVERY seconds."""
    delay, state, line, next_look = 0.05, ("PENDING", "None"), None, time.monotonic()
    log = progress_log(job)
    while not finished(job):
        if isinstance(job, submitit.SlurmJob):
            state = _say_state(job, stage, state)
        if time.monotonic() >= next_look:
            line, next_look = _say_progress(log, stage, line), time.monotonic() + PROGRESS_EVERY
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)


def _task_outcome(job: submitit.Job, task: int) -> tuple[str | None, str, float]:
    """(status, what the task returned or its traceback, when it wrote that) from submitit's result file of one
    task; (None, "", inf) where the task wrote none (killed, or never started)."""
    pkl = job.task(task).paths.result_pickle
    if not pkl.exists():
        return None, "", float("inf")
    with pkl.open("rb") as fh:  # submitit's own transport file, written by this job's task
        status, value = pickle.load(fh)[:2]
    return status, value if isinstance(value, str) else "", pkl.stat().st_mtime


def first_failed_task(job: submitit.Job) -> tuple[int, str]:
    """The rank whose failure ended the job, and srun's words for how it ended ("" where srun said nothing): the
    first task srun reports as exited or killed (the others are then terminated by --kill-on-bad-exit, or fail
    on the lost connection), else the task whose error was written first, else the first without a result."""
    main_log = job.task(0).paths.stderr
    if main_log.exists():
        for found in re.finditer(r"srun: error: \S+: tasks? ([\d,-]+): (.+)", main_log.read_text(errors="replace")):
            if found.group(2).strip() != "Terminated":
                return int(re.split(r"[,-]", found.group(1))[0]), found.group(2).strip()
    outcomes = [_task_outcome(job, t) for t in range(job.num_tasks)]
    errors = [(written, t) for t, (status, _, written) in enumerate(outcomes) if status == "error"]
    if errors:
        return min(errors)[1], ""
    return next((t for t, (status, _, _) in enumerate(outcomes) if status != "success"), 0), ""


def _failure(stage: str, job: submitit.Job, exc: Exception) -> JobFailed | UserError:
    """What the login node reports for a failed job: a UserError raised in the job (bad input found there, a full
    disk) stays one line naming the job and its log; anything else names the first failed rank, its error, the
    tail of its stderr and the log."""
    failing, srun_says = first_failed_task(job)
    paths = job.task(failing).paths
    tail = ""
    if paths.stderr.exists():
        lines = [line for line in paths.stderr.read_text(errors="replace").splitlines() if line.strip()]
        tail = "\n".join("  | " + line for line in lines[-STDERR_TAIL_LINES:])
    status, traceback_text, _ = _task_outcome(job, failing)
    raised = [line.strip() for line in traceback_text.splitlines() if line.strip()] if status == "error" else []
    user_error = f"{UserError.__module__}.{UserError.__name__}: "
    if raised and raised[-1].startswith(user_error):
        return UserError(f"{raised[-1].removeprefix(user_error)} (job {job.job_id}, log: {paths.stderr})")
    # a job that ended without a result (cancelled, timed out): the first line of `exc` names its state
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = (raised[-1] if raised else f"srun: {srun_says}" if srun_says else lines[0] if lines
              else type(exc).__name__)
    return JobFailed("\n".join(part for part in (
        f"{stage}: job {job.job_id} failed on rank {failing}: {reason}", tail, f"  log: {paths.stderr}") if part))


DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def _run_inline(spec: JobSpec) -> Any:
    """One rank in this process, its distributed variables set for the call only."""
    with environ(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                  **{JOB_STARTED: str(time.time()), JOB_KEY: digest(spec.key),
                     COLLECTIVE_TIMEOUT: str(spec.resources.collective_timeout_min)}):
        return spec.fn()


def start(spec: JobSpec, cluster: Cluster) -> submitit.Job:
    """The job for `spec` under the cluster's executor (not inline): the one a previous submission with the same key
    left running or finished, else a new one (a stale one, submitted for another key, is cancelled first)."""
    kind = choose_executor(cluster)
    logging.getLogger("submitit").setLevel(logging.ERROR)  # no sacct without slurmdbd: squeue is used instead
    key = digest({"stage": spec.stage, "key": spec.key, "executor": kind})
    state_file = state_path(spec.target)
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if state.get("key") == key and state.get("executor") == kind:
            job = _attach(state, kind)
            if job is not None:
                print(f"{spec.stage}: re-attached to {kind} job {job.job_id} (log: {progress_log(job)})",
                      file=sys.stderr)
                return job
        else:
            _cancel_stale(state)
    folder = log_folder(cluster, spec.stage)
    executor = _make_executor(kind, folder, spec.stage, spec.resources)
    gpus, tasks = spec.resources.gpus_per_node, spec.resources.tasks
    gpus_per_task = gpus // tasks if gpus and gpus % tasks == 0 else 0
    try:  # jobs copy this environment: a MASTER_PORT left by an earlier job here may still be in use
        with environ(**dict.fromkeys(DIST_VARS)), _interruptible(kind):
            job = executor.submit(_Task(spec.fn, gpus_per_task, digest(spec.key),
                                          spec.resources.collective_timeout_min))
    except FailedJobError as exc:  # sbatch refused: bad partition, account, limits, no controller
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise JobFailed(f"{spec.stage}: {kind} refused the job: {lines[-1] if lines else exc}") from None
    state_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({
        "executor": kind, "job_id": job.job_id, "folder": str(folder), "tasks": spec.resources.tasks * spec.resources.nodes,
        "key": key, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }, indent=2))
    os.replace(tmp, state_file)
    print(f"{spec.stage}: submitted {kind} job {job.job_id} (log: {progress_log(job)})", file=sys.stderr)
    return job


def submit(spec: JobSpec, cluster: Cluster) -> Any:
    """Run `spec.fn` under the cluster's executor and return rank 0's result; raise JobFailed on failure, or the
    UserError the job raised."""
    if choose_executor(cluster) == "inline":
        if spec.resources.tasks != 1 or spec.resources.nodes != 1:
            raise UserError(f"params.yaml: cluster.{spec.stage}: the inline executor runs one task; use local or slurm")
        return _run_inline(spec)
    job = start(spec, cluster)
    state_file = state_path(spec.target)
    try:
        _wait(job, spec.stage)
        if isinstance(job, submitit.SlurmJob) and not _has_results(job):
            info = job.get_info(mode="force")  # ended without a result: say how, without submitit's 60 s wait for
            state = info.get("State", "UNKNOWN").split(" ")[0]  # a result file that will not come
            if state in SLURM_FAILED:
                why = f" ({info['Reason']})" if info.get("Reason", "None") != "None" else ""
                raise UncompletedJobError(f"SLURM ended the job: {state}{why}")
        results = job.results()
    except (FailedJobError, UncompletedJobError) as exc:
        state_file.unlink(missing_ok=True)
        raise _failure(spec.stage, job, exc) from None
    state_file.unlink(missing_ok=True)
    return results[0]
