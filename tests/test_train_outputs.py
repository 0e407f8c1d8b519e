"""Every output folder of `fastpref train` (the final model, full or LoRA, causal LM or reward model, and each
checkpoint) loads with `from_pretrained` from another working directory, although the run named its base model by a
relative path, and carries a model card (README.md) naming the base model, the data, the task, the loss and the
metrics."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402
from test_train import model_dir, pair_rows, run, write_jsonl  # noqa: E402

LOADERS = {"dpo": transformers.AutoModelForCausalLM, "sft": transformers.AutoModelForCausalLM,
           "reward": transformers.AutoModelForSequenceClassification}


@pytest.mark.parametrize("task,lora", [("dpo", False), ("dpo", True), ("reward", False), ("reward", True)])
def test_every_output_folder_loads_from_anywhere_and_has_a_model_card(tmp_path, monkeypatch, task, lora):
    if lora:
        pytest.importorskip("peft")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    relative_model = os.path.relpath(model_dir(), work)  # as a user types it: relative to where the run starts
    _, out = run(task, tmp_path, data, model_name_or_path=relative_model, use_peft=lora, save_steps=2, max_steps=3,
                 output_dir="out")
    out = out.resolve()
    monkeypatch.chdir(tmp_path)  # elsewhere
    if task == "reward" and lora:  # the starting model with its new scalar head, saved by the run
        base = LOADERS[task].from_pretrained(out / "base_model")
    else:
        base = LOADERS[task].from_pretrained(model_dir(), **({"num_labels": 1} if task == "reward" else {}))
    base_weights = base.state_dict()
    inputs = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        base_output = base(input_ids=inputs).logits
    for folder in (out, out / "checkpoint-2"):
        loaded = LOADERS[task].from_pretrained(folder)
        weights = loaded.state_dict()
        embed = "model.embed_tokens.weight"
        if lora:  # frozen weights come from the base (not freshly initialised); the adapters are in
            torch.testing.assert_close(weights[embed], base_weights[embed], rtol=0, atol=0)
            assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items()), folder
        else:  # the model's own names, nothing new or missing
            assert weights.keys() == base_weights.keys(), folder
        with torch.no_grad():
            output = loaded(input_ids=inputs).logits
        assert output.shape == base_output.shape and not torch.allclose(output, base_output), folder
        card = (folder / "README.md").read_text()
        expected_base = str(Path(model_dir()).resolve()) if not (lora and task == "reward") else str(out / "base_model")
        for text in (f"base_model: \"{expected_base}\"", f"`{data.resolve()}`", f"`fastpref train {task}`",
                     "Bradley-Terry" if task == "reward" else "loss_type sigmoid", "| loss |"):
            assert text in card, (folder, text)
        assert ("library_name: \"peft\"" in card) == lora
