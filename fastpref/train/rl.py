"""The RL stage as a task of the one training loop (`fastpref train grpo`): prompts, rollouts, rewards,
advantages, and the policy loss on the fused head.

Per generation batch, each process samples its own prompts (`RolloutSampler`), num_generations completions
each with the model's `generate` (KV cache; seeded by (seed, generation batch, rank), so a resumed run samples
the same completions), scores them (`fastpref.train.rewards`), and turns the rewards into group advantages
(`fastpref.losses.policy.group_advantages`). The batch is then cut into gradient_accumulation_steps
micro-batches of per_device_train_batch_size completions and trained on num_iterations times (one optimizer
step each). Per-token log-probs and entropies of the policy, of the old policy (num_iterations > 1) and of the
reference (beta > 0) come from `fastpref.linear_token_logps` on the hidden states of the completion positions
(temperature applied to the logits, as TRL's head): no (tokens x vocab) tensor is held for any of them.
Every pass of the policy (sampling, old-policy and loss log-probs) goes through `PolicyModule.forward`, the
sharded root under FSDP2, whose forward gathers the weights; the reference is a PolicyModule too.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fastpref
from fastpref.losses.policy import (
    CLIPPED_LOSS_TYPES,
    group_advantages,
    high_entropy_mask,
    leave_one_out_advantages,
    policy_loss,
    rloo_loss,
)
from fastpref.model_head import head_of, hidden_states
from fastpref.train import distributed, metrics
from fastpref.train.data import (
    Example,
    Renderer,
    Splits,
    _check_field,
    _group_key,
    _is_conversation,
    _label,
    _split_by_prompt,
    load_rows,
)
from fastpref.train.modeling import TaskModule
from fastpref.train.rl_config import DEFAULT_REWARD_MODEL, RLConfig, starting_policy  # noqa: F401

RL_TASKS = ("grpo", "rloo", "raft")
MAX_TRAIN_EVAL_PROMPTS = 16  # training prompts sampled again at the end, for the summary


# --- prompts ---


@dataclass
class PromptExample(Example):
    """A prompt to sample from: its token ids (`prompt`), the prompt as the data gave it (`raw`, a string or a
    conversation) and the row's other columns (passed to reward functions, as TRL)."""

    raw: object = None
    columns: dict = field(default_factory=dict)


def build_prompt_splits(config: RLConfig, tokenizer) -> Splits:
    """Prompts of the dataset (a `prompt` column, standard or conversational; preference rows give their prompts,
    each once), split into train / held-out whole prompts at a time, tokenized and cut from the left to
    max_prompt_length."""
    train_rows, test_rows = load_rows(
        config.dataset_name, config.dataset_train_split, config.dataset_test_split, config.dataset_config
    )
    notes: list[str] = []

    def items(rows, source):
        if rows and "prompt" not in rows[0]:
            raise ValueError(f"dataset {source} has columns {sorted(rows[0])}; `fastpref train {config.task}` needs "
                             "a `prompt` column (a string, or a list of {'role', 'content'} messages)")
        out, seen = [], set()
        for i, row in enumerate(rows):
            if "prompt" not in row:
                raise ValueError(f"{_label(rows, i)} lacks column 'prompt'")
            _check_field(_label(rows, i), "prompt", row["prompt"])
            key = _group_key(row["prompt"])
            if key in seen:
                continue
            seen.add(key)
            columns = {k: v for k, v in row.items() if k != "prompt"}
            out.append((row.get("id", i), row["prompt"], columns, None))
        return out

    if not train_rows:
        raise ValueError(f"dataset {config.dataset_name} holds no training rows")
    train_items = items(train_rows, config.dataset_name)
    if test_rows is not None:
        test_items = items(test_rows, f"{config.dataset_name}[{config.dataset_test_split}]")
        notes.append(f"evaluating on split {config.dataset_test_split!r} ({len(test_items)} prompts)")
    else:
        train_items, test_items = _split_by_prompt(train_items, config.eval_fraction, config.seed)
        if test_items:
            notes.append(f"held out {len(test_items)} prompts for the reward evaluation; sampling from "
                         f"{len(train_items)}")
    if config.max_train_samples:
        train_items = train_items[: config.max_train_samples]
    if config.max_eval_samples:
        test_items = test_items[: config.max_eval_samples]
    renderer = Renderer(tokenizer)

    def tokenize(chosen_items):
        examples = []
        for row_id, prompt, columns, _ in chosen_items:
            ids, _ = renderer.encode(prompt, [])
            if config.max_prompt_length and len(ids) > config.max_prompt_length:
                ids = ids[-config.max_prompt_length:]
            examples.append(PromptExample(len(examples), ids, [], None, str(row_id), raw=prompt, columns=columns))
        return examples

    return Splits(tokenize(train_items), tokenize(test_items), notes)


