"""JSONL data and metrics files of the stages' artifacts, and the copy of each stage's metrics that DVC tracks."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from align.artifacts import MANIFEST
from align.health import health

METRICS_DIR = Path("metrics")  # metrics/<stage>.json: what `dvc metrics show/diff` reads (declared in dvc.yaml)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with Path(path).open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file inside a verified artifact (written by `write_jsonl`)."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def sample_in_order(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    """All rows, or `limit` of them drawn at random from `seed`, in their original order."""
    if limit is None or limit >= len(rows):
        return rows
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), limit))]


def unused_prompts(prompts: list[dict], sft: list[dict], limit: int | None, seed: int) -> list[dict]:
    """Up to `limit` prompts not in the SFT data, drawn at random (file order kept)."""
    used = {row["id"] for row in sft}
    return sample_in_order([p for p in prompts if p["id"] not in used], limit, seed)


def write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON through a temporary file, so a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def publish_metrics(artifact: Path, stage: str) -> Path:
    """metrics/<stage>.json for DVC: the stage's few figures from `artifact/metrics.json` (hashed in its manifest,
    where the detail stays) and the minutes the job took to write the artifact (from its manifest), so a run's cost
    shows beside its scores (align/health.py)."""
    out = METRICS_DIR / f"{stage}.json"
    metrics = json.loads((Path(artifact) / "metrics.json").read_text())
    manifest = json.loads((Path(artifact) / MANIFEST).read_text())
    write_json(out, health(stage, metrics, manifest.get("wall_seconds")))
    return out
