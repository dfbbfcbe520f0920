"""`dvc repro` of the SELF-ALIGN stages on the embedded default (SmolLM2-135M, vLLM on CPU, DeepSpeed on CPU,
submitit's local executor) in a fresh git + DVC repository, with the stage sizes cut down; then toggling
verbose cloning off with `dvc exp run -S` reruns only the stage it concerns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.artifacts import read_manifest, verify_artifact
from align.records import read_jsonl
from tests.helpers import new_repo, sh

SMALL = {
    "prompts": {"num_self_instruct": 8, "requests_per_round": 8, "max_rounds": 2, "max_new_tokens": 96,
                "tgrt": {"enabled": True, "topics_per_type": 1, "questions_per_topic": 1}},
    "self_align": {"max_prompts": 64},
    "engrave": {"epochs": 1},
    "training": {"micro_batch_size": 2, "save_every": 4},
    "verbose_clone": {"enabled": True, "max_new_tokens": 384, "epochs": 1},
}


@pytest.mark.slow
def test_dvc_repro_self_align_stages_on_the_embedded_model(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo", {**SMALL, "cluster": {"executor": "local"}})

    run = sh(repo, "dvc", "repro", "verbose_clone", timeout=1500).stdout
    for stage in ("import_model", "prompts", "self_align", "engrave", "verbose_clone"):
        assert f"Running stage '{stage}'" in run
    prompts = read_jsonl(repo / "data/prompts/prompts.jsonl")
    assert {"seed", "self_instruct", "tgrt"} <= {p["source"] for p in prompts}
    sft = read_jsonl(repo / "data/self_align/sft.jsonl")
    assert sft and not any("internal thoughts" in row["answer"].lower() for row in sft)
    for out in ("data/prompts", "data/self_align", "models/engraved", "models/sft"):
        verify_artifact(repo / out)
    assert read_manifest(repo / "models/sft")["params"]["verbose_clone"]["enabled"] is True
    lineage = sh(repo, "python", "-m", "align.lineage", "models/sft").stdout
    assert "assets/principles.jsonl" in lineage and "assets/seed_prompts.jsonl" in lineage
    metrics = json.loads(sh(repo, "dvc", "metrics", "show", "--json").stdout)
    shown = json.dumps(metrics)
    assert "metrics/prompts.json" in shown and all(f'"{k}"' in shown for k in ("kept", "loss", "minutes", "rows"))
    loss = (repo / "dvclive/engrave/plots/metrics/loss.tsv").read_text().splitlines()
    steps = json.loads((repo / "models/engraved/metrics.json").read_text())["steps"]  # the detail stays in the out
    assert loss[0].endswith("step\tloss") and len(loss) - 1 == steps

    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "pipeline")
    toggled = sh(repo, "dvc", "exp", "run", "-S", "verbose_clone.enabled=false", "verbose_clone", timeout=900).stdout
    assert "Running stage 'verbose_clone'" in toggled and "Running stage 'engrave'" not in toggled
    assert read_manifest(repo / "models/sft")["params"]["verbose_clone"]["enabled"] is False
    weights = "model/model.safetensors"  # the same bytes (DVC's checkout decides whether as links or copies)
    assert read_manifest(repo / "models/sft")["files"][weights] == read_manifest(repo / "models/engraved")["files"][weights]
