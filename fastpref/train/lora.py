"""LoRA through peft (`--use_peft`, TRL's ModelConfig names): adapters on the decoder's linear layers,
never on the LM head, whose weight fastpref's fused head reads directly (an adapter there would be
ignored). The reference model is the same model with its adapters disabled, as in TRL: no second copy
of the weights."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def check_targets(target_modules: list[str] | None, head_name: str = "lm_head") -> None:
    """Refuse an adapter on the LM head: the fused head would compute log-probs without it."""
    for target in [target_modules] if isinstance(target_modules, str) else target_modules or ():
        if target == head_name or target.endswith("." + head_name) or head_name.endswith("." + target):
            raise ValueError(
                f"--lora_target_modules names the LM head ({target!r}): fastpref's fused head reads the head's weight "
                "directly and would ignore an adapter on it; target the decoder's layers (or 'all-linear', which "
                "leaves the head out)"
            )


def _targets(names):
    """peft takes 'all-linear' as a string, module names as a list."""
    return names[0] if isinstance(names, list) and names == ["all-linear"] else names


def _head_name(model: nn.Module) -> str:
    head = model.get_output_embeddings()
    return next((name for name, module in model.named_modules() if module is head), "lm_head")


def apply(model: nn.Module, config, task: str) -> nn.Module:
    """model wrapped by peft.get_peft_model with the config's LoRA options."""
    try:
        import peft
    except ImportError as e:
        raise ImportError("--use_peft needs the `peft` package: pip install peft") from e
    head_name = _head_name(model) if task != "reward" else "score"
    if task != "reward":
        check_targets(config.lora_target_modules, head_name)
    lora = peft.LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=_targets(config.lora_target_modules),
        use_rslora=config.use_rslora,
        task_type="SEQ_CLS" if task == "reward" else "CAUSAL_LM",
    )
    wrapped = peft.get_peft_model(model, lora)
    head = wrapped.get_output_embeddings()
    if task != "reward" and isinstance(head, peft.tuners.lora.LoraLayer):
        raise ValueError(f"a LoRA adapter landed on the LM head {head_name!r}: fastpref's fused head would ignore it")
    return wrapped



def base_for_adapters(model: nn.Module, tokenizer, model_name: str, task: str, run_dir: Path) -> str:
    """The absolute path an adapter's `base_model_name_or_path` names, so that `from_pretrained` on any output folder
    loads from any working directory: a local model folder itself, or (for a preset, or a reward model's new scalar
    head) the starting model saved once into output_dir/base_model."""
    local = Path(model_name)
    if task != "reward" and (local / "config.json").exists():
        return str(local.resolve())
    folder = (run_dir / "base_model").resolve()
    if not (folder / "config.json").exists():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def save_adapter(model: nn.Module, folder: Path, base: str) -> None:
    """adapter_config.json + adapter_model.safetensors (peft's save_pretrained) naming `base` as the base model."""
    for adapter in model.peft_config.values():
        adapter.base_model_name_or_path = base
    model.save_pretrained(folder)
