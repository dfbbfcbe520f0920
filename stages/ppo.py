"""Stage `policy` with `policy.algorithm: ppo | grpo | rloo`: SALMON's policy optimisation against the instructable
reward model, with RL-time principles, by PPO or by a critic-free method (GRPO, RLOO). What each algorithm takes
for each part of the loop is one table, align/rl.py ALGORITHMS; the losses are align/losses.py.

Models, all in each task of the job: the policy = the SFT model + a trainable LoRA adapter; the reference = the
same model with the adapter disabled (no second copy); PPO's value model = the RM (its trunk with the RM adapter
folded in, and its scalar head) + its own LoRA, read at every response token; the RM itself, frozen, through
`RewardScorer.score`. Policy and value train as two DeepSpeed engines of the training base, data-parallel over
the job's ranks.

One iteration (`rollout`, then `update`): `rl.rollout_batch_size` prompts (each rank a contiguous block of them)
are answered through the generation interface with the current adapter, `rl.group_size` samples each for GRPO and
RLOO; each response is scored by the RM under every guard principle and `num_principles` principles drawn per
prompt from the PPO collection (seeded by the prompt's place in the iteration, so the draws and vLLM's samples do
not depend on the GPU count), or, for a system-message prompt, under its system message; the score is shaped
(a stop-token penalty, an optional length bonus); the algorithm's estimator turns scores (and PPO's values) into
advantages; `rl.epochs` passes of clipped policy steps (and PPO's value steps) in optimizer steps of
`rl.step_batch_size` samples follow, each step's loss normalised over the step's whole batch by `rl.loss_type`.
With `rl.vllm_is_correction` every term is weighted by the truncated ratio of the trainer's to the engine's
probability of the sampled token. Curves go to dvclive every iteration, sample rows to the out, checkpoints (both
engines, RNG, iteration, KL coefficient, curves) at iteration ends every `cluster.policy.save_every_steps`
optimizer steps.

Out (models/policy, the contract `dpo` shares): adapter/, model/ (merged), samples.jsonl, metrics.json.
"""

from __future__ import annotations

import functools
import random
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from align import paths, runner
from align.artifacts import input_refs
from align.assets import PreferencePrinciple, load_jsonl, pick_principles
from align.devices import config_dtype
from align.errors import UserError
from align.generation import Generator, Sampling, chat_prompt
from align.intervals import bootstrap_ci
from align.models import padding_id, prompt_ids
from align.losses import StepNorm, aggregate, policy_terms, value_loss
from align.params import Engine, Params, Ppo, Rl, TrainingRun
from align.paths import MODEL
from align.records import read_jsonl, unused_prompts, write_jsonl
from align.reward import RewardScorer
from align.rl import (
    ALGORITHMS, adapt_kl_coef, check_settings, entropy, explained_variance, loss_type, masked_mean, token_rewards,
    whiten,
)
from align.rollout import Rollout, by_chunks, pack, policy_outputs, token_values
from align.training import (
    DTYPE_NAMES, DTYPES, LiveCurve, checkpoint_dir, checkpointed, finish_training, init_distributed, lora_config,
    lora_model, make_engine, resumed_steps, reward_trunk, save_adapter,
)

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


def value_model(sft_dir: Path, rm_dir: Path, training: TrainingRun, seed: int) -> torch.nn.Module:
    """The RM with its adapter folded into the trunk, plus a fresh LoRA of its own; its head trains too."""
    from peft import PeftModel, get_peft_model

    rm = PeftModel.from_pretrained(reward_trunk(sft_dir, DTYPES[training.precision]), str(rm_dir / "adapter"))
    torch.manual_seed(seed + 1)
    return get_peft_model(checkpointed(rm.merge_and_unload(), training), lora_config(training, "SEQ_CLS"))


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every dropout module in eval mode (the model comes from `from_pretrained` in it, but PEFT makes
    its LoRA dropouts in training mode): a sample's log-probabilities before the update, the reference's and the
    update's must come from one function, or the ratio and the KL measure dropout noise. TRL's PPOTrainer turns
    dropout off in its models for the same reason."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    return model


