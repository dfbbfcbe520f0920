"""Manifest hashing (blake3, as align/artifacts.py does it) vs md5 (DVC's cache) and sha256 over the same
~1 GiB of checkpoint-like files; then a stage's input verification of that folder as an artifact, first (every
file hashed) and second (the hash cache of align/hash_cache.py: unchanged files are not read again). Prints a
table, writes bench/results/hashing.json.

    python bench/hashing.py [--gib 1.0] [--files 4]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from align.artifacts import hash_file, staged_out, verify_artifact  # noqa: E402

CHUNK = 1 << 20


def hashlib_file(name: str, path: Path) -> str:
    h = hashlib.new(name)
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def timed(fn, files: list[Path], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for path in files:
            fn(path)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--files", type=int, default=4, help="the data is split like a sharded checkpoint")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    size = int(args.gib * (1 << 30)) // args.files
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        files = []
        for i in range(args.files):  # float32-like noise: incompressible, like trained weights
            path = Path(tmp) / f"model-{i:05d}.safetensors"
            with path.open("wb") as fh:
                for _ in range(size // CHUNK):
                    fh.write(os.urandom(CHUNK))
            files.append(path)
        total = sum(p.stat().st_size for p in files)
        for path in files:  # warm the page cache so all three read from memory
            hashlib_file("md5", path)
        rows = {
            "blake3 (manifest)": timed(hash_file, files, args.repeats),
            "md5 (DVC cache)": timed(lambda p: hashlib_file("md5", p), files, args.repeats),
            "sha256": timed(lambda p: hashlib_file("sha256", p), files, args.repeats),
        }
        os.environ["ALIGN_HASH_CACHE"] = str(Path(tmp) / "cache" / "hashes.sqlite")
        with staged_out(Path(tmp) / "model", stage="bench", params={}, inputs={}) as folder:
            for path in files:
                os.replace(path, folder / path.name)
        verification = {}
        for run in ("first", "second"):  # what every stage does with its inputs before it submits its job
            start = time.perf_counter()
            verify_artifact(Path(tmp) / "model")
            verification[run] = time.perf_counter() - start
    md5 = rows["md5 (DVC cache)"]
    results = {
        "bytes": total, "files": args.files, "cpus": os.cpu_count(),
        "rows": [{"hash": k, "seconds": round(v, 3), "MiB_per_s": round(total / v / 2**20, 1),
                  "speed_vs_md5": round(md5 / v, 2)} for k, v in rows.items()],
        "verification_seconds": {k: round(v, 4) for k, v in verification.items()},
        "second_verification_speedup": round(verification["first"] / verification["second"], 1),
    }
    print(f"{total / 2**30:.2f} GiB in {args.files} files, {os.cpu_count()} cpus, best of {args.repeats}")
    print(f"{'hash':<20}{'seconds':>10}{'MiB/s':>10}{'x md5':>8}")
    for row in results["rows"]:
        print(f"{row['hash']:<20}{row['seconds']:>10.3f}{row['MiB_per_s']:>10.1f}{row['speed_vs_md5']:>8.2f}")
    print(f"input verification: first {verification['first']:.3f} s, second {verification['second']:.4f} s "
          f"(hash cache): {results['second_verification_speedup']}x faster")
    out = Path("bench/results/hashing.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
