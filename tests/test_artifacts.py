"""Manifests, atomic outs and lineage: an out is complete or absent, and any later change is caught by name."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align import lineage, records
from align.artifacts import MANIFEST, artifact_id, hash_file, input_id, input_refs, recover, staged_out, verify_artifact
from align.errors import UserError
from slurm.submit import JobSpec, submit
from tests.conftest import ROOT
from tests.helpers import cluster_with, resources


def write_out(target: Path, files: dict[str, str], inputs: dict | None = None, params: dict | None = None) -> str:
    with staged_out(target, stage="test", params=params or {"k": 1}, inputs=inputs or {}) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
    return verify_artifact(target)


def test_manifest_records_files_inputs_params_code_and_times(tmp_path: Path) -> None:
    asset = tmp_path / "seed.jsonl"
    asset.write_text('{"text": "hi"}\n')
    out = tmp_path / "data"
    out_id = write_out(out, {"a.txt": "alpha", "sub/b.txt": "beta"}, input_refs({"seeds": asset}), {"x": 2})
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["files"]) == {"a.txt", "sub/b.txt"}
    assert manifest["files"]["a.txt"] == {"blake3": hash_file(out / "a.txt"), "size": 5}
    assert manifest["inputs"] == {"seeds": {"path": str(asset), "id": hash_file(asset)}}
    assert manifest["params"] == {"x": 2} and manifest["stage"] == "test"
    assert set(manifest["code"]) == {"commit", "dirty"}
    assert manifest["host"] and manifest["started"] <= manifest["ended"] and manifest["wall_seconds"] >= 0
    assert out_id == input_id(out) == verify_artifact(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "seed.jsonl"]  # no temporary folder left


def test_id_covers_content_inputs_params_and_code_not_the_run_record(tmp_path: Path) -> None:
    first = write_out(tmp_path / "a", {"x.txt": "same"}, params={"seed": 1})
    time.sleep(1.1)  # a later run: other start and end times
    assert write_out(tmp_path / "b", {"x.txt": "same"}, params={"seed": 1}) == first
    assert write_out(tmp_path / "c", {"x.txt": "other"}, params={"seed": 1}) != first
    assert write_out(tmp_path / "d", {"x.txt": "same"}, params={"seed": 2}) != first
    manifest = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert artifact_id({**manifest, "host": "elsewhere", "slurm_job_id": "7", "wall_seconds": 9.0}) == first
    assert artifact_id({**manifest, "code": {"commit": "abc", "dirty": False}}) != first


def slow_stage(out: Path) -> None:
    """A job that works a while before it writes its out, as every model stage does."""
    time.sleep(0.5)
    with staged_out(out, stage="test", params={}, inputs={}) as tmp:
        (tmp / "metrics.json").write_text(json.dumps({"acc": 0.5}))


def test_published_metrics_carry_the_wall_time_of_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    spec = JobSpec(stage="test", fn=functools.partial(slow_stage, out), resources=resources(), target=out, key={})
    submit(spec, cluster_with(executor="inline"))
    published = json.loads(records.publish_metrics(out, "test").read_text())  # a stage with no figures of its own
    assert set(published) == {"minutes"} and 0.01 <= published["minutes"] < 1  # from the job's start, not the block's


def test_failure_inside_the_block_keeps_the_previous_out(tmp_path: Path) -> None:
    out = tmp_path / "data"
    first = write_out(out, {"a.txt": "v1"})
    with pytest.raises(RuntimeError):
        with staged_out(out, stage="test", params={}, inputs={}) as tmp:
            (tmp / "a.txt").write_text("v2-partial")
            raise RuntimeError("crash while writing")
    assert verify_artifact(out) == first and (out / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_replacing_an_out_swaps_it_whole(tmp_path: Path) -> None:
    out = tmp_path / "data"
    write_out(out, {"a.txt": "v1", "old-only.txt": "x"})
    second = write_out(out, {"a.txt": "v2"})
    assert (out / "a.txt").read_text() == "v2" and not (out / "old-only.txt").exists()
    assert verify_artifact(out) == second


CRASHER = """
import sys, time
from pathlib import Path
from align.artifacts import staged_out
with staged_out(Path(sys.argv[1]), stage="test", params={}, inputs={}) as tmp:
    for i in range(1000):
        (tmp / f"part{i}.bin").write_bytes(b"x" * 100_000)
        print(i, flush=True)
        time.sleep(0.01)