# --------------------------------------------------------------------------------------------- what a job reads


def guide_for(cfg: Rl, collection: list[PreferencePrinciple], guards: list[PreferencePrinciple], seed: int,
              iteration: int, index: int) -> tuple[list[str], list[str]]:
    """(principle ids, texts) the RM reads for one prompt: every guard principle, then `num_principles` drawn from
    the collection (seeded by iteration and prompt). Guards first: the RM was trained on principles in random
    order, and with the guards before the drawn ones every prompt's RM input starts with the same tokens (the
    template's head and the guards), which `RewardScorer` runs once and keeps, not once per response."""
    rng = random.Random(f"{seed}:{iteration}:{index}")
    drawn = rng.sample(collection, min(cfg.num_principles, len(collection)))
    shown = guards + drawn
    return [p.id for p in shown], [p.definition for p in shown]


def shaped_scores(raw: list[float], finishes: list[str], lengths: list[int], cfg: Rl) -> list[float]:
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


def hold_out(pool: list[dict], count: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(training pool, held-out prompts): `count` prompts, at most half the pool, drawn at random and kept out of
    training for `PpoRecipe.held_out`."""
    order = random.Random(f"{seed}:held_out").sample(range(len(pool)), len(pool))
    held = set(order[:min(count, len(pool) // 2)])
    return [p for i, p in enumerate(pool) if i not in held], [p for i, p in enumerate(pool) if i in held]


def held_out_summary(sft: list[tuple[float, float, bool]], policy: list[tuple[float, float, bool]],
                     seed: int) -> dict:
    """From each side's (RM score, shaped score, cut off at max_new_tokens) per held-out prompt, in one prompt order:
    for the RM score (`reward_*`) and the shaped score PPO maximises (`shaped_*`), both sides' means and the
    policy's mean gain with a paired 95% bootstrap interval; the policy's win rate over SFT under the RM (ties half)
    and each side's cut-off share."""
    summary: dict = {"prompts": len(sft)}
    for name, i in (("reward", 0), ("shaped", 1)):
        gains = [p[i] - s[i] for s, p in zip(sft, policy)]
        lo, hi = bootstrap_ci(gains, seed, 2000)
        summary |= {f"{name}_sft": statistics.fmean(s[i] for s in sft),
                    f"{name}_policy": statistics.fmean(p[i] for p in policy),
                    f"{name}_gain": statistics.fmean(gains), f"{name}_gain_ci95": f"[{lo:.3f}, {hi:.3f}]"}
    return {**summary, "win_rate": statistics.fmean(1.0 if p[0] > s[0] else 0.5 if p[0] == s[0] else 0.0
                                                    for s, p in zip(sft, policy)),
            "no_stop_sft": statistics.fmean(float(s[2]) for s in sft),
            "no_stop_policy": statistics.fmean(float(p[2]) for p in policy)}


def iteration_prompts(pool: list[dict], cfg: Rl, seed: int, iteration: int, rank: int,
                      world: int) -> tuple[int, list[int]]:
    """(this rank's first place in the iteration, indices into the pool): the pool visited in a seeded order per
    pass over it; each rank takes a contiguous block of the iteration's prompts, so a prompt's place - which seeds
    its principle draw and its samples - is the same whatever the number of ranks."""
    total = cfg.rollout_batch_size
    picked = []
    for position in range(iteration * total, (iteration + 1) * total):
        epoch, offset = divmod(position, len(pool))
        picked.append(random.Random(f"{seed}:pool:{epoch}").sample(range(len(pool)), len(pool))[offset])
    share = total // world
    return rank * share, picked[rank * share : (rank + 1) * share]


def all_mean(values: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """The mean over ranks of each statistic (each rank holds the same share of the batch)."""
    import torch.distributed as dist

    names = sorted(values)
    totals = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return {n: t / world for n, t in zip(names, totals.tolist())}


@dataclass(frozen=True)
class PpoJob:
    """What a PPO (GRPO, RLOO) job reads, built on the login node and pickled into the job."""

    sft_dir: Path
    rm_dir: Path
    pool: list[dict]  # prompts: {"id", "text"} and system-message rows with "system", "combination"
    collection: list[PreferencePrinciple]  # RL-time principles, `num_principles` drawn per prompt
    guards: list[PreferencePrinciple]  # shown with every prompt
    algorithm: str  # ppo | grpo | rloo: its row of align/rl.py ALGORITHMS
    rl: Rl
    ppo: Ppo
    training: TrainingRun  # rl's learning rate, LoRA, schedule and step batch, with cluster.policy's execution
    engine: Engine
    score_batch_size: int  # RM rows per forward pass
    seed: int
    ckpt_dir: Path
    params: dict
    inputs: dict
    held_out: list[dict] = field(default_factory=list)  # prompts kept out of `pool` for `PpoRecipe.held_out`


def job(args: PpoJob) -> str | None:
    """Runs in every task of the allocation; rank 0 returns the out's artifact id."""
    return PpoRecipe(args).run()


# ----------------------------------------------------------------------------------------------------- recipe


class PpoRecipe:
    """One rank's PPO (or GRPO, RLOO) run: the models in `__init__`, then per iteration `rollout` -> `update` ->
    `record`, with resume, curve replay, checkpoints and the preemption protocol from `training.resumed_steps`."""

    def __init__(self, job: PpoJob):
        from transformers import AutoTokenizer

        self.job, rl = job, job.rl
        self.algorithm = ALGORITHMS[job.algorithm]
        self.rank, self.world = init_distributed()
        self.group = rl.group_size if self.algorithm.grouped else 1  # samples per prompt
        self.steps_per_iteration = rl.epochs * (rl.rollout_batch_size * self.group // rl.step_batch_size)
        updates = rl.iterations * self.steps_per_iteration
        self.policy = make_engine(without_dropout(lora_model(job.sft_dir, job.training, job.seed)), job.training,
                                  self.world, total_steps=updates)
        self.value = None if not self.algorithm.value_model else \
            make_engine(without_dropout(value_model(job.sft_dir, job.rm_dir, job.training, job.seed)),
                        job.training, self.world, total_steps=updates)
        self.reward = RewardScorer(job.sft_dir, job.rm_dir, batch_size=job.score_batch_size,
                                   precision=job.training.precision)
        self.pad_id = padding_id(AutoTokenizer.from_pretrained(job.sft_dir))
        self.rollout_adapter = job.ckpt_dir / "rollout_adapter"  # the current policy, for the generation backend

    def run(self) -> str | None:
        job, rl = self.job, self.job.rl
        state = {"step": 0, "kl_coef": rl.kl_coef, "curves": [], "samples": []}
        every = -(-job.training.save_every_steps // self.steps_per_iteration)  # iterations: the first end after
        with Generator(job.sft_dir, job.engine, lora_rank=job.training.lora_r,
                       merge_adapters=rl.rollout_adapter == "merged") as generator:
            for iteration in resumed_steps(self.policy, job.ckpt_dir, state, rl.iterations,
                                           keep=job.training.keep_checkpoints, every=every,
                                           others={"value": self.value} if self.value else {},
                                           log=functools.partial(print, flush=True), on_step=LiveCurve(LIVE),
                                           unit="iteration"):
                started = time.perf_counter()
                rollout = self.rollout(generator, iteration)
                stats = self.update(rollout, state["kl_coef"], iteration)
                scored = started + rollout.stats["seconds_rollout"] + rollout.stats["seconds_reward"]
                self.record(state, rollout, {**stats, "seconds_update": time.perf_counter() - scored})
            state["held_out"] = self.held_out(generator)
        save_adapter(self.policy, job.ckpt_dir / "adapter")
        return self.finish(state)

    def guide(self, prompt: dict, iteration: int, index: int) -> tuple[list[str], list[str] | str]:
        """(ids, what the RM reads) for a prompt: its system message for a system-message row, else principles."""
        if "system" in prompt:
            return [f"system:{prompt['combination']}"], prompt["system"]
        job = self.job
        return guide_for(job.rl, job.collection, job.guards, job.seed, iteration, index)

    def held_out(self, generator: Generator) -> dict | None:
        """The trained policy against the SFT policy (adapter off) on the held-out prompts: one sample each with
        one seed, raw RM scores under the same principles. The per-iteration reward curve answers new prompts every
        time, so on a small rollout it mostly shows the prompts' own spread; this compares like with like."""
        import torch.distributed as dist

        job, rl = self.job, self.job.rl
        if not job.held_out:
            return None
        save_adapter(self.policy, self.rollout_adapter)
        mine = list(range(len(job.held_out)))[self.rank::self.world]
        rows = []
        if mine:
            prompts = [job.held_out[i] for i in mine]
            texts = [chat_prompt(generator.tokenizer, [{"role": "user", "content": p["text"]}],
                                 system=p.get("system")) for p in prompts]
            guides = [self.guide(p, -1, i)[1] for p, i in zip(prompts, mine)]
            sampling = Sampling(rl.temperature, 1.0, rl.max_new_tokens, seed=job.seed * 1_000_003 - 1)
            scored = []
            for adapter in (None, self.rollout_adapter):
                outs = generator.generate(texts, sampling, adapter=adapter)
                raw = self.reward.score([p["text"] for p in prompts], [o.text for o in outs], guides)
                finishes = [o.finish_reason for o in outs]
                shaped = shaped_scores(raw, finishes, [len(o.token_ids) for o in outs], rl)
                scored.append(list(zip(raw, shaped, [f == "length" for f in finishes])))
            rows = list(zip(*scored))  # (SFT's, the policy's) per prompt
        gathered: list[list] = [[] for _ in range(self.world)]
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
        return held_out_summary([r[0] for r in rows], [r[1] for r in rows], job.seed) if rows else None

    def rollout(self, generator: Generator, iteration: int) -> Rollout:
        """This rank's prompts answered by the current policy (`group` samples each, consecutive rows), scored by
        the RM under each prompt's principles (or its system message) and shaped; with the engine's log-probs of
        the sampled tokens, the trainer's and the reference's, and (PPO) the values, all before the first update."""
        job, rl = self.job, self.job.rl
        started = time.perf_counter()
        # 1. the prompts: a contiguous block of the iteration's, seeds and principle draws keyed by their place
        first, picked = iteration_prompts(job.pool, rl, job.seed, iteration, self.rank, self.world)
        prompts = [job.pool[i] for i in picked]
        texts = [chat_prompt(generator.tokenizer, [{"role": "user", "content": p["text"]}], system=p.get("system"))
                 for p in prompts]
        # 2. the samples, from the adapter as it is now (vLLM seeds prompt k of a call with seed + k x n)
        save_adapter(self.policy, self.rollout_adapter)
        sampling = Sampling(rl.temperature, 1.0, rl.max_new_tokens, n=self.group, logprobs=rl.vllm_is_correction,
                            seed=(job.seed * 1_000_003 + iteration * 7_919) * 104_729 + first * self.group)
        outs = generator.generate(texts, sampling, adapter=self.rollout_adapter)
        rolled = time.perf_counter()
        # 3. the RM's scores under each prompt's guide, shaped
        guides = [self.guide(p, iteration, first + k) for k, p in enumerate(prompts)]
        queries = [prompt_ids(generator.tokenizer, t) for t in texts for _ in range(self.group)]
        prompts, guides = ([x for x in xs for _ in range(self.group)] for xs in (prompts, guides))
        responses = [list(o.token_ids) or [self.pad_id] for o in outs]
        raw = self.reward.score([p["text"] for p in prompts], [o.text for o in outs], [g[1] for g in guides])
        scores = shaped_scores(raw, [o.finish_reason for o in outs], [len(r) for r in responses], rl)
        samples = [{"iteration": iteration, "prompt": p["text"], "response": o.text, "principles": g[0],
                    "reward_raw": r, "reward_shaped": s, "finish": o.finish_reason}
                   for p, o, g, r, s in zip(prompts, outs, guides, raw, scores)]
        stats = {"seconds_rollout": rolled - started, "seconds_reward": time.perf_counter() - rolled}
        engine_logprobs = [list(o.logprobs) for o in outs] if rl.vllm_is_correction else None
        rollout = pack(queries, responses, self.pad_id, scores, device=self.policy.device, samples=samples,
                       truncated=[o.finish_reason == "length" for o in outs], engine_logprobs=engine_logprobs)

        # 4. the trainer's and the reference's log-probs (and the values) of what was sampled, before any step
        def before_update(part: Rollout) -> list[torch.Tensor]:
            logprobs, logits = policy_outputs(self.policy, part, rl.temperature)
            with self.policy.module.disable_adapter():
                ref_logprobs, _ = policy_outputs(self.policy, part, rl.temperature)
            return [logprobs, ref_logprobs, entropy(logits)] + ([] if self.value is None else
                                                               [token_values(self.value, part)])

        with torch.no_grad():
            logprobs, ref_logprobs, entropies, *values = by_chunks(rollout, job.training.micro_batch_size,
                                                                   before_update)
        stats["entropy"] = float(masked_mean(entropies, rollout.response_mask))
        return replace(rollout, logprobs=logprobs, ref_logprobs=ref_logprobs,
                       values=values[0] * rollout.response_mask if values else None, stats=stats)

    def advantages(self, rollout: Rollout, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(advantages, returns (PPO only), per-token KL log pi - log pi_ref) by the algorithm's estimator; PPO's
        are whitened over every rank's tokens. The KL enters the rewards unless the algorithm puts it in the loss."""
        import torch.distributed as dist

        job, mask = self.job, rollout.response_mask
        rewards, kl = token_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask,
                                    0.0 if self.algorithm.kl_in_loss else kl_coef)
        advantages, returns = self.algorithm.estimator(rollout.scores, rewards, rollout.values, mask, job.rl, job.ppo)
        if not self.algorithm.whiten:
            return advantages, returns, kl
        moments = torch.stack([(advantages * mask).sum(), (advantages ** 2 * mask).sum(), mask.sum()]).double()
        dist.all_reduce(moments)
        mean = moments[0] / moments[2]
        return whiten(advantages, mask, mean.float(), (moments[1] / moments[2] - mean ** 2).float()), returns, kl

    def loss_mask(self, rollout: Rollout) -> torch.Tensor:
        """The tokens the loss learns from: every response token, less the responses cut at max_new_tokens with
        `rl.mask_truncated_completions` (DAPO's overlong filtering)."""
        if not self.job.rl.mask_truncated_completions:
            return rollout.response_mask
        return rollout.response_mask * (1 - rollout.truncated)[:, None]

    def step_norms(self, rollout: Rollout, mask: torch.Tensor, order: torch.Tensor) -> list[StepNorm]:
        """Per optimizer step of this epoch (its rows: consecutive slices of `order` on every rank), what the
        step's whole batch holds over every rank, for `aggregate`: one all-reduce per epoch."""
        import torch.distributed as dist

        rl, local = self.job.rl, self.job.rl.step_batch_size // self.world
        tokens = mask.sum(1)
        counts = torch.stack([tokens[order[i : i + local]].sum() for i in range(0, len(order), local)] +
                             [tokens.sum()]).double()
        dist.all_reduce(counts)
        per_step = float(counts[-1]) * rl.step_batch_size / (rl.rollout_batch_size * self.group)
        return [StepNorm(sequences=rl.step_batch_size, tokens=float(t), rollout_tokens_per_step=per_step,
                         max_tokens=rl.max_new_tokens) for t in counts[:-1].tolist()]

    def update(self, rollout: Rollout, kl_coef: float, iteration: int) -> dict[str, float]:
        """`rl.epochs` passes over the rollout in optimizer steps of `step_batch_size` samples (over all ranks),
        each cut into micro-batches; the means of the losses and statistics."""
        job, rl = self.job, self.job.rl
        # 1. advantages (PPO: and returns) of the whole rollout, before any step
        with torch.no_grad():
            advantages, returns, kl = self.advantages(rollout, kl_coef)
        mask, kind = self.loss_mask(rollout), loss_type(job.algorithm, rl)
        ratio = "sequence" if rl.importance_sampling_level == "sequence" else self.algorithm.ratio
        epsilon_high = rl.epsilon if rl.epsilon_high is None else rl.epsilon_high
        micro, local = job.training.micro_batch_size, rl.step_batch_size // self.world
        scale = local // micro * self.world  # DeepSpeed averages over accumulation steps and ranks: undone here
        sums: dict[str, float] = {}
        for epoch in range(rl.epochs):
            # 2. this epoch's order of the rank's rows, and each optimizer step's normalisers over every rank
            seed = ((job.seed * 7_919 + iteration) * 104_729 + epoch) * 1_009 + self.rank
            order = torch.randperm(len(rollout), generator=torch.Generator().manual_seed(seed)).to(mask.device)
            norms = self.step_norms(rollout, mask, order)
            for step, norm in enumerate(norms):
                for start in range(step * local, (step + 1) * local, micro):
                    # 3. a micro-batch's share of the step's policy loss (and PPO's value loss): backward, step
                    index = order[start : start + micro]
                    part = rollout.rows(index)
                    part_mask = part.response_width(mask[index])
                    logprobs, _ = policy_outputs(self.policy, part, rl.temperature)
                    terms, stats = policy_terms(
                        logprobs, part.logprobs, part.response_width(advantages[index]), part_mask, ratio, rl.epsilon,
                        epsilon_high, part.engine_logprobs, rl.vllm_is_cap,
                        part.ref_logprobs if self.algorithm.kl_in_loss else None, kl_coef)
                    loss = aggregate(terms, part_mask, "sequence" if terms.shape[1] == 1 else kind, norm)
                    self.policy.backward(loss * scale)
                    self.policy.step()
                    stats["policy_loss"] = loss.detach() * self.world / len(norms)
                    if self.value is not None:
                        per_token = value_loss(token_values(self.value, part), part.values,
                                               part.response_width(returns[index]), job.ppo.cliprange_value)
                        value = aggregate(per_token, part_mask, "bnpo", norm)
                        self.value.backward(value * scale)
                        self.value.step()
                        stats["value_loss"] = value.detach() * self.world / len(norms)
                    for name, x in stats.items():
                        sums[name] = sums.get(name, 0.0) + float(x)
        # 4. the iteration's statistics: token means over this rank, step losses averaged over the epochs
        result = {name: sums[name] / max(sums[f"{name}_of"], 1.0) for name in sums
                  if f"{name}_of" in sums}
        result |= {name: sums[name] / rl.epochs for name in ("policy_loss", "value_loss") if name in sums}
        result |= {"kl": float(kl.sum(1).mean()), "advantage_mean": float(masked_mean(advantages, rollout.response_mask))}
        if self.value is None:  # how much the groups tell apart: 0 where every sample of a prompt scores the same
            return {**result, "group_reward_std": float(rollout.scores.view(-1, self.group).std(1).mean())}
        return {**result, "explained_variance": explained_variance(rollout.values, returns, rollout.response_mask)}

    def record(self, state: dict, rollout: Rollout, stats: dict[str, float]) -> None:
        """The iteration's statistics (means over ranks) into the curves, two sample rows every
        `sample_every_iterations` iterations, the KL coefficient's next value, one line on rank 0; then the step
        is done."""
        rl, samples = self.job.rl, rollout.samples
        iteration = state["step"]
        stats = all_mean({**stats, **rollout.stats, "rollout_tokens": float(rollout.response_mask.sum()),
                          "reward_raw": statistics.fmean(s["reward_raw"] for s in samples),
                          "reward_shaped": statistics.fmean(s["reward_shaped"] for s in samples),
                          "response_length": float(rollout.response_mask.sum(1).mean()),
                          "no_stop_share": sum(s["finish"] == "length" for s in samples) / len(samples)},
                         self.world, self.policy.device)
        stats["kl_coef"] = state["kl_coef"]
        state["kl_coef"] = adapt_kl_coef(state["kl_coef"], stats["kl"], rl.kl_target, rl.kl_horizon,
                                         len(samples) * self.world)
        state["curves"].append(stats)
        if iteration % rl.sample_every_iterations == 0:
            state["samples"] += samples[:2]
        state["step"] += 1
        if self.rank == 0:
            print(f"iteration {state['step']}/{rl.iterations} reward {stats['reward_raw']:.3f} "
                  f"kl {stats['kl']:.4f} length {stats['response_length']:.1f}", flush=True)

    def finish(self, state: dict) -> str | None:
        """Rank 0 writes the out (adapter, merged model, samples, metrics); every rank returns."""
        job, curves = self.job, state["curves"]

        def write(folder: Path) -> dict:
            write_jsonl(folder / "samples.jsonl", state["samples"])
            return {"algorithm": job.algorithm, "loss_type": loss_type(job.algorithm, job.rl),
                    "iterations": len(curves),
                    **{f"{name}_first": curves[0][name] for name in ("reward_raw", "response_length", "kl")},
                    **{f"{name}_last": curves[-1][name] for name in ("reward_raw", "reward_shaped", "response_length",
                                                                       "kl", "entropy", "no_stop_share")},
                    "held_out": state.get("held_out")}

        return finish_training(OUT, stage=STAGE, params=job.params, inputs=job.inputs, adapter=job.ckpt_dir / "adapter",
                               ckpt_dir=job.ckpt_dir, base=job.sft_dir, write=write)


# ------------------------------------------------------------------------------------------------------ main


def check_layout(params: Params) -> TrainingRun:
    """The settings the chosen algorithm cannot run with, prompts that do not divide over the job's ranks, and
    rollouts one GPU per rank cannot sample, before any work; the job's training settings."""
    rl, resources, algorithm = params.rl, params.cluster.policy, params.policy.algorithm
    check_settings(algorithm, rl)
    ranks = resources.nodes * resources.tasks
    if rl.rollout_batch_size % ranks:
        raise UserError(f"params.yaml: rl.rollout_batch_size: {rl.rollout_batch_size} prompts do not divide over "
                        f"{ranks} ranks (cluster.policy); make it a multiple of {ranks}")
    if resources.tensor_parallel_size > 1 and params.generation.backend != "hf":
        raise UserError(f"params.yaml: cluster.policy.tensor_parallel_size: {resources.tensor_parallel_size}, but "
                        f"the policy stage samples inside each training rank on its one GPU; use 1 (a policy one GPU "
                        f"serves), generation.backend: hf, or policy.algorithm: dpo")
    return TrainingRun.of(params.training, resources, STAGE, learning_rate=rl.learning_rate, lora_r=rl.lora_r,
                          lora_alpha=rl.lora_alpha, lr_schedule=rl.lr_schedule, batch_size=rl.step_batch_size)


def check_one_dtype(params: Params) -> None:
    """Rollouts sample in the SFT folder's dtype on a GPU; the update computes log-probs in training.precision."""
    sampled, trained = config_dtype(SFT / MODEL), DTYPE_NAMES[params.training.precision]
    if sampled != trained:
        raise UserError(f"params.yaml: training.precision: {params.training.precision} but {SFT / MODEL} holds "
                        f"{sampled} weights, which rollouts sample in: the policy loss's ratio needs one dtype (set "
                        f"model.dtype or training.precision to match)")


def prompt_pool(cfg: Rl, seed: int) -> list[dict]:
    """The prompts the policy samples from: those SFT did not use (all of them if it used every one), plus the
    system message rows, each within `max_query_tokens` as the policy's tokenizer counts its chat prompt."""
    from transformers import AutoTokenizer

    prompts = read_jsonl(PROMPTS / "prompts.jsonl")
    pool = unused_prompts(prompts, read_jsonl(SFT_DATA / "sft.jsonl"), cfg.max_prompts or len(prompts), seed)
    pool = pool or prompts
    pool += [{"id": f"sys-{r['id']}", "text": r["prompt"], "system": r["system"], "combination": r["combination"]}
             for r in read_jsonl(SYSTEM / "train.jsonl")]
    tokenizer = AutoTokenizer.from_pretrained(SFT / MODEL)

    def query_tokens(prompt: dict) -> int:
        turn = [{"role": "user", "content": prompt["text"]}]
        return len(prompt_ids(tokenizer, chat_prompt(tokenizer, turn, system=prompt.get("system"))))

    pool = [p for p in pool if query_tokens(p) <= cfg.max_query_tokens]
    if not pool:
        raise UserError(f"{PROMPTS}/prompts.jsonl: no prompt fits rl.max_query_tokens ({cfg.max_query_tokens})")
    return pool


def main() -> None:
    params = runner.stage_params(STAGE)
    rl, algorithm = params.rl, params.policy.algorithm
    training = check_layout(params)
    runner.warn_unread(STAGE, {"seed", "training", "policy", "rl", "generation"} |
                       ({"ppo"} if ALGORITHMS[algorithm].value_model else set()), f"policy.algorithm {algorithm}")
    collection = pick_principles(load_jsonl(COLLECTION, PreferencePrinciple), rl.principles, "rl.principles",
                                 COLLECTION)
    guards = pick_principles(load_jsonl(GUARDS, PreferencePrinciple), rl.guard_principles, "rl.guard_principles",
                             GUARDS)
    inputs = input_refs({"policy": SFT, "rm": RM, "prompts": PROMPTS, "sft_data": SFT_DATA,
                         "principles": COLLECTION, "guards": GUARDS, "system_messages": SYSTEM})
    check_one_dtype(params)
    pool, held_out = hold_out(prompt_pool(rl, params.seed), rl.eval_prompts, params.seed)
    subset = {"seed": params.seed, "training": params.training.model_dump(), "policy": params.policy.model_dump(),
              "rl": rl.model_dump(), "generation": params.generation.model_dump(),
              **({"ppo": params.ppo.model_dump()} if ALGORITHMS[algorithm].value_model else {})}
    ckpt_dir = checkpoint_dir(algorithm, {"params": subset, "inputs": inputs})
    resources = params.cluster.policy
    fn = functools.partial(job, PpoJob(
        sft_dir=SFT / MODEL, rm_dir=RM, pool=pool, collection=collection, guards=guards, algorithm=algorithm, rl=rl,
        ppo=params.ppo, training=training, engine=Engine.of(params.generation, resources),
        score_batch_size=resources.score_batch_size, seed=params.seed, ckpt_dir=ckpt_dir, params=subset,
        inputs=inputs, held_out=held_out))
    runner.submit_stage(STAGE, OUT, fn, resources, params.cluster, subset, inputs)


if __name__ == "__main__":
    sys.exit(runner.run(main))
