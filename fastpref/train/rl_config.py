"""Options of the RL stage (`fastpref train grpo | rloo | raft`), with TRL 1.16 GRPOConfig's / RLOOConfig's names and
defaults.

per_device_train_batch_size counts completions, as TRL's: each process samples
per_device_train_batch_size x gradient_accumulation_steps / num_generations prompts per generation batch,
num_generations completions each, and trains on that batch num_iterations times (one optimizer step each).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from fastpref.train.config import TrainConfig, _help

DEFAULT_REWARD_MODEL = "runs/reward"  # where `fastpref train reward` writes by default
DEFAULT_POLICY = "runs/sft"  # where `fastpref train sft` writes by default: the pipeline's SFT'd tiny preset


@dataclass
class RLConfig(TrainConfig):
    """What every RL task shares: rewards, sampling, the clipped ratio, the KL weight, the warm start."""

    learning_rate: float = field(default=1e-6, metadata=_help("AdamW learning rate (TRL's GRPO / RLOO default)."))
    per_device_train_batch_size: int = field(
        default=8, metadata=_help("Completions per device per micro-batch (TRL: a multiple of num_generations).")
    )
    # --- rewards ---
    reward_model: str | None = field(
        default=None,
        metadata=_help(
            "A `fastpref train reward` output, or any local sequence-classification model with one label. "
            f"Default (no --reward_funcs given): {DEFAULT_REWARD_MODEL} when it exists."
        ),
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata=_help("Reward functions module:function, TRL's signature f(prompts, completions, **columns) -> "
                       "list[float] (None for a completion it cannot score)."),
    )
    reward_weights: list[float] | None = field(
        default=None, metadata=_help("One weight per reward (the model first, then the functions); default 1 each.")
    )
    # --- sampling ---
    num_generations: int = field(default=8, metadata=_help("Completions sampled per prompt (the group)."))
    max_completion_length: int = field(default=512, metadata=_help("Longest sampled completion in tokens."))
    temperature: float = field(default=1.0, metadata=_help("Sampling temperature; the log-probs use it too (TRL)."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling: the smallest set of probability >= top_p."))
    top_k: int = field(default=0, metadata=_help("Sample among the k most likely tokens; 0: all."))
    mask_truncated_completions: bool = field(
        default=False, metadata=_help("Completions cut at max_completion_length count for nothing in the loss.")
    )
    # --- the warm start ---
    sft_warmup_steps: int = field(
        default=0,
        metadata=_help("Before RL, SFT for N steps on the chosen responses of the training split (preference "
                       "data); the result is the policy's start and the reference."),
    )
    sft_warmup_learning_rate: float | None = field(
        default=None, metadata=_help("Learning rate of the SFT warm-up; None: learning_rate.")
    )
    task = "rl"

    def prompts_per_generation(self) -> int:
        """Prompts each process samples per generation batch."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps // self.num_generations


@dataclass
class PolicyGradientConfig(RLConfig):
    """GRPO's and RLOO's common loss options: the KL weight, the clipped importance ratio, reuse of a batch."""

    beta: float = field(default=0.0, metadata=_help("Weight of the KL to the reference; 0 loads no reference."))
    num_iterations: int = field(default=1, metadata=_help("Optimizer steps per generation batch (mu)."))
    epsilon: float = field(default=0.2, metadata=_help("Lower clipping bound: r >= 1 - epsilon."))
    epsilon_high: float | None = field(
        default=None, metadata=_help("Upper clipping bound (GRPO's cispo: the ratio cap); None: epsilon.")
    )


@dataclass
class GRPOConfig(PolicyGradientConfig):
    """Group Relative Policy Optimization (TRL's GRPOTrainer): sample num_generations completions per prompt,
    score them with a reward model and / or reward functions, and optimise the clipped surrogate of the
    group-normalised advantages (fastpref.losses.policy), with a k3 KL to the reference when beta > 0."""

    loss_type: str = field(
        default="dapo",
        metadata=_help("grpo, bnpo, dr_grpo, dapo (default), luspo, cispo, sapo or vespo (TRL 1.16's formulas)."),
    )
    delta: float | None = field(default=None, metadata=_help("Two-sided clipping: cap of the unclipped ratio."))
    importance_sampling_level: str = field(
        default="token", metadata=_help("token: one ratio per token; sequence: the mean log-ratio per sequence.")
    )
    scale_rewards: str = field(
        default="group", metadata=_help("Divide the advantages by the reward std of the group, the batch, or none.")
    )
    top_entropy_quantile: float = field(
        default=1.0, metadata=_help("Train only on the tokens of the top quantile of entropy; 1.0: all.")
    )
    entropy_coef: float = field(default=0.0, metadata=_help("Entropy bonus: loss - entropy_coef x mean entropy."))
    use_bias_correction_kl: bool = field(
        default=True, metadata=_help("Multiply the per-token KL by the importance ratio (TRL's default).")
    )
    sapo_temperature_neg: float = field(default=1.05, metadata=_help("SAPO's temperature, negative advantages."))
    sapo_temperature_pos: float = field(default=1.0, metadata=_help("SAPO's temperature, positive advantages."))
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    task = "grpo"


@dataclass
class RLOOConfig(PolicyGradientConfig):
    """REINFORCE Leave-One-Out (TRL's RLOOTrainer): each completion's baseline is the mean reward of the other
    completions of its prompt; the KL to the reference (k1, summed over the sequence) is taken off the reward;
    the sequence-level ratio is clipped (fastpref.losses.policy.rloo_loss)."""

    num_generations: int = field(default=2, metadata=_help("Completions sampled per prompt (RLOO's default 2)."))
    beta: float = field(default=0.05, metadata=_help("Weight of the sequence KL taken off the reward; 0: none."))
    normalize_advantages: bool = field(default=False, metadata=_help("Standardise the advantages over the batch."))
    reward_clip_range: list[float] | None = field(
        default=None, metadata=_help("Clip the rewards to [low, high] before the KL and the baseline.")
    )
    task = "rloo"


