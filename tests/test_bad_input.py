"""Bad input, one table: every malformed params.yaml, asset or benchmark file must stop the stage that reads it
before it loads a model, hashes an input, submits a job or writes anything - exit 2, one line on stderr naming the
file and the key or line, nothing on stdout, and every previous out byte for byte as it was.

Each row runs the real stage command (`python -m stages.<stage>`, as `dvc repro` does) in a project folder that
already holds outs, metrics and benchmark files; the whole tree is hashed before and after. The cheapest stage that
reads an input is the one that runs it. Below the table: scheduler strings that must never reach a job script,
model code that must not run without `model.trust_remote_code`, and no pickle loads in stages/.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import blake3
import pytest
import yaml

from align.params import parse_params
from tests.conftest import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
Mutate = Callable[[Path], None]

# ------------------------------------------------------------------------------------------ the project folder

STAGES = ("benchmarks", "import_model", "prompts", "self_align", "engrave", "verbose_clone", "system_messages", "sample_pairs",
          "label_preferences", "train_rm", "policy", "evaluate")
MODEL_FILES = {"config.json": '{"model_type": "llama", "dtype": "float32"}\n', "model.safetensors": b"\x00" * 256,
               "tokenizer.json": "{}\n"}
OUTS: dict[str, dict[str, Any]] = {  # out folder -> {file: content}: placeholders the rows must leave alone
    "models/base": MODEL_FILES,
    "models/engraved": {**{f"model/{k}": v for k, v in MODEL_FILES.items()}, "adapter/adapter_config.json": "{}\n",
                        "metrics.json": '{"loss_last": 1.5}\n'},
    "models/sft": {**{f"model/{k}": v for k, v in MODEL_FILES.items()}, "metrics.json": '{"verbose_clone": false}\n'},
    "models/rm": {"adapter/adapter_model.safetensors": b"\x01" * 64, "metrics.json": '{"accuracy": 0.6}\n'},
    "models/policy": {**{f"model/{k}": v for k, v in MODEL_FILES.items()}, "metrics.json": '{"reward": 0.1}\n'},
    "data/prompts": {"prompts.jsonl": '{"id": "seed-001", "text": "Hi?", "source": "seed"}\n',
                     "metrics.json": '{"kept": 1}\n'},
    "data/self_align": {"sft.jsonl": '{"id": "seed-001", "prompt": "Hi?", "answer": "Hello."}\n',
                        "metrics.json": '{"kept": 1}\n'},
    "data/system_messages": {"train.jsonl": "", "eval.jsonl": "", "metrics.json": '{"enabled": false}\n'},
    "data/pairs": {"pairs.jsonl": '{"id": "p1", "prompt": "Hi?", "response_a": "A", "response_b": "B"}\n',
                   "metrics.json": '{"pairs": 1}\n'},
    "data/preferences": {"preferences.jsonl": '{"id": "p1"}\n', "metrics.json": '{"pairs": 1}\n'},
    "data/benchmarks": {"hhh_alignment/harmless/task.json": '{"examples": []}\n', "metrics.json": '{"hhh": {}}\n'},
    "data/evaluation": {"answers/base.jsonl": '{"question_id": 81}\n', "metrics.json": '{"base": {}}\n',
                        "plot.json": "[]\n"},
}
HHH = {"examples": [{"input": "\nHuman: Hi\n\nAssistant:", "target_scores": {"Hello!": 1, "Go away.": 0}},
                    {"input": "\nHuman: 2+2?\n\nAssistant:", "target_scores": {"4": 1, "5": 0}}]}
TQA_CSV = ("Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
           "Adversarial,Misconceptions,Do seeds grow in you?,No,No; They pass through,Yes,https://example.org\n"
           "Adversarial,Fiction,Are vampires real?,No,No; They are fiction,Yes; Some are,https://example.org\n")
MT_BENCH = ('{"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now in French."]}\n'
            '{"question_id": 82, "category": "math", "turns": ["What is 2+2?"]}\n')
BENCHMARKS = {"benchmarks/hhh_alignment/harmless/task.json": json.dumps(HHH),
              "benchmarks/truthfulqa/task_mc.json": json.dumps(HHH),
              "benchmarks/truthfulqa/TruthfulQA_part1.csv": TQA_CSV,
              "benchmarks/mt_bench/question.jsonl": MT_BENCH}


def write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


def make_project(cwd: Path) -> Path:
    """params.yaml (the repository's, run inline so that nothing can reach a cluster, benchmark sources in the
    project), assets/, a finished out with its MANIFEST.json for every stage, metrics/ and dvclive/ files."""
    from align.artifacts import MANIFEST, hash_tree

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["cluster"]["executor"] = "inline"
    raw["benchmarks"].update(hhh="benchmarks/hhh_alignment", truthfulqa_mc="benchmarks/truthfulqa/task_mc.json",
                             truthfulqa_csv="benchmarks/truthfulqa/TruthfulQA_part1.csv",
                             mt_bench="benchmarks/mt_bench/question.jsonl")
    write(cwd / "params.yaml", yaml.safe_dump(raw, sort_keys=False))
    for asset in (ROOT / "assets").iterdir():
        write(cwd / "assets" / asset.name, asset.read_bytes())
    for out, files in OUTS.items():
        for name, content in files.items():
            write(cwd / out / name, content)
        manifest = {"stage": out, "files": hash_tree(cwd / out), "inputs": {}, "params": {},
                    "code": {"commit": None, "dirty": None}}
        write(cwd / out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for stage in STAGES:
        write(cwd / "metrics" / f"{stage}.json", json.dumps({"wall_seconds": 1.0, "stage": stage}) + "\n")
    write(cwd / "metrics/evaluate_plot.json", "[]\n")
    write(cwd / "dvclive/engrave/plots/metrics/loss.tsv", "step\tloss\n0\t2.5\n")
    for name, content in BENCHMARKS.items():
        write(cwd / name, content)
    return cwd


def snapshot(root: Path) -> dict[str, str]:
    """Every file's blake3 and every folder, hidden ones included, by path under `root`."""
    tree = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            tree[os.path.relpath(os.path.join(folder, name), root) + "/"] = "folder"
        for name in files:
            path = os.path.join(folder, name)
            tree[os.path.relpath(path, root)] = blake3.blake3(Path(path).read_bytes()).hexdigest()
    return tree


