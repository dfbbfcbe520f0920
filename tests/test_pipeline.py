"""`dvc repro` of the SELF-ALIGN stages on the embedded default (SmolLM2-135M, vLLM on CPU, DeepSpeed on CPU) in a
fresh git + DVC repository, with the stage sizes cut down, every stage a job on the test cluster under one GPU-site
profile; then toggling verbose cloning off with `dvc exp run -S` reruns only the stage it concerns."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from align.artifacts import read_manifest, verify_artifact
from align.precision import native_bf16
from align.records import read_jsonl
from tests.helpers import new_repo, sh

SMALL = {
    "prompts": {"num_self_instruct": 8, "requests_per_round": 8, "max_rounds": 2, "max_new_tokens": 96,
                "tgrt": {"enabled": True, "topics_per_type": 1, "questions_per_topic": 1}},
    # bf16 sampling here (auto) cut 53 of 64 answers at 192 tokens and kept 1, which verbose cloning then rejected
    "self_align": {"max_prompts": 64, "max_new_tokens": 256, "max_repeated_ngram_share": 0.5},
    "engrave": {"epochs": 1},
    "training": {"batch_size": 2},
    "verbose_clone": {"enabled": True, "max_new_tokens": 384, "epochs": 1},
}


def gpu_site_profile(log_dir: Path) -> dict:
    """A typical GPU site's `cluster` group: only `defaults` (the gpu partition, typed GPUs, their memory for the
    plan: the type is not in its table) and one override (the import needs no GPU). The test cluster's GPUs are
    placeholders with no CUDA behind them, where every GPU job rightly stops at once (test_slurm.py); the jobs'
    python is a wrapper that hides them, as a site's container command is a wrapper, so these jobs run on the CPU."""
    hide_gpus = ["env", "-u", "SLURM_GPUS_ON_NODE", "-u", "SLURM_JOB_GPUS", sys.executable]
    return {"executor": "slurm", "log_dir": str(log_dir),
            "defaults": {"partition": "gpu", "gpus_per_node": 1, "gpu_type": "placeholder", "gpu_memory_gb": 80,
                         "cpus_per_task": 2, "mem_gb": 8, "time_min": 30, "python": hide_gpus,
                         "micro_batch_size": 2, "save_every_steps": 4},
            "import_model": {"partition": "cpu", "gpus_per_node": 0, "gpu_type": None}}


@pytest.mark.slow
@pytest.mark.slurm
def test_dvc_repro_self_align_stages_on_the_embedded_model(slurm_cluster, tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo", {**SMALL, "cluster": gpu_site_profile(tmp_path / "logs")})

    run = sh(repo, "dvc", "repro", "verbose_clone", timeout=1500).stdout
    for stage in ("import_model", "prompts", "self_align", "engrave", "verbose_clone"):
        assert f"Running stage '{stage}'" in run
    for stage in ("prompts", "self_align", "engrave", "verbose_clone"):  # what sbatch was given, and ran
        scripts = [p.read_text() for p in (tmp_path / "logs" / stage).glob("*_submission.sh")]
        assert scripts and all("--partition=gpu\n" in s and "--gpus-per-node=placeholder:1\n" in s
                               for s in scripts), (stage, scripts)
    imported = [p.read_text() for p in (tmp_path / "logs/import_model").glob("*_submission.sh")]
    assert imported and "--partition=cpu\n" in imported[0] and "--gpus-per-node" not in imported[0]
    prompts = read_jsonl(repo / "data/prompts/prompts.jsonl")
    assert {"seed", "self_instruct", "tgrt"} <= {p["source"] for p in prompts}
    sft = read_jsonl(repo / "data/self_align/sft.jsonl")
    assert sft and not any("internal thoughts" in row["answer"].lower() for row in sft)
    for out in ("data/prompts", "data/self_align", "models/engraved", "models/sft"):
        verify_artifact(repo / out)
    assert read_manifest(repo / "models/sft")["params"]["verbose_clone"]["enabled"] is True
    # the default precision, auto, as the jobs resolved it on this CPU (bf16 with AMX or AVX512-BF16 units)
    bf16 = native_bf16(torch.device("cpu"))[0]
    assert read_manifest(repo / "models/base")["precision"] == {"model.dtype": "bfloat16" if bf16 else "float32"}
    assert read_manifest(repo / "models/engraved")["precision"] == {"training.precision": "bf16" if bf16 else "fp32"}
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
