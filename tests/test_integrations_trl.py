"""`fastpref.integrations.trl.patch`: a TRL 1.16 DPOTrainer run with fastpref's head logs the same
losses and metrics as stock TRL from the same seed (tiny Llama, CPU, fp32 and bf16 autocast)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("transformers")
pytest.importorskip("datasets")

import datasets
import transformers
from test_train import pair_rows, tiny_config, tokenizer_dir
from trl import DPOConfig, DPOTrainer

import fastpref
from fastpref.integrations import trl as fastpref_trl

STEPS = 3


def _trainer(tmp_path, **options) -> DPOTrainer:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir())
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pair_rows(8, 2)]
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=STEPS, logging_steps=1, report_to="none",
        learning_rate=1e-2, seed=0, use_cpu=True, save_strategy="no", disable_tqdm=True, gradient_checkpointing=False,
        bf16=False,
    )
    settings.update(options)
    return DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=DPOConfig(**settings),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    )


def _logs(trainer) -> list[dict]:
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def _max_differences(stock: list[dict], patched: list[dict]) -> dict[str, float]:
    assert [sorted(e) for e in stock] == [sorted(e) for e in patched], "the logged metric names differ"
    out = {}
    for a, b in zip(stock, patched):
        for key, value in a.items():
            if isinstance(value, float):
                out[key] = max(out.get(key, 0.0), abs(value - b[key]))
    return out


@pytest.mark.parametrize(
    "options, atol",
    [
        ({}, 1e-4),
        ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0, 0.5], "use_weighting": True}, 1e-4),
        ({"bf16": True}, 2e-2),  # both heads on bf16 operands under autocast: they round differently
    ],
    ids=["sigmoid", "sigmoid+ipo+wpo", "bf16-autocast"],
)
def test_patched_dpo_trainer_logs_what_stock_trl_logs(tmp_path, monkeypatch, options, atol):
    stock = _logs(_trainer(tmp_path / "stock", **options))
    calls = []
    real = fastpref.linear_token_logps
    monkeypatch.setattr(fastpref, "linear_token_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer = _trainer(tmp_path / "patched", **options)
    fastpref_trl.patch(trainer)
    patched = _logs(trainer)
    assert len(calls) == 2 * STEPS  # the policy and the reference model, every step
    assert len(stock) == STEPS and {"rewards/accuracies", "logps/chosen", "entropy", "logits/chosen"} <= set(stock[0])
    differences = _max_differences(stock, patched)
    print("max |stock - patched|:", {k: f"{v:.2e}" for k, v in differences.items()})
    scale = {k: max(abs(e[k]) for e in stock) for k in differences}
    for key, difference in differences.items():
        if key == "rewards/accuracies":  # a fraction of pairs: equal unless a reward difference sits at rounding
            continue
        assert difference <= atol * max(1.0, scale[key]), (key, difference)
    assert all(math.isfinite(e["loss"]) for e in patched)


def test_generation_path_is_unchanged(tmp_path):
    trainer = _trainer(tmp_path)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        before = trainer.model(input_ids=ids).logits
        fastpref_trl.patch(trainer)
        after = trainer.model(input_ids=ids).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_patch_wants_a_dpo_trainer():
    with pytest.raises(TypeError, match="trainer must be a trl.DPOTrainer"):
        fastpref_trl.patch(object())
