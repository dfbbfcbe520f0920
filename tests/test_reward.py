"""The instructable reward model: labels under a principle subset (SALMON's dominant principle of
variance-normalised scores, or the majority; negation flips them, ties are dropped, a share flipped as noise), the
subset sizes, the held-out split, and the `train_rm` stage on the tiny model — the Bradley-Terry loss falls, the
out's RM is the one `RewardScorer.score` loads, the metrics hold held-out / negation / HHH / label results, and
bad input is one line."""

from __future__ import annotations

import collections
import itertools
import functools
import json
import pickle
import random
import shutil
import statistics
from pathlib import Path
from typing import Callable

import pytest

from align.artifacts import verify_artifact
from align.records import read_jsonl, write_jsonl
from align.reward import (
    RewardScorer, collate_pairs, dominant_label, label_metrics, majority_label, normalised_scores, pair_batches,
    pair_rewards, pair_widths, principle_scales, sample_subset, shared_length, split_pairs, subset_label,
    labelled_draws, training_examples,
)
from align.training import length_grouped_batches
from stages.train_rm import pmp_pairs, split_transcript
from tests.helpers import DEFAULTS, curve, stage, training_run
from tests.projects import PRINCIPLES, SHORT_LONG, add_policy_outs, preference_rows, rm_project


OLD_RULE = DEFAULTS.rm.model_copy(update=dict(max_principles=8, size_p=0.0, negation_prob=0.5, label_rule="majority",
                                              label_noise=0.0))


def test_majority_label_with_negation_flipping() -> None:  # the earlier rule, kept as label_rule: majority
    labels = {"concise": "a", "specific": "b", "ethical": "tie"}
    assert majority_label(labels, [("concise", False)]) == "a"
    assert majority_label(labels, [("concise", True)]) == "b"  # negated: the vote flips
    assert majority_label(labels, [("concise", False), ("specific", False)]) == "tie"
    assert majority_label(labels, [("concise", False), ("specific", True)]) == "a"
    assert majority_label(labels, [("ethical", False), ("ethical", True)]) == "tie"
    assert majority_label(labels, [("concise", True), ("specific", False), ("ethical", False)]) == "b"


def test_scores_are_normalised_by_each_principles_variance_over_the_file() -> None:
    rows = preference_rows()  # concise (+-2, -+1), comprehensive (-+0.5, +-1.5), the rest (0.5, 0.5): see there
    scales = principle_scales(rows)
    # concise, read as favouring a: 2, 1 in even rows, -2, -1 in odd ones: mean 0, variance (4 + 1 + 4 + 1) / 4
    assert scales["concise"] == pytest.approx(2.5) and scales["comprehensive"] == pytest.approx(1.25)
    assert scales["ethical"] == pytest.approx(0.25)  # 0.5 and -0.5
    even, odd = normalised_scores(rows[0], scales), normalised_scores(rows[1], scales)
    assert even["concise"] == pytest.approx(1.5 / 2.5) and even["comprehensive"] == pytest.approx(-1.0 / 1.25)
    assert odd["concise"] == pytest.approx(-0.6) and odd["comprehensive"] == pytest.approx(0.8)
    assert even["ethical"] == 0.0  # the orders disagree: a tie scores nothing
    flat = {**rows[0], "scores": {"concise": [1.0, -1.0]}}
    assert normalised_scores(flat, principle_scales([flat])) == {"concise": 0.0}  # never varies: decides nothing
    # raw, Concise's mean (1.5) beats Comprehensive's (1.0); normalised, Comprehensive (0.8 > 0.6) decides
    both = [("concise", False), ("comprehensive", False)]
    assert [subset_label(row, both, "dominant", scales) for row in rows[:2]] == ["b", "a"]  # the long answer
    assert subset_label(rows[0], both, "majority", scales) == "tie"


