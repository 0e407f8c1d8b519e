"""Data: load -> check columns -> render (chat template) -> tokenize -> truncate -> split -> batch.

Rows hold `prompt` / `chosen` / `rejected` (preference data), `prompt` / `completion`, `messages` or
`text` (SFT), or `prompt` / `ranked` (listwise, best first). Each field is a string or a conversation
(a list of {"role", "content"} messages) rendered with the tokenizer's chat template; a conversation
without a `prompt` column has its shared leading messages taken as the prompt (TRL's implicit prompt).

An `Example` is one prompt and its completions as token ids: one (SFT), two (chosen, rejected), or K
ranked. Batches lay sequences out as `linear_dpo_loss` wants them: all chosen rows, then all rejected
rows (for K ranked completions, K rows per prompt, best first). Labels are the input ids with the
prompt and the padding set to -100; the model shifts them (hidden[:, :-1] scores labels[:, 1:]).

SFT follows TRL's objective: a `messages` row is one sequence scored whole (or, with
`assistant_only_loss`, on every assistant turn); prompt + completion rows score the completion
(all tokens with `completion_only_loss=False`). Truncation (`truncation_mode`): TRL's `keep_start` /
`keep_end` of prompt + completion, or by default for preference data fastpref's rule, which keeps the
completion: the prompt is cut from the left to `max_prompt_length`, then further (to one token at least)
until the longest completion fits `max_length`, and only then are completions
cut at their end. Rows that cannot be used (an empty completion) are skipped and counted in the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

IGNORE_INDEX = -100
PACKAGED = {"hhh": "hhh_alignment.jsonl"}

log = logging.getLogger("fastpref.train")


@dataclass
class Example:
    """One prompt and its completions (token ids); `index` is its row in its split."""

    index: int
    prompt: list[int]
    completions: list[list[int]]
    margin: float | None = None
    row_id: str = ""
    masks: list[list[bool]] | None = None  # per completion token: scored (SFT's assistant_only_loss)


@dataclass
class Splits:
    train: list[Example]
    eval: list[Example]
    notes: list[str] = field(default_factory=list)  # what was held out / skipped / cut, for the log

    def fingerprint(self) -> str:
        """A hash of the tokenized data (ids, truncation, split): a reference-cache key part."""
        h = hashlib.sha256()
        for name, split in (("train", self.train), ("eval", self.eval)):
            h.update(name.encode())
            for ex in split:
                h.update(json.dumps([ex.index, ex.prompt, ex.completions]).encode())
        return h.hexdigest()


# --- loading ---


class Rows(list):
    """Dataset rows (dicts) that know where each one came from: `where(i)` is 'file:line' or 'dir[split] row i'."""

    def __init__(self, rows: list[dict], places: list[str]):
        super().__init__(rows)
        self.places = places

    def where(self, i: int) -> str:
        return self.places[i]


def _read_jsonl(path: Path) -> Rows:
    """UTF-8 JSON lines (a leading byte-order mark is accepted); errors say file:line:column."""
    rows, places = [], []
    data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    for line_no, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            column = len(raw[: e.start].decode("utf-8", errors="replace")) + 1
            raise ValueError(
                f"{path}:{line_no}:{column}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8"
            ) from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}:{e.colno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{line_no}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
        places.append(f"{path}:{line_no}")
    return Rows(rows, places)


def packaged_path(name: str) -> Path:
    return Path(str(resources.files("fastpref.data").joinpath(PACKAGED[name])))


def _hhh_rows() -> Rows:
    """The packaged HHH pairs as conversations (a user turn, an assistant reply)."""
    rows = _read_jsonl(packaged_path("hhh"))
    return Rows([
        {
            "id": row["id"],
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }
        for row in rows
    ], rows.places)


def check_dataset_exists(name: str) -> None:
    """Fail before the model loads when --dataset names nothing this machine holds."""
    from fastpref.train.sources import dataset_is_local

    if name not in PACKAGED and not dataset_is_local(name):
        raise FileNotFoundError(
            f"--dataset {name!r} not found: give a file (jsonl, json, parquet, csv, arrow), a folder of them, a "
            f"save_to_disk folder, a hub id in the local Hugging Face cache (nothing is downloaded), or one of "
            f"the packaged names {sorted(PACKAGED)}"
        )


def load_rows(
    name: str, train_split: str = "train", test_split: str = "test", config_name: str | None = None
) -> tuple[list[dict], list[dict] | None]:
    """(train rows, test rows or None) from a packaged name, or any source `sources.load_splits` reads."""
    if name in PACKAGED:
        return (_hhh_rows() if name == "hhh" else _read_jsonl(packaged_path(name))), None
    from fastpref.train.sources import load_splits

    return load_splits(name, config_name, train_split, test_split, _read_jsonl)


# --- columns and rendering ---

PAIR_COLUMNS = ("chosen", "rejected")
# Every column the README documents, per task: each one is read (tests/test_train_columns.py changes each and
# sees the step's loss change). `id` names a row in errors; it is never trained on.
DOCUMENTED_COLUMNS = {
    "sft": ("prompt", "completion", "messages", "text", "chosen"),
    "dpo": ("prompt", "chosen", "rejected", "ranked"),
    "reward": ("prompt", "chosen", "rejected", "margin"),
}
TASKS = tuple(DOCUMENTED_COLUMNS)
LAYOUT_COLUMNS = {
    "pair": ("prompt", "chosen", "rejected"),
    "ranked": ("prompt", "ranked"),
    "completion": ("prompt", "completion"),
    "chosen": ("prompt", "chosen"),
    "chosen_only": ("chosen",),
    "messages": ("messages",),
    "text": ("text",),
}


def _is_conversation(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _check_field(label, column, value):
    if value is None:
        raise ValueError(
            f"{label}: column {column!r} is null; give a string or a list of {{'role', 'content'}} messages"
        )
    if not (isinstance(value, str) or _is_conversation(value)):
        raise ValueError(
            f"{label}: column {column!r} must be a string or a list of {{'role', 'content'}} messages, "
            f"got {type(value).__name__}"
        )
    for j, message in enumerate(value if isinstance(value, list) else []):
        if not (isinstance(message["role"], str) and isinstance(message["content"], str)):
            raise ValueError(
                f"{label}: column {column!r}, message {j}: role and content must be strings, got {message!r}"
            )


def _label(rows, i: int) -> str:
    """Where row i is, for error messages: 'file:line: row <id>' (the row's `id` when it has one)."""
    where = rows.where(i) if isinstance(rows, Rows) else f"row {i}"
    return f"{where}: row {rows[i]['id']}" if "id" in rows[i] else where


def _check_margin(label, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{label}: column 'margin' must be a finite number (the reward margin), got {value!r}")


def required_columns(task: str, listwise: bool) -> str:
    if task == "sft":
        return "prompt + completion, messages, text, or prompt + chosen"
    if listwise:
        return "prompt + ranked (a list, best first), or prompt + chosen + rejected (rankings built per prompt)"
    return "chosen + rejected, and prompt (or chosen / rejected conversations that share their leading messages)"


def check_columns(rows: list[dict], task: str, listwise: bool, source: str) -> str:
    """The row layout ('pair', 'ranked', 'completion', 'messages', 'text'); ValueError naming what is missing."""
    columns = set(rows[0]) if rows else set()
    layout = None
    if task == "sft":
        for name, needed in (("completion", ("prompt", "completion")), ("messages", ("messages",)),
                             ("text", ("text",)), ("chosen", ("prompt", "chosen")), ("chosen_only", ("chosen",))):
            if all(c in columns for c in needed):
                layout = name
                break
    elif listwise and "ranked" in columns and "prompt" in columns:
        layout = "ranked"
    elif all(c in columns for c in PAIR_COLUMNS):
        layout = "pair"
    if layout is None:
        raise ValueError(
            f"dataset {source} has columns {sorted(columns)}; `fastpref train {task}` needs {required_columns(task, listwise)}"
        )
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row] if layout != "text" else []
        if missing and any(c in ("prompt", "chosen", "rejected", "completion", "messages", "ranked") for c in missing):
            raise ValueError(f"{_label(rows, i)} lacks column(s) {sorted(missing)}")
    return layout


def _common_prefix(a: list[dict], b: list[dict]) -> int:
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return n


def to_prompt_completions(row: dict, layout: str, label: str):
    """(prompt, [completions], margin) with each a string or a conversation; `label` says where the row is."""
    margin = row.get("margin")
    if layout == "pair":
        chosen, rejected = row["chosen"], row["rejected"]
        prompt = row.get("prompt")
        if prompt is None:
            if not (_is_conversation(chosen) and _is_conversation(rejected)):
                raise ValueError(f"{label}: without a `prompt` column, chosen / rejected must be conversations")
            n = _common_prefix(chosen, rejected)
            if n == 0:
                raise ValueError(f"{label}: chosen and rejected share no leading messages to use as the prompt")
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        return prompt, [chosen, rejected], margin
    if layout == "ranked":
        ranked = row["ranked"]
        if not isinstance(ranked, list) or len(ranked) < 2:
            raise ValueError(f"{label}: `ranked` must list at least 2 responses, best first")
        return row["prompt"], list(ranked), None
    if layout == "completion":
        return row["prompt"], [row["completion"]], None
    if layout == "chosen":
        return row["prompt"], [row["chosen"]], None
    if layout == "chosen_only":
        chosen = row["chosen"]
        if not _is_conversation(chosen) or len(chosen) < 2:
            raise ValueError(f"{label}: `chosen` without a prompt must be a conversation of 2+ messages")
        return chosen[:-1], [chosen[-1:]], None
    if layout == "messages":
        messages = row["messages"]
        if not _is_conversation(messages) or len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise ValueError(f"{label}: `messages` must be a conversation ending with an assistant message")
        return messages[:-1], [messages[-1:]], None
    if layout == "text":
        return "", [row["text"]], None
    raise AssertionError(layout)


class Renderer:
    """Turns (prompt, completion) strings or conversations into token ids."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        self.start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    def _template(self, messages, generation_prompt):
        if not getattr(self.tok, "chat_template", None):
            raise ValueError(
                "the data holds conversations but the tokenizer has no chat template: give strings, or a tokenizer "
                "(--tokenizer_name_or_path) with a chat template"
            )
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def encode_conversation(self, messages: list[dict], assistant_only: bool):
        """A whole conversation as one sequence, as TRL's SFT tokenizes it -> (prompt ids, [ids], masks).

        Without `assistant_only` every token is a completion token (the prompt is empty; the first token
        is not scored, as in TRL). With it, the completion starts at the first assistant turn and its
        mask marks every assistant turn's tokens: the text each turn adds after the generation prompt.
        """
        text = self._template(messages, False)
        encoded = self.tok(text, add_special_tokens=False, return_offsets_mapping=assistant_only)
        ids = encoded.input_ids
        if not assistant_only:
            return [], [ids], None
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._template(messages[:i], True) if i else ""
            through = self._template(messages[: i + 1], False)
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError("the chat template renders a conversation's turns differently alone and together")
            spans.append((len(before), len(through)))
        mask = [any(lo <= start < hi for lo, hi in spans) for start, _ in encoded.offset_mapping]
        first = mask.index(True) if any(mask) else len(ids)
        return ids[:first], [ids[first:]], [mask[first:]]

    def encode(self, prompt, completions) -> tuple[list[int], list[list[int]]]:
        conversational = _is_conversation(prompt) or any(_is_conversation(c) for c in completions)
        if conversational:
            prompt_msgs = prompt if _is_conversation(prompt) else [{"role": "user", "content": prompt}]
            prompt_text = self._template(prompt_msgs, True)
            prompt_ids = self.tok(prompt_text, add_special_tokens=False).input_ids
            out = []
            for completion in completions:
                msgs = completion if _is_conversation(completion) else [{"role": "assistant", "content": completion}]
                if all(not str(m["content"]).strip() for m in msgs):
                    out.append([])
                    continue
                full = self._template(prompt_msgs + msgs, False)
                if not full.startswith(prompt_text):
                    raise ValueError("the chat template renders the prompt differently alone and with its completion")
                out.append(self.tok(full[len(prompt_text):], add_special_tokens=False).input_ids)
        else:
            prompt_ids = self.tok(prompt, add_special_tokens=True).input_ids if prompt else []
            out = []
            for completion in completions:
                if not completion.strip():
                    out.append([])
                    continue
                ids = self.tok(completion, add_special_tokens=False).input_ids
                out.append(ids + ([self.eos] if self.eos is not None else []))
        if not prompt_ids:  # the first completion token needs a position before it
            prompt_ids = [self.start] if self.start is not None else []
        return prompt_ids, out


def truncate(prompt: list[int], completions: list[list[int]], max_length, max_prompt_length, mode=None):
    """Cut prompt + completion to max_length -> (prompt, completions, something_was_cut).

    The prompt is first cut from the left to max_prompt_length. Then, by `mode`:
    None (fastpref's rule): keep the completions: cut the prompt from the left, to one token at least,
    then the completions at their end; "keep_start" (TRL's default): the first max_length tokens of
    prompt + completion; "keep_end": the last max_length tokens (the prompt cut once for all
    completions, by the longest).
    """
    cut = False
    if max_prompt_length and len(prompt) > max_prompt_length:
        prompt, cut = prompt[-max_prompt_length:], True
    if max_length and mode == "keep_start":
        cut = cut or any(len(prompt) + len(c) > max_length for c in completions)
        return prompt[:max_length], [c[: max(max_length - len(prompt), 0)] for c in completions], cut
    if max_length and mode == "keep_end":
        longest = max(len(c) for c in completions)
        excess = max(len(prompt) + longest - max_length, 0)
        prompt = prompt[excess:]
        room = max_length - len(prompt)
        return prompt, [c[max(len(c) - room, 0) :] for c in completions], cut or excess > 0
    if max_length:
        room = max_length - max(len(c) for c in completions)
        if len(prompt) > max(room, 1):
            prompt, cut = prompt[-max(room, 1):], True
        cut = cut or any(len(prompt) + len(c) > max_length for c in completions)
        completions = [c[: max_length - len(prompt)] for c in completions]
    return prompt, completions, cut


def _group_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def rank_from_pairs(items: list[tuple[str, object, list, object]]):
    """Group pairs by prompt into rankings (most wins first): [(row_id, prompt, [ranked responses], None)]."""
    groups: OrderedDict[str, dict] = OrderedDict()
    for row_id, prompt, (chosen, rejected), _ in items:
        g = groups.setdefault(_group_key(prompt), {"id": row_id, "prompt": prompt, "wins": OrderedDict()})
        for response, win in ((chosen, 1), (rejected, 0)):
            key = _group_key(response)
            entry = g["wins"].setdefault(key, [response, 0])
            entry[1] += win
    out = []
    for g in groups.values():
        ranked = sorted(g["wins"].values(), key=lambda e: -e[1])  # stable: ties keep first appearance
        out.append((g["id"], g["prompt"], [r for r, _ in ranked], None))
    return out


def _split_by_prompt(items, fraction: float, seed: int):
    """Hold out about `fraction` of the rows, whole prompts at a time (every row of a prompt on one side)."""
    groups: OrderedDict[str, int] = OrderedDict()
    for _, prompt, _, _ in items:
        key = _group_key(prompt)
        groups[key] = groups.get(key, 0) + 1
    if fraction <= 0 or len(groups) < 2:
        return items, []
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    target, held, count = fraction * len(items), set(), 0
    for key in keys[:-1]:  # at least one prompt stays for training
        if count >= target:
            break
        if count + groups[key] > 1.5 * target and count > 0:
            continue  # a large group would overshoot: try smaller ones
        held.add(key)
        count += groups[key]
    train = [it for it in items if _group_key(it[1]) not in held]
    test = [it for it in items if _group_key(it[1]) in held]
    return train, test


def _encode(renderer: Renderer, config, layout: str, prompt, completions):
    """(prompt ids, completion ids, masks or None) with SFT's objective as TRL's: a `messages` row is one
    sequence, scored whole or on its assistant turns (assistant_only_loss); prompt + completion rows
    score the completion unless completion_only_loss is False."""
    sft = getattr(config, "task", None) == "sft"
    if sft and layout == "messages":
        return renderer.encode_conversation(prompt + completions[0], config.assistant_only_loss)
    prompt_ids, completion_ids = renderer.encode(prompt, completions)
    if sft and config.completion_only_loss is False:
        return [], [prompt_ids + c for c in completion_ids], None
    return prompt_ids, completion_ids, None


def _tokenize(items, renderer: Renderer, config, split: str, notes: list[str], layout: str = "") -> list[Example]:
    examples, empty, cut = [], [], 0
    mode = getattr(config, "truncation_mode", None)
    for row_id, prompt, completions, margin in items:
        prompt_ids, completion_ids, masks = _encode(renderer, config, layout, prompt, completions)
        if any(len(c) == 0 for c in completion_ids):
            empty.append(row_id)
            continue
        full = [len(c) for c in completion_ids]
        prompt_ids, completion_ids, was_cut = truncate(
            prompt_ids, completion_ids, config.max_length, config.max_prompt_length, mode
        )
        if masks is not None:  # the completions were cut at their end, or (keep_end) at their start
            masks = [m[n - len(c) :] if mode == "keep_end" else m[: len(c)]
                     for m, n, c in zip(masks, full, completion_ids)]
        cut += was_cut
        if any(len(c) == 0 for c in completion_ids) or (masks is not None and not any(any(m) for m in masks)):
            empty.append(row_id)
            continue
        examples.append(Example(len(examples), prompt_ids, completion_ids, margin, str(row_id), masks))
    if empty:
        notes.append(f"{split}: skipped {len(empty)} row(s) with an empty completion: {empty[:5]}")
    if cut:
        how = {None: "the prompt cut from the left first", "keep_start": "keep_start", "keep_end": "keep_end"}[mode]
        notes.append(f"{split}: cut {cut} row(s) to fit max_prompt_length / max_length ({how})")
    return examples


def build_splits(config, tokenizer, task: str, listwise: bool = False) -> Splits:
    """Load, check, render, tokenize, truncate and split the dataset named by `config.dataset_name`."""
    if task not in TASKS:  # an old or misspelt task name would silently skip what a task reads (`margin`)
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    train_rows, test_rows = load_rows(
        config.dataset_name, config.dataset_train_split, config.dataset_test_split, config.dataset_config
    )
    if not train_rows:
        raise ValueError(f"dataset {config.dataset_name} holds no training rows")
    layout = check_columns(train_rows, task, listwise, config.dataset_name)
    if test_rows is not None:
        check_columns(test_rows, task, listwise, f"{config.dataset_name}[{config.dataset_test_split}]")

    def items(rows):
        # the reward model reads `margin` when the data has one; every row then needs a number
        margins = task == "reward" and any(row.get("margin") is not None for row in rows)
        out = []
        for i, row in enumerate(rows):
            row_id, label = row.get("id", i), _label(rows, i)
            for column in LAYOUT_COLUMNS[layout]:
                if column in row:
                    values = row[column] if column == "ranked" and isinstance(row[column], list) else [row[column]]
                    for value in values:
                        _check_field(label, column, value)
            if margins:
                _check_margin(label, row.get("margin"))
            prompt, completions, margin = to_prompt_completions(row, layout, label)
            out.append((row_id, prompt, completions, margin if margins else None))
        return out

    notes: list[str] = []
    unused = sorted(set(train_rows[0]) - set(LAYOUT_COLUMNS[layout]) - {"id"}
                    - ({"margin"} if task == "reward" else set()))
    if unused:
        notes.append(f"column(s) {unused} not used by `fastpref train {task}` (it reads "
                     f"{' + '.join(LAYOUT_COLUMNS[layout])} from these rows)")
    train_items = items(train_rows)
    if test_rows is not None:
        test_items = items(test_rows)
        notes.append(f"evaluating on split {config.dataset_test_split!r} ({len(test_items)} rows)")
    else:
        n_prompts = len({_group_key(p) for _, p, _, _ in train_items})
        train_items, test_items = _split_by_prompt(train_items, config.eval_fraction, config.seed)
        if test_items:
            held_prompts = len({_group_key(p) for _, p, _, _ in test_items})
            notes.append(
                f"held out {held_prompts} of {n_prompts} prompts ({len(test_items)} rows) for evaluation; "
                f"training on {len(train_items)} rows"
            )
    if listwise and layout == "pair":
        train_items, test_items = rank_from_pairs(train_items), rank_from_pairs(test_items)
        notes.append(f"ranked the responses per prompt: {len(train_items)} train / {len(test_items)} eval rankings")
    if config.max_train_samples:
        train_items = train_items[: config.max_train_samples]
    if config.max_eval_samples:
        test_items = test_items[: config.max_eval_samples]
    renderer = Renderer(tokenizer)
    if getattr(config, "assistant_only_loss", False) and layout != "messages":
        raise ValueError(
            f"--assistant_only_loss needs conversational `messages` rows; dataset {config.dataset_name} has "
            f"{layout!r} rows"
        )
    train = _tokenize(train_items, renderer, config, "train", notes, layout)
    test = _tokenize(test_items, renderer, config, "eval", notes, layout)
    if not train:
        raise ValueError(f"no usable training rows in {config.dataset_name} (see: {'; '.join(notes)})")
    return Splits(train, test, notes)


# --- batching ---


def collate(
    examples: list[Example], pad_id: int, completion_only: bool = True, listwise: bool = False
) -> dict[str, torch.Tensor]:
    """Right-padded sequences: completion j of every example, for j = 0, 1, ... (chosen rows, then rejected).

    listwise: K rows per example, best first ((B*K) row-major); rankings of different sizes are cut to
    the smallest K in the batch (the best responses kept).
    """
    k = min(len(ex.completions) for ex in examples)
    def mask(ex, j):
        return ex.masks[j] if ex.masks is not None else None

    if listwise:
        seqs = [(ex.prompt, ex.completions[j], mask(ex, j)) for ex in examples for j in range(k)]
    else:
        seqs = [(ex.prompt, ex.completions[j], mask(ex, j)) for j in range(k) for ex in examples]
    length = max(len(p) + len(c) for p, c, _ in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, (prompt, completion, scored) in enumerate(seqs):
        ids = prompt + completion
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        start = len(prompt) if completion_only else 0
        labels[row, start : len(ids)] = input_ids[row, start : len(ids)]
        if scored is not None:
            unscored = torch.tensor([not s for s in scored], dtype=torch.bool)
            labels[row, len(prompt) : len(ids)][unscored] = IGNORE_INDEX
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "index": torch.tensor([ex.index for ex in examples]),
        "responses": torch.tensor(k),
    }
    margins = [ex.margin for ex in examples]
    if all(m is not None for m in margins):
        batch["margin"] = torch.tensor(margins, dtype=torch.float32)
    return batch


class StepSampler:
    """Deterministic data order: a seeded permutation per epoch, cut into global batches of
    per_device x world x accumulation examples (the last partial one dropped). The position in the
    data is a function of the optimizer step alone, so resuming from a step resumes the data."""

    def __init__(self, n_examples: int, per_device: int, world: int, accumulation: int, seed: int):
        self.n, self.per_device, self.world, self.accumulation, self.seed = n_examples, per_device, world, accumulation, seed
        self.global_batch = per_device * world * accumulation
        self.steps_per_epoch = n_examples // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training split has {n_examples} examples, fewer than one global batch of {self.global_batch} "
                "(per_device_train_batch_size x processes x gradient_accumulation_steps)"
            )
        self._perm_epoch, self._perm = None, None

    def permutation(self, epoch: int) -> list[int]:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed + 1000003 * epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        return self._perm

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Example indices of this rank's micro-batches for optimizer step `step` (0-based, global)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        start = within * self.global_batch
        out = []
        for micro in range(self.accumulation):
            offset = start + (micro * self.world + rank) * self.per_device
            out.append(perm[offset : offset + self.per_device])
        return out


def eval_batches(n: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This rank's share of an evaluation pass: every example exactly once over all ranks."""
    mine = list(range(rank, n, world))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
