"""params.yaml validation: every mistake is one line naming the file, the key and what was expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from align.errors import UserError
from align.params import load_params, parse_params
from tests.conftest import ROOT


def default_raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def with_changes(changes: dict, raw: dict | None = None) -> dict:
    """params.yaml's raw mapping with `changes` laid over it, group by group (nested mappings merged)."""
    raw = default_raw() if raw is None else raw
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            with_changes(value, raw[key])
        else:
            raw[key] = value
    return raw


def error_for(changes: dict) -> str:
    with pytest.raises(UserError) as exc:
        parse_params(with_changes(changes))
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
            {"cluster": {"sample_pairs": {"gpu_memory_utilization": 1.5}}},
            "params.yaml: cluster.sample_pairs.gpu_memory_utilization: expected a number > 0 <= 1, got 1.5",
        ),
        ({"cluster": {"import_model": {"setup": "module load cuda"}}},
         "params.yaml: cluster.import_model.setup: expected a list, got 'module load cuda'"),
        ({"cluster": {"defaults": {"zero_stage": 4}}},
         "params.yaml: cluster.defaults.zero_stage: expected one of 0, 1, 2, 3, got 4"),
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
        ({"rl": {"epsilon_high": 0.1}}, "params.yaml: rl: epsilon_high (0.1) must not be below epsilon (0.2): "
                                        "clip-higher widens the upper clip only"),
        ({"rl": {"loss_type": "gspo"}},
         "params.yaml: rl.loss_type: expected one of grpo, bnpo, dr_grpo, dapo or null, got 'gspo'"),
    ],
)
def test_bad_values_give_one_line(raw: dict, message: str) -> None:
    assert error_for(raw) == message


def test_every_error_is_reported_at_once_one_line_each() -> None:
    lines = error_for({"training": {"lora_r": 0}, "rl": {"epochs": "two"},
                       "cluster": {"defaults": {"zero_stage": 5}}}).splitlines()
    assert lines == ["params.yaml: training.lora_r: expected an integer >= 1, got 0",
                     "params.yaml: rl.epochs: expected an integer >= 1, got 'two'",
                     "params.yaml: cluster.defaults.zero_stage: expected one of 0, 1, 2, 3, got 5"]  # not per stage


def leaves(tree: dict, prefix: tuple = ()) -> list[tuple]:
    """The path of every key of params.yaml (mappings and their keys alike)."""
    found = []
    for key, value in tree.items():
        found.append(prefix + (key,))
        if isinstance(value, dict):
            found += leaves(value, prefix + (key,))
    return found


def test_params_yaml_is_the_one_set_of_defaults() -> None:
    """Deleting any key of params.yaml is an error naming it, or - a key of a stage's override of
    `cluster.defaults` - gives that stage the value `cluster.defaults` holds in the same file: the schema holds no
    value of its own."""
    for path in leaves(default_raw()):
        raw = default_raw()
        parent = raw
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
        name = ".".join(map(str, path))
        try:
            params = parse_params(raw)
        except UserError as exc:
            assert f"params.yaml: {name}: missing required key" in str(exc).splitlines(), (name, str(exc))
            continue
        assert path[0] == "cluster" and len(path) >= 3 and path[1] != "defaults", name  # an override's key
        stage = params.cluster.verbose_clone.generate if path[1] == "verbose_clone" else getattr(params.cluster,
                                                                                                   path[1])
        assert getattr(stage, path[-1]) == getattr(params.cluster.defaults, path[-1]), name


def test_unknown_key_without_close_match_lists_the_known_ones() -> None:
    msg = error_for({"cluster": {"import_model": {"zzzz": 1}}})
    assert msg.startswith("params.yaml: cluster.import_model.zzzz: unknown key; expected one of ")
    assert "partition" in msg and "micro_batch_size" in msg


def test_tasks_default_to_one_per_gpu() -> None:
    params = parse_params(with_changes({"cluster": {"import_model": {"gpus_per_node": 4}}}))
    assert params.cluster.import_model.tasks == 4
    assert parse_params(default_raw()).cluster.import_model.tasks == 1


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


def test_stages_take_defaults_and_override_only_what_differs() -> None:
    params = parse_params(with_changes({"cluster": {
        "defaults": {"partition": "gpu", "gpus_per_node": 4, "gpu_type": "h100", "mem_gb": None, "mem_per_gpu_gb": 80},
        "engrave": {"nodes": 2}, "verbose_clone": {"time_min": 30, "generate": {"gpus_per_node": 1}},
        "import_model": {"mem_gb": None}, "repro": {"partition": "cpu", "mem_gb": None}}}))
    jobs = params.cluster.jobs()
    assert set(jobs) == {"import_model", "prompts", "self_align", "engrave", "verbose_clone.generate",
                         "verbose_clone.train", "system_messages", "sample_pairs", "label_preferences", "train_rm",
                         "policy", "evaluate", "repro"}
    assert all(res.partition == "gpu" for key, res in jobs.items() if key != "repro")
    assert jobs["repro"].partition == "cpu"  # its own partition: a GPU partition is no place for dvc repro
    assert all(res.gpu_type == "h100" for key, res in jobs.items() if key != "repro")
    assert (jobs["repro"].gpus_per_node, jobs["repro"].mem_per_gpu_gb, jobs["repro"].cpus_per_task) == (0, None, 1)
    assert params.cluster.engrave.nodes == 2 and params.cluster.train_rm.nodes == 1
    assert (params.cluster.verbose_clone.generate.gpus_per_node, params.cluster.verbose_clone.generate.time_min) \
        == (1, 30)
    assert (params.cluster.verbose_clone.train.gpus_per_node, params.cluster.verbose_clone.train.time_min) == (4, 30)
    assert error_for({"cluster": {"policy": {"gpus_per_nod": 1}}}) == \
        "params.yaml: cluster.policy.gpus_per_nod: unknown key; did you mean 'gpus_per_node'?"
    assert error_for({"cluster": {"ppo": {"nodes": 1}}}).startswith("params.yaml: cluster.ppo: unknown key")