def test_the_dominant_principle_decides_and_negation_flips_it() -> None:
    scores = {"concise": 0.6, "comprehensive": -0.8, "ethical": 0.0}
    assert dominant_label(scores, [("concise", False)]) == "a"
    assert dominant_label(scores, [("concise", True)]) == "b"
    assert dominant_label(scores, [("concise", False), ("comprehensive", False)]) == "b"  # |-0.8| > |0.6|
    assert dominant_label(scores, [("concise", False), ("comprehensive", True)]) == "a"  # negated: +0.8
    assert dominant_label(scores, [("concise", True), ("comprehensive", True), ("ethical", False)]) == "a"
    assert dominant_label(scores, [("ethical", False)]) == dominant_label(scores, [("ethical", True)]) == "tie"
    assert dominant_label(scores, [("ethical", False), ("concise", True)]) == "b"  # a tie does not block it
    assert dominant_label({"x": 0.5, "y": -0.5}, [("x", False), ("y", False)]) == "a"  # as large: the first shown
    assert dominant_label({"x": 0.5, "y": -0.5}, [("y", False), ("x", False)]) == "b"


def test_subset_sizes_decay_geometrically_and_negation_is_as_often_as_set() -> None:
    ids = list(PRINCIPLES)  # 15
    rng = random.Random(0)
    draws = [sample_subset(rng, ids, 8, 0.2, 0.5) for _ in range(20000)]
    sizes = collections.Counter(len(d) for d in draws)
    # P(k) = 0.8^(k-1) / (1 + 0.8 + ... + 0.8^7) = 0.8^(k-1) / 4.1611392: 0.2403, 0.1923, 0.1538, ... 0.0504
    for k, expected in zip(range(1, 9), [0.2403, 0.1923, 0.1538, 0.1230, 0.0984, 0.0787, 0.0630, 0.0504]):
        assert sizes[k] / len(draws) == pytest.approx(expected, abs=0.01), (k, sizes)
    assert set(sizes) == set(range(1, 9)) and all(len({p for p, _ in d}) == len(d) for d in draws)
    shown = [neg for d in draws for _, neg in d]
    assert statistics.fmean(shown) == pytest.approx(0.5, abs=0.01)
    uniform = collections.Counter(len(sample_subset(rng, ids, 8, 0.0, 0.0)) for _ in range(8000))
    assert all(count / 8000 == pytest.approx(1 / 8, abs=0.015) for count in uniform.values()) and len(uniform) == 8
    assert {len(sample_subset(rng, ids, 8, 1.0, 0.0)) for _ in range(100)} == {1}
    assert {len(sample_subset(rng, ids[:3], 8, 0.0, 0.0)) for _ in range(100)} == {1, 2, 3}  # at most every id
    again = random.Random(0)
    assert [sample_subset(again, ids, 8, 0.2, 0.5) for _ in range(50)] == draws[:50]  # seeded


def test_a_share_of_labels_is_flipped_as_noise() -> None:
    rows, cfg = preference_rows(), DEFAULTS.rm.model_copy(update={"label_noise": 0.1})
    scales = principle_scales(rows)
    examples = training_examples(rows, PRINCIPLES, per_pair=500, cfg=cfg, scales=scales, seed=1)
    by_id = {r["id"]: r for r in rows}
    flipped = [e["flipped"] for e in examples]
    assert len(examples) > 2000 and statistics.fmean(flipped) == pytest.approx(0.1, abs=0.015)  # of 500 x 12 drawn
    for e in examples:
        row = by_id[e["id"]]
        winner = subset_label(row, e["shown"], "dominant", scales)
        right = row["response_" + winner]
        assert (e["chosen"] != right) == e["flipped"]  # a flipped label prefers the other response
    clean = training_examples(rows, PRINCIPLES, per_pair=50, cfg=cfg.model_copy(update={"label_noise": 0.0}),
                              scales=scales, seed=1)
    assert not any(e["flipped"] for e in clean)
    for pid in by_id:  # noise does not move the subsets: a pair's first clean ones are its first noisy ones
        first = [e["shown"] for e in clean if e["id"] == pid]
        assert first == [e["shown"] for e in examples if e["id"] == pid][:len(first)]


