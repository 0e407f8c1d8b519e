"""The `fastpref` command line: help texts, option parsing (TRL names, presets, YAML), errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from fastpref import cli  # noqa: E402
from fastpref.train import parse_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_top_level_help(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "fastpref" in out


@pytest.mark.parametrize("task", ["sft", "dpo", "reward", "rm"])
def test_task_help_lists_trl_names(task, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", task, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--learning_rate", "--per_device_train_batch_size", "--gradient_accumulation_steps",
                   "--max_length", "--max_prompt_length", "--num_train_epochs", "--max_steps", "--warmup_ratio",
                   "--lr_scheduler_type", "--max_grad_norm", "--logging_steps", "--eval_steps", "--save_steps",
                   "--output_dir", "--seed", "--gradient_checkpointing", "--bf16", "--resume", "--config", "--fsdp"):
        assert option in out, option
    if task == "dpo":
        for option in ("--beta", "--loss_type", "--label_smoothing", "--ld_alpha", "--use_weighting",
                       "--f_divergence_type", "--precompute_ref_log_probs", "--loss"):
            assert option in out, option


def test_console_entry_point_runs():
    """`python -m fastpref.cli` as torchrun launches it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "fastpref.cli", "train", "dpo", "--help"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--loss_type" in result.stdout


def test_no_task_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train"])
    assert exit_info.value.code == 2
    assert "needs a task" in capsys.readouterr().err


def test_bad_option_value_is_reported_not_raised(capsys):
    assert cli.main(["train", "dpo", "--loss_type", "nope", "--max_steps", "1"]) == 2
    assert "--loss_type ['nope'] unknown" in capsys.readouterr().err


def test_presets_fill_only_unset_options():
    demo = parse_config("dpo", [])
    assert demo.model_name_or_path == "tiny-llama" and demo.dataset_name == "hhh"
    assert demo.learning_rate == 1e-3 and demo.precompute_ref_log_probs and demo.max_length == 192
    mine = parse_config("dpo", ["--learning_rate", "1e-6", "--max_length", "1024"])
    assert mine.learning_rate == 1e-6 and mine.max_length == 1024 and mine.lr_scheduler_type == "cosine"
    local = parse_config("dpo", ["--model", "/some/dir"])
    assert local.learning_rate == 1e-6 and local.max_length == 1024  # TRL's defaults for a real model


def test_trl_style_values():
    config = parse_config("dpo", ["--loss_type", "sigmoid", "sft", "--loss_weights", "1.0", "0.5", "--bf16", "false",
                                  "--gradient_checkpointing", "--resume", "--beta", "0.5"])
    assert config.loss_type == ["sigmoid", "sft"] and config.loss_weights == [1.0, 0.5]
    assert config.bf16 is False and config.gradient_checkpointing and config.resume_from_checkpoint == "last"


def test_unknown_yaml_option_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("betaa: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['betaa'\]"):
        parse_config("dpo", ["--config", str(path)])


def test_bench_command_reaches_the_harness(capsys):
    from fastpref.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