class RolloutSampler:
    """Prompts per generation batch: a seeded permutation per epoch cut into global batches of
    prompts_per_generation x world prompts; each optimizer step belongs to generation batch step // num_iterations."""

    def __init__(self, n_prompts: int, per_rank: int, world: int, num_iterations: int, seed: int):
        self.n, self.per_rank, self.world, self.seed = n_prompts, per_rank, world, seed
        self.num_iterations = num_iterations
        self.global_batch = per_rank * world  # prompts
        generations = n_prompts // self.global_batch
        if generations == 0:
            raise ValueError(
                f"the training split has {n_prompts} prompts, fewer than one generation batch of {self.global_batch} "
                "(per_device_train_batch_size x gradient_accumulation_steps / num_generations x processes)"
            )
        self.generations_per_epoch = generations
        self.steps_per_epoch = generations * num_iterations

    def prompts(self, generation: int, rank: int) -> list[int]:
        epoch, within = divmod(generation, self.generations_per_epoch)
        g = torch.Generator().manual_seed(self.seed + 1000003 * epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        start = within * self.global_batch + rank * self.per_rank
        return perm[start : start + self.per_rank]


# --- rollouts ---


def sampling_seed(seed: int, generation: int, rank: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + generation * 7_919 + rank * 104_729 + salt * 15_485_863) % (2**63 - 1)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, length - len(s):] = torch.tensor(s)
            mask[i, length - len(s):] = 1
    return ids, mask


def completion_mask(completion_ids: torch.Tensor, eos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (B, C) long: the tokens up to and including the first EOS, truncated (B,) bool: no EOS at all)."""
    if eos_id is None:
        return torch.ones_like(completion_ids), torch.ones(completion_ids.shape[0], dtype=torch.bool)
    is_eos = completion_ids == eos_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion_ids.shape[1])
    mask = (torch.arange(completion_ids.shape[1], device=completion_ids.device)[None] <= first[:, None]).long()
    return mask, ~is_eos.any(1)


def token_logps(model, prompt_ids, prompt_mask, completion_ids, mask, temperature: float, with_entropy: bool):
    """Per-token log-probs (B, C) of the completion tokens (0 where mask is 0) under `model` at `temperature`, and
    their entropies (B, C) when asked: fused head on the completion positions' hidden states."""
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask, mask], 1)
    hidden = hidden_states(model, input_ids, attention)[:, prompt_ids.shape[1] - 1:]
    head = head_of(model)
    weight = head.weight.to(hidden.dtype)
    bias = None if head.bias is None else head.bias.to(hidden.dtype)
    labels = completion_ids.masked_fill(mask == 0, -100)
    out = fastpref.linear_token_logps(
        hidden, weight, labels, bias=bias, softcap=head.softcap, logit_scale=head.logit_scale,
        temperature=temperature, return_stats="entropy" if with_entropy else False,
    )
    return (out[0], out[1].entropy) if with_entropy else (out, None)


