"""Stage `engrave`: principle engraving. LoRA SFT of the base model on the self-aligned (query → answer) pairs
with no principles or exemplars in the context: only the user's query in the model's chat template, loss on the
answer tokens. The model learns to answer as the principles made it answer, without being shown them.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from align import paths, runner, sft
from align.artifacts import input_refs
from align.params import TrainingRun
from align.records import read_jsonl
from align.training import checkpoint_dir

STAGE = "engrave"
OUT = paths.ENGRAVED
BASE = paths.BASE
DATA = paths.SELF_ALIGN
LIVE = Path("dvclive/engrave")


def pairs(data: Path) -> list[tuple[str, str]]:
    """(user query, answer) per kept self-aligned record: the query exactly as the user wrote it."""
    return [(row["prompt"], row["answer"]) for row in read_jsonl(data / "sft.jsonl")]


def main() -> None:
    params = runner.stage_params(STAGE)
    inputs = input_refs({"model": BASE, "data": DATA})
    subset = {"seed": params.seed, "training": params.training.model_dump(), "engrave": params.engrave.model_dump()}
    ckpt_dir = checkpoint_dir(STAGE, {"params": subset, "inputs": inputs})
    fn = functools.partial(sft.job, sft.SftJob(
        stage=STAGE, model=BASE, pairs=pairs(DATA), out=OUT, live_dir=LIVE, ckpt_dir=ckpt_dir,
        training=TrainingRun.of(params.training, params.cluster.engrave, STAGE), epochs=params.engrave.epochs, max_prompt_tokens=params.engrave.max_prompt_tokens,
        max_answer_tokens=params.engrave.max_answer_tokens, seed=params.seed, params=subset, inputs=inputs,
    ))
    runner.submit_stage(STAGE, OUT, fn, params.cluster.engrave, params.cluster, subset, inputs)


if __name__ == "__main__":
    sys.exit(runner.run(main))