def test_label_metrics_on_hand_computed_cases() -> None:
    rows, cfg = preference_rows(), DEFAULTS.rm
    metrics = label_metrics(rows, list(PRINCIPLES), 1000, cfg, principle_scales(rows), seed=0)
    assert metrics["rule"] == "dominant" and metrics["subsets"] == 12 * 1000
    assert metrics["one_principle_agreement"] == 1.0
    # only Concise and Comprehensive decide, against each other: where the majority rule decides, at most one of
    # them is shown plain, so it agrees with the dominant one (Comprehensive, negated or not, when both are shown)
    assert metrics["majority_agreement"] == 1.0
    # decided where Concise or Comprehensive is shown: 1 - sum_k P(k) C(13, k) / C(15, k) = 0.3917
    assert metrics["decided"] == pytest.approx(0.3917, abs=0.015)
    assert metrics["flipped"] == pytest.approx(0.1, abs=0.02)

    # x and y prefer a a little, z prefers b a lot: shown together, the majority says a and the dominant one b
    row = {"id": "r", "prompt": "p", "response_a": "A", "response_b": "B", "labels": {"x": "a", "y": "a", "z": "b"},
           "scores": {"x": [1.0, -1.0], "y": [1.0, -1.0], "z": [-3.0, 3.0]}}
    scales = {"x": 1.0, "y": 1.0, "z": 1.0}
    cfg = DEFAULTS.rm.model_copy(update=dict(max_principles=3, size_p=0.0, negation_prob=0.0, label_noise=0.0))
    metrics = label_metrics([row], ["x", "y", "z"], 30000, cfg, scales, seed=0)
    # sizes 1, 2, 3 each 1/3; both rules decide every single, {x, y} (1/9) and {x, y, z}; they agree on the first
    # two: (1/3 + 1/9) / (1/3 + 1/9 + 1/3) = 4/7
    assert metrics["decided"] == 1.0 and metrics["flipped"] == 0.0
    assert metrics["majority_agreement"] == pytest.approx(4 / 7, abs=0.01)
    majority = label_metrics([row], ["x", "y", "z"], 3000, cfg.model_copy(update={"label_rule": "majority"}),
                             scales, seed=0)
    assert majority["majority_agreement"] == 1.0 and majority["decided"] == pytest.approx(1 - 2 / 9, abs=0.02)


def test_training_examples_follow_the_shown_principles_and_drop_ties() -> None:  # with the earlier rule
    rows = preference_rows() + [{"id": "undecided", "prompt": "p", "response_a": "x", "response_b": "y",
                                 "scores": {}, "labels": {pid: "tie" for pid in PRINCIPLES}}]
    scales = principle_scales(rows)
    examples = training_examples(rows, PRINCIPLES, per_pair=8, cfg=OLD_RULE, scales=scales, seed=3)
    per_pair = collections.Counter(e["id"] for e in examples)
    assert max(per_pair.values()) <= 8 and "undecided" not in per_pair  # 8 drawn per pair, the ties dropped
    by_id = {r["id"]: r for r in rows}
    negated_decisions = 0
    for e in examples:
        row = by_id[e["id"]]
        winner = majority_label(row["labels"], e["shown"])
        assert winner != "tie" and not e["flipped"]
        assert (e["chosen"], e["rejected"]) == ((row["response_a"], row["response_b"]) if winner == "a"
                                                else (row["response_b"], row["response_a"]))
        assert e["guide"] == [PRINCIPLES[p].negation if neg else PRINCIPLES[p].definition for p, neg in e["shown"]]
        assert 1 <= len(e["shown"]) <= 8
        deciding = [(p, neg) for p, neg in e["shown"] if p in ("concise", "comprehensive")]
        if all(neg for _, neg in deciding):
            negated_decisions += 1  # decided by negated principles only: the label opposite to theirs
            short = min(row["response_a"], row["response_b"], key=len)
            assert e["chosen"] == (short if deciding[0][0] == "comprehensive" else max(
                row["response_a"], row["response_b"], key=len))
    assert negated_decisions > 0
    again = training_examples(list(reversed(rows)), PRINCIPLES, per_pair=8, cfg=OLD_RULE, scales=scales, seed=3)
    assert sorted(map(json.dumps, again)) == sorted(map(json.dumps, examples))  # seeded per pair, order-free
    dominant = training_examples(rows, PRINCIPLES, per_pair=8, cfg=DEFAULTS.rm, scales=scales, seed=3)
    assert dominant and {e["id"] for e in dominant} <= {r["id"] for r in preference_rows()}  # the default rule


