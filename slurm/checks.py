"""What the cluster must have before a stage does any work: every partition, account and qos (and typed GPU) the
DAG's jobs name, checked against `sinfo` and, where it answers, `sacctmgr`. A misspelt partition is one line
naming the key and listing what exists, in seconds, instead of a refused sbatch after minutes of hashing.
"""

from __future__ import annotations

import getpass
import re
import subprocess

from align.errors import UserError
from align.params import Cluster, Resources

TIMEOUT_S = 30


def _lines(*cmd: str) -> list[str] | None:
    """The command's output lines, or None where it is missing, fails or hangs (an optional source)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.splitlines() if proc.returncode == 0 else None


def _where(cluster: Cluster, key: str, res: Resources, field: str) -> str:
    """The key a value was written under: `defaults` where the stage took it from there."""
    inherited = key != "defaults" and getattr(res, field) == getattr(cluster.defaults, field)
    return f"cluster.{'defaults' if inherited else key}.{field}"


def check_cluster(cluster: Cluster) -> None:
    """Raise UserError for the first partition, typed GPU, account or qos of any job that this cluster lacks."""
    jobs = {"defaults": cluster.defaults, **cluster.jobs()}
    rows = _lines("sinfo", "-h", "-o", "%P %G") or []
    partitions = {row.split()[0].rstrip("*") for row in rows if row.split()}
    gres = " ".join(row.split(maxsplit=1)[1] for row in rows if len(row.split()) > 1)
    for key, res in jobs.items():
        for name in (res.partition or "").split(","):
            if name and partitions and name not in partitions:
                raise UserError(f"params.yaml: {_where(cluster, key, res, 'partition')}: '{name}' is not a partition "
                                f"of this cluster; it has {', '.join(sorted(partitions))}")
        if res.gpu_type and gres and not re.search(rf"\bgpu:{re.escape(res.gpu_type)}\b", gres):
            raise UserError(f"params.yaml: {_where(cluster, key, res, 'gpu_type')}: no node offers GPUs of type "
                            f"'{res.gpu_type}' (sinfo's GRES: {gres})")
    associations = _lines("sacctmgr", "-nP", "show", "assoc", f"user={getpass.getuser()}", "format=account,qos")
    if not associations:  # no accounting database here: sbatch is the judge
        return
    accounts = {row.split("|")[0] for row in associations}
    qos = {q for row in associations for q in row.split("|")[1].split(",") if q}
    for key, res in jobs.items():
        if res.account and res.account not in accounts:
            raise UserError(f"params.yaml: {_where(cluster, key, res, 'account')}: '{res.account}' is not an account "
                            f"of {getpass.getuser()} here; yours: {', '.join(sorted(accounts))}")
        if res.qos and qos and res.qos not in qos:
            raise UserError(f"params.yaml: {_where(cluster, key, res, 'qos')}: '{res.qos}' is not a qos of "
                            f"{getpass.getuser()} here; yours: {', '.join(sorted(qos))}")