class PolicyModule(TaskModule):
    """forward(micro-batch of rollouts) -> (GRPO-family or RLOO loss, TRL's metrics as (sum, units)).

    The model's other passes go through this forward too, chosen by batch["run"]: "generate" (the model's
    `generate` on batch["inputs"] -> the sequences) and "logps" (per-token log-probs (B, C), no loss). Under FSDP2
    this module is the sharded root, and the root's forward is what gathers the weights held at its level."""

    def forward(self, batch):
        run = batch.get("run", "loss")
        if run == "generate":
            with distributed.gathered(self):
                return self.model.generate(**batch["inputs"])
        if run == "logps":
            return token_logps(self.model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                               batch["completion_mask"], self.config.temperature, False)[0]
        c = self.config
        mask = batch["completion_mask"]
        logps, entropies = token_logps(self.model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                                       mask, c.temperature, True)
        if c.task == "rloo":
            return self._rloo(batch, logps, entropies, mask)
        if c.task == "raft":  # SFT on the kept completions: the token mean over this process's generation batch
            m = mask.to(logps.dtype)
            loss = -(logps * m).sum() / batch["num_items"].clamp(min=1.0)
            values = {"entropy": ((entropies.detach() * m).sum(), m.sum()),
                      "loss": (loss.detach() * batch["accumulation"], torch.ones((), device=m.device))}
            return loss, values
        entropy_mask = None
        if c.top_entropy_quantile < 1.0:
            local = entropies.detach()[mask.bool()].float()
            gather = batch.get("gather")  # the quantile of every process's micro-batch tokens, as TRL's
            entropy_mask = high_entropy_mask(entropies.detach(), mask, 1 - c.top_entropy_quantile,
                                             gather(local) if gather is not None else None)
        out = policy_loss(
            logps, batch.get("old_logps"), batch["advantages"], mask, loss_type=c.loss_type,
            ref_logps=batch.get("ref_logps"), beta=c.beta, epsilon=c.epsilon, epsilon_high=c.epsilon_high,
            importance_sampling_level=c.importance_sampling_level, delta=c.delta,
            sapo_temperature_pos=c.sapo_temperature_pos, sapo_temperature_neg=c.sapo_temperature_neg,
            vespo_k_pos=c.vespo_k_pos, vespo_lambda_pos=c.vespo_lambda_pos, vespo_k_neg=c.vespo_k_neg,
            vespo_lambda_neg=c.vespo_lambda_neg, use_bias_correction_kl=c.use_bias_correction_kl,
            entropies=entropies, entropy_mask=entropy_mask, entropy_coef=c.entropy_coef,
            max_completion_length=c.max_completion_length, num_items=batch["num_items"],
            accumulation=batch["accumulation"],
        )
        m = mask.float()
        tokens = m.sum()
        values = {"entropy": ((entropies.detach() * m).sum(), tokens)}
        if out.kl is not None:
            values["kl"] = ((out.kl.detach() * m).sum(), tokens)
        if c.loss_type in CLIPPED_LOSS_TYPES:
            values.update(_clip_metrics(out.ratio, batch["advantages"].unsqueeze(1), m, c))
        # the loss as logged: the accumulation-scaled share undone, so every micro-batch logs the step's scale
        values["loss"] = (out.loss.detach() * batch["accumulation"], torch.ones((), device=mask.device))
        return out.loss, values


    def _rloo(self, batch, logps, entropies, mask):
        c = self.config
        loss, ratio = rloo_loss(logps, batch["old_logps"].sum(1), batch["advantages"], mask.to(logps.dtype),
                                epsilon=c.epsilon, epsilon_high=c.epsilon_high)
        loss = loss / batch["accumulation"]  # the micro-batches' mean, as the Trainer scales TRL's RLOO loss
        m = mask.float()
        values = {"entropy": ((entropies.detach() * m).sum(), m.sum()),
                  "loss": (loss.detach() * batch["accumulation"], torch.ones((), device=m.device))}
        values.update(_clip_metrics(ratio.unsqueeze(1), batch["advantages"].unsqueeze(1), m, c))
        return loss, values


def _clip_metrics(ratio, advantages, m, c) -> dict:
    low_bound = 1 - c.epsilon
    high_bound = 1 + (c.epsilon if c.epsilon_high is None else c.epsilon_high)
    low = ((ratio < low_bound) & (advantages < 0)).float()
    high = ((ratio > high_bound) & (advantages > 0)).float()
    if ratio.shape[1] == 1:  # one ratio per sequence
        n = torch.tensor(float(ratio.shape[0]), device=m.device)
        return {"clip_ratio/low_mean": (low.sum(), n), "clip_ratio/high_mean": (high.sum(), n),
                "clip_ratio/region_mean": ((low + high).clamp(max=1).sum(), n)}
    tokens = m.sum()
    return {"clip_ratio/low_mean": ((low * m).sum(), tokens), "clip_ratio/high_mean": ((high * m).sum(), tokens),
            "clip_ratio/region_mean": (((low + high).clamp(max=1) * m).sum(), tokens)}


