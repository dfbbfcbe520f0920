"""Job functions for the SLURM tests: module-level, so that submitit pickles them by reference and the job's
Python imports them from this repository (PYTHONPATH is exported to the job)."""

from __future__ import annotations

import os


def all_reduce_rank() -> tuple[int, int, float, str | None]:
    """Join the torch.distributed group from the exported env (gloo, env://), sum rank+1 over all ranks."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")
    try:
        total = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(total)
        return dist.get_rank(), dist.get_world_size(), total.item(), os.environ.get("CUDA_VISIBLE_DEVICES")
    finally:
        dist.destroy_process_group()


def fail(message: str) -> None:
    raise RuntimeError(message)



def node_ranks() -> tuple[int, str | None, list[str], str, float]:
    """(rank, the SLURM node this task runs on, the job's hostnames as submitit reads them, the master address
    the submission layer exported, the sum of rank+1 over all ranks by gloo all_reduce)."""
    import submitit
    import torch
    import torch.distributed as dist

    hostnames = submitit.JobEnvironment().hostnames
    dist.init_process_group("gloo", init_method="env://")
    try:
        total = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(total)
        return dist.get_rank(), os.environ.get("SLURMD_NODENAME"), hostnames, os.environ["MASTER_ADDR"], total.item()
    finally:
        dist.destroy_process_group()



class RankFault:
    """sft_loss, except on rank `rank`, whose `after`+1-th call raises (`how="raise"`) or kills its own process
    (`how="kill"`, as the OOM killer would): one rank of a DeepSpeed job dying in the middle of a step."""

    def __init__(self, rank: int, after: int, how: str) -> None:
        self.rank, self.after, self.how, self.calls = rank, after, how, 0

    def __call__(self, model, batch: dict):  # noqa: ANN001, ANN204
        import signal

        from align.training import sft_loss

        self.calls += 1
        if int(os.environ["RANK"]) == self.rank and self.calls > self.after:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"rank {self.rank}: injected fault in call {self.calls} of the loss")
        return sft_loss(model, batch)


def device_of_job() -> str:
    """The device a job's models would use (align.devices.job_device): raises where SLURM gave GPUs torch cannot use."""
    from align.devices import job_device

    return str(job_device())
