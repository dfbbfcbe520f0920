"""Job states for submitit on clusters with and without accounting: sacct where slurmdbd runs, squeue otherwise.

submitit itself only asks sacct; on a cluster without slurmdbd (the test cluster, some small sites) every state
stayed UNKNOWN, so a cancelled or timed-out job was waited on forever and sacct complained on every poll.
"""

from __future__ import annotations

import subprocess
import time

import submitit
from submitit.slurm.slurm import SlurmInfoWatcher

GONE = "GONE"  # the state of a job that slurmctld no longer lists and sacct cannot tell about
SLURM_FAILED = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")


class SlurmWatcher(SlurmInfoWatcher):
    """Job states from sacct where accounting works, else from squeue. submitit itself only asks sacct: on a
    cluster without slurmdbd every state stayed UNKNOWN (a job that ended without a result, cancelled or out of
    time, was waited on forever) and sacct's complaint went to stderr on every poll."""

    def __init__(self, delay_s: int) -> None:
        super().__init__(delay_s=delay_s)
        self._sacct_works: bool | None = None

    def update(self) -> None:
        ids = sorted({x.split("_")[0] for x in self._registered - self._finished})
        if not ids:
            return
        self._num_calls += 1
        info = None
        if self._sacct_works is not False:
            info = self._run(["sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", ",".join(ids)])
            self._sacct_works = info is not None
        if info is None:
            info = self._squeue(ids)
        if info is not None:
            self._info_dict.update(info)
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    def _run(self, command: list[str]) -> dict | None:
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return self.read_info(proc.stdout) if proc.returncode == 0 else None

    def _squeue(self, ids: list[str]) -> dict | None:
        """squeue lists pending, running and recently ended jobs (MinJobAge); a job it does not list is gone."""
        command = ["squeue", "-h", "-t", "all", "-o", "%i|%T|%N|%r", "-j", ",".join(ids)]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
            return None  # controller unreachable: keep the states known so far
        listed = proc.stdout if proc.returncode == 0 else ""
        info = self.read_info("JobID|State|NodeList|Reason\n" + listed)
        for job_id in ids:
            info.setdefault(job_id, {"JobID": job_id, "State": GONE, "NodeList": ""})
        return info


class SlurmJob(submitit.SlurmJob):
    watcher = SlurmWatcher(delay_s=600)
