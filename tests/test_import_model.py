"""Stage `import_model`: a local HF folder and the packaged SmolLM2 GGUF become a verified safetensors folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from align.artifacts import MANIFEST, verify_artifact
from tests.conftest import ROOT


def project(tmp_path: Path, **overrides) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        group, key = dotted.split("__")
        raw[group][key] = value
    raw["cluster"]["log_dir"] = str(tmp_path / "logs")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path


def folder(path: Path) -> Path:
    path.mkdir()
    return path


def run_stage(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_local_folder_through_local_executor(tmp_path: Path, tiny_model: Path) -> None:
    """Under the default `model.dtype: auto`: the folder is saved in what the job resolved it to (bf16 on a CPU with
    AMX or AVX512-BF16, as the developers' and CI's), and its manifest and log say so."""
    from safetensors import safe_open

    from align.precision import native_bf16

    cwd = project(tmp_path, model__base=str(tiny_model), cluster__executor="local")
    proc = run_stage(cwd, "stages.import_model")
    assert proc.returncode == 0, proc.stderr
    out = cwd / "models" / "base"
    artifact_id = verify_artifact(out)
    assert proc.stdout.strip() == f"import_model: models/base {artifact_id}"
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["stage"] == "import_model"
    assert manifest["params"] == {"model": {"base": str(tiny_model), "dtype": "auto"}}
    expected = "bfloat16" if native_bf16(torch.device("cpu"))[0] else "float32"
    assert manifest["precision"] == {"model.dtype": expected}
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert str(weights.get_tensor(next(iter(weights.keys()))).dtype) == f"torch.{expected}"
    log = "".join(p.read_text() for p in (cwd / "logs/import_model").glob("*_0_log.out"))
    assert f"model.dtype: auto -> {expected} (cpu" in log
    assert manifest["inputs"]["model"]["path"] == str(tiny_model)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert "submitted local job" in proc.stderr and list((cwd / "logs" / "import_model").glob("*_0_log.out"))

    lineage = run_stage(cwd, "align.lineage", "models/base")
    assert lineage.returncode == 0, lineage.stderr
    assert f"artifact {artifact_id[:16]}  stage=import_model" in lineage.stdout


def test_bfloat16_import_inline(tmp_path: Path, tiny_model: Path) -> None:
    from safetensors import safe_open

    cwd = project(tmp_path, model__base=str(tiny_model), model__dtype="bfloat16", cluster__executor="inline")
    proc = run_stage(cwd, "stages.import_model")
    assert proc.returncode == 0, proc.stderr
    with safe_open(cwd / "models/base/model.safetensors", "pt") as weights:
        assert str(weights.get_tensor(next(iter(weights.keys()))).dtype) == "torch.bfloat16"


def test_two_imports_give_the_same_id(tmp_path: Path, tiny_model: Path) -> None:
    ids = []
    for run in ("one", "two"):
        (tmp_path / run).mkdir()
        cwd = project(tmp_path / run, model__base=str(tiny_model), cluster__executor="inline")
        proc = run_stage(cwd, "stages.import_model")
        assert proc.returncode == 0, proc.stderr
        ids.append(verify_artifact(cwd / "models" / "base"))
    assert ids[0] == ids[1]


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "not-a-model").mkdir()
    cwd = project(tmp_path, model__base=str(tmp_path / "not-a-model"))
    proc = run_stage(cwd, "stages.import_model")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"params.yaml: model.base: {tmp_path / 'not-a-model'} has no config.json; expected a Hugging Face model folder"


@pytest.mark.slow
def test_embedded_smollm2_imports_answers_and_detects_corruption(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cwd = project(tmp_path, cluster__executor="local")
    proc = run_stage(cwd, "stages.import_model")
    assert proc.returncode == 0, proc.stderr
    out = cwd / "models" / "base"
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["inputs"]["model"]["path"].endswith(".gguf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = tokenizer.decode(model.generate(**prompt, max_new_tokens=20, do_sample=False)[0][prompt["input_ids"].shape[1]:])
    assert "Paris" in answer

    weights = out / "model.safetensors"
    with weights.open("r+b") as fh:
        fh.seek(weights.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    lineage = run_stage(cwd, "align.lineage", "models/base")
    assert lineage.returncode == 1
    assert lineage.stderr.strip() == f"lineage: models/base/model.safetensors: content does not match models/base/{MANIFEST} (altered after it was written)"


def test_a_base_model_without_a_chat_template_needs_one_named(tmp_path: Path, tiny_model: Path) -> None:
    """A folder with no chat template is one line at import (before any job); with `model.chat_template: plain`
    or a Jinja file, the template is saved with the tokenizer, so every later stage renders prompts with it."""
    from transformers import AutoTokenizer

    from align.models import PLAIN_TEMPLATE

    base = tmp_path / "base_model"
    shutil.copytree(tiny_model, base)
    (base / "chat_template.jinja").unlink()
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    cwd = project(folder(tmp_path / "p1"), model__base=str(base), cluster__executor="inline")
    proc = run_stage(cwd, "stages.import_model")
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [
        f"params.yaml: model.chat_template: {base} has no chat template (a base model); set model.chat_template to "
        f"a Jinja file or to `plain` (User:/Assistant: turns)"])
    assert not (cwd / "models").exists()

    cwd = project(folder(tmp_path / "p2"), model__base=str(base), model__chat_template="plain", cluster__executor="inline")
    proc = run_stage(cwd, "stages.import_model")
    assert proc.returncode == 0, proc.stderr
    tokenizer = AutoTokenizer.from_pretrained(cwd / "models/base")
    assert tokenizer.chat_template == PLAIN_TEMPLATE
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "User: Hi?\n\nAssistant:"

    jinja = tmp_path / "turns.jinja"
    jinja.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    cwd = project(folder(tmp_path / "p3"), model__base=str(base), model__chat_template=str(jinja), cluster__executor="inline")
    proc = run_stage(cwd, "stages.import_model")
    assert proc.returncode == 0, proc.stderr
    assert AutoTokenizer.from_pretrained(cwd / "models/base").chat_template == jinja.read_text()
    assert json.loads((cwd / "models/base" / MANIFEST).read_text())["inputs"]["chat_template"]["path"] == str(jinja)


def test_a_hub_model_comes_from_the_hf_cache_the_login_node_fills(tmp_path: Path, tiny_model: Path) -> None:
    """A hub id resolves on the login node to its snapshot in the HF cache (downloaded there where the hub answers;
    here offline, already cached, as a compute node would need it), which the job reads; not cached, one line."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    shutil.copytree(tiny_model, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    cwd = project(folder(tmp_path / "p"), model__base="tiny-org/tiny-llama", cluster__executor="local")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = subprocess.run([sys.executable, "-m", "stages.import_model"], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **env})
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((cwd / "models/base" / MANIFEST).read_text())
    assert manifest["inputs"]["model"]["path"] == str(repo / "snapshots" / revision)
    assert manifest["params"]["model"]["base"] == "tiny-org/tiny-llama"
    verify_artifact(cwd / "models/base")

    proc = subprocess.run([sys.executable, "-m", "stages.import_model"], cwd=project(
        folder(tmp_path / "q"), model__base="tiny-org/not-cached", cluster__executor="local"), capture_output=True,
        text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **env})
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"params.yaml: model.base: 'tiny-org/not-cached' is a hub id and the hub is not reachable from here "
        f"(offline), nor is it in the HF cache ({tmp_path / 'hub'}); use 'embedded' or a local HF folder")