@dataclass
class RAFTConfig(RLConfig):
    """Reward-ranked fine-tuning (RAFT, Dong et al. 2023): per generation batch, sample num_generations completions
    per prompt, keep the best by reward, and take an SFT step (token-mean NLL) on the kept completions. No
    reference, no ratio: cheaper than GRPO, and it only ever imitates its own best samples."""

    learning_rate: float = field(default=2e-5, metadata=_help("AdamW learning rate (TRL's SFT default)."))
    task = "raft"


def starting_policy(config: RLConfig) -> RLConfig:
    """The embedded pipeline (sft -> reward -> grpo): on the tiny preset, the policy starts from the default
    `fastpref train sft` output when there is one (no warm-up of its own); else the preset warms up itself."""
    if config.model_name_or_path != "tiny-llama" or not (Path(DEFAULT_POLICY) / "config.json").exists():
        return config
    logging.getLogger("fastpref.train").info(
        "policy: %s (the `fastpref train sft` output; the embedded pipeline's SFT stage)", DEFAULT_POLICY)
    return dataclasses.replace(config, model_name_or_path=DEFAULT_POLICY, sft_warmup_steps=0)


RL_RANGES = {
    "temperature": (0, False, math.inf, False),
    "top_p": (0, False, 1, True),
    "beta": (0, True, math.inf, False),
    "epsilon": (0, True, 1, False),
    "epsilon_high": (0, True, math.inf, False),
    "delta": (1, False, math.inf, False),
    "top_entropy_quantile": (0, False, 1, True),
    "entropy_coef": (-math.inf, False, math.inf, False),
    "sapo_temperature_neg": (0, False, math.inf, False),
    "sapo_temperature_pos": (0, False, math.inf, False),
}


def validate_rl(config: RLConfig) -> None:
    """The RL options' ranges and combinations; each error names the option."""

    for name in ("num_generations", "max_completion_length", "num_iterations"):
        if not hasattr(config, name):
            continue
        if getattr(config, name) <= 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(config, name)}")
    if config.top_k < 0:
        raise ValueError(f"--top_k must be >= 0 (0: no top-k), got {config.top_k}")
    if config.num_generations < 2:
        raise ValueError(f"--num_generations must be >= 2 (the group's spread is the baseline), got "
                         f"{config.num_generations}")
    if isinstance(config, GRPOConfig):
        _validate_grpo(config)
    if isinstance(config, RLOOConfig) and config.reward_clip_range is not None:
        low_high = config.reward_clip_range
        if len(low_high) != 2 or not low_high[0] < low_high[1]:
            raise ValueError(f"--reward_clip_range must be two numbers low < high, got {low_high}")
    per_process = config.per_device_train_batch_size * config.gradient_accumulation_steps
    if per_process % config.num_generations:
        raise ValueError(
            f"--per_device_train_batch_size x --gradient_accumulation_steps ({per_process} completions per process "
            f"per generation batch) must be a multiple of --num_generations ({config.num_generations}): each "
            "process samples whole groups"
        )
    n_rewards = (config.reward_model is not None) + len(config.reward_funcs or [])
    if config.reward_weights is not None and n_rewards and len(config.reward_weights) != n_rewards:
        raise ValueError(f"--reward_weights has {len(config.reward_weights)} weights for {n_rewards} rewards "
                         "(the reward model first, then --reward_funcs in order)")
    if config.reward_weights is not None and not all(math.isfinite(w) for w in config.reward_weights):
        raise ValueError(f"--reward_weights must be finite numbers, got {config.reward_weights}")
    for spec in config.reward_funcs or []:
        module, _, name = spec.partition(":")
        if not module or not name:
            raise ValueError(f"--reward_funcs {spec!r}: expected module:function (e.g. my_rewards:length_reward)")
    if isinstance(config, RAFTConfig) and config.per_device_train_batch_size % config.num_generations:
        raise ValueError(f"--per_device_train_batch_size ({config.per_device_train_batch_size}) must be a multiple "
                         f"of --num_generations ({config.num_generations}) for raft: each micro-batch keeps the best "
                         "completion of whole groups")
    if getattr(config, "num_iterations", 1) > 1 and config.save_steps and config.save_steps % config.num_iterations:
        raise ValueError(f"--save_steps ({config.save_steps}) must be a multiple of --num_iterations "
                         f"({config.num_iterations}): a checkpoint falls between generation batches, so resuming it "
                         "samples the next batch exactly")
    if config.use_peft and config.sft_warmup_steps:
        raise ValueError("--sft_warmup_steps with --use_peft is not supported by fastpref train")
    if config.use_peft and getattr(config, "beta", 0.0):
        raise ValueError("--use_peft with --beta > 0 is not supported by `fastpref train grpo` yet")


def _validate_grpo(config: GRPOConfig) -> None:
    from fastpref.losses.policy import IMPORTANCE_SAMPLING_LEVELS, POLICY_LOSS_TYPES, SCALE_REWARDS

    for name, value, choices in (("loss_type", config.loss_type, POLICY_LOSS_TYPES),
                                 ("importance_sampling_level", config.importance_sampling_level,
                                  IMPORTANCE_SAMPLING_LEVELS), ("scale_rewards", config.scale_rewards, SCALE_REWARDS)):
        if value not in choices:
            raise ValueError(f"--{name} must be one of {list(choices)}, got {value!r}")
