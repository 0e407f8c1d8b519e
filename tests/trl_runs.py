"""Short TRL 1.16 training runs on a tiny random Llama, stock or patched with fastpref's head, for the parity tests
of `fastpref.integrations.trl`: same seed, same data, so every logged metric can be compared step by step."""

from __future__ import annotations

import copy
import functools
import tempfile

import datasets
import torch
import transformers
import trl
from test_train import _SESSION_DIR, model_dir, pair_rows, tiny_config, tokenizer_dir

from fastpref.integrations import trl as fastpref_trl

STEPS = 3
TIMING_KEYS = ("step_time",)  # wall-clock figures: different in every run


def reward(completions, **_) -> list[float]:
    """A deterministic reward that differs between completions, so that GRPO / RLOO advantages are O(1)."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


def _rows(kind: str) -> list[dict]:
    pairs = pair_rows(8, 2)
    if kind in ("dpo",):
        return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pairs]
    if kind == "sft":
        return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pairs]
    if kind == "kto":
        return [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                for r in pairs for side in ("chosen", "rejected")]
    return [{"prompt": r["prompt"]} for r in pair_rows(8, 1)]  # grpo, rloo: prompts to sample from


CONFIGS = {"sft": trl.SFTConfig, "dpo": trl.DPOConfig, "kto": trl.KTOConfig, "grpo": trl.GRPOConfig,
           "rloo": trl.RLOOConfig}
TRAINERS = {"sft": trl.SFTTrainer, "dpo": trl.DPOTrainer, "kto": trl.KTOTrainer, "grpo": trl.GRPOTrainer,
            "rloo": trl.RLOOTrainer}
# Sampling trainers: at a temperature != 1 (their head divides by it), with a KL term (so a reference model)
SAMPLING = dict(temperature=0.7, beta=0.04, num_generations=4, max_completion_length=8)


def trainer(kind: str, *, peft_config=None, model_config=None, **options):
    """A TRL trainer of `kind` ('sft', 'dpo', 'kto', 'grpo', 'rloo') on the tiny Llama (or a model of
    `model_config`: not for grpo / rloo), fp32 unless options say."""
    settings = dict(
        output_dir=tempfile.mkdtemp(dir=_SESSION_DIR.name), per_device_train_batch_size=4, max_steps=STEPS,
        logging_steps=1, report_to="none", learning_rate=1e-2, seed=0, use_cpu=True, save_strategy="no",
        disable_tqdm=True, bf16=False,
    )
    if kind in ("grpo", "rloo"):
        settings.update(SAMPLING)
    settings.update(options)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir())
    extra = {}
    if kind in ("grpo", "rloo"):
        model = model_dir("llama")  # they load their reference model from the policy's path
        extra["reward_funcs"] = reward
    else:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(model_config or tiny_config("llama"))
        if kind in ("dpo", "kto") and peft_config is None:
            extra["ref_model"] = copy.deepcopy(model)
    if peft_config is not None:
        extra["peft_config"] = peft_config
    return TRAINERS[kind](
        model=model, args=CONFIGS[kind](**settings), train_dataset=datasets.Dataset.from_list(_rows(kind)),
        processing_class=tokenizer, **extra,
    )


def logs(kind: str, patched: bool, **options) -> list[dict]:
    """The per-step log entries of a run (stock TRL, or patched with fastpref)."""
    run = trainer(kind, **options)
    if patched:
        fastpref_trl.patch(run)
    run.train()
    return [entry for entry in run.state.log_history if "loss" in entry]


@functools.cache
def _stock_logs(kind: str, options: tuple) -> list[dict]:
    return logs(kind, False, **dict(options))


def stock_logs(kind: str, **options) -> list[dict]:
    """Stock TRL's log entries, run once per session and configuration (several tests compare with them)."""
    return copy.deepcopy(_stock_logs(kind, tuple(sorted(options.items()))))


def max_differences(reference: list[dict], other: list[dict]) -> dict[str, float]:
    """metric -> max over steps of |reference - other| (the same metric names, timings left out)."""
    assert [sorted(e) for e in reference] == [sorted(e) for e in other], "the logged metric names differ"
    out = {}
    for a, b in zip(reference, other, strict=True):
        for key, value in a.items():
            if isinstance(value, float) and key not in TIMING_KEYS:
                out[key] = max(out.get(key, 0.0), abs(value - b[key]))
    return out


def scales(entries: list[dict]) -> dict[str, float]:
    """metric -> max(1, max over steps of |value|): differences are judged relative to it."""
    return {k: max([1.0] + [abs(e[k]) for e in entries]) for k, v in entries[0].items() if isinstance(v, float)}
