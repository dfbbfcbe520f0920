"""Time limits and preemption for training loops.

SLURM warns a job before it ends it. Before the time limit it sends SIGUSR2 (`--signal=USR2@signal_delay_s`, set
by the submission layer). When it preempts a job it sends SIGTERM and, the partition's GraceTime later, SIGKILL
(SIGUSR2 instead of SIGTERM only where the site sets `PreemptParameters=send_user_signal`). submitit's handler for
SIGUSR2 requeues the job at once and exits, which throws away everything since the last periodic checkpoint; its
handler for SIGTERM only logs it, so a preempted job ran on until SIGKILL and, unless the site requeues preempted
jobs itself, was gone.

A training loop that can stop cleanly at safe points (between steps; inside a PPO iteration between its rollout,
scoring and update) calls `defer()` first: both signals are then only recorded. At the next safe point every rank
learns of them through `stop_requested` (one all_reduce, so all ranks stop at the same point), the loop saves a
checkpoint, and `requeue()` hands the signal to submitit, which requeues the job. The next allocation runs the
same function, which resumes from that checkpoint: neither a time limit nor a preemption costs work.

SIGTERM is also what `scancel` and the time limit itself send. It is taken for preemption only while SLURM still
lists the job RUNNING (a preempted job keeps running through its grace time; a cancelled one or one out of time
is at once COMPLETING): otherwise the loop stops after its checkpoint without requeueing (`requeue_refused`).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from contextlib import contextmanager
from typing import Any, Iterator, NoReturn

import torch

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)  # the order `stop_requested` prefers them in
_received: set[int] = set()  # signals recorded while deferred
_previous: dict[int, Any] = {}  # each deferred signal's handler before `defer`, put back by `release`


def _record(signum: int, frame: Any) -> None:
    _received.add(signum)


def defer() -> None:
    """Record SIGUSR2 and SIGTERM instead of acting on them, where submitit handles them (a job, not an in-process
    call)."""
    if _previous or not callable(signal.getsignal(signal.SIGUSR2)):  # deferred already, or not under submitit:
        return  # the signals keep their meaning
    try:
        for signum in SIGNALS:
            _previous[signum] = signal.signal(signum, _record)
    except ValueError:  # not the main thread: submitit's handlers stay
        _previous.clear()


def release() -> None:
    """Give the signals back to submitit (the loop is over: what follows cannot stop at a safe point)."""
    for signum, handler in _previous.items():
        signal.signal(signum, handler)
    _previous.clear()
    _received.clear()


@contextmanager
def shielded() -> Iterator[None]:
    """Processes started in the block never see SIGUSR2 or SIGTERM: they start with both blocked (a blocked signal
    stays blocked across fork and exec, whatever handler the process installs). SLURM signals every process of a
    job step; a helper process the job started - vLLM's engine and its workers - would otherwise die of the
    time-limit warning (no SIGUSR2 handler) or shut down on a preemption's SIGTERM while the job's own process goes
    on to its next safe point and needs it. They end with the job (SIGKILL), or when the job closes them (vLLM:
    its SIGTERM unheard, SIGKILL after its 5 s grace). A signal that reaches this process during the block is held
    and handled right after it."""
    from multiprocessing import resource_tracker

    before = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        # multiprocessing starts its resource tracker with the first process it spawns, and unblocks SIGTERM here
        # after: started now (shielded too), then the signals blocked again
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def stop_requested(device: torch.device | str = "cpu") -> int:
    """The signal any rank has received (SIGUSR2 before SIGTERM), 0 for none; collective (every rank calls it at
    the same point)."""
    import torch.distributed as dist

    flags = torch.tensor([float(s in _received) for s in SIGNALS], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return next((int(s) for s, flag in zip(SIGNALS, flags.tolist()) if flag), 0)


def requeue_refused(signum: int) -> str | None:
    """Why a job stopped by `signum` must not be requeued, None where it must be: SIGUSR2 always requeues; SIGTERM
    only while SLURM still lists the job RUNNING (preemption), not once it is COMPLETING (`scancel`, or its time
    limit). Asks slurmctld; a local job (no SLURM) is always requeued."""
    import submitit

    environment = submitit.JobEnvironment()
    if signum != signal.SIGTERM or environment.cluster != "slurm":
        return None
    try:
        state = subprocess.run(["squeue", "-h", "-j", environment.job_id, "-o", "%T"], capture_output=True,
                               text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        state = ""
    if state in ("RUNNING", ""):  # slurmctld silent: read as the preemption a SIGTERM to a live job is
        return None
    return f"SIGTERM while SLURM lists the job {state} (cancelled, or at its time limit)"


def requeue(signum: int) -> NoReturn:
    """After the checkpoint, on rank 0 (the other ranks end with no result, which neither srun nor submitit takes for
    a failure): submitit's handler requeues the job and exits, or raises when it is out of requeues."""
    handler = _previous.get(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler
    if not callable(handler):
        raise RuntimeError("requeue() without a deferred signal")
    handler(signum, None)
    sys.exit(0)  # where submitit's handler returns: a task it does not take for rank 0 ends cleanly too
