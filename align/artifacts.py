"""Content-hashed artifacts: every out is a folder with a MANIFEST.json whose digest is the artifact's id.

The id covers what the artifact is (files, inputs, params, code); the manifest's record of the run that made it
(host, SLURM job id, start and end time) is kept beside and left out of the digest, so two runs with the same
params, seed and backend give the same id.

An out is built in a temporary folder beside its target and swapped into place only when complete (an atomic
RENAME_EXCHANGE where the filesystem has one), so a crash at any moment leaves the previous out intact.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import blake3
import yaml

from align.errors import UserError
from align.hash_cache import remembered
from align.precision import recorded

MANIFEST = "MANIFEST.json"
RUN_RECORD = ("host", "slurm_job_id", "started", "ended", "wall_seconds", "job_key")  # in the manifest, not the id
JOB_STARTED = "ALIGN_JOB_STARTED"  # set by the submission layer when a job's task starts: its wall time's origin
JOB_KEY = "ALIGN_JOB_KEY"  # set by the submission layer: the digest of what decided the job's result
_RENAME_EXCHANGE = 2


def hash_file(path: Path) -> str:
    """blake3 of a file, multi-threaded and memory-mapped (checkpoints are GBs)."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if os.path.getsize(path):
        hasher.update_mmap(path)
    return hasher.hexdigest()


def file_hash(path: Path, cached: bool = True) -> str:
    """`hash_file`, or its remembered value for an unchanged file (align/hash_cache.py) unless `cached` is False."""
    return remembered(path, hash_file) if cached else hash_file(path)


def digest(obj: Any) -> str:
    """blake3 of the canonical JSON form of `obj`: the id of a manifest, or of a job's inputs."""
    return blake3.blake3(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def artifact_id(manifest: dict[str, Any]) -> str:
    return digest({key: value for key, value in manifest.items() if key not in RUN_RECORD})


def hash_tree(folder: Path, cached: bool = True) -> dict[str, dict[str, Any]]:
    """{relative path: {blake3, size}} for every file under `folder` except the manifest itself."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST:
            files[rel] = {"blake3": file_hash(path, cached), "size": path.stat().st_size}
    return files


def producer(folder: Path) -> str | None:
    """The dvc.yaml stage whose out `folder` is (or lies in), for the fix a message names; None outside a project."""
    try:
        stages = yaml.safe_load(Path("dvc.yaml").read_text()).get("stages", {})
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    target = Path(folder)
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            out = Path(next(iter(out)) if isinstance(out, dict) else out)
            if target == out or out in target.parents:
                return name
    return None


def rebuild_hint(folder: Path) -> str:
    stage = producer(folder)
    return f"run `dvc repro {stage}`" if stage else "rerun the stage that writes it"


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; {folder} is not a finished artifact ({rebuild_hint(folder)})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def verify_artifact(folder: Path, cached: bool = True) -> str:
    """Re-hash every file against the manifest (an unchanged file's remembered hash unless `cached` is False);
    return the artifact id or raise naming the first mismatch."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    expected = manifest.get("files")
    if not isinstance(expected, dict):
        raise UserError(f"{folder / MANIFEST}: files: expected a mapping of path to hash")
    for rel, entry in sorted(expected.items()):
        path = folder / rel
        if not path.is_file():
            raise UserError(f"{path}: listed in {folder / MANIFEST} but missing")
        if path.stat().st_size != entry["size"] or file_hash(path, cached) != entry["blake3"]:
            stage = producer(folder)
            fix = f": `dvc checkout {folder}` restores it, `dvc repro -f {stage}` rebuilds it" if stage else ""
            raise UserError(f"{path}: content does not match {folder / MANIFEST} (altered after it was written){fix}")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST and rel not in expected:
            raise UserError(f"{path}: not listed in {folder / MANIFEST} (added after it was written)")
    return artifact_id(manifest)


def input_id(path: Path, cached: bool = True) -> str:
    """The id of anything a stage reads: a verified artifact's manifest digest, a plain folder's tree digest
    (a user's HF model folder), or a file's blake3 (assets, the packaged GGUF)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return verify_artifact(path, cached)
    if path.is_dir():
        return digest(hash_tree(path, cached))
    if path.is_file():
        return file_hash(path, cached)
    raise UserError(f"{path}: input not found (run `dvc repro`: the stage that writes it has not run)")


def input_refs(paths: dict[str, Path]) -> dict[str, dict[str, str]]:
    """{name: {path, id}} for a stage's inputs, verified now: what the manifest and the job key record."""
    return {name: {"path": str(path), "id": input_id(path)} for name, path in paths.items()}


def code_revision() -> dict[str, Any]:
    """The git commit of the code that ran, and whether tracked files differed from it."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the kernel or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False


def _sync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def recover(target: Path) -> None:
    """Undo what an interrupted swap or build left beside `target`: restore a displaced previous out when the
    target itself is gone, and delete half-built temporary folders."""
    target = Path(target)
    for old in sorted(target.parent.glob(f".{target.name}.old-*")):
        if not target.exists():
            os.rename(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):
        shutil.rmtree(tmp)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old)


@contextmanager
def staged_out(target: Path, *, stage: str, params: dict, inputs: dict[str, dict[str, str]]) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; when the block finishes, write its manifest and swap it into
    place. On any exception the temporary folder is removed and `target` is left as it was. `wall_seconds` counts
    from the start of the job that writes the out (queue wait excluded), or from the block's start outside a job."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    started = time.time()
    try:
        yield tmp
        ended = time.time()
        manifest = {
            "stage": stage,
            "files": hash_tree(tmp),
            "inputs": inputs,
            "params": params,
            "code": code_revision(),
            "host": socket.gethostname(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": _iso(started),
            "ended": _iso(ended),
            "wall_seconds": round(ended - float(os.environ.get(JOB_STARTED, started)), 1),
            "job_key": os.environ.get(JOB_KEY),  # what `runner.up_to_date` compares: params, inputs, code
        }
        if precision := recorded(params):  # what `auto` resolved to on this job's node
            manifest["precision"] = precision
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _sync_tree(tmp)
        _swap_into_place(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _out_of_space(exc):  # a full disk or quota: one line, the previous out kept
            free = shutil.disk_usage(target.parent).free / 2**20
            writing = f", writing {exc.filename}" if getattr(exc, "filename", None) else ""
            raise UserError(f"{target}: no space left on the device ({free:.1f} MiB free there{writing}); "
                            "the previous out is kept") from None
        raise


def _out_of_space(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT, as an OSError or inside another library's error (safetensors reports it as text)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(os.strerror(code) in str(exc) for code in (errno.ENOSPC, errno.EDQUOT))


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))
