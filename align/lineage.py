"""`python -m align.lineage PATH`: an artifact's chain of ids back to the assets and params it came from.

Every file on the way is re-hashed; the first one that no longer matches ends the walk with one line and exit 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from align.artifacts import MANIFEST, input_id, read_manifest, verify_artifact
from align.errors import UserError


def _flat(params: dict, prefix: str = "") -> list[str]:
    items = []
    for key, value in sorted(params.items()):
        if isinstance(value, dict):
            items += _flat(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={value}")
    return items


def walk(path: Path, depth: int = 0, recorded: str | None = None) -> list[str]:
    """Lines describing `path` and, under it, everything it was built from; raises UserError on a mismatch."""
    pad = "  " * depth
    is_artifact = (path / MANIFEST).is_file()
    current = verify_artifact(path, cached=False) if is_artifact else input_id(path, cached=False)  # all re-read
    if recorded is not None and current != recorded:
        raise UserError(f"{path}: changed since it was used (recorded id {recorded[:16]}, now {current[:16]})")
    if not is_artifact:
        kind = "folder" if path.is_dir() else "file"
        return [f"{pad}{path}  {kind} {current[:16]}"]
    manifest = read_manifest(path)
    code = manifest.get("code") or {}
    commit = (code.get("commit") or "no-git")[:10] + (" dirty" if code.get("dirty") else "")
    lines = [
        f"{pad}{path}  artifact {current[:16]}  stage={manifest.get('stage')}  code={commit}"
        f"  job={manifest.get('slurm_job_id') or '-'}  ended={manifest.get('ended')}",
    ]
    params = _flat(manifest.get("params") or {})
    if params:
        lines.append(f"{pad}  params: {', '.join(params)}")
    for name, ref in sorted((manifest.get("inputs") or {}).items()):
        lines.append(f"{pad}  <- {name}:")
        lines += walk(Path(ref["path"]), depth + 2, ref.get("id"))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    try:
        lines = walk(args.path)
    except UserError as exc:
        print(f"lineage: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    print("ok: every file re-hashed and matches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
