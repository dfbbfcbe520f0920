"""Stage `policy` with `policy.algorithm: ppo`: SALMON's policy optimisation against the instructable reward model, with RL-time principles.

Models, all in each task of the job: the policy = the SFT model + a trainable LoRA adapter; the reference = the
same model with the adapter disabled (no second copy); the value model = the RM (its trunk with the RM adapter
folded in, and its scalar head) + its own LoRA, read at every response token; the RM itself, frozen, through
`RewardModel.score`. Policy and value train as two DeepSpeed engines of the training base (ZeRO stage from
`training`), data-parallel over the job's ranks.

One iteration: `rollout_batch_size` prompts (each rank its share) are answered through the generation interface
with the current adapter (saved, then served as a LoRA request by vLLM or loaded by the hf backend); each
response is scored by the RM under `num_principles` principles drawn per prompt from the PPO collection plus
every guard principle, or, for a prompt of the `system_messages` training rows, under its system message (which
the policy sees in the system role); the score is shaped (a response that ends without the stop token gets `stop_penalty`
instead; an optional capped length bonus) and spread into per-token rewards with the KL penalty to the reference;
GAE gives advantages (whitened over all ranks) and returns; `ppo_epochs` passes of clipped policy and value
updates in steps of `step_batch_size` samples follow. Curves go to dvclive every iteration, sample rows to the
out, checkpoints (both engines, RNG, iteration, KL coefficient, curves) every `save_every` iterations.

Out (models/policy, the contract `dpo` shares): adapter/, model/ (merged), samples.jsonl, metrics.json.
"""

from __future__ import annotations

import functools
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from align import paths, runner
from align.artifacts import input_refs
from align.assets import PreferencePrinciple, load_jsonl, pick_principles
from align.errors import UserError
from align.generation import Generator, Sampling, chat_prompt
from align.models import padding_id
from align.params import Generation, Ppo, Training, load_params
from align.paths import MODEL
from align.records import read_jsonl, unused_prompts, write_jsonl
from align.reward import RewardModel
from align.rl import (
    adapt_kl_coef, entropy, explained_variance, gae, masked_mean, policy_loss, token_rewards, value_loss, whiten,
)
from align.training import (
    DTYPES, LiveCurve, checkpoint_dir, end_of_step, finish_training, init_distributed, latest_checkpoint,
    load_checkpoint, lora_model, make_engine, reward_trunk, save_adapter,
)
from slurm import preemption

STAGE = "policy"  # the DVC stage that runs this module or stages/dpo.py (policy.algorithm)
OUT = paths.POLICY
SFT = paths.SFT
RM = paths.RM
PROMPTS = paths.PROMPTS
SFT_DATA = paths.SELF_ALIGN
SYSTEM = paths.SYSTEM_MESSAGES
COLLECTION = Path("assets/ppo_principles.jsonl")
GUARDS = Path("assets/guard_principles.jsonl")
LIVE = Path("dvclive/policy")


# ------------------------------------------------------------------------------------------------------ models


def value_model(sft_dir: Path, rm_dir: Path, training: Training, seed: int) -> torch.nn.Module:
    """The RM with its adapter folded into the trunk, plus a fresh LoRA of its own; its head trains too."""
    from peft import LoraConfig, PeftModel, get_peft_model

    rm = PeftModel.from_pretrained(reward_trunk(sft_dir, DTYPES[training.precision]), str(rm_dir / "adapter"))
    torch.manual_seed(seed + 1)
    config = LoraConfig(r=training.lora_r, lora_alpha=training.lora_alpha, lora_dropout=training.lora_dropout,
                        target_modules=list(training.lora_targets), task_type="SEQ_CLS")
    return get_peft_model(rm.merge_and_unload(), config)


def token_values(value: Any, batch: dict) -> torch.Tensor:
    """The value head at every position, [B, L]: the classifier's trunk and head called directly (its own
    forward keeps only the last token)."""
    inner = value.module.get_base_model() if hasattr(value, "module") else value.get_base_model()
    hidden = inner.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch["position_ids"]).last_hidden_state
    return inner.score(hidden).squeeze(-1).float()


