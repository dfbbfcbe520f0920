"""Stage `benchmarks`: the public evaluation sets (HHH, TruthfulQA as BIG-bench MC and as the CSV, MT-Bench
questions) read from where params.yaml says and written into data/benchmarks in the formats the loaders read,
with a manifest like every other out: `train_rm` and `evaluate` depend on a versioned artifact, a changed
benchmark reruns them, and `align.lineage` walks back to the source files. The project commits no copy.

A source (`benchmarks.<name>`) is a local file or folder in the benchmark's own published format (checked item by
item, then copied), `hub:<dataset id>@<commit>` (downloaded into the HF cache with huggingface_hub, read with
`datasets` and converted), or `auto`: ../shared/benchmarks where it exists, else the pinned hub dataset below.
It needs no model, so it runs first and in this process, not as a job: compute nodes are often offline, and a
missing source stops `dvc repro` before any model is loaded.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from align import runner
from align.artifacts import input_refs, staged_out, verify_artifact
from align.benchmarks import (
    DATA, FILES, QA_PRIMER, load_bigbench, load_hhh, load_mt_bench, load_truthfulqa_csv,
)
from align.errors import UserError
from align.params import HUB_SOURCE
from align.records import write_json

STAGE = "benchmarks"
SHARED = Path("../shared/benchmarks")  # beside a clone in CI; a user sets a path or uses the hub instead
SHARED_FILES = {"hhh": "hhh_alignment", "truthfulqa_mc": "truthfulqa/task_mc.json",
                "truthfulqa_csv": "truthfulqa/TruthfulQA_part1.csv", "mt_bench": "mt_bench/question.jsonl"}
TRUTHFULQA = "hub:truthfulqa/truthful_qa@741b8276f2d1982aa3d5b832d3ee81ed3b896490"
PINNED = {  # what `auto` downloads where no local copy exists: commits, so a rerun reads the same bytes
    "hhh": "hub:HuggingFaceH4/hhh_alignment@3c7b9fb06c6997e08a1798764a388971ab0711af",  # its parquet conversion
    "truthfulqa_mc": TRUTHFULQA,
    "truthfulqa_csv": TRUTHFULQA,
    "mt_bench": "hub:HuggingFaceH4/mt_bench_prompts@e3a795c5e9a82ee40611c416b8a7786c73198991",
}
DATA_FILES = ["*.parquet", "*.json", "*.jsonl", "*.csv", "README.md"]  # what a dataset repo's rows are in
FORMATS = {"hhh": "a BIG-bench hhh_alignment folder (<subset>/task.json)",
           "truthfulqa_mc": "BIG-bench's truthful_qa task_mc.json", "truthfulqa_csv": "the TruthfulQA CSV",
           "mt_bench": "MT-Bench's question.jsonl"}


# ------------------------------------------------------------------------------------------------ sources


def resolve(key: str, value: str) -> str:
    """The source a params value names: `auto` becomes ../shared/benchmarks' copy where it exists, else the pin."""
    if value != "auto":
        return value
    shared = SHARED / SHARED_FILES[key]
    return str(shared) if shared.exists() else PINNED[key]


def download(key: str, source: str, value: str) -> Path:
    """The hub dataset's snapshot folder in the HF cache (HF_HOME / HF_HUB_CACHE move it), downloaded where
    missing; one line naming the param and both ways to satisfy it where the hub cannot be reached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import logging as hub_logging

    repo, revision = HUB_SOURCE.fullmatch(source).groups()  # type: ignore[union-attr]
    hub_logging.set_verbosity_error()  # its retries say "Retrying in 2s" each: the one line below says it all
    try:
        return Path(snapshot_download(repo, repo_type="dataset", revision=revision, allow_patterns=DATA_FILES))
    except Exception as exc:  # offline, unknown repo or revision, gated: the hub client's own error names it
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        found = f"no {SHARED / SHARED_FILES[key]} and " if value == "auto" else ""
        raise UserError(f"params.yaml: benchmarks.{key}: {value}: {found}{source} could not be downloaded "
                        f"({type(exc).__name__}: {why[:200]}); set it to a local copy of {FORMATS[key]}, or to "
                        f"hub:<dataset id>@<commit> on a machine that reaches the hub") from None


def read_source(key: str, value: str) -> tuple[Path, Callable[[Path], None]]:
    """(the path the benchmark is read from, a function that writes it into an out folder), checked now:
    nothing is written when a source is missing or malformed."""
    source = resolve(key, value)
    if source.startswith("hub:"):
        snapshot = download(key, source, value)
        files = convert(key, snapshot, source)
        return snapshot, lambda out: write_files(out, files)
    path = Path(source)
    if not path.exists():
        raise UserError(f"params.yaml: benchmarks.{key}: {value} not found; set it to a local copy of "
                        f"{FORMATS[key]}, or to hub:<dataset id>@<commit>")
    LOADERS[key](path)
    return path, lambda out: copy_local(key, path, out)


LOADERS: dict[str, Callable[[Path], list]] = {  # each parses every item, one line naming file and field otherwise
    "hhh": load_hhh, "truthfulqa_mc": lambda path: load_bigbench(path, "truthfulqa"),
    "truthfulqa_csv": load_truthfulqa_csv, "mt_bench": load_mt_bench}


def copy_local(key: str, path: Path, out: Path) -> None:
    target = out / FILES[key]
    target.parent.mkdir(parents=True, exist_ok=True)
    if key == "hhh":
        for task in sorted(path.glob("*/task.json")):
            (target / task.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(task, target / task.parent.name / "task.json")
    else:
        shutil.copyfile(path, target)


def write_files(out: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------------------- hub conversions


def rows(snapshot: Path, split: str, **where: str) -> list[dict[str, Any]]:
    """A split of the hub dataset in `snapshot` (`name=` a config of its README, or `data_dir=` a folder), read
    with `datasets`; its arrow cache goes to a temporary folder, not the user's cache."""
    import datasets

    with tempfile.TemporaryDirectory() as cache:
        return datasets.load_dataset(str(snapshot), split=split, cache_dir=cache, **where).to_list()


