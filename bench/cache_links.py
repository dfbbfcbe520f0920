"""What the DVC cache link type costs when a stage's out is a multi-GB checkpoint folder: `dvc add` of the same
folder (default ~1 GiB in 4 safetensors-sized files) into a fresh cache per link type, timed, with the extra disk
it takes (workspace + cache, hard links counted once) and the files' state after it.

    python bench/cache_links.py [--gib 1] [--out bench/results/cache_links.json]

Each type runs in its own scratch repository on the same filesystem as --dir (default: a folder under the
current directory, so the numbers are the ones a cluster's shared filesystem would give where it is run from).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from align.records import write_json  # noqa: E402

TYPES = ("copy", "reflink", "hardlink", "symlink")
FILES = 4


def disk_bytes(*paths: Path) -> int:
    """Allocated bytes under `paths`, each inode once (du's accounting)."""
    seen, total = set(), 0
    for root in paths:
        for dirpath, _, names in os.walk(root):
            for name in names:
                st = os.lstat(Path(dirpath) / name)
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def make_checkpoint(folder: Path, gib: float) -> int:
    folder.mkdir(parents=True)
    size = int(gib * 2**30 / FILES)
    for i in range(FILES):  # random bytes throughout: files that share content would be stored once
        with (folder / f"model-{i:05d}-of-{FILES:05d}.safetensors").open("wb") as fh:
            left = size
            while left > 0:
                fh.write(os.urandom(min(left, 2**24)))
                left -= 2**24
    return size * FILES


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A command with this Python's environment first on PATH (dvc installed beside it)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)


def measure(kind: str, source: Path, scratch: Path) -> dict:
    repo = scratch / kind
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "config", "cache.type", kind], repo)
    run(["dvc", "config", "core.analytics", "false"], repo)
    shutil.copytree(source, repo / "checkpoint")
    before = disk_bytes(repo / "checkpoint", repo / ".dvc" / "cache")
    start = time.perf_counter()
    proc = run(["dvc", "add", "-q", "checkpoint"], repo)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"type": kind, "ok": False, "error": reason}
    after = disk_bytes(repo / "checkpoint", repo / ".dvc" / "cache")
    sample = next((repo / "checkpoint").iterdir())
    return {"type": kind, "ok": True, "seconds": seconds, "extra_disk_bytes": after - before,
            "dvc_said": " ".join(line.strip() for line in proc.stderr.splitlines() if line.strip())[:300],
            "workspace_file": "symlink" if sample.is_symlink() else
            f"{os.stat(sample).st_nlink} links" if os.stat(sample).st_nlink > 1 else "own copy"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--dir", type=Path, default=Path.cwd())
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/cache_links.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cache-links-", dir=args.dir) as tmp:
        scratch = Path(tmp)
        size = make_checkpoint(scratch / "source", args.gib)
        results = [measure(kind, scratch / "source", scratch) for kind in TYPES]
    fstype = subprocess.run(["stat", "-f", "-c", "%T", str(args.dir)], capture_output=True, text=True).stdout.strip()
    print(f"dvc add of a {size / 2**30:.2f} GiB checkpoint folder ({FILES} files), one fresh cache per type, "
          f"on {fstype} ({args.dir})")
    print(f"{'cache.type':<10} {'seconds':>8} {'extra disk':>12}  workspace file after")
    for r in results:
        if r["ok"]:
            print(f"{r['type']:<10} {r['seconds']:>8.2f} {r['extra_disk_bytes'] / 2**30:>10.2f} G  {r['workspace_file']}")
        else:
            print(f"{r['type']:<10} {'-':>8} {'-':>12}  not supported here: {r['error']}")
    write_json(args.out, {"bytes": size, "files": FILES, "filesystem": fstype, "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