def response_slice(x: torch.Tensor, width: int, responses: int) -> torch.Tensor:
    """Columns that predict (logits) or value (values) the response tokens: query width - 1 onwards."""
    return x[:, width - 1 : width - 1 + responses]


def policy_outputs(model: Any, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities of the sampled response tokens, the logits they come from), at sampling temperature.
    The LM head runs only where it predicts a response token (the response columns and the query's last one are
    the sequence's last R + 1): over the query it would be a fifth of the FLOPs of a 135M model, for nothing."""
    length = batch["responses"].shape[1]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_to_keep=length + 1).logits
    logits = logits[:, :length].float() / temperature
    logprobs = logits.gather(-1, batch["responses"].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logprobs, logits


def pack(queries: list[list[int]], responses: list[list[int]], pad_id: int) -> dict:
    """Queries left-padded to one width, responses right-padded after them, so every response starts at the
    same column; position ids count real tokens only."""
    width = max(len(q) for q in queries)
    length = max(len(r) for r in responses)
    ids, mask, resp, resp_mask = [], [], [], []
    for q, r in zip(queries, responses):
        ids.append([pad_id] * (width - len(q)) + q + r + [pad_id] * (length - len(r)))
        mask.append([0] * (width - len(q)) + [1] * (len(q) + len(r)) + [0] * (length - len(r)))
        resp.append(r + [pad_id] * (length - len(r)))
        resp_mask.append([1] * len(r) + [0] * (length - len(r)))
    attention = torch.tensor(mask)
    return {"input_ids": torch.tensor(ids), "attention_mask": attention,
            "position_ids": (attention.cumsum(-1) - 1).clamp(min=0), "responses": torch.tensor(resp),
            "response_mask": torch.tensor(resp_mask, dtype=torch.float32), "query_width": width}


def rows(batch: dict, index: torch.Tensor) -> dict:
    return {k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------- the rollout


def guide_for(cfg: Ppo, collection: list[PreferencePrinciple], guards: list[PreferencePrinciple], seed: int,
              iteration: int, index: int) -> tuple[list[str], list[str]]:
    """(principle ids, texts) the RM reads for one prompt: `num_principles` drawn from the collection (seeded by
    iteration and prompt), then every guard principle."""
    rng = random.Random(f"{seed}:{iteration}:{index}")
    drawn = rng.sample(collection, min(cfg.num_principles, len(collection)))
    shown = drawn + guards
    return [p.id for p in shown], [p.definition for p in shown]


def shaped_scores(raw: list[float], finishes: list[str], lengths: list[int], cfg: Ppo) -> list[float]:
    """The RM score plus `length_bonus` x min(tokens / max_new_tokens, `length_bonus_cap`); a response that ran
    out of tokens before its stop token gets `stop_penalty` (unless None) added to its score (`relative`, SALMON's
    and TRL's `missing_eos_penalty`: a Bradley-Terry score has no fixed offset, so only a relative penalty is sure
    to lower it, and the truncated response keeps its quality signal) or in place of it (`absolute`)."""
    shaped = []
    for score, finish, n in zip(raw, finishes, lengths):
        if finish == "length" and cfg.stop_penalty is not None:
            score = score + cfg.stop_penalty if cfg.stop_penalty_mode == "relative" else cfg.stop_penalty
        shaped.append(score + cfg.length_bonus * min(n / cfg.max_new_tokens, cfg.length_bonus_cap))
    return shaped


def iteration_prompts(pool: list[dict], cfg: Ppo, seed: int, iteration: int, rank: int, world: int) -> list[int]:
    """Indices into the pool for this iteration and rank: the pool visited in a seeded order per pass over it."""
    total = cfg.rollout_batch_size
    picked = []
    for position in range(iteration * total, (iteration + 1) * total):
        epoch, offset = divmod(position, len(pool))
        picked.append(random.Random(f"{seed}:pool:{epoch}").sample(range(len(pool)), len(pool))[offset])
    return picked[rank::world]


def all_mean(values: dict[str, float], world: int) -> dict[str, float]:
    """The mean over ranks of each statistic (each rank holds the same share of the batch)."""
    import torch.distributed as dist

    names = sorted(values)
    totals = torch.tensor([float(values[n]) for n in names], dtype=torch.float64)
    dist.all_reduce(totals)
    return {n: t / world for n, t in zip(names, totals.tolist())}


# ------------------------------------------------------------------------------------------------------- job


def job(sft_dir: Path, rm_dir: Path, pool: list[dict], collection: list[PreferencePrinciple],
        guards: list[PreferencePrinciple], cfg: Ppo, training: Training, settings: Generation, seed: int,
        ckpt_dir: Path, params: dict, inputs: dict) -> str | None:
    """Runs in every task of the allocation: PPO iterations from the newest checkpoint; rank 0 writes the out."""
    from transformers import AutoTokenizer

    rank, world = init_distributed()
    local = cfg.rollout_batch_size // world
    accum = cfg.step_batch_size // (world * training.micro_batch_size)
    training = training.model_copy(update={"gradient_accumulation_steps": accum})
    updates = cfg.iterations * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.step_batch_size)
    policy = make_engine(lora_model(sft_dir, training, seed), training, world, total_steps=updates)
    value = make_engine(value_model(sft_dir, rm_dir, training, seed), training, world, total_steps=updates)
    reward = RewardModel(sft_dir, rm_dir, batch_size=cfg.score_batch_size, precision=training.precision)
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    pad_id = padding_id(tokenizer)
    state = load_checkpoint(policy, ckpt_dir, others={"value": value}) or {
        "step": 0, "kl_coef": cfg.kl_coef, "curves": [], "samples": []}
    live = LiveCurve(LIVE) if rank == 0 else None
    if rank == 0 and state["step"]:
        print(f"resumed from {ckpt_dir}/{latest_checkpoint(ckpt_dir)} at iteration {state['step']}")
    for step, stats in enumerate(state["curves"]):
        if live:
            live(step, stats)
    rollout_adapter = ckpt_dir / "rollout_adapter"
    preemption.defer()  # a time-limit signal from here on stops after an iteration, with a checkpoint
    with Generator(sft_dir, settings, lora_rank=training.lora_r) as generator:
        while state["step"] < cfg.iterations:
            iteration = state["step"]
            started = time.perf_counter()
            picked = iteration_prompts(pool, cfg, seed, iteration, rank, world)
            save_adapter(policy, rollout_adapter)  # the current policy, for the generation backend to serve
            prompts = [pool[i] for i in picked]
            texts = [chat_prompt(generator.tokenizer, [{"role": "user", "content": p["text"]}], system=p.get("system"))
                     for p in prompts]
            sampling = Sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens,
                                seed=seed * 1_000_003 + iteration * 7_919 + rank * 104_729)
            outs = generator.generate(texts, sampling, adapter=rollout_adapter)
            rolled = time.perf_counter()
            queries = [generator.tokenizer(t)["input_ids"] for t in texts]
            responses = [list(o.token_ids) or [pad_id] for o in outs]
            guides = [([f"system:{p['combination']}"], p["system"]) if "system" in p else
                      guide_for(cfg, collection, guards, seed, iteration, rank * local + k) for k, p in enumerate(prompts)]
            raw = reward.score([p["text"] for p in prompts], [o.text for o in outs], [g[1] for g in guides])
            scores = shaped_scores(raw, [o.finish_reason for o in outs], [len(r) for r in responses], cfg)
            scored = time.perf_counter()
            batch = pack(queries, responses, pad_id)
            stats = update(policy, value, batch, torch.tensor(scores), state["kl_coef"], cfg, training, seed,
                           iteration, rank, world)
            stats.update(all_mean({
                "seconds_rollout": rolled - started, "seconds_reward": scored - rolled,
                "seconds_update": time.perf_counter() - scored, "rollout_tokens": sum(len(r) for r in responses),
                "reward_raw": statistics.fmean(raw), "reward_shaped": statistics.fmean(scores),
                "response_length": statistics.fmean(len(r) for r in responses),
                "no_stop_share": sum(o.finish_reason == "length" for o in outs) / len(outs)}, world))
            stats["kl_coef"] = state["kl_coef"]
            state["kl_coef"] = adapt_kl_coef(state["kl_coef"], stats["kl"], cfg.kl_target, cfg.kl_horizon,
                                             cfg.rollout_batch_size)
            state["curves"].append(stats)
            if iteration % cfg.sample_every == 0:
                state["samples"] += [{"iteration": iteration, "prompt": p["text"], "response": o.text, "principles": g[0],
                                      "reward_raw": r, "reward_shaped": s, "finish": o.finish_reason}
                                     for p, o, g, r, s in list(zip(prompts, outs, guides, raw, scores))[:2]]
            state["step"] += 1
            if rank == 0:
                print(f"iteration {state['step']}/{cfg.iterations} reward {stats['reward_raw']:.3f} "
                      f"kl {stats['kl']:.4f} length {stats['response_length']:.1f}")
                live(iteration, stats)
            end_of_step(policy, ckpt_dir, state, training.keep_checkpoints, cfg.save_every, cfg.iterations,
                        others={"value": value}, say=functools.partial(print, flush=True) if rank == 0 else None,
                        unit="iteration")
    preemption.release()
    final = ckpt_dir / "adapter"
    save_adapter(policy, final)
    curves = state["curves"]

    def write(folder: Path) -> dict:
        write_jsonl(folder / "samples.jsonl", state["samples"])
        return {"algorithm": "ppo", "iterations": len(curves),
                **{f"{name}_first": curves[0][name] for name in ("reward_raw", "response_length", "kl")},
                **{f"{name}_last": curves[-1][name] for name in ("reward_raw", "reward_shaped", "response_length",
                                                                   "kl", "entropy", "no_stop_share")}}

    return finish_training(OUT, stage=STAGE, params=params, inputs=inputs, adapter=final, ckpt_dir=ckpt_dir,
                           base=sft_dir, write=write)