def bigbench_task(examples: list[tuple[str, list[str], list[int]]], before: str, after: str, head: str = "") -> str:
    """A BIG-bench multiple-choice task: each (input, choices, labels) as `target_scores`, `head` its task prefix."""
    return json.dumps({"task_prefix": head, "example_input_prefix": before, "example_output_prefix": after,
                       "examples": [{"input": text, "target_scores": dict(zip(choices, labels))}
                                    for text, choices, labels in examples]}, ensure_ascii=False, indent=1)


def convert_hhh(snapshot: Path) -> dict[str, str]:
    """One BIG-bench task per subset folder (harmless, helpful, honest, other), framed as BIG-bench frames HHH."""
    subsets = sorted(d.name for d in snapshot.iterdir() if d.is_dir() and not d.name.startswith("."))
    def examples(subset: str) -> list[tuple[str, list[str], list[int]]]:
        return [(r["input"], r["targets"]["choices"], r["targets"]["labels"])
                for r in rows(snapshot, "test", data_dir=subset)]

    return {f"{FILES['hhh']}/{subset}/task.json": bigbench_task(examples(subset), "\nHuman: ", "\nAssistant:")
            for subset in subsets}


def convert_truthfulqa_mc(snapshot: Path) -> dict[str, str]:
    """MC1 targets (one true answer among the choices) as BIG-bench's task_mc.json holds them: after the paper's QA
    primer as its task prefix, so each question is asked as lm-evaluation-harness's truthfulqa_mc1 asks it."""
    found = rows(snapshot, "validation", name="multiple_choice")
    return {FILES["truthfulqa_mc"]: bigbench_task(
        [(r["question"], r["mc1_targets"]["choices"], r["mc1_targets"]["labels"]) for r in found], "\nQ: ", "\nA: ",
        head=QA_PRIMER + "\n")}


def convert_truthfulqa_csv(snapshot: Path) -> dict[str, str]:
    """The generation config back into the CSV's columns (answers `; `-joined, as the original file has them)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"])
    for r in rows(snapshot, "validation", name="generation"):
        writer.writerow([r["type"], r["category"], r["question"], r["best_answer"], "; ".join(r["correct_answers"]),
                         "; ".join(r["incorrect_answers"]), r["source"]])
    return {FILES["truthfulqa_csv"]: text.getvalue()}


def convert_mt_bench(snapshot: Path) -> dict[str, str]:
    lines = [json.dumps({"question_id": r["prompt_id"], "category": r["category"], "turns": r["prompt"]},
                        ensure_ascii=False) for r in rows(snapshot, "train")]
    return {FILES["mt_bench"]: "\n".join(lines) + "\n"}


CONVERT = {"hhh": convert_hhh, "truthfulqa_mc": convert_truthfulqa_mc, "truthfulqa_csv": convert_truthfulqa_csv,
           "mt_bench": convert_mt_bench}


def convert(key: str, snapshot: Path, source: str) -> dict[str, str]:
    """The benchmark's files from a hub snapshot; a dataset without the expected splits or columns is one line."""
    try:
        return CONVERT[key](snapshot)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as exc:
        raise UserError(f"params.yaml: benchmarks.{key}: {source}: not the layout this stage reads ({FORMATS[key]} "
                        f"as the pinned dataset has it: {type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------------------------------------------- stage


def counts(out: Path) -> dict[str, dict[str, int]]:
    """Items per benchmark as the loaders read them back from the out (which also checks a converted file)."""
    return {key: {"items": len(load(out / FILES[key]))} for key, load in LOADERS.items()}


def main() -> None:
    params = runner.stage_params()
    cfg = params.benchmarks
    sources = {key: read_source(key, getattr(cfg, key)) for key in FILES}
    inputs = input_refs({key: path for key, (path, _) in sources.items()})
    subset = {"benchmarks": cfg.model_dump()}
    with staged_out(DATA, stage=STAGE, params=subset, inputs=inputs) as tmp:
        for _, write in sources.values():
            write(tmp)
        write_json(tmp / "metrics.json", counts(tmp))
    runner.finish_stage(STAGE, DATA, verify_artifact(DATA))


if __name__ == "__main__":
    sys.exit(runner.run(main))