# ------------------------------------------------------------------------------------------ mutations


UNSET = object()  # `params` deletes a key given this value, as a user deleting its line would


def params(changes: dict[str, Any]) -> Mutate:
    """Set dotted keys in params.yaml (a key that does not exist yet is added, as a typo would be)."""
    def mutate(cwd: Path) -> None:
        raw = yaml.safe_load((cwd / "params.yaml").read_text())
        for dotted, value in changes.items():
            *parents, last = dotted.split(".")
            node = raw
            for key in parents:
                node = node.setdefault(key, {})
            if value is UNSET:
                del node[last]
            else:
                node[last] = value
        (cwd / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return mutate


def content(rel: str, text: str | bytes) -> Mutate:
    return lambda cwd: write(cwd / rel, text)


def line(rel: str, number: int, text: str) -> Mutate:
    """Replace line `number` (1-based; one past the end appends)."""
    def mutate(cwd: Path) -> None:
        lines = (cwd / rel).read_text(encoding="utf-8").splitlines()
        lines[number - 1 : number] = [text]
        (cwd / rel).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return mutate


def delete(rel: str) -> Mutate:
    return lambda cwd: (cwd / rel).unlink()


def both(*mutations: Mutate) -> Mutate:
    def mutate(cwd: Path) -> None:
        for m in mutations:
            m(cwd)
    return mutate


def custom_code_model(cwd: Path) -> Path:
    """cwd/custom_model: a config that maps an unknown model type to the folder's own Python file, which writes
    cwd/CODE_RAN when imported."""
    folder = cwd / "custom_model"
    write(folder / "config.json", json.dumps({"model_type": "marker_lm", "architectures": ["MarkerLM"],
                                              "auto_map": {"AutoConfig": "marker.MarkerConfig",
                                                           "AutoModelForCausalLM": "marker.MarkerLM"}}))
    write(folder / "marker.py", f"from pathlib import Path\nPath({str(cwd / 'CODE_RAN')!r}).write_text('ran')\n")
    return folder


def space_value(dimension: str, n: int) -> str:
    return json.dumps({"id": f"extra{n}", "dimension": dimension, "name": "X", "request": "Do x.",
                       "description": "The response does x."})


PRINCIPLE = {"id": 99, "name": "late", "definition": "Something."}
PREFERENCE = {"id": "late", "name": "Late", "definition": "The response is late.", "negation": "It is early."}
SPACE = "assets/preference_space.jsonl"
ASSET = "assets/"
BENCH = "benchmarks/"
TQA_HEADER = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source"

# ------------------------------------------------------------------------------------------ the table

PARAMS_ROWS = [
    ("unknown-top-level-key", params({"modle.base": "x"}), "params.yaml: modle: unknown key; did you mean 'model'?"),
    ("unknown-nested-key", params({"cluster.import_model.gpus_per_nod": 2}),
     "params.yaml: cluster.import_model.gpus_per_nod: unknown key; did you mean 'gpus_per_node'?"),
    ("wrong-type", params({"cluster.import_model.gpus_per_node": "two"}),
     "params.yaml: cluster.import_model.gpus_per_node: expected an integer >= 0, got 'two'"),
    ("negative-gpus", params({"cluster.train_rm.gpus_per_node": -1}),
     "params.yaml: cluster.train_rm.gpus_per_node: expected an integer >= 0, got -1"),
    ("zero-nodes", params({"cluster.engrave.nodes": 0}),
     "params.yaml: cluster.engrave.nodes: expected an integer >= 1, got 0"),
    ("out-of-range", params({"cluster.sample_pairs.gpu_memory_utilization": 1.5}),
     "params.yaml: cluster.sample_pairs.gpu_memory_utilization: expected a number > 0 <= 1, got 1.5"),
    ("bad-literal", params({"cluster.executor": "pbs"}),
     "params.yaml: cluster.executor: expected one of auto, slurm, local, inline, got 'pbs'"),
    ("partition-semicolon", params({"cluster.import_model.partition": "gpu; rm -rf /"}),
     "params.yaml: cluster.import_model.partition: 'gpu; rm -rf /' is not a valid SLURM partition; allowed: "
     "letters, digits and _ . - + : (a list: comma-separated)"),
    ("partition-space", params({"cluster.prompts.partition": "gpu a"}),
     "params.yaml: cluster.prompts.partition: 'gpu a' is not a valid SLURM partition; allowed: letters, digits "
     "and _ . - + : (a list: comma-separated)"),
    ("partition-subshell", params({"cluster.policy.partition": "$(id)"}),
     "params.yaml: cluster.policy.partition: '$(id)' is not a valid SLURM partition; allowed: letters, digits and "
     "_ . - + : (a list: comma-separated)"),
    ("partition-newline", params({"cluster.defaults.partition": "gpu\n#SBATCH --uid=0"}),
     "params.yaml: cluster.defaults.partition: 'gpu\\n#SBATCH --uid=0' is not a valid SLURM partition; allowed: "
     "letters, digits and _ . - + : (a list: comma-separated)"),
    ("account-backtick", params({"cluster.train_rm.account": "proj`id`"}),
     "params.yaml: cluster.train_rm.account: 'proj`id`' is not a valid SLURM account; allowed: letters, digits "
     "and _ . - + :"),
    ("qos-quote", params({"cluster.evaluate.qos": "normal' --uid=0 '"}),
     "params.yaml: cluster.evaluate.qos: \"normal' --uid=0 '\" is not a valid SLURM qos; allowed: letters, "
     "digits and _ . - + :"),
    ("constraint-dollar", params({"cluster.engrave.constraint": "a100&$HOME"}),
     "params.yaml: cluster.engrave.constraint: 'a100&$HOME' is not a valid SLURM constraint; allowed: letters, "
     "digits, _ . - + : , and & | [ ] * ( )"),
    ("setup-newline", params({"cluster.train_rm.setup": ["module load cuda/12.4", "true\nrm -rf ~"]}),
     "params.yaml: cluster.train_rm.setup: item 2 ('true\\nrm -rf ~') is not one line; each setup entry must be "
     "a single shell line (no newline, carriage return or NUL): split it into list items"),
    ("setup-nul", params({"cluster.import_model.setup": ["export A=1\x00"]}),
     "params.yaml: cluster.import_model.setup: item 1 ('export A=1\\x00') is not one line; each setup entry "
     "must be a single shell line (no newline, carriage return or NUL): split it into list items"),
    ("setup-not-a-list", params({"cluster.import_model.setup": "module load cuda"}),
     "params.yaml: cluster.import_model.setup: expected a list, got 'module load cuda'"),
    ("sbatch-value-space", params({"cluster.engrave.sbatch": {"gres-flags": "enforce binding"}}),
     "params.yaml: cluster.engrave.sbatch: gres-flags: 'enforce binding' is not a plain sbatch value; allowed: "
     "letters, digits and _ . , : = @ / + % # [ ] - (no spaces or shell syntax)"),
    ("sbatch-own-key", params({"cluster.defaults.sbatch": {"partition": "gpu"}}),
     "params.yaml: cluster.defaults.sbatch: 'partition' is set from its own key (or by the submission layer); use "
     "that key"),
    ("srun-semicolon", params({"cluster.policy.srun_args": ["--mpi=pmix;id"]}),
     "params.yaml: cluster.policy.srun_args: item 1 ('--mpi=pmix;id') is not a plain srun argument; allowed: "
     "letters, digits and _ . , : = @ / + % # [ ] - (no spaces or shell syntax: one word per list item)"),
    ("python-subshell", params({"cluster.defaults.python": ["apptainer", "exec", "$(id).sif", "python"]}),
     "params.yaml: cluster.defaults.python: item 3 ('$(id).sif') is not a plain command word; allowed: letters, "
     "digits and _ . , : = @ / + % # [ ] - (no spaces or shell syntax: one word per list item)"),
    ("mem-both", params({"cluster.train_rm.mem_per_gpu_gb": 80, "cluster.train_rm.gpus_per_node": 4}),
     "params.yaml: cluster.train_rm: mem_gb and mem_per_gpu_gb are both set; sbatch takes one: set mem_gb: null"),
    ("log-dir-newline", params({"cluster.log_dir": "logs\nx"}),
     "params.yaml: cluster.log_dir: 'logs\\nx' is not one line; expected a folder path without newline, carriage "
     "return or NUL"),
    ("rl-step-not-dividing-rollout", params({"rl.step_batch_size": 3}),
     "params.yaml: rl: step_batch_size (3) must divide rollout_batch_size (8)"),
    ("rl-step-bigger-than-rollout", params({"rl.step_batch_size": 16}),
     "params.yaml: rl: step_batch_size (16) must not exceed rollout_batch_size (8)"),
    ("deleted-key", params({"training.lora_r": UNSET}), "params.yaml: training.lora_r: missing required key"),
    ("machine-shots-above-shots", params({"prompts.machine_shots": 9}),
     "params.yaml: prompts: machine_shots (9) must not exceed shots (6)"),
    ("trust-remote-code-not-bool", params({"model.trust_remote_code": "maybe"}),
     "params.yaml: model.trust_remote_code: expected true or false, got 'maybe'"),
    ("invalid-yaml", content("params.yaml", "model:\n  base: [embedded\nseed: 0\n"),
     "params.yaml: line 3: not valid YAML (expected ',' or ']', but got ':')"),
    ("top-level-list", content("params.yaml", "- model\n- seed\n"),
     "params.yaml: expected a mapping of parameter groups at the top level, got list"),
    ("not-utf8", content("params.yaml", b"seed: 0\nmodel:\n  base: caf\xe9\n"), "params.yaml: line 3: not UTF-8 text"),
    ("missing-file", delete("params.yaml"), "params.yaml: file not found (run stages from the project root)"),
    ("model-base-missing", params({"model.base": "no-such-model"}),
     "params.yaml: model.base: no-such-model not found; expected 'embedded', a local HF folder or a hub id"),
    ("model-with-own-code", lambda cwd: params({"model.base": str(custom_code_model(cwd))})(cwd),
     "params.yaml: model.base: <project>/custom_model/config.json: model_type 'marker_lm' needs the Python files "
     "the folder ships (auto_map); set model.trust_remote_code: true to run them, only for code you trust"),
]
ASSET_ROWS = [
    ("self_align", "principles-not-json", line(f"{ASSET}principles.jsonl", 3, '{"id": 3, "name": "x"'),
     "assets/principles.jsonl: line 3: not valid JSON (Expecting ',' delimiter)"),
    ("self_align", "principles-not-an-object", line(f"{ASSET}principles.jsonl", 17, "[1, 2]"),
     "assets/principles.jsonl: line 17: expected a JSON object, got list"),
    ("self_align", "principles-missing-key", line(f"{ASSET}principles.jsonl", 2, '{"id": 2, "name": "x"}'),
     "assets/principles.jsonl: line 2: definition: field required"),
    ("self_align", "principles-wrong-type",
     line(f"{ASSET}principles.jsonl", 17, json.dumps({**PRINCIPLE, "id": "seventeen"})),
     "assets/principles.jsonl: line 17: id: input should be a valid integer, unable to parse string as an integer"),
    ("self_align", "principles-duplicate-id", line(f"{ASSET}principles.jsonl", 17, json.dumps({**PRINCIPLE, "id": 4})),
     "assets/principles.jsonl: line 17: id 4 appears more than once (first on line 4)"),
    ("self_align", "principles-empty", content(f"{ASSET}principles.jsonl", "\n"),
     "assets/principles.jsonl: empty; expected one JSON object per line"),
    ("self_align", "principles-missing", delete(f"{ASSET}principles.jsonl"), "assets/principles.jsonl: file not found"),
    ("self_align", "exemplars-empty-answer",
     line(f"{ASSET}exemplars.jsonl", 5, '{"id": 5, "query": "q", "thoughts": "t", "answer": ""}'),
     "assets/exemplars.jsonl: line 5: answer: string should have at least 1 character"),
    ("prompts", "seed-prompts-unknown-key",
     line(f"{ASSET}seed_prompts.jsonl", 151, '{"id": "s", "category": "c", "text": "t", "colour": "red"}'),
     "assets/seed_prompts.jsonl: line 151: colour: extra inputs are not permitted"),
    ("prompts", "seed-prompts-not-utf8",
     content(f"{ASSET}seed_prompts.jsonl", b'{"id": "s", "category": "c",\n"\xff"}\n'),
     "assets/seed_prompts.jsonl: line 2: not UTF-8 text"),
    ("prompts", "question-types-wrong-type",
     line(f"{ASSET}tgrt_question_types.jsonl", 20, '{"id": "t", "name": ["x"], "description": "d"}'),
     "assets/tgrt_question_types.jsonl: line 20: name: input should be a valid string"),
    ("label_preferences", "principle-without-negation",
     line(f"{ASSET}preference_principles.jsonl", 16, json.dumps({k: v for k, v in PREFERENCE.items()
                                                                if k != "negation"})),
     "assets/preference_principles.jsonl: line 16: negation: field required"),
    ("label_preferences", "judge-template-missing-placeholder",
     content(f"{ASSET}judge_prompt.txt", "{instruction}\n{output_a}\n{output_b}\nAnswer: Output ("),
     "assets/judge_prompt.txt: placeholder {principle} must appear exactly once, found 0"),
    ("label_preferences", "judge-template-unknown-placeholder",
     content(f"{ASSET}judge_prompt.txt", "{instruction} {output_a} {output_b} {output_c} {principle}"),
     "assets/judge_prompt.txt: placeholder {output_c} is not one of {instruction}, {output_a}, {output_b}, "
     "{principle} (write {{ or }} for a literal brace)"),
    ("label_preferences", "judge-template-stray-brace",
     content(f"{ASSET}judge_prompt.txt", "{instruction} {output_a} {output_b} {principle} :-}"),
     "assets/judge_prompt.txt: Single '}' encountered in format string (write {{ or }} for a literal brace)"),
    ("label_preferences", "preference-space-unknown-dimension",
     line(SPACE, 25, space_value("tone", 1)),
     "assets/preference_space.jsonl: line 25: dimension: input should be 'style', 'background', 'informativeness' "
     "or 'harmlessness'"),
    ("system_messages", "preference-space-five-values",
     both(params({"system_messages.enabled": True}), line(SPACE, 1, "")),
     "assets/preference_space.jsonl: dimension 'style' has 5 values; expected at least 6"),
    ("train_rm", "preference-space-duplicate-id", line(SPACE, 25, space_value("style", 1).replace("extra1", "formal")),
     "assets/preference_space.jsonl: line 25: id 'formal' appears more than once (first on line 1)"),
    ("train_rm", "rm-template-missing-placeholder",
     content(f"{ASSET}rm_prompt.txt", "{principles}\n{instruction}\nScore:"),
     "assets/rm_prompt.txt: placeholder {response} must appear exactly once, found 0"),
    ("policy", "ppo-principles-missing-negation",
     line(f"{ASSET}ppo_principles.jsonl", 3, '{"id": "x", "name": "X", "definition": "d"}'),
     "assets/ppo_principles.jsonl: line 3: negation: field required"),
    ("policy", "guard-principles-empty", content(f"{ASSET}guard_principles.jsonl", ""),
     "assets/guard_principles.jsonl: empty; expected one JSON object per line"),
    ("policy", "dpo-preference-space-not-json", both(params({"policy.algorithm": "dpo"}), line(SPACE, 4, "{")),
     "assets/preference_space.jsonl: line 4: not valid JSON (Expecting property name enclosed in double quotes)"),
    ("verbose_clone", "verbose-instruction-empty",
     both(params({"verbose_clone.enabled": True}), content(f"{ASSET}verbose_instruction.txt", "  \n")),
     "assets/verbose_instruction.txt: empty; expected the instruction text"),
    ("evaluate", "judge-model-not-a-model", params({"evaluate.judge_model": "assets"}),
     "params.yaml: evaluate.judge_model: assets is not a Hugging Face model folder (no config.json) nor a hub id; "
     "expected null (the base model), a local HF folder or a hub id"),
]
BENCHMARK_ROWS = [
    ("benchmarks", "hhh-not-json", content(f"{BENCH}hhh_alignment/harmless/task.json", '{"examples": [}'),
     "benchmarks/hhh_alignment/harmless/task.json: not valid JSON (Expecting value at line 1)"),
    ("benchmarks", "hhh-not-an-object", content(f"{BENCH}hhh_alignment/harmless/task.json", "[]"),
     "benchmarks/hhh_alignment/harmless/task.json: expected a JSON object (a BIG-bench task), got list"),
    ("benchmarks", "hhh-missing-field",
     content(f"{BENCH}hhh_alignment/harmless/task.json",
             json.dumps({"examples": [HHH["examples"][0], {"input": "Human: x"}]})),
     "benchmarks/hhh_alignment/harmless/task.json: examples[2]: expected an input string and >= 2 target_scores"),
    ("benchmarks", "hhh-no-task", delete(f"{BENCH}hhh_alignment/harmless/task.json"),
     "benchmarks/hhh_alignment: no <subset>/task.json inside; expected the BIG-bench hhh_alignment folder"),
    ("benchmarks", "hhh-input-wrong-type",
     content(f"{BENCH}hhh_alignment/harmless/task.json",
             json.dumps({"examples": [{"input": 7, "target_scores": {"a": 1, "b": 0}}]})),
     "benchmarks/hhh_alignment/harmless/task.json: examples[1]: expected an input string and >= 2 target_scores"),
    ("benchmarks", "truthfulqa-mc-examples-not-a-list",
     content(f"{BENCH}truthfulqa/task_mc.json", json.dumps({"examples": {"input": "Q"}})),
     "benchmarks/truthfulqa/task_mc.json: examples: expected a list of examples, got dict"),
    ("benchmarks", "truthfulqa-mc-example-not-an-object",
     content(f"{BENCH}truthfulqa/task_mc.json", json.dumps({"examples": [HHH["examples"][0], "Q: why?"]})),
     "benchmarks/truthfulqa/task_mc.json: examples[2]: expected an input string and >= 2 target_scores"),
    ("benchmarks", "truthfulqa-mc-nothing-correct",
     content(f"{BENCH}truthfulqa/task_mc.json",
             json.dumps({"examples": [{"input": "Q", "target_scores": {"a": 0, "b": 0}}]})),
     "benchmarks/truthfulqa/task_mc.json: examples[1].target_scores: no choice scored 1"),
    ("benchmarks", "truthfulqa-csv-missing-column",
     content(f"{BENCH}truthfulqa/TruthfulQA_part1.csv", "Type,Category,Question,Correct Answers,Incorrect Answers\n"
                                                          "A,B,Q?,Yes,No\n"),
     "benchmarks/truthfulqa/TruthfulQA_part1.csv: line 2: column 'Best Answer' missing"),
    ("benchmarks", "truthfulqa-csv-short-row",
     line(f"{BENCH}truthfulqa/TruthfulQA_part1.csv", 3, "Adversarial,Fiction,Are vampires real?"),
     "benchmarks/truthfulqa/TruthfulQA_part1.csv: line 3: column 'Correct Answers' missing (the row has fewer "
     "fields than the header)"),
    ("benchmarks", "truthfulqa-csv-no-incorrect-answers",
     line(f"{BENCH}truthfulqa/TruthfulQA_part1.csv", 2, "A,M,Q?,No,No,,src"),
     "benchmarks/truthfulqa/TruthfulQA_part1.csv: line 2: Incorrect Answers: empty; expected the best answer and "
     ";-separated incorrect answers"),
    ("benchmarks", "truthfulqa-csv-header-only", content(f"{BENCH}truthfulqa/TruthfulQA_part1.csv", TQA_HEADER + "\n"),
     "benchmarks/truthfulqa/TruthfulQA_part1.csv: no questions; expected the TruthfulQA CSV (a header row, then one "
     "row per question)"),
    ("benchmarks", "mt-bench-not-json", line(f"{BENCH}mt_bench/question.jsonl", 2, '{"question_id": 82, "turns": ['),
     "benchmarks/mt_bench/question.jsonl: line 2: not valid JSON (Expecting value: line 1 column 31 (char 30))"),
    ("benchmarks", "mt-bench-turns-wrong-type",
     line(f"{BENCH}mt_bench/question.jsonl", 2, '{"question_id": 82, "turns": "What is 2+2?"}'),
     "benchmarks/mt_bench/question.jsonl: line 2: turns: expected a list of non-empty strings"),
    ("benchmarks", "mt-bench-duplicate-id",
     line(f"{BENCH}mt_bench/question.jsonl", 2, '{"question_id": 81, "turns": ["Again?"]}'),
     "benchmarks/mt_bench/question.jsonl: line 2: question_id: expected a unique integer or string, got 81"),
    ("benchmarks", "mt-bench-empty", content(f"{BENCH}mt_bench/question.jsonl", "\n\n"),
     "benchmarks/mt_bench/question.jsonl: empty; expected MT-Bench questions, one JSON object per line"),
    ("benchmarks", "mt-bench-missing", delete(f"{BENCH}mt_bench/question.jsonl"),
     "params.yaml: benchmarks.mt_bench: benchmarks/mt_bench/question.jsonl not found; set it to a local copy of "
     "MT-Bench's question.jsonl, or to hub:<dataset id>@<commit>"),
]
ROWS = ([pytest.param("import_model", mutate, expected, id=f"params-{name}") for name, mutate, expected in PARAMS_ROWS]
        + [pytest.param(stage, mutate, expected, id=f"assets-{name}") for stage, name, mutate, expected in ASSET_ROWS]
        + [pytest.param(stage, mutate, expected, id=f"benchmarks-{name}")
           for stage, name, mutate, expected in BENCHMARK_ROWS])


def run_stage(cwd: Path, stage: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("stage, mutate, expected", ROWS)
def test_bad_input_is_one_line_exit_2_and_touches_nothing(tmp_path: Path, stage: str, mutate: Mutate,
                                                          expected: str) -> None:
    cwd = make_project(tmp_path / "project")
    mutate(cwd)
    before = snapshot(cwd)
    assert "models/base/MANIFEST.json" in before and "metrics/evaluate.json" in before
    proc = run_stage(cwd, stage)
    assert (proc.returncode, proc.stderr.splitlines(), proc.stdout) == (
        2, [expected.replace("<project>", str(cwd))], ""), proc.stderr[-3000:]
    assert snapshot(cwd) == before  # no out, metric or input changed, nothing added (temporary folders included)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_the_table_is_spread_over_every_kind_of_input() -> None:
    assert (len(PARAMS_ROWS), len(ASSET_ROWS), len(BENCHMARK_ROWS)) >= (16, 10, 6)
    assert len(ROWS) >= 34 and len({p.id for p in ROWS}) == len(ROWS)


# ------------------------------------------------------------------------------------------ scheduler strings


@pytest.mark.parametrize("key, value", [
    ("partition", "gpu"), ("partition", "gpu,gpu-large,cpu_small"), ("partition", "a100.80gb"),
    ("account", "proj-123_ml"), ("qos", "normal+"), ("constraint", "a100|h100"),
    ("constraint", "[rack1*2&rack2*4]"), ("constraint", "(intel&avx512)|amd"), ("gpu_type", "a100"),
    ("exclude", "gpu[07-08],cpu3"), ("reservation", "maint_2026"), ("mail_type", "END,FAIL"),
    ("mail_user", "ada@uni.example"), ("srun_args", ["--mpi=pmix", "--container-image=nvcr.io#nvidia/pytorch:24.05-py3"]),
    ("python", ["apptainer", "exec", "--nv", "/shared/img.sif", "python"]), ("sbatch", {"gres-flags": "enforce-binding"}),
])
def test_ordinary_scheduler_names_pass(key: str, value: str) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["cluster"]["train_rm"][key] = value
    assert getattr(parse_params(raw).cluster.train_rm, key) == value


# ------------------------------------------------------------------------------------------ model code

LOADERS = {
    "import_model": "from align.models import ModelSource, import_model\n"
                    "import_model(ModelSource('folder', MODEL), OUT, 'float32'{extra})",
    "scorer": "from align.scoring import Scorer\nScorer(MODEL{extra})",
    "generator_hf": "from align.generation import Generator\nfrom tests.helpers import engine\n"
                    "Generator(MODEL, engine(backend='hf'){extra})",
}


def load_with_yes_on_stdin(tmp_path: Path, loader: str, extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Load the custom-code model with one of the project's loaders, in a process whose stdin answers 'y' to any
    question transformers asks; the model's own file writes CODE_RAN where it is imported."""
    code = f"MODEL, OUT = {str(custom_code_model(tmp_path))!r}, {str(tmp_path / 'out')!r}\n"
    code += LOADERS[loader].format(extra=extra)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, input="y\n", capture_output=True, text=True,
                          timeout=300, env={**ENV, "HF_HOME": str(tmp_path / "hf_home")})
    return proc, tmp_path / "CODE_RAN"


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_loaders_never_run_a_models_own_code_by_default(tmp_path: Path, loader: str) -> None:
    proc, marker = load_with_yes_on_stdin(tmp_path, loader, "")
    assert proc.returncode != 0 and "trust_remote_code" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()


def test_transformers_would_run_it_when_asked_and_answered(tmp_path: Path) -> None:
    """The check above can fail: left to transformers' default (None), the same load asks on stdin, and the 'y'
    waiting there runs the model's file."""
    proc, marker = load_with_yes_on_stdin(tmp_path, "scorer", ", trust_remote_code=None")
    assert marker.exists(), proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------ pickles


PICKLERS = ("pickle", "_pickle", "dill", "cloudpickle", "joblib")


def unsafe_loads(source: str) -> list[str]:
    """What in `source` may unpickle: an import of a pickle module, pandas read_pickle, numpy load with
    allow_pickle=True, torch.load without weights_only=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"line {node.lineno}: import {m}" for m in modules if m.split(".")[0] in PICKLERS]
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        name = node.func.attr
        kwargs = {k.arg: k.value for k in node.keywords}
        flag = {k: isinstance(v, ast.Constant) and v.value is True for k, v in kwargs.items()}
        if (owner in PICKLERS and name in ("load", "loads", "Unpickler") or name == "read_pickle"
                or owner in ("np", "numpy") and name == "load" and flag.get("allow_pickle")
                or owner == "torch" and name == "load" and not flag.get("weights_only")):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_stages_load_nothing_with_pickle() -> None:
    """Artifacts are safetensors and JSON; a torch file, where one is unavoidable, loads with weights_only=True.
    (slurm/submit.py reads submitit's own result pickle: the job transport, not an artifact.)"""
    assert sorted(unsafe_loads("import torch, pickle\ntorch.load(p)\npickle.load(f)\ntorch.load(p, weights_only=True)\n"
                               "np.load(p, allow_pickle=True)\nfrom joblib import load\n")) == [
        "line 1: import pickle", "line 2: torch.load(p)", "line 3: pickle.load(f)",
        "line 5: np.load(p, allow_pickle=True)", "line 6: import joblib"]
    found = {f"{path.parent.name}/{path.name}": unsafe_loads(path.read_text())
             for folder in ("stages", "align") for path in sorted((ROOT / folder).glob("*.py"))}
    assert {name: calls for name, calls in found.items() if calls} == {}