def update(policy: Any, value: Any, batch: dict, scores: torch.Tensor, kl_coef: float, cfg: Ppo,
           training: Training, seed: int, iteration: int, rank: int, world: int) -> dict[str, float]:
    """Rewards, advantages and `ppo_epochs` passes of clipped updates over this rank's rollouts; the iteration's
    statistics, averaged over ranks."""
    import torch.distributed as dist

    mask = batch["response_mask"]
    with torch.no_grad():
        logprobs, logits = policy_outputs(policy, batch, cfg.temperature)
        start_entropy = entropy(logits, mask)
        with policy.module.disable_adapter():
            ref_logprobs, _ = policy_outputs(policy, batch, cfg.temperature)
        values = response_slice(token_values(value, batch), batch["query_width"], mask.shape[1]) * mask
        rewards, kl = token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        moments = torch.stack([(advantages * mask).sum(), (advantages ** 2 * mask).sum(), mask.sum()]).double()
        dist.all_reduce(moments)
        mean = moments[0] / moments[2]
        advantages = whiten(advantages, mask, mean.float(), (moments[1] / moments[2] - mean ** 2).float())
    sums: dict[str, float] = {}
    micro = training.micro_batch_size
    for epoch in range(cfg.ppo_epochs):
        generator = torch.Generator().manual_seed(((seed * 7_919 + iteration) * 104_729 + epoch) * 1_009 + rank)
        order = torch.randperm(mask.shape[0], generator=generator)
        for start in range(0, len(order), micro):
            index = order[start : start + micro]
            part = rows(batch, index)
            new_logprobs, _ = policy_outputs(policy, part, cfg.temperature)
            loss, stats = policy_loss(new_logprobs, logprobs[index], advantages[index], mask[index], cfg.cliprange)
            policy.backward(loss)
            policy.step()
            new_values = response_slice(token_values(value, part), part["query_width"], mask.shape[1])
            v_loss = value_loss(new_values, values[index], returns[index], mask[index], cfg.cliprange_value)
            value.backward(v_loss)
            value.step()
            for name, x in {"policy_loss": loss, "value_loss": v_loss, **stats}.items():
                sums[name] = sums.get(name, 0.0) + float(x.detach())
    passes = cfg.ppo_epochs * -(-mask.shape[0] // micro)
    local = {name: total / passes for name, total in sums.items()}
    local.update(kl=float((kl.sum(1)).mean()), entropy=float(start_entropy),
                 explained_variance=explained_variance(values, returns, mask),
                 advantage_mean=float(masked_mean(advantages, mask)))
    return all_mean(local, world)


# ------------------------------------------------------------------------------------------------------ main


def main() -> None:
    params = load_params()
    cfg = params.ppo
    resources = params.cluster.ppo
    world = resources.nodes * resources.tasks
    if cfg.rollout_batch_size % world or cfg.step_batch_size % (world * params.training.micro_batch_size):
        raise UserError(f"params.yaml: ppo.step_batch_size: {cfg.step_batch_size} samples per step (and "
                        f"rollout_batch_size {cfg.rollout_batch_size}) must divide evenly over {world} ranks x "
                        f"training.micro_batch_size {params.training.micro_batch_size}")
    collection = pick_principles(load_jsonl(COLLECTION, PreferencePrinciple), cfg.principles, "ppo.principles",
                                 COLLECTION)
    guards = pick_principles(load_jsonl(GUARDS, PreferencePrinciple), cfg.guard_principles, "ppo.guard_principles",
                             GUARDS)
    inputs = input_refs({"policy": SFT, "rm": RM, "prompts": PROMPTS, "sft_data": SFT_DATA,
                         "principles": COLLECTION, "guards": GUARDS, "system_messages": SYSTEM})
    prompts = read_jsonl(PROMPTS / "prompts.jsonl")
    pool = unused_prompts(prompts, read_jsonl(SFT_DATA / "sft.jsonl"), cfg.max_prompts or len(prompts), params.seed)
    pool = pool or prompts  # every prompt was used for SFT: PPO still needs prompts
    pool += [{"id": f"sys-{r['id']}", "text": r["prompt"], "system": r["system"], "combination": r["combination"]}
             for r in read_jsonl(SYSTEM / "train.jsonl")]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SFT / MODEL)
    pool = [p for p in pool if len(tokenizer(chat_prompt(tokenizer, [{"role": "user", "content": p["text"]}],
                                                         system=p.get("system")))["input_ids"]) <= cfg.max_query_tokens]
    if not pool:
        raise UserError(f"{PROMPTS}/prompts.jsonl: no prompt fits ppo.max_query_tokens ({cfg.max_query_tokens})")
    training = params.training.model_copy(update={"learning_rate": cfg.learning_rate, "lora_r": cfg.lora_r,
                                                  "lora_alpha": cfg.lora_alpha})
    subset = {"seed": params.seed, "training": params.training.model_dump(), "policy": params.policy.model_dump(),
              "ppo": cfg.model_dump(), "generation": params.generation.model_dump()}
    ckpt_dir = checkpoint_dir("ppo", {"params": subset, "inputs": inputs})
    fn = functools.partial(job, SFT / MODEL, RM, pool, collection, guards, cfg, training, params.generation,
                           params.seed, ckpt_dir, subset, inputs)
    runner.submit_stage(STAGE, OUT, fn, resources, params.cluster, subset, inputs)


if __name__ == "__main__":
    sys.exit(runner.run(main))
