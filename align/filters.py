"""What decides whether a machine-written prompt or answer is kept: ROUGE-L novelty against everything kept so
far, length bounds, requests for inputs a text model cannot see, degenerate repetition, echoes of the principles.

ROUGE-L is Google's `rouge-score` (the implementation self-instruct used): its tokenizer (lower-cased
alphanumeric words) and its LCS F-measure. The kept pool is tokenized once per prompt as it is admitted, so each
candidate costs one LCS per kept prompt; large pools are split over worker processes.
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Iterable

from rouge_score import rouge_scorer, tokenizers

if TYPE_CHECKING:
    from align.assets import Principle
    from align.generation import Completion
    from align.params import SelfAlign

PARALLEL_MIN_POOL = 2000  # below this, one process is faster than shipping the pool to workers
_TOKENIZER = tokenizers.DefaultTokenizer(use_stemmer=False)

UNSEEN_INPUT = re.compile(
    r"\b(image|picture|photo|photograph|video|audio|recording|diagram|chart|screenshot|attachment|spreadsheet)s?\b"
    r"|\battached\b|\buploaded\b|https?://|\bwww\.|\burls?\b"
    r"|\b(this|the following|the given|my|our|that) (file|document|pdf|link|web ?page|website)s?\b",
    re.IGNORECASE,
)
PLACEHOLDER = re.compile(r"\[\s*(topic|insert|name|your|placeholder|question)[^\]]*\]", re.IGNORECASE)


def tokens(text: str) -> list[str]:
    return _TOKENIZER.tokenize(text)


@functools.lru_cache(maxsize=256)
def fixed_tokens(text: str) -> tuple[str, ...]:
    """`tokens` of a text compared again and again (a principle's definition, against every answer): once."""
    return tuple(tokens(text))


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F-measure of two token lists (symmetric)."""
    return rouge_scorer._score_lcs(a, b).fmeasure  # the package's LCS scorer; its public API re-tokenizes


def _max_rouge_l(candidate: list[str], pool: list[list[str]]) -> float:
    return max((rouge_l(candidate, kept) for kept in pool), default=0.0)


class RougePool:
    """The prompts kept so far, tokenized; admits a candidate only if its ROUGE-L to each is below `threshold`."""

    def __init__(self, threshold: float, workers: int | None = None):
        self.threshold = threshold
        self.workers = workers or os.cpu_count() or 1
        self.pool: list[list[str]] = []
        self._executor: ProcessPoolExecutor | None = None

    def nearest(self, candidate: list[str]) -> float:
        """The highest ROUGE-L of `candidate` to any kept prompt (0 for an empty pool)."""
        if len(self.pool) < PARALLEL_MIN_POOL or self.workers < 2:
            return _max_rouge_l(candidate, self.pool)
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.workers)
        size = -(-len(self.pool) // self.workers)
        chunks = [self.pool[i : i + size] for i in range(0, len(self.pool), size)]
        return max(self._executor.map(_max_rouge_l, [candidate] * len(chunks), chunks))

    def extend(self, texts: Iterable[str]) -> None:
        """Add texts unconditionally (the human-written seeds)."""
        self.pool.extend(tokens(text) for text in texts)

    def admit(self, text: str) -> tuple[bool, float]:
        """(kept, nearest ROUGE-L): a kept text joins the pool, so later candidates are compared with it too."""
        candidate = tokens(text)
        score = self.nearest(candidate)
        if score >= self.threshold:
            return False, score
        self.pool.append(candidate)
        return True, score

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None


def prompt_problem(text: str, min_words: int, max_words: int) -> str | None:
    """Why a candidate prompt is unusable before any comparison (None: usable)."""
    words = len(text.split())
    if words == 0:
        return "empty"
    if words < min_words:
        return "too_short"
    if words > max_words:
        return "too_long"
    if not text[0].isalnum() and text[0] not in "\"'(":
        return "not_an_instruction"
    if UNSEEN_INPUT.search(text):
        return "needs_unseen_input"
    if PLACEHOLDER.search(text):
        return "placeholder"
    return None


def counts_text(counts: Counter[str]) -> str:
    """'cut_off 79, no_answer 24': rejection reasons with their counts, most frequent first, for a message."""
    return ", ".join(f"{reason} {count}" for reason, count in counts.most_common())


# What helps where every answer was rejected, by the most frequent reason (`group`: the params group that
# generated them: self_align or verbose_clone)
REMEDIES = {
    "cut_off": "raise {group}.max_new_tokens (answers ran out of tokens)",
    "no_answer": "raise {group}.max_new_tokens (the thoughts used every token) or use a stronger base model",
    "empty": "use a stronger base model (it answered nothing)",
    "repetitive": "raise self_align.max_repeated_ngram_share (now {cfg.max_repeated_ngram_share})",
    "echoes_principles": "raise self_align.echo_threshold (now {cfg.echo_threshold})",
}


def all_rejected(stage: str, what: str, count: int, rejected: Counter[str], group: str, cfg: object) -> str:
    """The line a stage stops with when none of its `count` answers passed the filters: the reasons and, for the
    most frequent, the setting that helps."""
    top = rejected.most_common(1)[0][0] if rejected else ""
    remedy = REMEDIES.get(top, "look at the answers in the job's log").format(group=group, cfg=cfg)
    return f"{stage}: all {count} {what} were rejected ({counts_text(rejected)}); nothing written; {remedy}"


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """Share of the word n-grams of `text` that repeat an earlier one (0 for texts shorter than 2n words)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(words) < 2 * n:
        return 0.0
    return sum(count - 1 for count in Counter(grams).values()) / len(grams)


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct-n: unique word n-grams over all word n-grams of `texts` (a diversity measure, 0..1)."""
    grams = [tuple(words[i : i + n]) for words in map(tokens, texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


_SENTENCE_END = re.compile(r"[.!?][\"')\]]?(?=\s)")


def trim_to_boundary(text: str) -> str | None:
    """A text cut off by the token limit, shortened to its last complete paragraph, else its last complete
    sentence; None when not even one sentence is complete."""
    text = text.rstrip()
    paragraph = text.rfind("\n\n")
    if paragraph > 0:
        return text[:paragraph].rstrip()
    ends = [m.end() for m in _SENTENCE_END.finditer(text + " ")]
    ends = [e for e in ends if e < len(text)]
    return text[: ends[-1]].rstrip() if ends else None


def answer_problem(completion: Completion, answer: str | None, principles: list[Principle],
                   cfg: SelfAlign) -> str | None:
    """Why an answer is not kept (None: kept)."""
    if completion.finish_reason == "length":
        return "cut_off"
    if answer is None:
        return "no_answer"
    if not answer.strip():
        return "empty"
    if repeated_ngram_share(answer) > cfg.max_repeated_ngram_share:
        return "repetitive"
    lowered = answer.lower()
    if "internal thoughts" in lowered or any(f"({p.name.lower()})" in lowered for p in principles):
        return "echoes_principles"
    words = tokens(answer)
    if any(rouge_l(words, fixed_tokens(p.definition)) >= cfg.echo_threshold for p in principles):
        return "echoes_principles"
    return None
