"""`python -m align.compare A B`: is B better than A, or is the difference noise? For every headline score and policy
of `evaluate`, B - A over the items both runs scored, with a 95% paired-bootstrap interval, and a verdict only where
the interval excludes 0. `dvc metrics diff` prints the two means; two runs on the same items differ mostly item by
item in the same direction, so the paired interval is far narrower than the two runs' own intervals side by side.

A and B are git revisions (a commit, branch or tag), `dvc exp` names, or `workspace`. Each side's per-item outcomes
(data/evaluation/outcomes.jsonl, written by stages/evaluate.py) are read through DVC at that revision (`dvc.api`:
the out's cached copy), the workspace's from the file itself; nothing is recomputed. Items are paired by their
stable id; MT-Bench turns are resampled by question (their cluster), as `evaluate`'s own intervals are.
"""

from __future__ import annotations

import argparse
import io
import json
import sys

import pandas as pd

from align import paths
from align.errors import UserError
from align.intervals import bootstrap_ci
from align.runner import run

OUTCOMES = paths.EVALUATION / "outcomes.jsonl"  # stages/evaluate.py OUTCOMES, inside its out
WORKSPACE = "workspace"
COLUMNS = ("policy", "score", "item", "cluster", "value")


def outcomes_text(rev: str) -> str:
    """outcomes.jsonl as it is in the workspace, or as DVC recorded it at `rev`; one line where it cannot be read."""
    if rev == WORKSPACE:
        if not OUTCOMES.is_file():
            raise UserError(f"{OUTCOMES}: not found in the workspace; expected the per-item outcomes of an `evaluate` "
                            f"run (runs before they were kept lack them: rerun `dvc repro evaluate`)")
        return OUTCOMES.read_text(encoding="utf-8")
    import dvc.api
    from dvc.exceptions import DvcException, PathMissingError
    from dvc.scm import RevError

    try:
        return dvc.api.read(str(OUTCOMES), rev=rev, encoding="utf-8")
    except RevError:
        raise UserError(f"{rev}: unknown revision; expected a git commit, branch or tag, a `dvc exp` name, or "
                        f"{WORKSPACE}") from None
    except PathMissingError:
        raise UserError(f"{OUTCOMES} at {rev}: not found; expected the per-item outcomes of an `evaluate` run (runs "
                        f"before they were kept lack them: rerun `dvc repro evaluate` there)") from None
    except DvcException as exc:  # not a DVC repository, the out not in the cache, ...: DVC's own words name it
        raise UserError(f"{OUTCOMES} at {rev}: cannot be read through DVC ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def read_outcomes(rev: str) -> pd.DataFrame:
    """One row per (policy, score, item): its cluster and value; every line checked."""
    where = f"{OUTCOMES}" if rev == WORKSPACE else f"{OUTCOMES} at {rev}"
    rows = []
    for number, line in enumerate(outcomes_text(rev).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise UserError(f"{where}: line {number}: not valid JSON") from None
        missing = [k for k in COLUMNS if k not in row] if isinstance(row, dict) else list(COLUMNS)
        if missing or not isinstance(row["value"], (int, float)) or isinstance(row["value"], bool):
            raise UserError(f"{where}: line {number}: {missing[0] if missing else 'value'}: expected an object with "
                            f"{', '.join(COLUMNS)} (value a number)")
        rows.append({k: row[k] if k == "value" else str(row[k]) for k in COLUMNS})
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    repeated = frame.duplicated(["policy", "score", "item"])
    if repeated.any():
        first = frame[repeated].iloc[0]
        raise UserError(f"{where}: item {first['item']!r} of {first['policy']} {first['score']} appears more than "
                        f"once; expected one outcome per (policy, score, item)")
    return frame


def verdict(lo: float, hi: float) -> str:
    """Only where the interval excludes 0: which side is higher (for position_bias, lower is better)."""
    return "B > A" if lo > 0 else "B < A" if hi < 0 else ""


def compare(a: pd.DataFrame, b: pd.DataFrame, seed: int, resamples: int) -> pd.DataFrame:
    """Per (score, policy) either side has, in the order the runs list them (a score's policies together): the items
    each side had, the items both had, and over those B - A (mean of per-item differences) with its 95%
    paired-bootstrap interval, the items resampled by cluster (`bootstrap_ci`)."""
    rows = []
    keys = pd.concat([a, b])[["score", "policy"]].drop_duplicates()
    first = {score: n for n, score in enumerate(keys.score.unique())}
    keys = keys.sort_values("score", key=lambda column: column.map(first), kind="stable")  # a score's policies together
    for score, policy in keys.itertuples(index=False):
        side_a = a[(a.score == score) & (a.policy == policy)]
        side_b = b[(b.score == score) & (b.policy == policy)]
        both = side_a.merge(side_b, on="item", suffixes=("_a", "_b"))
        row = {"score": score, "policy": policy, "A items": len(side_a), "B items": len(side_b), "paired": len(both),
               "B - A": "", "95% CI": "", "verdict": ""}
        if len(both):
            diffs = (both.value_b - both.value_a).tolist()
            lo, hi = bootstrap_ci(diffs, seed, resamples, clusters=both.cluster_a.tolist())
            row.update({"B - A": f"{sum(diffs) / len(diffs):+.4f}", "95% CI": f"[{lo:+.4f}, {hi:+.4f}]",
                        "verdict": verdict(lo, hi)})
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", metavar="A", help=f"git revision, `dvc exp` name or {WORKSPACE}")
    parser.add_argument("b", metavar="B", help=f"git revision, `dvc exp` name or {WORKSPACE}")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap draws (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    table = compare(read_outcomes(args.a), read_outcomes(args.b), args.seed, args.resamples)
    out = io.StringIO()
    table.to_string(out, index=False)
    print(f"B - A per item, A = {args.a}, B = {args.b}; a verdict only where the 95% interval excludes 0")
    print(out.getvalue())


if __name__ == "__main__":
    sys.exit(run(main))
