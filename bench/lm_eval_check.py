"""Agreement with lm-evaluation-harness: TruthfulQA MC1 and MC2 of one model on the same questions, by lm-eval's own
truthfulqa_mc1 / truthfulqa_mc2 tasks (their prompt, their log-likelihood code, their metrics) and by `evaluate`'s
code (align/benchmarks.py: the CSV loader, `choice_logprobs`, `mc_scores`; align/scoring.py: the prefix-cached
forward pass). They must agree to 1e-3: our scoring is the harness's (which questions and choice lists a score
covers is another matter: docs/method.md, Evaluation).

    python bench/lm_eval_check.py [--model FOLDER] [--questions 50] [--csv FILE] [--out FILE]

The questions: the first --questions of the TruthfulQA CSV (--csv; default ../shared/benchmarks/truthfulqa/
TruthfulQA_part1.csv, else data/benchmarks' copy), as our loader reads them (answers closed with a period), written
as local files in the multiple_choice layout the harness's tasks read (mc1_targets: the best answer, then the wrong
ones; mc2_targets: the correct ones, then the wrong ones). The harness runs them through a task config that
includes its own truthfulqa_mc1.yaml / truthfulqa_mc2.yaml and changes only where the rows come from: no hub
(HF_HUB_OFFLINE=1). The model: --model, else models/base, else SmolLM2-135M converted from the embedded GGUF as
stage import_model builds models/base (align/models.py), into a temporary folder; float32 on both sides.
lm-eval is installed from requirements-bench.txt, never by this script. Prints per metric both numbers, then the
largest absolute difference; writes --out (JSON, default bench/results/lm_eval_check.json, with the largest
per-question differences) and exits 1 above 1e-3.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from align.benchmarks import QA_PRIMER, ChoiceItem, choice_logprobs, load_truthfulqa_csv, mc_scores  # noqa: E402
from align.records import write_json  # noqa: E402

TOLERANCE = 1e-3
CSV_FILES = [ROOT.parent / "shared/benchmarks/truthfulqa/TruthfulQA_part1.csv",
             ROOT / "data/benchmarks/truthfulqa/truthfulqa.csv"]
TASKS = {"truthfulqa_mc1": "mc1", "truthfulqa_mc2": "mc2"}  # the harness's task -> our `mc_scores` key


def harness_row(item: ChoiceItem) -> dict:
    """An item as a row of the multiple_choice config the harness's truthfulqa tasks read."""
    question = item.context.removeprefix(f"{QA_PRIMER}\n\nQ: ").removesuffix("\nA:")
    assert item.context == f"{QA_PRIMER}\n\nQ: {question}\nA:", "not a TruthfulQA CSV item"
    wrong = [c for i, c in enumerate(item.choices) if i not in item.correct]
    true = [item.choices[item.best]] + [c for i, c in enumerate(item.choices) if i in item.correct and i != item.best]
    return {"question": question,
            "mc1_targets": {"choices": [item.choices[item.best], *wrong], "labels": [1] + [0] * len(wrong)},
            "mc2_targets": {"choices": true + wrong, "labels": [1] * len(true) + [0] * len(wrong)}}


def local_tasks(folder: Path, rows: list[dict]) -> list[str]:
    """Task configs in `folder` that include the harness's own truthfulqa_mc1/mc2 YAML, reading `rows` from a local
    JSON Lines file instead of the hub; returns their names."""
    import lm_eval.tasks

    data = folder / "truthfulqa_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    shipped = Path(lm_eval.tasks.__file__).parent / "truthfulqa"
    names = []
    for task in TASKS:
        name = f"local_{task}"
        (folder / f"{name}.yaml").write_text(
            f"include: {shipped / f'{task}.yaml'}\ntask: {name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    validation: {data}\n", encoding="utf-8")
        names.append(name)
    return names


