"""Time limits and preemption for training loops.

SLURM sends SIGUSR2 `signal_delay_s` before a job's time limit (`--signal`, set by the submission layer) or when
it preempts it. submitit's handler for it requeues the job at once (the task's `checkpoint` resubmits the same
function) and exits, which throws away everything since the last periodic checkpoint. A training loop that can
stop cleanly between steps calls `defer()` first: the signal is then only recorded; at the end of the step every
rank learns of it through `stop_requested` (one all_reduce, so all ranks stop at the same step), the loop saves a
checkpoint, and `requeue()` hands the signal back to submitit, which requeues the job. The next allocation runs
the same function, which resumes from that checkpoint: a time limit costs no steps.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, Callable, NoReturn

import torch

_received: list[int] = []  # SIGUSR2s recorded while deferred
_submitit_handler: Callable[[int, Any], Any] | None = None


def _record(signum: int, frame: Any) -> None:
    _received.append(signum)


def defer() -> None:
    """Record SIGUSR2 instead of acting on it, where submitit handles it (a job, not an in-process call)."""
    global _submitit_handler
    if _submitit_handler is not None:
        return
    current = signal.getsignal(signal.SIGUSR2)
    if not callable(current):  # not under submitit: the signal keeps its default meaning
        return
    try:
        signal.signal(signal.SIGUSR2, _record)
    except ValueError:  # not the main thread: submitit's handler stays
        return
    _submitit_handler = current


def release() -> None:
    """Give SIGUSR2 back to submitit (the loop is over: what follows cannot stop at a step boundary)."""
    global _submitit_handler
    if _submitit_handler is not None:
        signal.signal(signal.SIGUSR2, _submitit_handler)
        _submitit_handler = None
    _received.clear()


def stop_requested(device: torch.device | str = "cpu") -> bool:
    """Whether any rank has received the signal; collective (every rank calls it at the same point)."""
    import torch.distributed as dist

    flag = torch.tensor([float(bool(_received))], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag)
    return flag.item() > 0


def requeue() -> NoReturn:
    """After the checkpoint: submitit's handler requeues the job and exits on rank 0; the other ranks (where it
    does nothing) exit cleanly, with no result, so that neither srun nor submitit takes the job for failed."""
    if _submitit_handler is None:
        raise RuntimeError("requeue() without a deferred signal")
    _submitit_handler(signal.SIGUSR2, None)  # rank 0: requeues, then sys.exit; or raises when out of requeues
    sys.exit(0)