def test_each_pair_draws_a_fixed_number_of_subsets_and_drops_those_that_tie() -> None:
    """SALMON draws `subsets_per_pair` subsets per pair and drops the ties, so a pair its principles decide more
    often weighs more: one every principle decides gives all 8 instances, one Concise alone decides only as many as
    its 8 draws show Concise (redrawing until 8 were decided gave both 8)."""
    ids = list(PRINCIPLES)
    everyone = {"id": "all", "prompt": "p", "response_a": "short", "response_b": "a long answer",
                "scores": {pid: [2.0, -2.0] for pid in ids}, "labels": {pid: "a" for pid in ids}}
    one = {"id": "one", "prompt": "p", "response_a": "short", "response_b": "a long answer",
           "scores": {pid: [1.0, -1.0] if pid == "concise" else [0.5, 0.5] for pid in ids},
           "labels": {pid: "a" if pid == "concise" else "tie" for pid in ids}}
    cfg = DEFAULTS.rm.model_copy(update={"label_noise": 0.0})
    rows = [everyone, one]
    scales = principle_scales(rows)
    examples = training_examples(rows, PRINCIPLES, per_pair=8, cfg=cfg, scales=scales, seed=5)
    counts = collections.Counter(e["id"] for e in examples)
    shown_concise = sum(any(pid == "concise" for pid, _ in subset)
                        for subset, _, _ in itertools.islice(labelled_draws(one, ids, cfg, scales, 5), 8))
    assert counts["all"] == 8 and counts["one"] == shown_concise < 8


def test_split_holds_out_decided_pairs_only() -> None:
    rows = preference_rows() + [{"id": "undecided", "prompt": "p", "response_a": "x", "response_b": "y",
                                 "scores": {}, "labels": {"concise": "tie"}}]
    train, held = split_pairs(rows, 0.25, seed=0)
    assert len(held) == 3 and "undecided" in {r["id"] for r in train}
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    assert split_pairs(rows, 0.25, seed=0) == (train, held)
    assert len(split_pairs(rows[:2], 0.01, seed=0)[1]) == 1  # two decided pairs: one is held out


def test_hh_transcripts_split_into_prompt_and_replies() -> None:
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Add 1 and 2.\n\nAssistant: 3"
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Add 1 and 2.\n\nAssistant: No."
    assert split_transcript(chosen, rejected) == (chosen[: chosen.rfind("3")].strip(), "3", "No.")
    assert split_transcript(chosen, "\n\nHuman: Other\n\nAssistant: x") is None
    assert pmp_pairs([{"chosen": chosen, "rejected": rejected}, {"prompt": "p", "chosen": "c", "rejected": "c"},
                      {"prompt": [{"role": "user", "content": "p"}], "chosen": [{"content": "c"}],
                       "rejected": [{"content": "r"}]}]) == [split_transcript(chosen, rejected), ("p", "c", "r")]


