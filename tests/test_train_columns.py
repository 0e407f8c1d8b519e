"""Every column the README documents is read by the task that names it: change the column's value and the
first step's loss changes (fastpref.train.data.DOCUMENTED_COLUMNS is the list; a column added there without a
case here fails `test_every_documented_column_has_a_case`)."""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("transformers")

from test_train import model_dir, write_jsonl  # noqa: E402

from fastpref.train import make_config, modeling  # noqa: E402
from fastpref.train.data import DOCUMENTED_COLUMNS, build_splits, collate  # noqa: E402

USER = {"role": "user", "content": "what colour is the sky number 1 ?"}
ROWS = {
    "pair": {"prompt": "what colour is the sky number 1 ?", "chosen": "the sky is blue .", "rejected": "no ."},
    "sft_completion": {"prompt": "what colour is the sky number 1 ?", "completion": "the sky is blue ."},
    "sft_chosen": {"prompt": "what colour is the sky number 1 ?", "chosen": "the sky is blue ."},
    "messages": {"messages": [USER, {"role": "assistant", "content": "the sky is blue ."}]},
    "text": {"text": "the sky is blue ."},
    "ranked": {"prompt": "what colour is the sky number 1 ?", "ranked": ["the sky is blue .", "no .", "go away ."]},
}
# (task, column) -> (row layout, options, the column's other value)
CASES = {
    ("sft", "prompt"): ("sft_completion", {}, "what colour is the coal number 7 ?"),
    ("sft", "completion"): ("sft_completion", {}, "the sun is red ."),
    ("sft", "messages"): ("messages", {}, [USER, {"role": "assistant", "content": "go away ."}]),
    ("sft", "text"): ("text", {}, "go away ."),
    ("sft", "chosen"): ("sft_chosen", {}, "the sun is red ."),
    ("dpo", "prompt"): ("pair", {"reference_free": True}, "what colour is the coal number 7 ?"),
    ("dpo", "chosen"): ("pair", {"reference_free": True}, "the sun is red ."),
    ("dpo", "rejected"): ("pair", {"reference_free": True}, "go away ."),
    ("dpo", "ranked"): ("ranked", {"loss": "rrhf"}, ["go away .", "the sky is blue .", "no ."]),
    ("reward", "prompt"): ("pair", {}, "what colour is the coal number 7 ?"),
    ("reward", "chosen"): ("pair", {}, "the sun is red ."),
    ("reward", "rejected"): ("pair", {}, "go away ."),
    ("reward", "margin"): ("pair", {}, 3.0),
}


@functools.lru_cache(maxsize=None)
def _model(task: str):
    torch.manual_seed(0)
    return modeling.load_model_and_tokenizer(model_dir(), task, seed=0)


def first_step_loss(tmp_path, task: str, rows: list[dict], **options) -> float:
    """The loss of the task's module on the first training batch, as the loop's first step computes it."""
    data = write_jsonl(tmp_path / f"{task}-{len(list(tmp_path.iterdir()))}.jsonl", rows)
    config = make_config(task, model_name_or_path=model_dir(), dataset_name=str(data), eval_fraction=0.0,
                         max_length=64, **options)
    model, tokenizer = _model(task)
    listwise = task == "dpo" and config.loss == "rrhf"
    splits = build_splits(config, tokenizer, task, listwise)
    batch = collate(splits.train, tokenizer.pad_token_id, listwise=listwise)
    with torch.no_grad():
        loss, _ = modeling.MODULES[task](model, config)(batch)
    return float(loss)


def test_every_documented_column_has_a_case():
    assert set(CASES) == {(task, column) for task, columns in DOCUMENTED_COLUMNS.items() for column in columns}


@pytest.mark.parametrize("task,column", sorted(CASES), ids=lambda x: x)
def test_changing_a_documented_column_changes_the_loss(tmp_path, task, column):
    layout, options, other = CASES[(task, column)]
    base = dict(ROWS[layout])
    if column == "margin":
        base["margin"] = 0.0
    changed = {**base, column: other}
    assert first_step_loss(tmp_path, task, [changed], **options) != pytest.approx(
        first_step_loss(tmp_path, task, [base], **options), rel=1e-6, abs=0)


def test_reward_margin_is_checked_and_sft_names_the_columns_it_drops(tmp_path):
    """A non-numeric `margin` is an error naming the row (it used to be dropped silently); SFT on pairs says
    that `rejected` is not used."""
    with pytest.raises(ValueError, match="column 'margin' must be a finite number"):
        first_step_loss(tmp_path, "reward", [{**ROWS["pair"], "margin": "big"}])
    data = write_jsonl(tmp_path / "pairs.jsonl", [ROWS["pair"]])
    config = make_config("sft", model_name_or_path=model_dir(), dataset_name=str(data), eval_fraction=0.0)
    notes = build_splits(config, _model("sft")[1], "sft").notes
    assert any("column(s) ['rejected'] not used by `fastpref train sft`" in note for note in notes), notes


def test_an_unknown_task_name_is_refused(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [ROWS["pair"]])
    config = make_config("reward", model_name_or_path=model_dir(), dataset_name=str(data))
    with pytest.raises(ValueError, match="unknown task 'rm'"):
        build_splits(config, _model("reward")[1], "rm")
