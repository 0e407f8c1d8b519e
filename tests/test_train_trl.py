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


# --- 2. SFT as TRL: objective, truncation, defaults ---

GENERATION_TEMPLATE = (  # the test template with TRL's {% generation %} marks around each assistant reply
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'Human: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' }}{% generation %}"
    "{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n\n' }}"
    "{% else %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
TWO_TURNS = {"messages": [
    {"role": "system", "content": "a b c"},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "hi ."},
    {"role": "user", "content": "what colour is the sky number 1 ?"},
    {"role": "assistant", "content": "the sky is blue , i am glad to help ."},
]}


def _generation_tokenizer(tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir())
    tok.chat_template = GENERATION_TEMPLATE
    tok.save_pretrained(tmp_path / "tok")
    return tok


def _fastpref_labels(tmp_path, tok, rows, **options):
    from fastpref.train.data import collate

    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    config = make_config("sft", model_name_or_path="x", dataset_name=str(data), eval_fraction=0.0, **options)
    out = build_splits(config, tok, "sft")
    batch = collate(out.train[:1], tok.pad_token_id)
    length = int(batch["attention_mask"][0].sum())
    return batch["input_ids"][0, :length], batch["labels"][0, :length]


def _trl_labels(tok, row, **options):
    trl = pytest.importorskip("trl")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir())
    args = trl.SFTConfig(output_dir=None, report_to="none", bf16=False, use_cpu=True, **options)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list([row]),
                             processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    return batch["input_ids"][0], batch["labels"][0]


@pytest.mark.parametrize("options", [{}, {"assistant_only_loss": True}, {"max_length": 12},
                                     {"assistant_only_loss": True, "max_length": 12}], ids=str)
def test_sft_messages_score_the_tokens_trl_scores(tmp_path, options):
    """The same two-turn row through fastpref and through TRL 1.16's SFTTrainer tokenisation + collator: the
    same sequence and the same scored tokens (31 of 32 by default, both assistant turns' 15 with
    assistant_only_loss; TRL's keep_start truncation). fastpref used to score the last turn only (11 tokens)."""
    tok = _generation_tokenizer(tmp_path)
    ours_ids, ours_labels = _fastpref_labels(tmp_path, tok, [TWO_TURNS, TWO_TURNS], **options)
    trl_ids, trl_labels = _trl_labels(tok, TWO_TURNS, **options)
    assert ours_ids.tolist() == trl_ids.tolist()
    # the model shifts the labels: position 0 is never scored
    assert ours_labels[1:].tolist() == trl_labels[1:].tolist()
    scored = int((ours_labels[1:] != -100).sum())
    assert scored == {"{}": 31, "{'assistant_only_loss': True}": 15, "{'max_length': 12}": 11,
                      "{'assistant_only_loss': True, 'max_length': 12}": 3}[str(options)]


def test_sft_prompt_completion_objectives(tmp_path, tok_rows=None):
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir())
    row = {"prompt": "what colour is the sky number 1 ?", "completion": "the sky is blue ."}
    ids, labels = _fastpref_labels(tmp_path, tok, [row, row])
    assert int((labels != -100).sum()) == 5 + 1  # completion + eos
    ids_all, labels_all = _fastpref_labels(tmp_path, tok, [row, row], completion_only_loss=False)
    assert ids_all.tolist() == ids.tolist()
    assert int((labels_all[1:] != -100).sum()) == len(ids) - 1  # every token but the first (TRL's shift)
    with pytest.raises(ValueError, match="--assistant_only_loss needs conversational `messages` rows"):
        _fastpref_labels(tmp_path, tok, [row, row], assistant_only_loss=True)


def test_truncation_modes_as_trl():
    from fastpref.train.data import truncate

    prompt, completions = list(range(10)), [list(range(100, 106)), list(range(200, 203))]
    p, (c, r), cut = truncate(prompt, completions, 12, None, "keep_start")
    assert cut and p == prompt and c == [100, 101] and r == [200, 201]
    p, (c, r), cut = truncate(prompt, completions, 12, None, "keep_end")
    assert cut and p == list(range(4, 10)) and c == completions[0] and r == completions[1]
    p, (c,), cut = truncate(prompt, [list(range(100, 120))], 12, None, "keep_end")
    assert p == [] and c == list(range(108, 120))
    p, (c,), cut = truncate(prompt, [[1, 2]], 12, None, "keep_start")
    assert not cut and (p, c) == (prompt, [1, 2])
    with pytest.raises(ValueError, match="--truncation_mode must be keep_start or keep_end"):
        make_config("dpo", truncation_mode="middle")


