"""Data: load -> check columns -> render (chat template) -> tokenize -> truncate -> split -> batch.

Rows hold `prompt` / `chosen` / `rejected` (preference data), `prompt` / `completion`, `messages` or
`text` (SFT), or `prompt` / `ranked` (listwise, best first). Each field is a string or a conversation
(a list of {"role", "content"} messages) rendered with the tokenizer's chat template; a conversation
without a `prompt` column has its shared leading messages taken as the prompt (TRL's implicit prompt).

An `Example` is one prompt and its completions as token ids: one (SFT), two (chosen, rejected), or K
ranked. Batches lay sequences out as `linear_dpo_loss` wants them: all chosen rows, then all rejected
rows (for K ranked completions, K rows per prompt, best first). Labels are the input ids with the
prompt and the padding set to -100; the model shifts them (hidden[:, :-1] scores labels[:, 1:]).

Truncation keeps the completion: the prompt is cut from the left to `max_prompt_length`, then further
(to one token at least) until the longest completion fits `max_length`, and only then are completions
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
    if name not in PACKAGED and not Path(name).exists():
        raise FileNotFoundError(
            f"--dataset {name!r} not found: give a JSONL file, a local `datasets` directory (save_to_disk) "
            f"or one of the packaged names {sorted(PACKAGED)}"
        )


def load_rows(name: str, train_split: str = "train", test_split: str = "test") -> tuple[list[dict], list[dict] | None]:
    """(train rows, test rows or None) from a packaged name, a JSONL file or a `datasets` directory."""
    if name in PACKAGED:
        return (_hhh_rows() if name == "hhh" else _read_jsonl(packaged_path(name))), None
    check_dataset_exists(name)
    path = Path(name)
    if path.is_file():
        rows = _read_jsonl(path)
        if not rows:
            raise ValueError(f"dataset {name} holds no rows")
        return rows, None
    try:
        import datasets
    except ImportError as e:
        raise ImportError("reading a `datasets` directory needs the `datasets` package: pip install fastpref[train]") from e
    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise ValueError(f"{name} is a directory but not a saved `datasets` dataset ({e})") from None
    def rows(split, label):
        return Rows(split.to_list(), [f"{name}{label} row {i}" for i in range(len(split))])

    if isinstance(data, datasets.DatasetDict):
        if train_split not in data:
            raise ValueError(f"{name} has splits {sorted(data)}, not the training split {train_split!r}")
        test = rows(data[test_split], f"[{test_split}]") if test_split in data else None
        return rows(data[train_split], f"[{train_split}]"), test
    return rows(data, ""), None


# --- columns and rendering ---

PAIR_COLUMNS = ("chosen", "rejected")
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


def truncate(prompt: list[int], completions: list[list[int]], max_length, max_prompt_length):
    """Keep the completions: cut the prompt from the left first. -> (prompt, completions, prompt_was_cut)."""
    cut = False
    if max_prompt_length and len(prompt) > max_prompt_length:
        prompt, cut = prompt[-max_prompt_length:], True
    if max_length:
        room = max_length - max(len(c) for c in completions)
        if len(prompt) > max(room, 1):
            prompt, cut = prompt[-max(room, 1):], True
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


def _tokenize(items, renderer: Renderer, config, split: str, notes: list[str]) -> list[Example]:
    examples, empty, cut = [], [], 0
    for row_id, prompt, completions, margin in items:
        prompt_ids, completion_ids = renderer.encode(prompt, completions)
        if any(len(c) == 0 for c in completion_ids):
            empty.append(row_id)
            continue
        prompt_ids, completion_ids, was_cut = truncate(prompt_ids, completion_ids, config.max_length, config.max_prompt_length)
        cut += was_cut
        if any(len(c) == 0 for c in completion_ids):
            empty.append(row_id)
            continue
        examples.append(Example(len(examples), prompt_ids, completion_ids, margin, str(row_id)))
    if empty:
        notes.append(f"{split}: skipped {len(empty)} row(s) with an empty completion: {empty[:5]}")
    if cut:
        notes.append(f"{split}: cut {cut} prompt(s) from the left to fit max_prompt_length / max_length")
    return examples


def build_splits(config, tokenizer, task: str, listwise: bool = False) -> Splits:
    """Load, check, render, tokenize, truncate and split the dataset named by `config.dataset_name`."""
    train_rows, test_rows = load_rows(config.dataset_name, config.dataset_train_split, config.dataset_test_split)
    if not train_rows:
        raise ValueError(f"dataset {config.dataset_name} holds no training rows")
    layout = check_columns(train_rows, task, listwise, config.dataset_name)
    if test_rows is not None:
        check_columns(test_rows, task, listwise, f"{config.dataset_name}[{config.dataset_test_split}]")

    def items(rows):
        # the reward model reads `margin` when the data has one; every row then needs a number
        margins = task == "rm" and any(row.get("margin") is not None for row in rows)
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
    train = _tokenize(train_items, renderer, config, "train", notes)
    test = _tokenize(test_items, renderer, config, "eval", notes)
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
    if listwise:
        seqs = [(ex.prompt, ex.completions[j]) for ex in examples for j in range(k)]
    else:
        seqs = [(ex.prompt, ex.completions[j]) for j in range(k) for ex in examples]
    length = max(len(p) + len(c) for p, c in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, (prompt, completion) in enumerate(seqs):
        ids = prompt + completion
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        start = len(prompt) if completion_only else 0
        labels[row, start : len(ids)] = input_ids[row, start : len(ids)]
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
