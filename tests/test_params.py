"""params.yaml validation: every mistake is one line naming the file, the key and what was expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from align.errors import UserError
from align.generation import one_task
from align.params import Params, load_params, parse_params
from tests.conftest import ROOT


def error_for(raw: dict) -> str:
    with pytest.raises(UserError) as exc:
        parse_params(raw)
    return str(exc.value)


def test_project_params_file_is_valid() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.cluster.executor == "auto"
    assert params.model.base == "embedded"


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            {"cluster": {"import_model": {"gpus_per_node": "two"}}},
            "params.yaml: cluster.import_model.gpus_per_node: expected an integer >= 0, got 'two'",
        ),
        (
            {"cluster": {"import_model": {"gpus_per_node": -1}}},
            "params.yaml: cluster.import_model.gpus_per_node: expected an integer >= 0, got -1",
        ),
        (
            {"cluster": {"import_model": {"gpus_per_nod": 2}}},
            "params.yaml: cluster.import_model.gpus_per_nod: unknown key; did you mean 'gpus_per_node'?",
        ),
        ({"modle": {}}, "params.yaml: modle: unknown key; did you mean 'model'?"),
        (
            {"cluster": {"executor": "pbs"}},
            "params.yaml: cluster.executor: expected one of auto, slurm, local, inline, got 'pbs'",
        ),
        (
            {"generation": {"gpu_memory_utilization": 1.5}},
            "params.yaml: generation.gpu_memory_utilization: expected a number > 0 <= 1, got 1.5",
        ),
        ({"cluster": {"import_model": {"setup": "module load cuda"}}},
         "params.yaml: cluster.import_model.setup: expected a list, got 'module load cuda'"),
        ({"training": {"zero_stage": 4}}, "params.yaml: training.zero_stage: expected one of 0, 1, 2, 3, got 4"),
        ({"cluster": {"engrave": {"time_min": 1}}},
         "params.yaml: cluster.engrave: signal_delay_s (120) must be shorter than time_min (1 min = 60 s): the job "
         "would be signalled at its start"),
        ({"cluster": {"import_model": {"partition": ""}}},
         "params.yaml: cluster.import_model.partition: expected a string of length >= 1, got ''"),
        ({"training": {"lora_targets": "q_proj"}},  # PEFT would read one string as a regular expression
         "params.yaml: training.lora_targets: expected 'all-linear' or a list of module names, got 'q_proj'"),
        ({"training": {"lora_targets": []}},
         "params.yaml: training.lora_targets: expected 'all-linear' or a list of module names, got []"),
        ({"rm": {"label_rule": "vote"}}, "params.yaml: rm.label_rule: expected one of dominant, majority, got 'vote'"),
        ({"dpo": {"label_noise": 0.5}}, "params.yaml: dpo.label_noise: expected a number >= 0 < 0.5, got 0.5"),
    ],
)
def test_bad_values_give_one_line(raw: dict, message: str) -> None:
    assert error_for(raw) == message


def test_unknown_key_without_close_match_lists_the_known_ones() -> None:
    msg = error_for({"cluster": {"import_model": {"zzzz": 1}}})
    assert msg.startswith("params.yaml: cluster.import_model.zzzz: unknown key; expected one of partition, nodes,")


def test_defaults_fill_missing_groups() -> None:
    params = parse_params({"seed": 3})
    assert params.seed == 3 and params.cluster.import_model.tasks == 1
    assert Params().cluster.import_model.partition is None  # the cluster's default partition


def test_tasks_default_to_one_per_gpu() -> None:
    params = parse_params({"cluster": {"import_model": {"gpus_per_node": 4}}})
    assert params.cluster.import_model.tasks == 4


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("model:\n  base: [unclosed\n")
    with pytest.raises(UserError, match=r"params.yaml: line \d+: not valid YAML"):
        load_params(bad)
    with pytest.raises(UserError, match="file not found"):
        load_params(tmp_path / "nope.yaml")


def test_stage_with_bad_params_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["cluster"]["import_model"]["gpus_per_node"] = "two"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "stages.import_model"], cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "params.yaml: cluster.import_model.gpus_per_node: expected an integer >= 0, got 'two'"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_missing_model_folder_exits_2(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"]["base"] = str(tmp_path / "no-such-model")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "stages.import_model"], cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"params.yaml: model.base: {tmp_path / 'no-such-model'} not found; expected 'embedded', a local HF folder or a hub id"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_hub_id_offline_fails_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from align.models import resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"^params.yaml: model.base: 'HuggingFaceTB/SmolLM2-135M' is a hub id and the hub is not reachable"):
        resolve_model("HuggingFaceTB/SmolLM2-135M")


def readme_examples() -> list[dict]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Examples: a 7B and a 70B base on 8-GPU nodes", 1)[1].split("\n## ", 1)[0]
    return [yaml.safe_load(block.split("```", 1)[0]) for block in section.split("```yaml\n")[1:]]


def test_the_readme_gpu_examples_are_complete_params() -> None:
    """The README's 7B and 70B blocks parse under the schema and give every stage's job what it needs: GPUs (but
    the import), one task per node for generation, one per GPU for training (they cannot run here)."""
    small, large = (parse_params(raw, "README.md") for raw in readme_examples())
    for params in (small, large):
        assert params.model.dtype == "bfloat16" and params.training.precision == "bf16"
        assert not params.generation.enforce_eager and params.cluster.executor == "slurm"
        jobs = params.cluster.jobs()
        assert all(res.gpus_per_node == 8 for key, res in jobs.items() if key not in ("import_model", "repro"))
        assert jobs["repro"].gpus_per_node == 0 and jobs["repro"].gpu_type is None  # dvc repro's own job: CPU
        assert jobs["import_model"].gpus_per_node == 0 and jobs["import_model"].time_min >= 60
        for key in ("prompts", "self_align", "verbose_clone.generate", "sample_pairs", "label_preferences", "evaluate"):
            assert one_task(jobs[key], key).tasks == 1
        assert jobs["engrave"].tasks == 8
    assert small.training.zero_stage == 2 and small.generation.tensor_parallel_size == 1
    assert large.training.zero_stage == 3 and large.generation.tensor_parallel_size == 8
    assert large.cluster.engrave.nodes == large.cluster.policy.nodes == 2 and large.policy.algorithm == "dpo"
    assert large.cluster.verbose_clone.train.nodes == 2 and large.cluster.verbose_clone.generate.nodes == 1
    with pytest.raises(UserError, match=r"^params.yaml: cluster.engrave: a generation job runs as one task"):
        one_task(large.cluster.engrave, "engrave")


def test_stages_take_defaults_and_override_only_what_differs() -> None:
    params = parse_params({"cluster": {"defaults": {"partition": "gpu", "gpus_per_node": 4, "gpu_type": "h100",
                                                    "mem_gb": None, "mem_per_gpu_gb": 80},
                                       "engrave": {"nodes": 2},
                                       "verbose_clone": {"time_min": 30, "generate": {"gpus_per_node": 1}}}})
    jobs = params.cluster.jobs()
    assert set(jobs) == {"import_model", "prompts", "self_align", "engrave", "verbose_clone.generate",
                         "verbose_clone.train", "system_messages", "sample_pairs", "label_preferences", "train_rm",
                         "policy", "evaluate", "repro"}
    assert all(res.partition == "gpu" for res in jobs.values())
    assert all(res.gpu_type == "h100" for key, res in jobs.items() if key != "repro")
    assert (jobs["repro"].gpus_per_node, jobs["repro"].mem_per_gpu_gb, jobs["repro"].cpus_per_task) == (0, None, 1)
    assert params.cluster.engrave.nodes == 2 and params.cluster.train_rm.nodes == 1
    assert (params.cluster.verbose_clone.generate.gpus_per_node, params.cluster.verbose_clone.generate.time_min) \
        == (1, 30)
    assert (params.cluster.verbose_clone.train.gpus_per_node, params.cluster.verbose_clone.train.time_min) == (4, 30)
    assert error_for({"cluster": {"policy": {"gpus_per_nod": 1}}}) == \
        "params.yaml: cluster.policy.gpus_per_nod: unknown key; did you mean 'gpus_per_node'?"
    assert error_for({"cluster": {"ppo": {"nodes": 1}}}).startswith("params.yaml: cluster.ppo: unknown key")
