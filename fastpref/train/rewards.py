"""Rewards of sampled completions: a reward model (a `fastpref train reward` output, or any local
sequence-classification model with one label) and reward functions with TRL's signature
f(prompts, completions, **columns) -> list[float | None]. Each reward gives one column of a (B, R) matrix;
None (a completion a function cannot score) becomes NaN, as in TRL."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Callable

import torch

from fastpref.train.data import Renderer


def load_reward_func(spec: str) -> tuple[str, Callable]:
    """(name, function) of `module:function`; the module is imported from sys.path (the working directory first)."""
    module_name, _, name = spec.partition(":")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"--reward_funcs {spec}: cannot import module {module_name!r}: {e}") from None
    func = getattr(module, name, None)
    if not callable(func):
        raise ValueError(f"--reward_funcs {spec}: module {module_name!r} has no function {name!r}")
    return name, func


class RewardModel:
    """A sequence classifier with one label scoring prompt + completion as the reward model was trained on them:
    the same rendering (chat template for conversations), right padding, its last non-pad token."""

    def __init__(self, path: str, device: torch.device, batch_size: int):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(path)
        config_file = folder / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"--reward_model {path}: not a model directory (no config.json)")
        architectures = json.loads(config_file.read_text()).get("architectures") or []
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise ValueError(f"--reward_model {path} holds {architectures}: a sequence-classification model with one "
                             "label is needed (`fastpref train reward` writes one)")
        self.model = AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True)
        if self.model.config.num_labels != 1:
            raise ValueError(f"--reward_model {path} has {self.model.config.num_labels} labels; a reward model has 1")
        self.model.to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.pad_id = pad
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = pad
        self.renderer = Renderer(self.tokenizer)
        self.device, self.batch_size = device, batch_size
        self.name = folder.name or str(folder)

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list[str]) -> torch.Tensor:
        """(B,) float32 rewards of the (prompt, completion) pairs, batch_size sequences per forward."""
        sequences = []
        for prompt, completion in zip(prompts, completions):
            prompt_ids, (completion_ids,) = self.renderer.encode(prompt, [completion if completion.strip() else " "])
            sequences.append(prompt_ids + completion_ids)
        out = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            length = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), length), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), length), dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits  # pools the last non-pad token
            out.append(logits[:, 0].float())
        return torch.cat(out)


class Rewards:
    """Every reward of a run: names (TRL's `rewards/<name>/mean`), weights, and a (B, R) scoring call."""

    def __init__(self, reward_model: RewardModel | None, funcs: list[tuple[str, Callable]], weights: list | None):
        self.reward_model, self.funcs = reward_model, funcs
        self.names = ([reward_model.name] if reward_model else []) + [name for name, _ in funcs]
        if not self.names:
            raise ValueError("no reward: give --reward_model DIR and / or --reward_funcs module:function")
        self.weights = torch.tensor(weights if weights is not None else [1.0] * len(self.names))

    def score(self, prompts: list, completions: list, columns: dict[str, list]) -> torch.Tensor:
        """(B, R) float32 rewards, NaN where a function returned None; `completions` as TRL passes them
        (strings, or [{'role': 'assistant', 'content': ...}] for conversational prompts)."""
        texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        columns_out = []
        if self.reward_model is not None:
            columns_out.append(self.reward_model(prompts, texts).cpu())
        for name, func in self.funcs:
            values = func(prompts=prompts, completions=completions, **columns)
            if not isinstance(values, (list, tuple)) or len(values) != len(completions):
                raise ValueError(f"reward function {name} returned {type(values).__name__} of length "
                                 f"{len(values) if hasattr(values, '__len__') else '?'}; expected a list of "
                                 f"{len(completions)} floats (None for a completion it cannot score)")
            columns_out.append(torch.tensor([float("nan") if v is None else float(v) for v in values]))
        return torch.stack(columns_out, dim=1).float()