def test_trl_defaults_gradient_checkpointing_and_warmup_ratio(tmp_path):
    assert make_config("sft", model_name_or_path="x").gradient_checkpointing is True
    assert make_config("dpo", model_name_or_path="x").truncation_mode is None
    assert make_config("sft", model_name_or_path="x").truncation_mode == "keep_start"
    assert parse_config("dpo", ["--model", "x", "--warmup_steps", "0.25"]).warmup_steps == 0.25
    with pytest.raises(ValueError, match="--warmup_steps must be a whole number"):
        make_config("dpo", model_name_or_path="x", warmup_steps=2.5)
    data = write_jsonl(tmp_path / "p.jsonl", pair_rows())
    summary, out = run("sft", tmp_path, data, max_steps=4, warmup_steps=0.5, lr_scheduler_type="linear",
                       eval_fraction=0.0)
    rates = [r["learning_rate"] for r in read_jsonl(out / "metrics.jsonl") if "learning_rate" in r]
    assert rates[0] == pytest.approx(0.5e-3) and rates[1] == pytest.approx(1e-3)  # 2 of 4 steps warm up


# --- 3. LoRA ---


def test_lora_dpo_trains_adapters_and_its_reference_is_the_base_model(tmp_path):
    pytest.importorskip("peft")
    from fastpref.train import loop

    data = write_jsonl(tmp_path / "p.jsonl", pair_rows())
    config = make_config(
        "dpo", model_name_or_path=model_dir(), dataset_name=str(data), output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4, max_steps=3, logging_steps=1, learning_rate=1e-2, disable_tqdm=True,
        plot=False, max_length=64, torch_threads=1, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
        lora_target_modules=["q_proj", "v_proj"],
    )
    threads = torch.get_num_threads()
    try:
        trainer = loop.Trainer(config)
        assert trainer.ref_model is None and trainer.reference["kind"] == "adapters disabled"
        trainable = {n for n, p in trainer.module.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    rows = [r for r in read_jsonl(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # B = 0 at the start: policy == reference
    assert rows[-1]["rewards/margins"] != pytest.approx(0.0, abs=1e-4)  # the adapters trained
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir())
    batch = trainer._batch(trainer.splits.train, list(range(4)), "train")
    with torch.no_grad():
        base_logps = modeling.sequence_logps(base, batch)
        policy_logps = modeling.sequence_logps(trainer.module.model, batch)
    reference = torch.cat([batch["ref_chosen"], batch["ref_rejected"]])
    torch.testing.assert_close(reference, base_logps, rtol=1e-6, atol=1e-5)
    assert not torch.allclose(policy_logps, base_logps, atol=1e-3)
    assert (tmp_path / "out" / "adapter_config.json").exists()  # the adapter is saved, as TRL does


def test_lora_on_the_lm_head_is_refused():
    with pytest.raises(ValueError, match="--lora_target_modules names the LM head"):
        parse_config("dpo", ["--model", "x", "--use_peft", "true", "--lora_target_modules", "q_proj", "lm_head"])


# --- 4. TRL option names ---

TRL_DPO_RECIPE = """\
# a TRL-style recipe (trl dpo --config ...), as the TRL docs' examples write them
model_name_or_path: {model}
dataset_name: {data}
dataset_train_split: train
dataset_test_split: test
learning_rate: 5.0e-4
num_train_epochs: 1
max_steps: 2
per_device_train_batch_size: 4
per_device_eval_batch_size: 4
gradient_accumulation_steps: 1
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
lr_scheduler_type: cosine
warmup_steps: 0.1
beta: 0.1
loss_type: [sigmoid]  # a plain string is issue 11's YAML coercion
max_length: 64
truncation_mode: keep_start
bf16: false
dtype: float32
attn_implementation: sdpa
eval_strategy: no
save_strategy: "no"
logging_steps: 1
logging_strategy: steps
optim: adamw_torch
report_to: none
push_to_hub: false
dataset_num_proc: 2
use_peft: true
lora_r: 4
lora_alpha: 8
lora_dropout: 0.0
lora_target_modules: all-linear
lora_task_type: CAUSAL_LM
seed: 42
output_dir: {out}
"""


def test_a_trl_style_yaml_recipe_runs(tmp_path):
    pytest.importorskip("peft")
    from fastpref.train import train

    data = write_jsonl(tmp_path / "p.jsonl", pair_rows())
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(TRL_DPO_RECIPE.format(model=model_dir(), data=data, out=tmp_path / "out"))
    config = parse_config("dpo", ["--config", str(recipe), "--torch_threads", "1", "--disable_tqdm", "true"])
    translated = (config.save_steps, config.eval_steps, config.warmup_steps, config.loss_type)
    assert translated == (None, None, 0.1, ["sigmoid"])
    threads = torch.get_num_threads()
    try:
        summary = train(config)
    finally:
        torch.set_num_threads(threads)
    assert summary["steps"] == 2 and summary["reference"]["kind"] == "adapters disabled"


@pytest.mark.parametrize("option,value,message", [
    ("packing", "true", "--packing True is not supported by fastpref train"),
    ("optim", "sgd", "--optim 'sgd' is not supported by fastpref train; it accepts"),
    ("dtype", "bfloat16", "not supported by fastpref train.*--bf16 true"),
    ("push_to_hub", "true", "--push_to_hub True is not supported by fastpref train"),
    ("max_seq_length", "512", "not supported by fastpref train; use --max_length"),
    ("torch_compile", None, "--torch_compile True is not supported by fastpref train"),
])
def test_unsupported_trl_options_are_refused_by_name_before_loading(tmp_path, option, value, message):
    """On the command line and in YAML, before any model or data is touched (the model does not exist)."""
    argv = ["--model", str(tmp_path / "absent"), f"--{option}", *([value] if value else [])]
    with pytest.raises(ValueError, match=message):
        parse_config("dpo", argv)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"{option}: {value or 'true'}\n")
    with pytest.raises(ValueError, match=message):
        parse_config("dpo", ["--config", str(recipe)])


def test_trl_options_at_their_default_or_without_effect_are_accepted():
    config = parse_config("sft", ["--model", "x", "--packing", "false", "--loss_type", "nll", "--dataset_num_proc", "8",
                                  "--eval_strategy", "steps", "--eval_steps", "5", "--run_name", "r1"])
    assert config.eval_steps == 5
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['betaa'\].*neither fastpref's nor TRL's"):
        parse_config("dpo", ["--betaa", "0.1"])


def test_trl_defaults_table_matches_installed_trl():
    """fastpref.train.trl_names.TRL_DEFAULTS was read from TRL 1.16: it still says what TRL says."""
    import dataclasses

    trl = pytest.importorskip("trl")
    from fastpref.train.trl_names import TRL_DEFAULTS

    classes = (transformers.TrainingArguments, trl.SFTConfig, trl.DPOConfig, trl.RewardConfig, trl.ModelConfig,
               trl.ScriptArguments)
    seen = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.name in TRL_DEFAULTS and f.init:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                plain = isinstance(default, (str, int, float, bool, list, type(None)))
                seen[f.name] = default if plain else repr(default)
    assert seen == {name: TRL_DEFAULTS[name] for name in seen}
    assert set(seen) == set(TRL_DEFAULTS)


# --- 5. TRL's metric names ---

TRL_NAMES = {  # what TRL 1.16's trainers log, per task (fastpref adds its own columns beside them)
    "dpo": {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy", "num_tokens",
            "grad_norm", "learning_rate"},
    "reward": {"loss", "accuracy", "margin", "min_reward", "mean_reward", "max_reward", "num_tokens", "grad_norm",
               "learning_rate"},
    "sft": {"loss", "entropy", "mean_token_accuracy", "num_tokens", "grad_norm", "learning_rate"},
}


@pytest.mark.parametrize("task", sorted(TRL_NAMES))
def test_metric_names_are_trls(tmp_path, task):
    data = write_jsonl(tmp_path / "p.jsonl", pair_rows())
    summary, out = run(task, tmp_path, data, max_steps=2, eval_fraction=0.0)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert TRL_NAMES[task] <= set(rows[0]), TRL_NAMES[task] - set(rows[0])
    assert 0 < rows[0]["num_tokens"] < rows[1]["num_tokens"]  # cumulative, as TRL's
    if task == "reward":
        assert rows[0]["min_reward"] <= rows[0]["mean_reward"] <= rows[0]["max_reward"]


def test_dpo_token_metrics_equal_the_textbook_values():
    """entropy, logits/*, mean_token_accuracy from the fused pass's statistics vs the model's own logits."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir()).eval()
    config = make_config("dpo", model_name_or_path="x", reference_free=True)
    torch.manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (4, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    labels = torch.where(attention_mask.bool(), input_ids, -100)
    labels[:, :3] = -100
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    with torch.no_grad():
        _, metrics = modeling.DPOModule(model, config)(batch)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].double()
    target = labels[:, 1:]
    mask = target != -100
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    chosen, rejected = mask.chunk(2)

    def value(name):
        total, units = metrics[name]
        return float(total / units)

    assert value("entropy") == pytest.approx(float(entropy[mask].mean()), rel=1e-5)
    assert value("logits/chosen") == pytest.approx(float(logits.mean(-1)[:2][chosen].mean()), rel=1e-5, abs=1e-6)
    assert value("logits/rejected") == pytest.approx(float(logits.mean(-1)[2:][rejected].mean()), rel=1e-5, abs=1e-6)
    top1 = logits.argmax(-1) == target
    assert value("mean_token_accuracy") == pytest.approx(float(top1[:2][chosen].double().mean()))


# --- 6. live reporting ---


def test_report_to_tensorboard_writes_the_metrics_rows(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_jsonl(tmp_path / "p.jsonl", pair_rows())
    summary, out = run("dpo", tmp_path, data, max_steps=2, report_to=["tensorboard"])
    events = list((out / "runs").glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(out / "runs")).Reload()
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    logged = [(e.step, e.value) for e in accumulator.Scalars("loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]
    assert "eval_loss" in accumulator.Tags()["scalars"] and "rewards/margins" in accumulator.Tags()["scalars"]


def test_report_to_refuses_unknown_backends_and_none_imports_nothing():
    with pytest.raises(ValueError, match=r"--report_to \['mlflow'\] is not supported by fastpref train"):
        parse_config("dpo", ["--model", "x", "--report_to", "mlflow"])
    assert parse_config("dpo", ["--model", "x", "--report_to", "none"]).report_to == ["none"]
