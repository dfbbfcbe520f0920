"""`python -m align.compare A B` (align/compare.py): B - A per headline score and policy over the items both runs
scored, with a paired-bootstrap interval and a verdict only where it excludes 0; each side read from the out's
per-item outcomes through DVC at a git revision or a `dvc exp` name, or from the workspace; bad input as one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from align.intervals import bootstrap_ci
from stages.evaluate import OUTCOMES, SCORES
from tests.conftest import ROOT
from tests.helpers import sh

FILE = Path("data/evaluation") / OUTCOMES


def compare(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align.compare", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
                          timeout=300)


def write_outcomes(cwd: Path, rows: list[dict]) -> None:
    (cwd / FILE).parent.mkdir(parents=True, exist_ok=True)
    (cwd / FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))


def full_run() -> list[dict]:
    """Every headline score of a full run: 400 multiple-choice items, 80 MT-Bench questions of two turns, 30
    system-message rows; base has no win rate against itself."""
    rows = []
    for policy in ("base", "sft", "policy"):
        for n, (score, _) in enumerate(SCORES):
            if score.startswith("mtbench"):
                items = [(f"{q}/{t}", str(q)) for q in range(81, 161) for t in (1, 2)]
            elif score.startswith("sysmsg"):
                items = [(f"row{r}", f"row{r}") for r in range(30)]
            else:
                items = [(f"{score[:4]}{i:012x}", f"{score[:4]}{i:012x}") for i in range(400)]
            if policy == "base" and (score.endswith("judge") or score.endswith("bias") or score.endswith("target_rm")):
                continue
            rows += [{"policy": policy, "score": score, "item": item, "cluster": cluster,
                      "value": (i * 7 + n) % 3 / 2} for i, (item, cluster) in enumerate(items)]
    return rows


ROW = re.compile(r"^\s*(\S+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s*([+-]\d\.\d{4})?\s*(\[[^\]]*\])?\s*(B [<>] A)?\s*$")


def table(stdout: str) -> dict[tuple[str, str], dict[str, str]]:
    """The printed table (after its title and header lines) by (score, policy): its columns as text, "" where
    empty."""
    found = {}
    for line in stdout.splitlines()[2:]:
        score, policy, *cells = ROW.match(line).groups()  # type: ignore[union-attr]
        found[(score, policy)] = dict(zip(("A items", "B items", "paired", "B - A", "95% CI", "verdict"),
                                          [c or "" for c in cells]))
    return found


def test_workspace_against_itself_is_zero_everywhere_within_160_columns(tmp_path: Path) -> None:
    write_outcomes(tmp_path, full_run())
    proc = compare(tmp_path, "workspace", "workspace")
    assert proc.returncode == 0, proc.stderr
    assert max(len(line) for line in proc.stdout.splitlines()) <= 160, proc.stdout
    rows = table(proc.stdout)
    assert len(rows) == 5 * 3 + 6 * 2 and rows[("mtbench_judge", "sft")]["paired"] == "160"
    assert rows[("hhh_acc", "base")]["A items"] == rows[("hhh_acc", "base")]["B items"] == "400"
    for row in rows.values():
        assert (row["B - A"], row["95% CI"], row["verdict"]) == ("+0.0000", "[+0.0000, +0.0000]", ""), row


def test_two_revisions_give_the_hand_computed_difference_and_a_verdict_only_where_the_interval_excludes_0(
        tmp_path: Path) -> None:
    """A tiny git + DVC repository whose data/evaluation (a DVC-tracked out) differs between two commits in a known
    way: hhh_acc of sft, 10 items in each run, 8 shared: 4 of them go 0 -> 1, so B - A = 4 / 8 = +0.5, every
    resampled mean >= 0 and the interval above 0 (a verdict); mtbench_judge of sft, 6 questions of 2 turns: one
    question + 1 on both turns, one - 1 on both, the rest unchanged: B - A = 0, no verdict; its interval is the
    cluster bootstrap by question. B is also reachable as a `dvc exp` name, and the workspace as itself."""
    repo = tmp_path / "repo"
    repo.mkdir()
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    hhh_a = [{"policy": "sft", "score": "hhh_acc", "item": f"i{i}", "cluster": f"i{i}", "value": float(i % 2)}
             for i in range(10)]  # items i0..i9: 0, 1, 0, 1, ...
    turns = [(q, t) for q in range(6) for t in (1, 2)]
    judge_a = [{"policy": "sft", "score": "mtbench_judge", "item": f"{q}/{t}", "cluster": str(q), "value": 0.5}
               for q, t in turns]
    write_outcomes(repo, hhh_a + judge_a)
    sh(repo, "dvc", "add", "-q", "data/evaluation")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "run A")
    hhh_b = [{**r, "value": 1.0} if r["item"] in {"i0", "i2", "i4", "i6"} else r for r in hhh_a[:8]]
    hhh_b += [{"policy": "sft", "score": "hhh_acc", "item": f"j{i}", "cluster": f"j{i}", "value": 1.0} for i in (1, 2)]
    judge_b = [{**r, "value": {"0": 1.0, "1": 0.0}.get(r["cluster"], 0.5)} for r in judge_a]
    write_outcomes(repo, hhh_b + judge_b)
    sh(repo, "dvc", "add", "-q", "data/evaluation")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "run B")
    sh(repo, "dvc", "exp", "save", "-q", "-n", "run-b")
    write_outcomes(repo, hhh_a + judge_a)  # the workspace: run A again, not committed

    proc = compare(repo, "HEAD~1", "HEAD")
    assert proc.returncode == 0, proc.stderr
    rows = table(proc.stdout)
    hhh = rows[("hhh_acc", "sft")]
    assert (hhh["A items"], hhh["B items"], hhh["paired"], hhh["B - A"], hhh["verdict"]) == ("10", "10", "8", "+0.5000",
                                                                                             "B > A")
    lo, hi = json.loads(hhh["95% CI"].replace("+", ""))
    assert 0 < lo < 0.5 < hi <= 1
    judged = rows[("mtbench_judge", "sft")]
    assert (judged["paired"], judged["B - A"], judged["verdict"]) == ("12", "+0.0000", "")
    diffs = [{"0": 0.5, "1": -0.5}.get(str(q), 0.0) for q, _ in turns]
    lo, hi = bootstrap_ci(diffs, 0, 1000, clusters=[str(q) for q, _ in turns])
    assert judged["95% CI"] == f"[{lo:+.4f}, {hi:+.4f}]" and lo < 0 < hi
    per_turn = bootstrap_ci(diffs, 0, 1000)
    assert hi - lo > per_turn[1] - per_turn[0]  # the two turns of a question moved together

    assert table(compare(repo, "run-b", "HEAD~1").stdout)[("hhh_acc", "sft")]["B - A"] == "-0.5000"  # exp name
    assert table(compare(repo, "workspace", "run-b").stdout)[("hhh_acc", "sft")]["verdict"] == "B > A"


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    """An unknown revision, an out from before per-item outcomes were kept, no out in the workspace, a malformed
    line: one line each, exit 2."""
    repo = tmp_path / "repo"
    (repo / "data/evaluation").mkdir(parents=True)
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    (repo / "data/evaluation/metrics.json").write_text("{}\n")  # an older run's out: no outcomes.jsonl
    sh(repo, "dvc", "add", "-q", "data/evaluation")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "an older run")
    cases = {("no-such-rev", "HEAD"): "no-such-rev: unknown revision; expected a git commit, branch or tag, a `dvc "
                                      "exp` name, or workspace",
             ("HEAD", "workspace"): f"{FILE} at HEAD: not found; expected the per-item outcomes of an `evaluate` run "
                                    f"(runs before they were kept lack them: rerun `dvc repro evaluate` there)"}
    for args, line in cases.items():
        proc = compare(repo, *args)
        assert (proc.returncode, proc.stdout, proc.stderr.splitlines()) == (2, "", [line]), proc.stderr
    proc = compare(repo, "workspace", "workspace")
    assert proc.stderr.splitlines() == [f"{FILE}: not found in the workspace; expected the per-item outcomes of an "
                                        f"`evaluate` run (runs before they were kept lack them: rerun `dvc repro "
                                        f"evaluate`)"]
    write_outcomes(repo, [{"policy": "sft", "score": "hhh_acc", "item": "i0", "value": 1.0}])
    proc = compare(repo, "workspace", "workspace")
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [
        f"{FILE}: line 1: cluster: expected an object with policy, score, item, cluster, value (value a number)"])


@pytest.mark.parametrize(("lo", "hi", "expected"), [(0.01, 0.3, "B > A"), (-0.3, -0.01, "B < A"), (0.0, 0.2, ""),
                                                     (-0.2, 0.0, ""), (-0.1, 0.1, "")])
def test_a_verdict_only_where_the_interval_excludes_0(lo: float, hi: float, expected: str) -> None:
    from align.compare import verdict

    assert verdict(lo, hi) == expected