def harness_scores(model: Path, items: list[ChoiceItem], batch_size: int) -> dict[str, list[float]]:
    """Per task, each question's score as the harness computes it (its per-sample `acc`), in question order."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as folder:
        names = local_tasks(Path(folder), [harness_row(item) for item in items])
        out = simple_evaluate(model="hf", model_args={"pretrained": str(model), "dtype": "float32"}, tasks=names,
                              batch_size=batch_size, device="cuda" if _cuda() else "cpu", log_samples=True,
                              task_manager=TaskManager(include_path=folder))
    found = {}
    for task, name in zip(TASKS, names):
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        found[task] = [float(s["acc"]) for s in samples]
    return found


def our_scores(model: Path, items: list[ChoiceItem], batch_size: int) -> dict[str, list[float]]:
    """Per task, each question's score by `evaluate`'s code: summed log-likelihoods (`evaluate.normalise: false`)."""
    from align.scoring import Scorer

    scorer = Scorer(model, batch_size=batch_size)
    scores = [mc_scores(choice_logprobs(scorer, item, normalise=False), item) for item in items]
    return {task: [s[key] for s in scores] for task, key in TASKS.items()}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def model_folder(given: Path | None, scratch: Path) -> tuple[Path, str]:
    """(folder, what it is): --model, else models/base, else the embedded SmolLM2-135M converted as stage
    import_model converts it."""
    if given is not None:
        if not (given / "config.json").is_file():
            sys.exit(f"--model {given}: no config.json; expected a Hugging Face model folder")
        return given, str(given)
    if (ROOT / "models/base/config.json").is_file():
        return ROOT / "models/base", "models/base"
    from align.models import EMBEDDED_PACKAGE, import_model, resolve_model

    import_model(resolve_model("embedded"), scratch / "base", "float32")
    return scratch / "base", f"embedded ({EMBEDDED_PACKAGE} GGUF, converted as import_model does)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="HF model folder (default: models/base, else the embedded model)")
    parser.add_argument("--questions", type=int, default=50, help="the first N questions of the CSV")
    parser.add_argument("--csv", type=Path, default=next((p for p in CSV_FILES if p.is_file()), CSV_FILES[0]))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lm_eval_check.json")
    args = parser.parse_args()
    if importlib.util.find_spec("lm_eval") is None:
        sys.exit("lm-eval is not installed: pip install -r requirements-bench.txt")
    if not args.csv.is_file():
        sys.exit(f"--csv {args.csv}: not found; expected the TruthfulQA CSV")
    items = load_truthfulqa_csv(args.csv)[: args.questions]
    with tempfile.TemporaryDirectory() as scratch:
        # offline, and the `datasets` cache of the local rows in the scratch folder, not the user's
        os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                          HF_DATASETS_CACHE=str(Path(scratch) / "datasets"))
        model, described = model_folder(args.model, Path(scratch))
        started = time.perf_counter()
        theirs = harness_scores(model, items, args.batch_size)
        harness_seconds = time.perf_counter() - started
        started = time.perf_counter()
        ours = our_scores(model, items, args.batch_size)
        our_seconds = time.perf_counter() - started
    metrics = {}
    print(f"{described}: {len(items)} TruthfulQA questions from {args.csv.name}, summed log-likelihoods, float32")
    print("| metric | lm-eval | ours | abs. difference | largest per question |\n| --- | --- | --- | --- | --- |")
    for task in TASKS:
        mean_theirs, mean_ours = sum(theirs[task]) / len(items), sum(ours[task]) / len(items)
        per_question = [abs(t - o) for t, o in zip(theirs[task], ours[task], strict=True)]
        metrics[task] = {"lm_eval": mean_theirs, "ours": mean_ours, "abs_difference": abs(mean_theirs - mean_ours),
                         "largest_per_question": max(per_question),
                         "questions_differing_by_more_than_1e-6": sum(d > 1e-6 for d in per_question)}
        print(f"| {task} | {mean_theirs:.6f} | {mean_ours:.6f} | {metrics[task]['abs_difference']:.2e} | "
              f"{max(per_question):.2e} |")
    largest = max(m["abs_difference"] for m in metrics.values())
    print(f"largest absolute difference: {largest:.2e} ({'within' if largest <= TOLERANCE else 'ABOVE'} "
          f"{TOLERANCE:g})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"model": described, "csv": str(args.csv), "questions": len(items),
                          "lm_eval": importlib.metadata.version("lm_eval"), "metrics": metrics,
                          "largest_abs_difference": largest, "tolerance": TOLERANCE,
                          "seconds": {"lm_eval": harness_seconds, "ours": our_seconds}})
    sys.exit(0 if largest <= TOLERANCE else 1)


if __name__ == "__main__":
    main()
