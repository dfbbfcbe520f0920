"""Overhead of each executor of slurm/submit.py around a job that does nothing: seconds from `submit()` to the
collected result, N repeats after one warm-up, split into submit -> job ran and job ran -> result collected.
Prints a table, writes bench/results/submit.json.

    python bench/submit.py [--repeats 5] [--executors inline,local,slurm] [--partition cpu]

slurm: uses the cluster `sbatch` finds; where there is none (or it does not answer) and this runs as root, starts
the one-node test cluster (slurm/testcluster.sh install + start) and stops it afterwards if it started it.
Target on that cluster: < 2 s (reported, not enforced).

Both slurmctld (a batch job is scheduled on its background loop's next 1 s tick) and submitit (looks for the
result file once a second) work in 1 s steps, so back-to-back runs lock into one phase and all come out ~1.0 s
or all ~2.0 s; a random pause before each run (--jitter, default 1 s) samples the phases evenly.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from align.params import load_params  # noqa: E402
from slurm.submit import JobSpec, submit  # noqa: E402

DEFAULTS = load_params(ROOT / "params.yaml")  # what every run of the bench starts from

TESTCLUSTER = ROOT / "slurm" / "testcluster.sh"
TARGET_S = 2.0


def nothing() -> float:
    """The job: report when it ran (same clock: one machine, or NTP-synced nodes)."""
    return time.time()


def slurm_answers(timeout: float = 15) -> bool:
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def ensure_slurm() -> tuple[str | None, bool]:
    """(why slurm cannot be benchmarked or None, whether this run started the test cluster)."""
    if slurm_answers():
        return None, False
    if os.geteuid() != 0:
        return "no answering sbatch/sinfo and not root (slurm/testcluster.sh needs root)", False
    state_dir = Path(os.environ.get("SLURM_TEST_DIR", "/tmp/slurm-test"))
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin:/bin"}
    was_running = subprocess.run([str(TESTCLUSTER), "status"], env=env, capture_output=True).returncode == 0
    for step in ("install", "start"):
        proc = subprocess.run([str(TESTCLUSTER), step], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return f"slurm/testcluster.sh {step} failed: {proc.stderr.strip().splitlines()[-1:]}", False
    os.environ["SLURM_CONF"] = str(state_dir / "etc" / "slurm.conf")
    os.environ["PATH"] = env["PATH"]
    if not slurm_answers():
        return "the test cluster started but sinfo does not answer", not was_running
    return None, not was_running


def stop_test_cluster() -> None:
    subprocess.run([str(TESTCLUSTER), "stop"], capture_output=True)


def run_once(kind: str, workdir: Path, partition: str, index: int) -> dict:
    spec = JobSpec(
        stage=f"bench_{kind}", fn=nothing,
        resources=DEFAULTS.cluster.defaults.model_copy(update={"partition": partition, "mem_gb": 1, "time_min": 5}),
        target=workdir / f"out-{kind}-{index}", key={"nonce": uuid.uuid4().hex},
    )
    cluster = DEFAULTS.cluster.model_copy(update={"executor": kind, "log_dir": str(workdir / "logs")})
    with contextlib.redirect_stderr(io.StringIO()):  # "submitted ... job N" on every run
        start = time.time()
        ran = submit(spec, cluster)
        end = time.time()
    return {"total_s": end - start, "submit_to_ran_s": ran - start, "ran_to_collected_s": end - ran}


def summarize(kind: str, runs: list[dict]) -> dict:
    totals = [r["total_s"] for r in runs]
    return {
        "executor": kind,
        "median_s": round(statistics.median(totals), 6),
        "min_s": round(min(totals), 6),
        "max_s": round(max(totals), 6),
        "submit_to_ran_median_s": round(statistics.median(r["submit_to_ran_s"] for r in runs), 4),
        "ran_to_collected_median_s": round(statistics.median(r["ran_to_collected_s"] for r in runs), 4),
        "runs_s": [round(t, 6) for t in totals],
    }


def slurm_version() -> str | None:
    try:
        return subprocess.run(["sbatch", "--version"], capture_output=True, text=True, timeout=15).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per executor first")
    parser.add_argument("--executors", default="inline,local,slurm")
    parser.add_argument("--partition", default="cpu")
    parser.add_argument("--jitter", type=float, default=1.0, help="untimed random pause before each run, seconds")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.executors.split(",") if k.strip()]
    # jobs unpickle slurm.submit and this file's function: let their Python find the repository
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

    skipped, started = {}, False
    if "slurm" in kinds:
        reason, started = ensure_slurm()
        if reason:
            skipped["slurm"] = reason
    rows = []
    try:
        # a folder the nodes share with this machine on a real cluster (the repository), removed afterwards
        with tempfile.TemporaryDirectory(dir=ROOT, prefix=".bench-submit-") as tmp:
            for kind in kinds:
                if kind in skipped:
                    continue
                for i in range(args.warmup):
                    run_once(kind, Path(tmp), args.partition, -1 - i)
                runs = []
                for i in range(args.repeats):
                    time.sleep(random.uniform(0, args.jitter))
                    runs.append(run_once(kind, Path(tmp), args.partition, i))
                rows.append(summarize(kind, runs))
    finally:
        if started:
            stop_test_cluster()

    slurm_row = next((r for r in rows if r["executor"] == "slurm"), None)
    results = {
        "repeats": args.repeats, "warmup": args.warmup, "jitter_s": args.jitter, "cpus": os.cpu_count(), "partition": args.partition,
        "slurm": {"version": slurm_version() if slurm_row else None, "conf": os.environ.get("SLURM_CONF"),
                  "test_cluster_started": started},
        "target_s": TARGET_S,
        "slurm_median_under_target": (slurm_row["median_s"] < TARGET_S) if slurm_row else None,
        "rows": rows, "skipped": skipped,
    }
    print(f"submit -> collected result for a job that does nothing; {args.repeats} runs after {args.warmup} warm-up")
    print(f"{'executor':<10}{'median s':>10}{'min s':>9}{'max s':>9}{'to job s':>10}{'collect s':>11}")
    for r in rows:
        print(f"{r['executor']:<10}{r['median_s']:>10.3f}{r['min_s']:>9.3f}{r['max_s']:>9.3f}"
              f"{r['submit_to_ran_median_s']:>10.3f}{r['ran_to_collected_median_s']:>11.3f}")
    for kind, reason in skipped.items():
        print(f"{kind:<10}skipped: {reason}")
    if slurm_row:
        verdict = "meets" if results["slurm_median_under_target"] else "misses"
        print(f"slurm median {slurm_row['median_s']:.2f} s {verdict} the < {TARGET_S:.0f} s target")
    out = ROOT / "bench" / "results" / "submit.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