@pytest.mark.slow
def test_the_shared_prefix_runs_once_and_gives_the_rewards_and_gradients_of_whole_rows(tiny_model: Path) -> None:
    import torch

    from align.training import lora_model

    model = lora_model(tiny_model, training_run(lora_r=4, lora_alpha=8, lora_dropout=0.0), seed=0, head="reward")
    pad = model.config.pad_token_id
    pairs = [{"chosen": [5, 6, 7, 8, 9], "rejected": [5, 6, 7, 20]},  # shares 3 tokens
             {"chosen": [30, 31], "rejected": [30, 31, 32, 33]},  # one side is the other's start: 1 token each left
             {"chosen": [40, 41, 42], "rejected": [50, 41]}]  # nothing shared
    assert [shared_length(p["chosen"], p["rejected"]) for p in pairs] == [3, 1, 0]
    batch = collate_pairs(pairs, pad)
    assert batch["prefix_ids"].shape == (3, 3) and batch["input_ids"].shape == (6, 3)
    shared = pair_rewards(model, batch)
    shared[0::2].sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    whole = torch.stack([model(input_ids=torch.tensor([side])).logits[0, 0]
                         for p in pairs for side in (p["chosen"], p["rejected"])])  # each row alone, unpadded
    whole[0::2].sum().backward()
    assert torch.allclose(shared, whole, atol=1e-4)
    assert all(torch.allclose(a, p.grad, atol=1e-4) for a, p in
               zip(grads, [p for p in model.parameters() if p.requires_grad]))


