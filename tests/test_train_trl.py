"""`fastpref train` as a TRL user meets it (issue 14): task names, models and datasets from every
source `from_pretrained` / `load_dataset` read offline, SFT objectives and truncation as TRL's, LoRA,
the TRL option names, TRL's metric names, live reporting."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import transformers  # noqa: E402
from test_train import model_dir, pair_rows, run, tokenizer_dir, write_jsonl  # noqa: E402

from fastpref import cli  # noqa: E402
from fastpref.train import make_config, modeling, parse_config  # noqa: E402
from fastpref.train.data import build_splits, load_rows  # noqa: E402
from fastpref.train.metrics import read_jsonl  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache_entry(cache: Path, repo_type: str, repo_id: str) -> Path:
    """The snapshot folder of `repo_id` in a Hugging Face hub cache laid out as huggingface_hub writes it."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # anything that tried the network would fail loudly
    return cache


# --- 1. task names, models, datasets ---


def test_reward_is_the_task_name_and_rm_its_alias(capsys):
    assert type(parse_config("reward", [])).__name__ == "RewardConfig"
    assert parse_config("rm", []).task == "reward"
    assert make_config("rm").task == "reward"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "reward", "--help"])
    assert exit_info.value.code == 0 and "--center_rewards_coefficient" in capsys.readouterr().out


def test_a_cached_hub_model_id_loads_offline(hub_cache):
    snapshot = hub_cache_entry(hub_cache, "model", "tiny-org/tiny-llama")
    shutil.copytree(model_dir(), snapshot, dirs_exist_ok=True)
    model, tokenizer = modeling.load_model_and_tokenizer("tiny-org/tiny-llama", "dpo", 0)
    expected = transformers.AutoModelForCausalLM.from_pretrained(model_dir())
    torch.testing.assert_close(model.lm_head.weight, expected.lm_head.weight, rtol=0, atol=0)
    assert len(tokenizer) == len(transformers.AutoTokenizer.from_pretrained(tokenizer_dir()))
    with pytest.raises(FileNotFoundError, match="hub id in the local Hugging Face cache.*nothing is downloaded"):
        modeling.load_model_and_tokenizer("tiny-org/not-cached", "dpo", 0)


def _pairs_dataset(rows):
    return datasets.Dataset.from_list(rows)


@pytest.mark.parametrize("kind", ["parquet", "csv", "json"])
def test_dataset_files_of_every_format(tmp_path, kind):
    rows = pair_rows(4, 1)
    path = tmp_path / f"pairs.{kind}"
    getattr(_pairs_dataset(rows), f"to_{kind}")(str(path))
    train_rows, test_rows = load_rows(str(path))
    assert test_rows is None
    assert [r["chosen"] for r in train_rows] == [r["chosen"] for r in rows]


def test_a_hub_snapshot_folder_with_splits_and_configs(tmp_path, hub_cache):
    """A dataset as the hub stores it: parquet split files under data/, a second config named in the card."""
    rows = pair_rows(6, 1)
    snapshot = hub_cache_entry(hub_cache, "dataset", "tiny-org/pairs")
    (snapshot / "data").mkdir()
    _pairs_dataset(rows[:4]).to_parquet(str(snapshot / "data" / "train-00000-of-00001.parquet"))
    _pairs_dataset(rows[4:]).to_parquet(str(snapshot / "data" / "test-00000-of-00001.parquet"))
    (snapshot / "small").mkdir()
    _pairs_dataset(rows[:2]).to_parquet(str(snapshot / "small" / "train.parquet"))
    (snapshot / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
        "  - split: test\n    path: data/test-*\n- config_name: small\n  data_files:\n  - split: train\n"
        "    path: small/train.parquet\n---\n"
    )
    for source in (str(snapshot), "tiny-org/pairs"):  # the folder itself, and its id resolved from the cache
        train_rows, test_rows = load_rows(source)
        assert (len(train_rows), len(test_rows)) == (4, 2), source
    train_rows, test_rows = load_rows("tiny-org/pairs", config_name="small")
    assert (len(train_rows), test_rows) == (2, None)
    with pytest.raises(ValueError, match="not the training split 'dev'.*--dataset_train_split"):
        load_rows("tiny-org/pairs", train_split="dev")
    with pytest.raises(FileNotFoundError, match="hub id in the local Hugging Face cache"):
        load_rows("tiny-org/absent")


def test_a_parquet_folder_trains(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    rows = pair_rows(12, 2)
    _pairs_dataset(rows[:20]).to_parquet(str(folder / "train.parquet"))
    _pairs_dataset(rows[20:]).to_parquet(str(folder / "test.parquet"))
    summary, out = run("dpo", tmp_path, folder, max_steps=2)
    assert summary["eval_samples"] == 4
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_jsonl(out / "metrics.jsonl") if "loss" in r)


def test_a_bad_file_is_named(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="bad.parquet"):
        load_rows(str(bad))
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        (tmp_path / "d.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n')
        config = make_config("dpo", model_name_or_path="x", dataset_name=str(tmp_path / "d.jsonl"))
        build_splits(config, transformers.AutoTokenizer.from_pretrained(tokenizer_dir()), "dpo")


def test_jsonl_file_keeps_line_numbers(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", pair_rows(2, 1))
    assert len(load_rows(str(data))[0]) == 2
