"""Where every stage's out lies, the folder name of a model inside one, and the asset files more than one stage
reads: one place for the names dvc.yaml's outs and deps use, so no stage imports another for a path."""

from __future__ import annotations

from pathlib import Path

MODEL = "model"  # the merged HF folder inside a model out (models/engraved, models/sft, models/policy)

BENCHMARKS = Path("data/benchmarks")
BASE = Path("models/base")
PROMPTS = Path("data/prompts")
SELF_ALIGN = Path("data/self_align")
ENGRAVED = Path("models/engraved")
SFT = Path("models/sft")
SYSTEM_MESSAGES = Path("data/system_messages")
PAIRS = Path("data/pairs")
PREFERENCES = Path("data/preferences")
RM = Path("models/rm")
POLICY = Path("models/policy")
EVALUATION = Path("data/evaluation")

PREFERENCE_SPACE = Path("assets/preference_space.jsonl")  # Janus: dimensions and values
PREFERENCE_PRINCIPLES = Path("assets/preference_principles.jsonl")  # SALMON's judging principles
JUDGE_PROMPT = Path("assets/judge_prompt.txt")  # the a/b judge's prompt (label_preferences, evaluate's judge model)
