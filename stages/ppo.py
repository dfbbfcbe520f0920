"""Stage `policy` with `policy.algorithm: ppo | grpo | rloo`: SALMON's policy optimisation against the instructable
reward model, with RL-time principles, by PPO or by a critic-free method (GRPO, RLOO). What each algorithm takes
for each part of the loop is one table, align/rl.py ALGORITHMS; the losses are align/losses.py.

Models (align/roles.py, which builds them in each trainer task of the job; align/placement.py says which tasks
train and where the rollout engines run): the policy = the SFT model + a trainable LoRA adapter; the reference = the same model with the adapter disabled (no second copy); PPO's value model = the RM
(its trunk with the RM adapter folded in, and its scalar head) + its own LoRA, read at every response token; the RM
itself, frozen, through `RewardScorer.score`; the generation engine. Policy and value train as two DeepSpeed
engines of the training base, data-parallel over the job's ranks.

One iteration (`rollout`, `score`, then `update`): `rl.rollout_batch_size` prompts (each rank a contiguous block of
them) are answered through the generation interface with the current adapter, `rl.group_size` samples each for
GRPO and RLOO; each response is scored by the RM under every guard principle and `num_principles` principles drawn
per prompt from the PPO collection (seeded by the prompt's place in the iteration, so the draws and vLLM's samples
do not depend on the GPU count), or, for a system-message prompt, under its system message; the score is shaped
(a stop-token penalty, an optional length bonus); the algorithm's estimator turns scores (and PPO's values) into
advantages; `rl.epochs` passes of clipped policy steps (and PPO's value steps) in optimizer steps of
`rl.step_batch_size` samples follow, each step's loss normalised over the step's whole batch by `rl.loss_type`.
With `rl.vllm_is_correction` every term is weighted by the truncated ratio of the trainer's to the engine's
probability of the sampled token. Curves go to dvclive every iteration, sample rows to the out, checkpoints (both
engines, RNG, iteration, KL coefficient, curves) at iteration ends every `cluster.policy.save_every_steps`
optimizer steps.

Time limits and preemption: the rollout and the scoring each end at a safe point. A signal (slurm/preemption.py)
that arrives during a phase stops the job at the end of that phase, with a checkpoint holding what the phase made
(each rank's samples, or its scored rollout), and the requeued job goes on from there: SLURM's warning has to
outlast one phase and a checkpoint, not a whole iteration. Each phase's longest time and the last checkpoint's are
kept with the checkpoint; where they add up to more than `cluster.policy.signal_delay_s` the job log says so.

Out (models/policy, the contract `dpo` shares): adapter/, model/ (merged), samples.jsonl, metrics.json.
"""

from __future__ import annotations