# --- the stage ---


def reward_model_path(config: RLConfig) -> str | None:
    """--reward_model, else the default `fastpref train reward` output when no --reward_funcs is given; an error
    saying how to make one when there is none."""
    if config.reward_model is not None or config.reward_funcs:
        return config.reward_model
    if (Path(DEFAULT_REWARD_MODEL) / "config.json").exists():
        return DEFAULT_REWARD_MODEL
    raise FileNotFoundError(
        f"no reward: --reward_model DIR or --reward_funcs module:function, or the default reward model "
        f"{DEFAULT_REWARD_MODEL}/, which `fastpref train reward` writes (run it first; the embedded pipeline is "
        "`fastpref train sft`, `fastpref train reward`, `fastpref train grpo`)"
    )


class RLStage:
    """The RL parts of a Trainer whose task is in RL_TASKS: sampler, reference, rewards, generation cache."""

    def __init__(self, trainer):
        from fastpref.train.rewards import RewardModel, Rewards, load_reward_func

        self.trainer = t = trainer
        c: RLConfig = t.config
        self.config, self.dist = c, t.dist
        self.sampler = RolloutSampler(len(t.splits.train), c.prompts_per_generation(), t.dist.world,
                                      getattr(c, "num_iterations", 1), c.seed)
        self.iterations = getattr(c, "num_iterations", 1)  # raft: one step per generation batch
        path = reward_model_path(c)
        reward_model = RewardModel(path, t.device, c.per_device_eval_batch_size) if path else None
        self.rewards = Rewards(reward_model, [load_reward_func(s) for s in c.reward_funcs or []], c.reward_weights)
        self.policy = t.module  # under FSDP2 the sharded root: every pass of the policy goes through its forward
        self.ref_model = t.ref_model  # a PolicyModule too (beta > 0), built by the Trainer
        tok = t.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.eos_id = tok.eos_token_id
        self.cache: tuple[int, dict, dict] | None = None  # (generation index, rollouts, metrics)

    # --- sampling ---

    def _generation_config(self, greedy: bool = False):
        from transformers import GenerationConfig

        c = self.config
        return GenerationConfig(
            max_new_tokens=c.max_completion_length, do_sample=not greedy, temperature=c.temperature, top_p=c.top_p,
            top_k=c.top_k, pad_token_id=self.pad_id, eos_token_id=self.eos_id, bos_token_id=None, use_cache=True,
        )

    @torch.no_grad()
    def sample(self, examples: list[PromptExample], k: int, seed: int) -> dict:
        """k completions per prompt (consecutive), sampled with `seed`; returns the padded tensors and texts."""
        t = self.trainer
        device = t.device
        prompt_ids, prompt_mask = left_pad([ex.prompt for ex in examples for _ in range(k)], self.pad_id)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        devices = [device] if device.type == "cuda" else []
        was_training = self.policy.training
        self.policy.eval()
        with torch.random.fork_rng(devices=devices), t.autocast():
            torch.manual_seed(seed)
            out = self.policy({"run": "generate", "inputs": dict(
                input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=self._generation_config())})
        self.policy.train(was_training)
        completion_ids = out[:, prompt_ids.shape[1]:]
        if completion_ids.shape[1] == 0:
            completion_ids = torch.full((len(completion_ids), 1), self.pad_id, dtype=torch.long, device=device)
        mask, truncated = completion_mask(completion_ids, self.eos_id)
        completion_ids = completion_ids.masked_fill(mask == 0, self.pad_id)
        texts = t.tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(completion_ids, mask)],
                                         skip_special_tokens=True)
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
                "completion_mask": mask, "truncated": truncated, "texts": texts}

    def score(self, examples: list[PromptExample], k: int, rollouts: dict) -> torch.Tensor:
        """(B, R) rewards of the rollouts of `examples` (k each)."""
        prompts = [ex.raw for ex in examples for _ in range(k)]
        texts = rollouts["texts"]
        completions = [[{"role": "assistant", "content": text}] if _is_conversation(p) else text
                       for p, text in zip(prompts, texts)]
        names = sorted({name for ex in examples for name in ex.columns})
        columns = {name: [ex.columns.get(name) for ex in examples for _ in range(k)] for name in names}
        return self.rewards.score(prompts, completions, columns)

    def _gather_ragged(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's 1-D `x` (lengths may differ), concatenated in rank order."""
        import torch.distributed as tdist

        length = torch.tensor([x.numel()], device=self.trainer.device)
        lengths = [torch.empty_like(length) for _ in range(self.dist.world)]
        tdist.all_gather(lengths, length)
        longest = int(max(n.item() for n in lengths))
        padded = torch.zeros(longest, dtype=x.dtype, device=self.trainer.device)
        padded[: x.numel()] = x
        parts = [torch.empty_like(padded) for _ in range(self.dist.world)]
        tdist.all_gather(parts, padded)
        return torch.cat([part[: int(n.item())] for part, n in zip(parts, lengths)])

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's equal-shaped `x`, concatenated in rank order."""
        if not self.dist.enabled:
            return x
        import torch.distributed as tdist

        parts = [torch.empty_like(x) for _ in range(self.dist.world)]
        tdist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def generate(self, generation: int) -> tuple[dict, dict]:
        """The rollouts of generation batch `generation` on this process and their metrics."""
        t, c = self.trainer, self.config
        examples = [t.splits.train[i] for i in self.sampler.prompts(generation, self.dist.rank)]
        k = c.num_generations
        rollouts = self.sample(examples, k, sampling_seed(c.seed, generation, self.dist.rank))
        per_func = self.score(examples, k, rollouts)  # (B, R)
        weights = self.rewards.weights
        rewards = (per_func * weights).nansum(1)
        rewards[torch.isnan(per_func).all(1)] = float("nan")
        mask = rollouts["completion_mask"]
        lengths = mask.sum(1)
        truncated = rollouts["truncated"]
        if c.mask_truncated_completions:
            mask = mask * (~truncated).long().unsqueeze(1).to(mask.device)
            rollouts["completion_mask"] = mask
        extra = {}
        if c.task == "raft":
            rollouts, extra = self._keep_best(rollouts, rewards)
            mask = rollouts["completion_mask"]
        rollouts["num_items"] = mask.sum().float()  # this process's generation batch (dapo / cispo / vespo)
        with torch.no_grad(), t.autocast():
            if self.iterations > 1 or c.task == "rloo":  # the sampling policy's log-probs, for the ratios
                rollouts["old_logps"] = self._logps(self.policy, rollouts)
            if self.ref_model is not None:
                rollouts["ref_logps"] = self._logps(self.ref_model, rollouts)
        if c.task == "rloo":
            adv, extra = self._rloo_advantages(rewards, rollouts)
        elif getattr(c, "scale_rewards", "group") == "batch" and self.dist.enabled:  # the std of every process's
            everything = group_advantages(self._gather(rewards.to(t.device)).cpu(), k, "batch")
            n = len(rewards)
            adv = type(everything)(*(x[self.dist.rank * n:(self.dist.rank + 1) * n] for x in everything))
        else:
            adv = group_advantages(rewards, k, getattr(c, "scale_rewards", "group"))  # raft: for the metrics
        if c.task != "raft":
            rollouts["advantages"] = adv.advantages.to(t.device)
        ones = torch.ones((), dtype=torch.float64)
        count = torch.tensor(float(len(rewards)), dtype=torch.float64)
        finite = ~torch.isnan(rewards)
        values = {
            "reward": (rewards[finite].double().sum(), finite.sum().double()),
            "reward_std": (_nanstd(rewards), ones),
            "frac_reward_zero_std": (adv.zero_std.double().sum(), count),
            "completions/mean_length": (lengths.double().sum().cpu(), count),
            "completions/min_length": (lengths.min().double().cpu(), ones),
            "completions/max_length": (lengths.max().double().cpu(), ones),
            "completions/clipped_ratio": (truncated.double().sum().cpu(), count),
        }
        values.update(extra)
        for name, column in zip(self.rewards.names, per_func.T):
            ok = ~torch.isnan(column)
            values[f"rewards/{name}/mean"] = (column[ok].double().sum(), ok.sum().double())
            values[f"rewards/{name}/std"] = (_nanstd(column), ones)
        rollouts["tokens"] = int(rollouts["prompt_mask"].sum() + rollouts["completion_mask"].sum())
        return rollouts, values

    def _keep_best(self, rollouts: dict, rewards: torch.Tensor) -> tuple[dict, dict]:
        """RAFT: the rollouts of each prompt's best completion by reward (unscorable ones last)."""
        k = self.config.num_generations
        grouped = torch.nan_to_num(rewards, nan=-math.inf).view(-1, k)
        best = grouped.argmax(1) + torch.arange(grouped.shape[0]) * k
        kept = {name: value[best.to(value.device)] for name, value in rollouts.items()
                if isinstance(value, torch.Tensor)}
        kept["texts"] = [rollouts["texts"][i] for i in best.tolist()]
        n = torch.tensor(float(len(best)), dtype=torch.float64)
        return kept, {"raft/kept_reward": (rewards[best].double().nansum(), n)}

    def _rloo_advantages(self, rewards: torch.Tensor, rollouts: dict):
        """RLOO (TRL 1.16): rewards clipped, minus beta x the sequence KL (k1, old vs reference), leave-one-out
        baseline, optionally standardised over the batch."""
        from fastpref.losses.policy import Advantages, nanstd

        c = self.config
        rewards = rewards.clone()
        if c.reward_clip_range:
            rewards = rewards.clamp(min=c.reward_clip_range[0], max=c.reward_clip_range[1])
        extra = {}
        if self.ref_model is not None:
            m = rollouts["completion_mask"].float()
            per_token_kl = (rollouts["old_logps"] - rollouts["ref_logps"]) * m
            rewards = rewards - c.beta * per_token_kl.sum(1).cpu()
            extra["kl"] = (per_token_kl.sum().double().cpu(), m.sum().double().cpu())
        std = nanstd(rewards.view(-1, c.num_generations), dim=1).repeat_interleave(c.num_generations)
        advantages = leave_one_out_advantages(rewards, c.num_generations, c.normalize_advantages)
        return Advantages(advantages, std, torch.isclose(std, torch.zeros_like(std))), extra

    def _logps(self, module: PolicyModule, rollouts) -> torch.Tensor:
        """(B, C) per-token log-probs of the rollouts under `module` (the policy or the reference), in micro-batches."""
        per = self.config.per_device_train_batch_size
        keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
        parts = []
        for start in range(0, len(rollouts["completion_ids"]), per):
            batch = {key: rollouts[key][start:start + per] for key in keys}
            parts.append(module({"run": "logps", **batch}).float())
        return torch.cat(parts)

    # --- one optimizer step ---

    def step(self) -> tuple[dict, bool]:
        """One optimizer step of the loop (Trainer._step's contract): sample (every num_iterations steps), then
        the accumulated micro-batches of this generation batch."""
        t, c, dist = self.trainer, self.config, self.dist
        generation = t.global_step // self.iterations
        if self.cache is None or self.cache[0] != generation:
            rollouts, gen_values = self.generate(generation)
            self.cache = (generation, rollouts, gen_values)
        _, rollouts, gen_values = self.cache
        acc = metrics.Accumulator()
        if t.global_step % self.iterations == 0:
            acc.add(gen_values)  # the generation's reward metrics, logged once per generation batch
        per, steps = c.per_device_train_batch_size, c.gradient_accumulation_steps
        if c.task == "raft":  # the best completion of each group is kept
            per //= c.num_generations
        keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "old_logps",
                "ref_logps")
        skipped = False
        for i in range(steps):
            s = slice(i * per, (i + 1) * per)
            batch = {k: rollouts[k][s] for k in keys if k in rollouts}
            batch.update(num_items=rollouts["num_items"], accumulation=steps)
            if dist.enabled and getattr(c, "top_entropy_quantile", 1.0) < 1.0:
                batch["gather"] = self._gather_ragged
            last = i == steps - 1
            sync = contextlib.nullcontext() if last or not hasattr(t.wrapped, "no_sync") else t.wrapped.no_sync()
            with sync:
                with t.autocast():
                    loss, values = t.wrapped(batch)
                if dist.any(not bool(torch.isfinite(loss.detach()))):
                    skipped = True
                    break
                loss.backward()  # DDP averages over processes, as TRL's accelerate does
            acc.add(values)
        grad_norm, skipped = t.update(skipped)
        tokens = rollouts["tokens"] if t.global_step % self.iterations == 0 else 0
        return {"acc": acc, "grad_norm": grad_norm, "tokens": tokens}, skipped

    # --- held-out reward ---

    @torch.no_grad()
    def evaluate(self, split: str = "eval") -> dict:
        """Mean reward of completions sampled for held-out prompts (a fixed seed, so successive evaluations differ
        by the policy alone), with the KL to the reference beside it; `train` scores training prompts."""
        t, c, dist = self.trainer, self.config, self.dist
        examples = t.splits.eval if split == "eval" else t.splits.train[:MAX_TRAIN_EVAL_PROMPTS]
        if not examples:
            return {}
        mine = examples[dist.rank::dist.world]
        longest = examples[0::dist.world]  # rank 0's share: every rank runs as many passes, of as many rows
        k = 2
        acc = metrics.Accumulator()
        per = max(1, c.per_device_eval_batch_size // k)
        for start in range(0, len(longest), per):
            chunk = mine[start:start + per]
            filler = len(longest[start:start + per]) - len(chunk)  # rows sampled and dropped: FSDP2's passes are
            rollouts = self.sample(chunk + longest[:1] * filler, k,  # collective, so no rank may skip one
                                   sampling_seed(c.seed, start, dist.rank, salt=1 + (split == "train")))
            kept = len(chunk) * k
            logps = ref = None
            if self.ref_model is not None:
                with t.autocast():
                    logps = self._logps(self.policy, rollouts)[:kept]
                    ref = self._logps(self.ref_model, rollouts)[:kept]
            if not chunk:
                continue
            rollouts = {name: value[:kept] for name, value in rollouts.items()}
            per_func = self.score(chunk, k, rollouts)
            rewards = (per_func * self.rewards.weights).nansum(1)
            finite = ~torch.isnan(rewards)
            n = torch.tensor(float(len(rewards)), dtype=torch.float64)
            values = {"reward": (rewards[finite].double().sum(), finite.sum().double()),
                      "reward_sq": ((rewards[finite].double() ** 2).sum(), finite.sum().double()),
                      "completions/mean_length": (rollouts["completion_mask"].sum().double().cpu(), n)}
            if ref is not None:
                m = rollouts["completion_mask"].float()
                kl = fastpref.kl_penalty(logps, ref, "k3") * m
                values["kl"] = (kl.sum().double().cpu(), m.sum().double().cpu())
            acc.add(values)
        reduced = acc.reduce(dist)
        mean, mean_sq = reduced.pop("reward"), reduced.pop("reward_sq")
        count = sum(1 for _ in examples) * k
        std = math.sqrt(max(mean_sq - mean * mean, 0.0))
        prefix = "eval_" if split == "eval" else "train_eval_"
        out = {"reward": mean, "reward_std": std, "reward_sem": std / math.sqrt(max(count, 1)), **reduced}
        return {f"{prefix}{k_}": v for k_, v in out.items()} | {f"{prefix}samples": len(examples)}


def reward_curve_summary(rows: list[dict]) -> dict:
    """The held-out mean reward before training, at the end, and its step-to-step noise: the standard deviation
    of the differences between successive evaluations (the same prompts and seeds each time)."""
    curve = [r["eval_reward"] for r in rows if r.get("eval_reward") is not None]
    if len(curve) < 2:
        return {}
    steps = [b - a for a, b in zip(curve, curve[1:])]
    mean = sum(steps) / len(steps)
    noise = math.sqrt(sum((d - mean) ** 2 for d in steps) / (len(steps) - 1)) if len(steps) > 1 else float("nan")
    return {"eval_reward_start": curve[0], "eval_reward_end": curve[-1], "eval_reward_step_noise": noise}


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    ok = x[~torch.isnan(x)].double()
    return ok.std() if ok.numel() > 1 else torch.tensor(float("nan"), dtype=torch.float64)
