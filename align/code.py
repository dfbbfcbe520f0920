"""The code a stage runs, read from the source: its module and every project module it imports, transitively (lazy
imports inside functions too, since they run as well), and a digest of those files' bytes.

A job's key holds this digest rather than the git commit: committing, or editing a file the stage does not run,
while a multi-hour job runs leaves the key as it was, so a rerun re-attaches to the job; editing a file it runs
makes the job stale. tests/test_structure.py checks dvc.yaml's deps against the same closure.

The memory plan (`UNRESULTING`) runs in every stage but decides only whether a job is submitted, never what it
computes: it is left out of the closure, so an edit to it (or to an asset it sizes) reruns no stage.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import cache
from pathlib import Path

import blake3

PACKAGES = ("align", "stages", "slurm")
UNRESULTING = frozenset({"align.plan"})  # run by every stage before its job, read nothing of what a job computes


@cache
def module_file(name: str) -> Path | None:
    """The source file of a project module (where Python would import it from), or None for anything else (a
    package's empty __init__ included)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.submodule_search_locations is not None or not (spec.origin or "").endswith(".py"):
        return None
    return Path(spec.origin)


@cache
def imports(name: str) -> frozenset[str]:
    """The project modules `name` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(module_file(name).read_text())):  # type: ignore[union-attr]
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return frozenset(m for m in found if module_file(m) and m != name and m not in UNRESULTING)


def closure(name: str) -> set[str]:
    """`name` and every project module it imports, transitively."""
    seen, todo = set(), [name]
    while todo:
        module = todo.pop()
        if module not in seen and module_file(module):
            seen.add(module)
            todo += imports(module)
    return seen


def code_digest(module: str) -> dict[str, str]:
    """blake3 of each file the module runs, by module name: what a job's key records of its code."""
    return {name: blake3.blake3(module_file(name).read_bytes()).hexdigest()  # type: ignore[union-attr]
            for name in sorted(closure(module))}