"""


def test_killed_process_leaves_previous_out_and_next_run_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "data"
    first = write_out(out, {"a.txt": "v1"})
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    for _ in range(5):
        proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "data"]
    assert leftovers and all(name.startswith(".data.tmp-") for name in leftovers)
    assert verify_artifact(out) == first
    write_out(out, {"a.txt": "v2"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_recover_restores_an_out_displaced_by_an_interrupted_swap(tmp_path: Path) -> None:
    out = tmp_path / "data"
    first = write_out(out, {"a.txt": "v1"})
    os.rename(out, tmp_path / ".data.old-1234abcd")  # crash between the two renames of the fallback path
    recover(out)
    assert verify_artifact(out) == first


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda d: (d / "w.bin").write_bytes(b"\x00" + (d / "w.bin").read_bytes()[1:]), r"w.bin: content does not match"),
        (lambda d: (d / "w.bin").unlink(), r"w.bin: listed in .*MANIFEST.json but missing"),
        (lambda d: (d / "extra.txt").write_text("x"), r"extra.txt: not listed in .*MANIFEST.json"),
        (lambda d: (d / MANIFEST).write_text("{oops"), r"MANIFEST.json: not valid JSON"),
        (lambda d: (d / MANIFEST).unlink(), r"MANIFEST.json: missing"),
    ],
)
def test_verification_names_the_altered_file(tmp_path: Path, change, expected: str) -> None:
    out = tmp_path / "data"
    write_out(out, {"w.bin": "weights", "rows.jsonl": '{"a": 1}\n'})
    change(out)
    with pytest.raises(UserError, match=expected):
        verify_artifact(out)


def test_input_id_of_plain_folder_and_file(tmp_path: Path) -> None:
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "config.json").write_text("{}")
    first = input_id(tmp_path / "f")
    (tmp_path / "f" / "config.json").write_text('{"a": 1}')
    assert input_id(tmp_path / "f") != first
    with pytest.raises(UserError, match="input not found"):
        input_id(tmp_path / "missing")


def test_lineage_walks_back_to_assets_and_refuses_a_changed_file(tmp_path: Path, capsys) -> None:
    asset = tmp_path / "assets" / "principles.txt"
    asset.parent.mkdir()
    asset.write_text("1 (ethical): ...\n")
    base = tmp_path / "models" / "base"
    base_id = write_out(base, {"model.safetensors": "weights"}, input_refs({"gguf": asset}), {"model": {"base": "x"}})
    sft = tmp_path / "models" / "sft"
    sft_id = write_out(sft, {"adapter.bin": "lora"}, input_refs({"base": base, "principles": asset}), {"lr": 1e-4})

    assert lineage.main([str(sft)]) == 0
    text = capsys.readouterr().out
    assert f"artifact {sft_id[:16]}" in text and f"artifact {base_id[:16]}" in text
    assert "params: lr=0.0001" in text and "params: model.base=x" in text
    assert f"file {hash_file(asset)[:16]}" in text

    weights = base / "model.safetensors"
    weights.write_bytes(b"W" + weights.read_bytes()[1:])
    assert lineage.main([str(sft)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"lineage: {weights}: content does not match {base / MANIFEST} (altered after it was written)"


def test_lineage_reports_an_input_rebuilt_since(tmp_path: Path, capsys) -> None:
    base = tmp_path / "base"
    write_out(base, {"w": "1"})
    child = tmp_path / "child"
    write_out(child, {"c": "1"}, input_refs({"base": base}))
    time.sleep(0.01)
    write_out(base, {"w": "2"})
    assert lineage.main([str(child)]) == 1
    assert "changed since it was used" in capsys.readouterr().err


def test_an_unchanged_input_is_hashed_once_and_lineage_rereads_everything(tmp_path: Path, capsys,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from align import hash_cache

    monkeypatch.setenv("ALIGN_HASH_CACHE", str(tmp_path / "cache" / "hashes.sqlite"))
    with staged_out(tmp_path / "out", stage="t", params={}, inputs={}) as tmp:
        (tmp / "weights.bin").write_bytes(b"\x01" * 4096)
    computed: list[Path] = []

    def counting(path: Path) -> str:
        computed.append(path)
        return hash_file(path)

    weights = tmp_path / "out" / "weights.bin"
    first = hash_cache.remembered(weights, counting)
    assert hash_cache.remembered(weights, counting) == first == hash_file(weights) and len(computed) == 1
    weights.write_bytes(b"\x02" * 4096)  # same size, new mtime: hashed again
    assert hash_cache.remembered(weights, counting) == hash_file(weights) and len(computed) == 2

    with staged_out(tmp_path / "out", stage="t", params={}, inputs={}) as tmp:
        (tmp / "weights.bin").write_bytes(b"\x01" * 4096)
    out_id = verify_artifact(tmp_path / "out")
    stat = weights.stat()
    with weights.open("r+b") as fh:  # altered in place with its size and mtime put back: only a re-read sees it
        fh.write(b"\x03")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert verify_artifact(tmp_path / "out") == out_id  # the cache trusts (inode, size, mtime), as DVC's state does
    with pytest.raises(UserError, match="content does not match"):
        verify_artifact(tmp_path / "out", cached=False)
    assert lineage.main([str(tmp_path / "out")]) == 1  # `python -m align.lineage` re-reads every file

    (tmp_path / "cache" / "hashes.sqlite").write_bytes(b"not a database")  # a broken cache: plain hashing
    assert hash_cache.remembered(weights, hash_file) == hash_file(weights)