def test_under_gradient_checkpointing_pairs_run_whole_with_the_same_rewards_and_gradients(tiny_model: Path) -> None:
    import torch

    from align.training import lora_model, recomputes

    pairs = [{"chosen": [5, 6, 7, 8, 9], "rejected": [5, 6, 7, 20]}, {"chosen": [30, 31], "rejected": [30, 31, 32, 33]},
             {"chosen": [40, 41, 42], "rejected": [50, 41]}]
    runs = []
    for recompute in (False, True):  # the same seed: the same fresh adapter and head
        model = lora_model(tiny_model, training_run(lora_r=4, lora_alpha=8, gradient_checkpointing=recompute), seed=0,
                           head="reward")
        model.train()
        assert recomputes(model) == recompute
        rewards = pair_rewards(model, collate_pairs(pairs, model.config.pad_token_id))
        (rewards[0::2] - rewards[1::2]).sum().backward()
        runs.append((rewards.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    (cached, cached_grads), (whole, whole_grads) = runs
    assert torch.allclose(cached, whole, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(cached_grads, whole_grads))


def varied_pairs(count: int) -> list[dict[str, list[int]]]:
    """Tokenized pairs whose shared prefixes (2..300 tokens: principles and instruction) and remainders (1..150
    each: the responses) vary independently; pair k's first token is 1000 + k."""
    rng = random.Random(0)
    pairs = []
    for k in range(count):
        prefix = [1000 + k] + [7] * rng.randint(1, 299)
        pairs.append({"chosen": prefix + [8] * rng.randint(1, 150), "rejected": prefix + [9] * rng.randint(1, 150)})
    return pairs


def pair_ids(batch: dict) -> list[int]:
    """Which pairs of `varied_pairs` a `collate_pairs` batch holds: each prefix row's first real token - 1000."""
    return [int(row[mask.argmax()]) - 1000 for row, mask in zip(batch["prefix_ids"], batch["prefix_mask"])]


def padded_tokens(batches: Callable[[int], dict], count: int) -> int:
    """Tokens of micro-batches 0..count-1, padding included: prefix width x m + remainder width x 2m each."""
    return sum(batches(i)["prefix_ids"].numel() + batches(i)["input_ids"].numel() for i in range(count))


def test_length_grouped_pair_batches_pad_less_and_visit_every_pair_once_per_epoch() -> None:
    pairs, m, group = varied_pairs(98), 4, DEFAULTS.rm.length_group  # 24.5 micro-batches an epoch
    grouped = pair_batches(pairs, m, 5, pad_id=0, length_group=group)
    plain = pair_batches(pairs, m, 5, pad_id=0, length_group=1)
    by_one_width = [length_grouped_batches(pairs, m, 5, functools.partial(collate_pairs, pad_id=0),
                                           [pair_widths(p)[w:w + 1] for p in pairs], group) for w in (0, 1)]
    padded = padded_tokens(grouped, 49)  # two epochs
    assert padded < 0.8 * padded_tokens(plain, 49)
    assert all(padded < 0.95 * padded_tokens(b, 49) for b in by_one_width)  # the grid: both widths matter

    stream = [k for i in range(49) for k in pair_ids(grouped(i))]  # micro-batch 24 straddles the two epochs
    assert sorted(stream[:98]) == sorted(stream[98:]) == list(range(98))  # every pair once per epoch
    assert stream[:98] != stream[98:]  # each epoch in its own order
    again = pickle.loads(pickle.dumps(pair_batches(pairs, m, 5, pad_id=0, length_group=group)))
    assert [pair_ids(again(i)) for i in (40, 3, 24, 25)] == [pair_ids(grouped(i)) for i in (40, 3, 24, 25)]
    other_seed = pair_batches(pairs, m, 6, pad_id=0, length_group=group)
    assert [pair_ids(other_seed(i)) for i in range(24)] != [pair_ids(grouped(i)) for i in range(24)]


def test_a_prompts_samples_are_scored_over_their_shared_prefix_as_each_alone(tmp_path: Path, tiny_model: Path) -> None:
    add_policy_outs(tmp_path, tiny_model)  # models/rm: an untrained RM (random head) on the tiny model
    rm = RewardScorer(tmp_path / "models/sft/model", tmp_path / "models/rm", batch_size=4)
    guide = [PRINCIPLES["concise"].definition, PRINCIPLES["comprehensive"].definition]
    prompt, other = SHORT_LONG[0][0], SHORT_LONG[1][0]
    responses = ["Paris.", "It is Paris, the capital.", "Lyon?", "Paris, on the Seine, since the tenth century.", "No"]
    rows = [(prompt, r, guide) for r in responses] + [(other, "Yes.", guide), (other, "Yes.", "Answer briefly.")]
    rm.score([prompt] * 2, responses[:2], [guide] * 2)  # one group alone: its prefix is the last one cached
    assert rm.tokenizer.decode(list(rm.prefix.tokens)).endswith(f"Instruction:\n{prompt}\n\nResponse:\n")
    together = rm.score(*zip(*rows))  # a group of 5 in batches of 4 and 1, then 2 rows sharing the template head
    alone = [rm.score([p], [r], [g])[0] for p, r, g in rows]  # one row per forward pass: no prefix, no padding
    assert together == pytest.approx(alone, abs=1e-5) and len(set(together)) == len(rows)


def test_train_rm_loss_falls_and_score_reuses_the_trained_model(tmp_path: Path, roomy_model: Path) -> None:
    hh = tmp_path / "hh.jsonl"
    write_jsonl(hh, [{"chosen": f"\n\nHuman: {p}\n\nAssistant: {s}", "rejected": f"\n\nHuman: {p}\n\nAssistant: {lg}"}
                     for p, s, lg in SHORT_LONG[:6]])
    cwd = rm_project(tmp_path / "project", roomy_model, rm={
        "learning_rate": 3e-3, "lora_r": 8, "lora_alpha": 16, "epochs": 4, "eval_share": 0.34,
        "pmp": {"dataset": str(hh), "split": "train", "max_examples": 6},
        "negation_prob": 0.25})  # SALMON's 0.5 is more than ~30 steps on the tiny model learn (loss 0.70 -> 0.72)
    proc = stage(cwd, "train_rm")
    assert proc.returncode == 0, proc.stderr
    verify_artifact(cwd / "models/rm")
    metrics = json.loads((cwd / "models/rm/metrics.json").read_text())
    assert metrics["train"]["pmp_examples"] == 6 and metrics["train"]["examples"] == 26  # the decided draws below
    assert 0 < metrics["held_out"]["examples"] <= 4 * 8 and 0 <= metrics["held_out"]["accuracy"] <= 1
    assert metrics["negation"]["cases"] == 4 * 2 and 0 <= metrics["negation"]["flip_rate"] <= 1
    assert metrics["hhh"]["items"] == metrics["hhh"]["harmless"]["items"] + metrics["hhh"]["helpful"]["items"] == 6
    labels = metrics["labels"]  # 8 training pairs, 8 draws each (seed 0): 26 show Concise or Comprehensive, none
    assert labels == {"rule": "dominant", "subsets": 64, "decided": 26 / 64,  # of them alone; 1 label flipped
                      "one_principle_agreement": None, "majority_agreement": 1.0, "flipped": 1 / 26}

    losses = [loss for _, loss in curve(cwd, "train_rm", "loss")]
    assert len(losses) == metrics["train"]["steps"] == 2 + 26  # pre-training: 6 pairs / 4; then 26 x 4 epochs / 4
    assert statistics.fmean(losses[-8:]) < statistics.fmean(losses[2:10])  # Bradley-Terry loss falls
    assert len(curve(cwd, "train_rm", "accuracy")) == len(losses)

    # the out is a reward model `score` loads: it reproduces the job's own held-out judgements
    rm = RewardScorer(cwd / "models/sft/model", cwd / "models/rm")
    held = [r for r in read_jsonl(cwd / "models/rm/eval.jsonl") if r["kind"] == "held_out"][:4]
    rows = {r["id"]: r for r in preference_rows()}
    guides = [[PRINCIPLES[p].negation if neg else PRINCIPLES[p].definition for p, neg in r["shown"]] for r in held]
    scales = principle_scales(list(rows.values()))
    winners = [subset_label(rows[r["id"]], r["shown"], "dominant", scales) for r in held]  # held out: no noise
    chosen = [rows[r["id"]]["response_" + w] for r, w in zip(held, winners)]
    scores = rm.score([rows[r["id"]]["prompt"] for r in held], chosen, guides)
    assert scores == pytest.approx([r["chosen"] for r in held], abs=1e-4)
    # guides are per row: the same response under a different guide gets a different reward
    assert len(set(rm.score([rows[held[0]["id"]]["prompt"]] * 2, [chosen[0]] * 2,
                            [guides[0], "Answer like a pirate."]))) == 2


def test_train_rm_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, tiny_model: Path) -> None:
    old = [{k: v for k, v in r.items() if k != "scores"} | {"scores": {p: 0.5 for p in PRINCIPLES}}
           for r in preference_rows()]  # an older format: one score per principle
    cwd = rm_project(tmp_path / "old", tiny_model, rows=old)
    proc = stage(cwd, "train_rm")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "data/preferences/preferences.jsonl: line 1: scores." in proc.stderr and "older format" in proc.stderr
    assert not (cwd / "models/rm").exists()

    cwd = rm_project(tmp_path / "ties", tiny_model, rows=[{**r, "labels": {p: "tie" for p in PRINCIPLES}}
                                                         for r in preference_rows()])
    proc = stage(cwd, "train_rm")
    assert proc.returncode == 2 and "every label is a tie" in proc.stderr and not (cwd / "models/rm").exists()

    cwd = rm_project(tmp_path / "negation", tiny_model)
    lines = (cwd / "assets/preference_principles.jsonl").read_text().splitlines()
    broken = json.loads(lines[2])
    del broken["negation"]
    (cwd / "assets/preference_principles.jsonl").write_text("\n".join([*lines[:2], json.dumps(broken), *lines[3:]]))
    proc = stage(cwd, "train_rm")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "assets/preference_principles.jsonl: line 3: negation: field required" in proc.stderr

    cwd = rm_project(tmp_path / "hhh", tiny_model)
    shutil.rmtree(cwd / "data/benchmarks")  # stage `benchmarks` has not run
    proc = stage(cwd, "train_rm")
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [
        "data/benchmarks: input not found (run `dvc repro`: the stage that writes it has not run)"])


def test_pmp_from_an_unreachable_hub_is_skipped_with_one_line(capsys: pytest.CaptureFixture) -> None:
    from stages.train_rm import load_pmp  # HF_HUB_OFFLINE=1 in tests

    assert load_pmp(DEFAULTS.rm.pmp.model_copy(update={"dataset": "no-such-org/no-such-preferences"})) == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_rm: rm.pmp: skipped, 'no-such-org/no-such-preferences'")
