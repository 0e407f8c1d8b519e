"""Data edge cases of the training loop: columns, conversations, truncation, empty completions, splits,
rankings, batches; and bad models / non-finite losses reported clearly instead of crashing in a kernel."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402
from test_train import pair_rows, run, tokenizer_dir, write_jsonl  # noqa: E402

from fastpref.train import make_config, modeling  # noqa: E402
from fastpref.train.data import (  # noqa: E402
    IGNORE_INDEX,
    Renderer,
    StepSampler,
    build_splits,
    collate,
    load_rows,
    truncate,
)
from fastpref.train.metrics import read_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir())


def splits(tmp_path, rows, task="dpo", listwise=False, **options):
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    config = make_config(task, model_name_or_path="x", dataset_name=str(data), **options)
    return build_splits(config, transformers.AutoTokenizer.from_pretrained(tokenizer_dir()), task, listwise)


def test_missing_columns_are_named(tmp_path):
    rows = [{"prompt": "hi", "chosen": "hello there"}]
    with pytest.raises(ValueError, match=r"columns \['chosen', 'prompt'\].*needs chosen \+ rejected"):
        splits(tmp_path, rows)
    with pytest.raises(ValueError, match="needs prompt \\+ completion"):
        splits(tmp_path, [{"question": "hi"}], task="sft")


def test_a_row_missing_a_column_is_named(tmp_path):
    rows = pair_rows(3, 1)
    del rows[1]["rejected"]
    with pytest.raises(ValueError, match=r"row p1-0 lacks column\(s\) \['rejected'\]"):
        splits(tmp_path, rows)


def test_wrong_field_type_is_named(tmp_path):
    rows = pair_rows(3, 1)
    rows[2]["chosen"] = 42
    with pytest.raises(ValueError, match="row p2-0: column 'chosen' must be a string or a list"):
        splits(tmp_path, rows)


def test_empty_completions_are_skipped_and_logged(tmp_path):
    rows = pair_rows(4, 1)
    rows[1]["rejected"] = "   "
    rows[3]["chosen"] = ""
    out = splits(tmp_path, rows, eval_fraction=0.0)
    assert [ex.row_id for ex in out.train] == ["p0-0", "p2-0"]
    assert any("skipped 2 row(s) with an empty completion" in note for note in out.notes)


def test_all_rows_unusable_is_a_clear_error(tmp_path):
    rows = [{"prompt": "hi", "chosen": "", "rejected": "no ."}]
    with pytest.raises(ValueError, match="no usable training rows"):
        splits(tmp_path, rows, eval_fraction=0.0)


def test_truncation_keeps_the_completion():
    prompt, completions = list(range(100)), [list(range(1000, 1010)), list(range(2000, 2004))]
    p, (c, r), cut = truncate(prompt, completions, max_length=32, max_prompt_length=None)
    assert cut and p == list(range(78, 100))  # the prompt's end is kept
    assert c == completions[0] and r == completions[1]
    p, (c, r), _ = truncate(prompt, completions, max_length=64, max_prompt_length=8)
    assert p == list(range(92, 100)) and c == completions[0]
    # a completion longer than max_length: one prompt token stays, the completion's end is cut
    p, (c, r), _ = truncate(prompt, [list(range(50)), [7]], max_length=16, max_prompt_length=None)
    assert p == [99] and c == list(range(15)) and r == [7]


def test_prompt_longer_than_max_length_trains(tmp_path):
    rows = pair_rows(6, 1)
    rows[0]["prompt"] = " ".join(["what"] * 300) + " ?"
    out = splits(tmp_path, rows, max_length=24, eval_fraction=0.0)
    ex = next(e for e in out.train if e.row_id == "p0-0")
    assert all(len(ex.prompt) + len(c) <= 24 for c in ex.completions)
    assert len(ex.completions[0]) == len(rows[0]["chosen"].split()) + 1  # completion + eos kept whole
    assert any("cut 1 row(s)" in n for n in out.notes)


def test_conversations_use_the_chat_template(tmp_path, tok):
    rows = [{
        "prompt": [{"role": "user", "content": "what colour is the sky number 1 ?"}],
        "chosen": [{"role": "assistant", "content": "the sky is blue ."}],
        "rejected": [{"role": "assistant", "content": "no ."}],
    }] * 2
    out = splits(tmp_path, rows, eval_fraction=0.0)
    ex = out.train[0]
    assert tok.decode(ex.prompt).split() == "Human: what colour is the sky number 1 ? Assistant:".split()
    assert tok.decode(ex.completions[0]).split() == ["the", "sky", "is", "blue", ".", "<eos>"]


def test_implicit_prompt_from_shared_messages(tmp_path, tok):
    user = {"role": "user", "content": "hello there"}
    rows = [{"chosen": [user, {"role": "assistant", "content": "hi ."}],
             "rejected": [user, {"role": "assistant", "content": "go away ."}]}]
    ex = splits(tmp_path, rows, eval_fraction=0.0).train[0]
    assert "hello" in tok.decode(ex.prompt) and "hi" not in tok.decode(ex.prompt).split()


def test_conversations_without_a_template_fail_clearly(tok):
    bare = transformers.AutoTokenizer.from_pretrained(tokenizer_dir())
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        Renderer(bare).encode([{"role": "user", "content": "hi"}], ["hello there"])


def test_held_out_split_keeps_prompts_together(tmp_path):
    out = splits(tmp_path, pair_rows(10, 3), eval_fraction=0.3)
    train_prompts = {tuple(e.prompt) for e in out.train}
    eval_prompts = {tuple(e.prompt) for e in out.eval}
    assert out.eval and not train_prompts & eval_prompts
    assert len(out.eval) == 9  # 3 of 10 prompts, 3 pairs each


def test_datasets_directory_with_a_test_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = pair_rows(6, 1)
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(rows[:4]), "test": datasets.Dataset.from_list(rows[4:])
    }).save_to_disk(str(tmp_path / "ds"))
    train_rows, test_rows = load_rows(str(tmp_path / "ds"))
    assert len(train_rows) == 4 and len(test_rows) == 2
    config = make_config("dpo", model_name_or_path="x", dataset_name=str(tmp_path / "ds"))
    out = build_splits(config, transformers.AutoTokenizer.from_pretrained(tokenizer_dir()), "dpo")
    assert (len(out.train), len(out.eval)) == (4, 2)


def test_rankings_from_pairs_sharing_a_prompt(tmp_path):
    rows = [
        {"prompt": "what colour is the sky number 1 ?", "chosen": "a", "rejected": "b"},
        {"prompt": "what colour is the sky number 1 ?", "chosen": "a", "rejected": "c"},
        {"prompt": "what colour is the sky number 1 ?", "chosen": "b", "rejected": "c"},
        {"prompt": "hello there", "chosen": "hi .", "rejected": "no ."},
    ]
    out = splits(tmp_path, rows, listwise=True, loss="rrhf", eval_fraction=0.0)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir())
    ranked = [[tok.decode(c).split()[0] for c in ex.completions] for ex in out.train]
    assert ranked == [["a", "b", "c"], ["hi", "no"]]


def test_collate_layout_and_masks(tok):
    from fastpref.train.data import Example

    examples = [Example(0, [5, 6], [[7, 8, 9], [10]]), Example(1, [11], [[12], [13, 14]])]
    batch = collate(examples, pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [11, 12, 1, 1, 1], [5, 6, 10, 1, 1], [11, 13, 14, 1, 1]]
    i = IGNORE_INDEX
    assert batch["labels"].tolist() == [[i, i, 7, 8, 9], [i, 12, i, i, i], [i, i, 10, i, i], [i, 13, 14, i, i]]
    assert batch["attention_mask"].sum(-1).tolist() == [5, 2, 3, 3]


def test_sampler_covers_each_global_batch_once_across_ranks():
    sampler = StepSampler(20, per_device=2, world=2, accumulation=2, seed=0)
    assert sampler.steps_per_epoch == 2
    seen = [i for step in range(2) for rank in range(2) for mb in sampler.micro_batches(step, rank) for i in mb]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 16
    single = StepSampler(20, per_device=8, world=1, accumulation=1, seed=0)
    assert sorted(single.micro_batches(0, 0)[0]) == sorted(
        i for rank in range(2) for mb in sampler.micro_batches(0, rank) for i in mb
    )
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepSampler(3, per_device=2, world=1, accumulation=2, seed=0)


# --- models and losses ---


def test_model_directory_without_a_head(tmp_path):
    from test_train import tiny_config

    base = transformers.LlamaModel(tiny_config("llama"))
    base.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="without a language-model head"):
        modeling.load_model_and_tokenizer(str(tmp_path / "base"), "dpo", 0, tokenizer_dir())
    with pytest.raises(FileNotFoundError, match="neither a local transformers model directory.* nor a preset"):
        modeling.load_model_and_tokenizer(str(tmp_path / "nowhere"), "dpo", 0)


def test_non_finite_loss_is_skipped_and_logged(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", pair_rows())
    original = modeling.DPOModule.forward
    calls = {"n": 0}

    def sometimes_nan(self, batch):
        loss, metrics = original(self, batch)
        calls["n"] += 1
        return (loss * float("nan"), metrics) if calls["n"] == 2 else (loss, metrics)

    monkeypatch.setattr(modeling.DPOModule, "forward", sometimes_nan)
    summary, out = run("dpo", tmp_path, data, max_steps=3, eval_fraction=0.0)
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in transformers.AutoModelForCausalLM.from_pretrained(out).parameters())


def test_options_are_checked_with_their_names():
    with pytest.raises(ValueError, match="--loss_type"):
        make_config("dpo", model_name_or_path="x", loss_type=["sigmoid", "nope"])
    with pytest.raises(ValueError, match="label_smoothing"):
        make_config("dpo", model_name_or_path="x", loss_type=["exo_pair"])
    with pytest.raises(ValueError, match="--max_prompt_length"):
        make_config("dpo", model_name_or_path="x", max_length=16, max_prompt_length=16)
    with pytest.raises(ValueError, match="--per_device_train_batch_size"):
        make_config("sft", model_name_or_path="x", per_device_train_batch_size=0)


def test_packaged_hhh_is_loaded_as_conversations():
    rows, test = load_rows("hhh")
    assert len(rows) == 221 and test is None
    assert rows[0]["prompt"][0]["role"] == "user" and rows[0]["chosen"][0]["role"] == "assistant"
    assert json.dumps(rows[0])  # plain data


# --- rows a user's file can hold: each error says file, line (and column) ---


def _write_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _build(path, task="dpo", **options):
    config = make_config(task, model_name_or_path="x", dataset_name=str(path), eval_fraction=0.0, **options)
    return build_splits(config, transformers.AutoTokenizer.from_pretrained(tokenizer_dir()), task)


@pytest.mark.parametrize("column", ["prompt", "chosen", "rejected"])
def test_a_null_field_names_file_line_and_column(tmp_path, column):
    rows = pair_rows(3, 1)
    rows[1][column] = None
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=rf"d\.jsonl:2: row p1-0: column '{column}' is null"):
        _build(path)


def test_a_message_without_string_content_is_named(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": None}],
             "rejected": [{"role": "assistant", "content": "no ."}]}]
    with pytest.raises(ValueError, match=r"d\.jsonl:1: column 'chosen', message 0: role and content must be strings"):
        _build(write_jsonl(tmp_path / "d.jsonl", rows))


def test_non_utf8_bytes_name_file_line_and_column(tmp_path):
    lines = [json.dumps(r).encode() for r in pair_rows(3, 1)]
    lines[1] = lines[1].replace(b"glad", b"gl\xe9d")  # Latin-1, as an old editor saves it
    column = lines[1].index(b"\xe9") + 1
    with pytest.raises(ValueError, match=rf"d\.jsonl:2:{column}: not UTF-8 text \(byte 0xe9\)"):
        _build(_write_lines(tmp_path / "d.jsonl", lines))


def test_a_utf8_byte_order_mark_is_read_as_utf8(tmp_path):
    lines = [json.dumps(r).encode() for r in pair_rows(3, 1)]
    path = _write_lines(tmp_path / "d.jsonl", lines)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as Windows Notepad writes UTF-8
    assert [ex.row_id for ex in _build(path).train] == ["p0-0", "p1-0", "p2-0"]


def test_bad_json_names_file_line_and_column(tmp_path):
    lines = [json.dumps(r).encode() for r in pair_rows(3, 1)]
    lines[2] = b'{"prompt": "hi", "chosen": "a" "rejected": "b"}'  # a comma missing
    column = lines[2].index(b'"rejected"') + 1
    with pytest.raises(ValueError, match=rf"d\.jsonl:3:{column}: not valid JSON \(Expecting ',' delimiter\)"):
        _build(_write_lines(tmp_path / "d.jsonl", lines))


@pytest.mark.parametrize("margin", ["high", None, True, float("nan")], ids=["string", "null", "bool", "nan"])
def test_reward_margins_must_be_numbers_on_every_row(tmp_path, margin):
    rows = [{**row, "margin": 1.5} for row in pair_rows(3, 1)]
    rows[1]["margin"] = margin
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=r"d\.jsonl:2: row p1-0: column 'margin' must be a finite number"):
        _build(path, task="reward")


def test_reward_margins_reach_the_batch_and_other_tasks_ignore_them(tmp_path):
    rows = [{**row, "margin": float(i)} for i, row in enumerate(pair_rows(3, 1))]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples = _build(path, task="reward").train
    assert collate(examples, pad_id=1)["margin"].tolist() == [0.0, 1.0, 2.0]
    rows[1]["margin"] = "high"  # not read by DPO: no error, and no margin in its batches
    examples = _build(write_jsonl(tmp_path / "d.jsonl", rows)).train
    assert "margin" not in collate(examples, pad_id=1)