import functools
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from align import paths, runner
from align.artifacts import input_refs
from align.assets import PreferencePrinciple, load_jsonl, pick_principles
from align.devices import computed_dtype, config_dtype, job_device
from align.errors import UserError
from align.generation import Completion, Sampling, chat_prompt
from align.intervals import bootstrap_ci
from align.models import padding_id, prompt_ids
from align.losses import StepNorm, aggregate, policy_terms, value_loss
from align.params import Engine, Params, Ppo, Rl, TrainingRun
from align.paths import MODEL
from align.precision import TRAINING_TO_DTYPE, training_precision
from align.records import read_jsonl, unused_prompts, write_jsonl
from align.reward import both_rewards
from align.rl import (
    ALGORITHMS, adapt_kl_coef, check_settings, entropy, explained_variance, loss_type, masked_mean, token_rewards,
    whiten,
)
from align.placement import Layout, engine_devices, serve
from align.roles import RoleSpec, build_roles
from align.rollout import Rollout, by_chunks, pack, policy_outputs, token_values
from align.training import (
    LiveCurve, checkpoint_dir, end_of_step, finish_training, init_distributed, resumed_steps,
    save_adapter,
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


def on_device(rollout: Rollout, device: torch.device | str) -> Rollout:
    """`rollout` with every tensor on `device` (a safe point keeps it on the CPU, for the checkpoint)."""
    return replace(rollout, **{f.name: getattr(rollout, f.name).to(device) for f in fields(rollout)
                               if isinstance(getattr(rollout, f.name), torch.Tensor)})


@dataclass(frozen=True)
class PpoJob:
    """What a PPO (GRPO, RLOO) job reads, built on the login node and pickled into the job."""

    roles: RoleSpec  # the models, the engine and their settings (training: rl's learning rate, LoRA, schedule and
    # step batch, with cluster.policy's execution settings)
    pool: list[dict]  # prompts: {"id", "text"} and system-message rows with "system", "combination"
    collection: list[PreferencePrinciple]  # RL-time principles, `num_principles` drawn per prompt
    guards: list[PreferencePrinciple]  # shown with every prompt
    algorithm: str  # ppo | grpo | rloo: its row of align/rl.py ALGORITHMS
    rl: Rl
    ppo: Ppo
    seed: int
    ckpt_dir: Path
    signal_delay_s: int  # cluster.policy's: how long SLURM's warning comes before the time limit
    params: dict
    inputs: dict
    held_out: list[dict] = field(default_factory=list)  # prompts kept out of `pool` for `PpoRecipe.held_out`


@dataclass(frozen=True)
class Samples:
    """One rank's rollout phase: its prompts (the first one's place in the iteration, the rows, their chat texts)
    and what the engine sampled for them (`group` consecutive completions per prompt)."""

    first: int
    prompts: list[dict]
    texts: list[str]
    outs: list[Completion]
    seconds: float


def job(args: PpoJob) -> str | None:
    """Runs in every task of the allocation: a trainer rank's recipe (rank 0 returns the out's artifact id), or in
    the split layout an engine node's rollout engine (align/placement.py)."""
    layout = args.roles.layout
    role, index = layout.role(int(os.environ.get("RANK", "0")))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if role == "engine":
        engine_devices(layout, local_rank)
        return serve(args.roles.sft_dir, args.roles.engine, layout, index, args.roles.timeout_min)
    if role == "idle":
        return None
    if layout.split:  # the job's group is the trainers' alone: they come first, so their ranks and MASTER_ADDR stay
        os.environ["WORLD_SIZE"] = str(layout.trainers)
    return PpoRecipe(args).run()


# ----------------------------------------------------------------------------------------------------- recipe


class PpoRecipe:
    """One rank's PPO (or GRPO, RLOO) run: the roles built in `__init__` (align/roles.py), then per iteration
    `rollout` -> `score` -> `update` -> `record`, the first two each ending at a safe point, with resume, curve
    replay, checkpoints and the preemption protocol from `training.resumed_steps`."""

    def __init__(self, job: PpoJob):
        from transformers import AutoTokenizer

        self.job, rl = job, job.rl
        self.training = job.roles.training
        self.algorithm = ALGORITHMS[job.algorithm]
        self.rank, self.world = init_distributed()
        check_one_dtype(job.roles.sft_dir, training_precision(self.training.precision), job_device())
        self.group = rl.group_size if self.algorithm.grouped else 1  # samples per prompt
        self.steps_per_iteration = rl.epochs * (rl.rollout_batch_size * self.group // rl.step_batch_size)
        self.roles = build_roles(job.roles, job.seed, self.rank, self.world,
                                 total_steps=rl.iterations * self.steps_per_iteration)
        self.others = {"value": self.roles.value} if self.roles.value else {}  # saved with the policy
        self.every = -(-self.training.save_every_steps // self.steps_per_iteration)  # iterations: the first end
        # after `save_every_steps` optimizer steps
        self.pad_id = padding_id(AutoTokenizer.from_pretrained(job.roles.sft_dir))
        self.say = functools.partial(print, flush=True) if self.rank == 0 else None
        self.warned = False  # the signal delay is too short for a phase: said once per allocation

    def run(self) -> str | None:
        job, rl = self.job, self.job.rl
        state = {"step": 0, "kl_coef": rl.kl_coef, "curves": [], "samples": [], "seconds": {}}
        with self.roles:
            for iteration in resumed_steps(self.roles.policy, job.ckpt_dir, state, rl.iterations,
                                           keep=self.training.keep_checkpoints, every=self.every, others=self.others,
                                           log=functools.partial(print, flush=True), on_step=LiveCurve(LIVE),
                                           unit="iteration"):
                self.one_iteration(state, iteration, state.pop("own", None))
            state["held_out"] = self.held_out()
        save_adapter(self.roles.policy, job.ckpt_dir / "adapter")
        return self.finish(state)

    def one_iteration(self, state: dict, iteration: int, resumed: Samples | Rollout | None) -> None:
        """rollout, safe point, scoring, safe point, update, record; from where the safe point a requeued job
        stopped at left it (`resumed`: what the phase before it made)."""
        rollout = on_device(resumed, self.roles.policy.device) if isinstance(resumed, Rollout) else None
        if rollout is None:
            samples = resumed if isinstance(resumed, Samples) else None
            if samples is None:
                samples = self.rollout(iteration)
                self.measured(state, "rollout", samples.seconds)
                self.safe_point(state, "rollout", samples)
            rollout = self.score(samples, iteration)
            self.measured(state, "scoring", rollout.stats["seconds_reward"])
            self.safe_point(state, "scoring", on_device(rollout, "cpu"))
        started = time.perf_counter()
        stats = self.update(rollout, state["kl_coef"], iteration)
        stats["seconds_update"] = time.perf_counter() - started
        self.measured(state, "update", stats["seconds_update"])
        self.record(state, rollout, stats)

    def safe_point(self, state: dict, phase: str, made: Samples | Rollout) -> None:
        """After `phase` of the iteration, before any optimizer step: where a time-limit or preemption signal reached
        any rank, a checkpoint with what the phase `made` on each rank, and the job requeued
        (`training.end_of_step`)."""
        end_of_step(self.roles.policy, self.job.ckpt_dir, state, self.training.keep_checkpoints, self.every,
                    self.job.rl.iterations, others=self.others, say=self.say, unit="iteration", phase=phase,
                    own=made)

    def measured(self, state: dict, phase: str, seconds: float) -> None:
        """Keep the phase's longest time with the checkpoints; say once when it and a checkpoint outlast the warning
        SLURM gives before the time limit (the phase would not reach its safe point in time)."""
        times = state["seconds"]
        times[phase] = max(times.get(phase, 0.0), seconds)
        checkpoint = times.get("checkpoint", 0.0)  # measured by `end_of_step` once one was written
        if times[phase] + checkpoint > self.job.signal_delay_s and not self.warned and self.say:
            self.say(f"warning: the {phase} took {times[phase]:.0f} s and a checkpoint {checkpoint:.0f} s, more than "
                     f"cluster.policy.signal_delay_s ({self.job.signal_delay_s} s): a time limit would end the job "
                     f"before its next safe point; set signal_delay_s to "
                     f"{math.ceil(1.5 * (times[phase] + checkpoint))} or more")
            self.warned = True

    def guide(self, prompt: dict, iteration: int, index: int) -> tuple[list[str], list[str] | str]:
        """(ids, what the RM reads) for a prompt: its system message for a system-message row, else principles."""
        if "system" in prompt:
            return [f"system:{prompt['combination']}"], prompt["system"]
        job = self.job
        return guide_for(job.rl, job.collection, job.guards, job.seed, iteration, index)

    def held_out(self) -> dict | None:
        """The trained policy against the SFT policy (adapter off) on the held-out prompts: one sample each with
        one seed, raw RM scores under the same principles. The per-iteration reward curve answers new prompts every
        time, so on a small rollout it mostly shows the prompts' own spread; this compares like with like."""
        import torch.distributed as dist

        job, rl, engine = self.job, self.job.rl, self.roles.engine
        if not job.held_out:
            return None
        mine = list(range(len(job.held_out)))[self.rank::self.world]
        prompts = [job.held_out[i] for i in mine]
        texts = [chat_prompt(engine.tokenizer, [{"role": "user", "content": p["text"]}], system=p.get("system"))
                 for p in prompts]
        guides = [self.guide(p, -1, i)[1] for p, i in zip(prompts, mine)]
        sampling = Sampling(rl.temperature, 1.0, rl.max_new_tokens, seed=job.seed * 1_000_003 - 1)
        outs = [engine.sample(texts, sampling, adapted) for adapted in (False, True)]  # the SFT policy, the trained one
        # every rank scores, with rows or none: a reward model spread over the ranks (shard_scorers) is collective
        sft_texts, policy_texts = ([o.text for o in own] for own in outs)
        raws = both_rewards(self.roles.reward.score, [p["text"] for p in prompts], guides, sft_texts, policy_texts)
        scored = []
        for half, own in zip(raws, outs):
            finishes = [o.finish_reason for o in own]
            shaped = shaped_scores(half, finishes, [len(o.token_ids) for o in own], rl)
            scored.append(list(zip(half, shaped, [f == "length" for f in finishes])))
        rows = list(zip(*scored))  # (SFT's, the policy's) per prompt
        gathered: list[list] = [[] for _ in range(self.world)]
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
        return held_out_summary([r[0] for r in rows], [r[1] for r in rows], job.seed) if rows else None

    def rollout(self, iteration: int) -> Samples:
        """This rank's prompts answered by the current policy (`group` samples each, consecutive)."""
        job, rl, engine = self.job, self.job.rl, self.roles.engine
        started = time.perf_counter()
        # 1. the prompts: a contiguous block of the iteration's, seeds and principle draws keyed by their place
        first, picked = iteration_prompts(job.pool, rl, job.seed, iteration, self.rank, self.world)
        prompts = [job.pool[i] for i in picked]
        texts = [chat_prompt(engine.tokenizer, [{"role": "user", "content": p["text"]}], system=p.get("system"))
                 for p in prompts]
        # 2. the samples, from the adapter as it is now (vLLM seeds prompt k of a call with seed + k x n)
        sampling = Sampling(rl.temperature, 1.0, rl.max_new_tokens, n=self.group, logprobs=rl.vllm_is_correction,
                            seed=(job.seed * 1_000_003 + iteration * 7_919) * 104_729 + first * self.group)
        outs = engine.sample(texts, sampling, adapted=True)
        return Samples(first, prompts, texts, outs, time.perf_counter() - started)

    def score(self, samples: Samples, iteration: int) -> Rollout:
        """This rank's samples scored by the RM under each prompt's principles (or its system message), shaped, and
        packed with the engine's log-probs of the sampled tokens as the update reads them."""
        job, rl = self.job, self.job.rl
        started = time.perf_counter()
        # 1. each response's prompt and guide, keyed by the prompt's place in the iteration
        guides = [self.guide(p, iteration, samples.first + k) for k, p in enumerate(samples.prompts)]
        queries = [prompt_ids(self.roles.engine.tokenizer, t) for t in samples.texts for _ in range(self.group)]
        prompts, guides = ([x for x in xs for _ in range(self.group)] for xs in (samples.prompts, guides))
        outs = samples.outs
        responses = [list(o.token_ids) or [self.pad_id] for o in outs]
        # 2. the RM's scores under each guide, shaped
        raw = self.roles.reward.score([p["text"] for p in prompts], [o.text for o in outs], [g[1] for g in guides])
        scores = shaped_scores(raw, [o.finish_reason for o in outs], [len(r) for r in responses], rl)
        rows = [{"iteration": iteration, "prompt": p["text"], "response": o.text, "principles": g[0],
                 "reward_raw": r, "reward_shaped": s, "finish": o.finish_reason}
                for p, o, g, r, s in zip(prompts, outs, guides, raw, scores)]
        # 3. packed as the update reads it
        engine_logprobs = [list(o.logprobs) for o in outs] if rl.vllm_is_correction else None
        rollout = pack(queries, responses, self.pad_id, scores, device=self.roles.policy.device, samples=rows,
                       truncated=[o.finish_reason == "length" for o in outs], engine_logprobs=engine_logprobs)
        return replace(rollout, stats={"seconds_rollout": samples.seconds,
                                       "seconds_reward": time.perf_counter() - started})

    def before_update(self, rollout: Rollout) -> tuple[Rollout, float]:
        """(the rollout with the trainer's and the reference's log-probs of what was sampled (and PPO's values), the
        policy's mean entropy over the response tokens), by the policy as it was sampled from: before any step."""
        rl, policy, value = self.job.rl, self.roles.policy, self.roles.value

        def forward(part: Rollout) -> list[torch.Tensor]:
            logprobs, logits = policy_outputs(policy, part, rl.temperature)
            with self.roles.reference():
                ref_logprobs, _ = policy_outputs(policy, part, rl.temperature)
            return [logprobs, ref_logprobs, entropy(logits)] + ([] if value is None else [token_values(value, part)])

        with torch.no_grad():
            logprobs, ref_logprobs, entropies, *values = by_chunks(rollout, self.training.micro_batch_size, forward)
        return (replace(rollout, logprobs=logprobs, ref_logprobs=ref_logprobs,
                        values=values[0] * rollout.response_mask if values else None),
                float(masked_mean(entropies, rollout.response_mask)))

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
        job, rl, policy, value_model = self.job, self.job.rl, self.roles.policy, self.roles.value
        # 1. the log-probs (policy, reference) and PPO's values of the whole rollout, before any step
        rollout, entropy_mean = self.before_update(rollout)
        # 2. advantages (PPO: and returns) of the whole rollout
        with torch.no_grad():
            advantages, returns, kl = self.advantages(rollout, kl_coef)
        mask, kind = self.loss_mask(rollout), loss_type(job.algorithm, rl)
        ratio = "sequence" if rl.importance_sampling_level == "sequence" else self.algorithm.ratio
        epsilon_high = rl.epsilon if rl.epsilon_high is None else rl.epsilon_high
        micro, local = self.training.micro_batch_size, rl.step_batch_size // self.world
        scale = local // micro * self.world  # DeepSpeed averages over accumulation steps and ranks: undone here
        sums: dict[str, float] = {}
        for epoch in range(rl.epochs):
            # 3. this epoch's order of the rank's rows, and each optimizer step's normalisers over every rank
            seed = ((job.seed * 7_919 + iteration) * 104_729 + epoch) * 1_009 + self.rank
            order = torch.randperm(len(rollout), generator=torch.Generator().manual_seed(seed)).to(mask.device)
            norms = self.step_norms(rollout, mask, order)
            for step, norm in enumerate(norms):
                for start in range(step * local, (step + 1) * local, micro):
                    # 4. a micro-batch's share of the step's policy loss (and PPO's value loss): backward, step
                    index = order[start : start + micro]
                    part = rollout.rows(index)
                    part_mask = part.response_width(mask[index])
                    logprobs, _ = policy_outputs(policy, part, rl.temperature)
                    terms, stats = policy_terms(
                        logprobs, part.logprobs, part.response_width(advantages[index]), part_mask, ratio, rl.epsilon,
                        epsilon_high, part.engine_logprobs, rl.vllm_is_cap,
                        part.ref_logprobs if self.algorithm.kl_in_loss else None, kl_coef)
                    loss = aggregate(terms, part_mask, "sequence" if terms.shape[1] == 1 else kind, norm)
                    policy.backward(loss * scale)
                    policy.step()
                    stats["policy_loss"] = loss.detach() * self.world / len(norms)
                    if value_model is not None:
                        per_token = value_loss(token_values(value_model, part), part.values,
                                               part.response_width(returns[index]), job.ppo.cliprange_value)
                        value = aggregate(per_token, part_mask, "bnpo", norm)
                        value_model.backward(value * scale)
                        value_model.step()
                        stats["value_loss"] = value.detach() * self.world / len(norms)
                    for name, x in stats.items():
                        sums[name] = sums.get(name, 0.0) + float(x)
        # 5. the iteration's statistics: token means over this rank, step losses averaged over the epochs
        result = {name: sums[name] / max(sums[f"{name}_of"], 1.0) for name in sums
                  if f"{name}_of" in sums}
        result |= {name: sums[name] / rl.epochs for name in ("policy_loss", "value_loss") if name in sums}
        result |= {"kl": float(kl.sum(1).mean()), "advantage_mean": float(masked_mean(advantages, rollout.response_mask)),
                   "entropy": entropy_mean}
        if value_model is None:  # how much the groups tell apart: 0 where every sample of a prompt scores the same
            return {**result, "group_reward_std": float(rollout.scores.view(-1, self.group).std(1).mean())}
        return {**result, "explained_variance": explained_variance(rollout.values, returns, rollout.response_mask)}

    def record(self, state: dict, rollout: Rollout, stats: dict[str, float]) -> None:
        """The iteration's statistics (means over ranks; where its time went: each phase's seconds, the engine's
        tokens per second and the generation's share, as the peers' timing curves) into the curves, two sample rows
        every `sample_every_iterations` iterations, the KL coefficient's next value, one line on rank 0; then the
        step is done."""
        rl, samples = self.job.rl, rollout.samples
        iteration = state["step"]
        tokens, phases = float(rollout.response_mask.sum()), {**stats, **rollout.stats}
        seconds = phases["seconds_rollout"] + phases["seconds_reward"] + phases["seconds_update"]
        stats = all_mean({**phases, "rollout_tokens": tokens,
                          "rollout_tokens_per_s": tokens / phases["seconds_rollout"],  # this rank's engine
                          "generation_share": phases["seconds_rollout"] / seconds,  # of the iteration's three phases
                          "reward_raw": statistics.fmean(s["reward_raw"] for s in samples),
                          "reward_shaped": statistics.fmean(s["reward_shaped"] for s in samples),
                          "response_length": float(rollout.response_mask.sum(1).mean()),
                          "no_stop_share": sum(s["finish"] == "length" for s in samples) / len(samples)},
                         self.world, self.roles.policy.device)
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
                               ckpt_dir=job.ckpt_dir, base=job.roles.sft_dir, write=write)


# ------------------------------------------------------------------------------------------------------ main


def check_layout(params: Params) -> TrainingRun:
    """The settings the chosen algorithm cannot run with, a layout the allocation cannot hold (align/placement.py),
    and prompts that do not divide over the job's trainer ranks, before any work; the job's training settings."""
    rl, resources, algorithm = params.rl, params.cluster.policy, params.policy.algorithm
    check_settings(algorithm, rl)
    layout = Layout.of(resources)
    layout.check(params.generation.backend, rl.rollout_adapter)
    if rl.rollout_batch_size % layout.trainers:
        raise UserError(f"params.yaml: rl.rollout_batch_size: {rl.rollout_batch_size} prompts do not divide over "
                        f"{layout.trainers} trainer ranks (cluster.policy); make it a multiple of {layout.trainers}")
    return TrainingRun.of(params.training, resources, STAGE, ranks=layout.trainers, learning_rate=rl.learning_rate,
                          lora_r=rl.lora_r, lora_alpha=rl.lora_alpha, lr_schedule=rl.lr_schedule,
                          batch_size=rl.step_batch_size)


def check_one_dtype(sft_dir: Path, precision: str, device: torch.device) -> None:
    """Rollouts sample in the dtype the SFT folder computes in on `device` (its own on a GPU; on a CPU bf16 where
    the processor has it, else float32: align/devices.py `computed_dtype`) and the update computes log-probs in
    `precision` (as resolved): the engine's log-probs the update corrects by need the one dtype. Checked in the job
    (its device known), and before it for a GPU job whose precision is set."""
    saved = config_dtype(sft_dir)
    sampled, trained = computed_dtype(saved, device), TRAINING_TO_DTYPE[precision]
    if sampled != trained:
        where = "on a GPU" if device.type == "cuda" else "on this CPU"
        raise UserError(f"params.yaml: training.precision: {precision} but {sft_dir} holds {saved} weights, which "
                        f"rollouts sample in {sampled} {where}: the policy loss's ratio needs one dtype (set "
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


def build_job(params: Params) -> PpoJob:
    """What the job reads, from params.yaml and the inputs, checked before any job."""
    rl, algorithm = params.rl, params.policy.algorithm
    training = check_layout(params)
    collection = pick_principles(load_jsonl(COLLECTION, PreferencePrinciple), rl.principles, "rl.principles",
                                 COLLECTION)
    guards = pick_principles(load_jsonl(GUARDS, PreferencePrinciple), rl.guard_principles, "rl.guard_principles",
                             GUARDS)
    inputs = input_refs({"policy": SFT, "rm": RM, "prompts": PROMPTS, "sft_data": SFT_DATA,
                         "principles": COLLECTION, "guards": GUARDS, "system_messages": SYSTEM})
    if params.training.precision != "auto" and params.cluster.policy.gpus_per_node:
        check_one_dtype(SFT / MODEL, params.training.precision, torch.device("cuda"))
    pool, held_out = hold_out(prompt_pool(rl, params.seed), rl.eval_prompts, params.seed)
    subset = {"seed": params.seed, "training": params.training.model_dump(), "policy": params.policy.model_dump(),
              "rl": rl.model_dump(), "generation": params.generation.model_dump(),
              **({"ppo": params.ppo.model_dump()} if ALGORITHMS[algorithm].value_model else {})}
    ckpt_dir = checkpoint_dir(algorithm, {"params": subset, "inputs": inputs})
    resources = params.cluster.policy
    roles = RoleSpec(sft_dir=SFT / MODEL, rm_dir=RM, training=training, engine=Engine.of(params.generation, resources),
                     score_batch_size=resources.score_batch_size,
                     shard_scorers=resources.shard_scorers, value_model=ALGORITHMS[algorithm].value_model,
                     merge_adapters=rl.rollout_adapter == "merged", layout=Layout.of(resources),
                     rollout_adapter=ckpt_dir / "rollout_adapter", timeout_min=resources.collective_timeout_min)
    return PpoJob(roles=roles, pool=pool, collection=collection, guards=guards, algorithm=algorithm, rl=rl,
                  ppo=params.ppo, seed=params.seed, ckpt_dir=ckpt_dir, signal_delay_s=resources.signal_delay_s,
                  params=subset, inputs=inputs, held_out=held_out)


def main() -> None:
    params = runner.stage_params(STAGE)
    ppo_job = build_job(params)
    algorithm = params.policy.algorithm
    runner.warn_unread(STAGE, {"seed", "training", "policy", "rl", "generation"} |
                       ({"ppo"} if ALGORITHMS[algorithm].value_model else set()), f"policy.algorithm {algorithm}")
    runner.submit_stage(STAGE, OUT, functools.partial(job, ppo_job), params.cluster.policy, params.cluster,
                        ppo_job.params, ppo_job.inputs)


if __name__ == "__main__":
    sys.exit(runner.run(main))
