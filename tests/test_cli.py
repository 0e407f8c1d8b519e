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


@pytest.mark.smoke
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


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    from importlib.metadata import version

    assert capsys.readouterr().out.strip() == f"fastpref {version('fastpref')}"


# --- every numeric option checked when it is parsed: finite, in range, named ---

BAD_OPTIONS = [
    (["--learning_rate", "inf"], "--learning_rate must be a finite number"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
    (["--weight_decay", "nan"], "--weight_decay must be a finite number"),
    (["--weight_decay", "-0.1"], "--weight_decay must be a finite number in \\[0, inf\\)"),
    (["--adam_beta2", "1.0"], "--adam_beta2 must be a finite number in \\[0, 1\\)"),
    (["--adam_epsilon=-1e-8"], "--adam_epsilon must be a finite number in \\[0, inf\\)"),
    (["--num_train_epochs", "inf"], "--num_train_epochs must be a finite number"),
    (["--warmup_steps", "-1"], r"--warmup_steps must be a finite number in \[0, inf\)"),
    (["--max_grad_norm", "-1"], "--max_grad_norm must be a finite number in \\[0, inf\\)"),
    (["--max_grad_norm", "inf"], "--max_grad_norm must be a finite number"),
    (["--save_total_limit", "-2"], "--save_total_limit must be > 0"),
    (["--save_total_limit", "0"], "--save_total_limit must be > 0"),
    (["--max_train_samples", "-5"], "--max_train_samples must be > 0"),
    (["--max_eval_samples", "0"], "--max_eval_samples must be > 0"),
    (["--memory_budget", "-1"], "--memory_budget must be > 0"),
    (["--torch_threads", "0"], "--torch_threads must be > 0"),
    (["--lr_scheduler_type", "cosinus"], "--lr_scheduler_type must be one of"),
    (["--lr_scheduler_type", "reduce_lr_on_plateau"], "--lr_scheduler_type must be one of"),
    (["--loss", "simpo", "--beta", "-1"], "--beta must be a finite number in \\(0, inf\\)"),
    (["--loss", "orpo", "--beta", "nan"], "--beta must be a finite number"),
    (["--loss", "simpo", "--label_smoothing", "0.7"], "--label_smoothing must be a finite number in \\[0, 0.5\\)"),
    (["--loss", "simpo", "--simpo_gamma", "inf"], "--simpo_gamma must be a finite number"),
    (["--loss", "cpo", "--cpo_alpha", "-1"], "--cpo_alpha must be a finite number in \\[0, inf\\)"),
    (["--loss", "rrhf", "--sft_weight", "nan"], "--sft_weight must be a finite number"),
    (["--use_weighting", "true", "--loss_type", "aot"], "--use_weighting cannot be combined with --loss_type"),
    (["--loss_type", "sigmoid", "ipo", "--loss_weights", "1", "inf"], "--loss_weights must be finite"),
    (["--discopop_tau", "0"], "--discopop_tau"),
    (["--sft_warmup_learning_rate", "inf"], "--sft_warmup_learning_rate must be a finite number"),
]


@pytest.mark.parametrize("argv,message", BAD_OPTIONS, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_bad_numeric_options_fail_at_parse_time(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config("dpo", ["--model", "/some/dir", *argv])


def test_center_rewards_coefficient_is_checked():
    with pytest.raises(ValueError, match="--center_rewards_coefficient must be a finite number"):
        parse_config("rm", ["--model", "/some/dir", "--center_rewards_coefficient", "nan"])


def test_a_non_finite_learning_rate_stops_the_cli_before_anything_loads(tmp_path, capsys):
    code = cli.main(["train", "dpo", "--model", "/some/dir", "--learning_rate", "inf", "--output_dir",
                     str(tmp_path / "out")])
    assert code == 2
    assert "--learning_rate must be a finite number in (0, inf), got inf" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- YAML as a TRL user writes it ---


def _yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return ["--model", "/some/dir", "--config", str(path)]


def test_yaml_values_take_the_command_lines_forms(tmp_path):
    config = parse_config("dpo", _yaml(tmp_path, "loss_type: sigmoid\nlearning_rate: 5e-7\nbf16: false\n"
                                                 "max_prompt_length: null\nloss_weights: 1\nseed: '7'\n"))
    assert config.loss_type == ["sigmoid"]  # a plain string is a one-element list, as on the command line
    assert config.learning_rate == 5e-7 and isinstance(config.learning_rate, float)  # a string to YAML 1.1
    assert config.bf16 is False and config.max_prompt_length is None
    assert config.loss_weights == [1.0] and config.seed == 7


@pytest.mark.parametrize("text,message", [
    ("max_steps: ten\n", "max_steps: expected an integer, got 'ten'"),
    ("max_steps: 2.5\n", "max_steps: expected an integer, got 2.5"),
    ("beta: [0.1, 0.2]\n", "beta: expected a number, got list"),
    ("learning_rate: {a: 1}\n", "learning_rate: expected a number, got dict"),
    ("gradient_checkpointing: maybe\n", "gradient_checkpointing: expected true or false, got 'maybe'"),
    ("loss: dpoo\n", "loss: must be one of"),
    ("max_steps: null\n", "max_steps cannot be null"),
    ("loss_type: [sigmoid, [ipo]]\n", "loss_type: expected a list"),
    ("beta: 0.1\n  bad indent: 1\n", "not a valid YAML file"),
])
def test_wrongly_typed_yaml_values_name_the_file_and_option(tmp_path, text, message):
    with pytest.raises(ValueError, match=f"--config {tmp_path / 'run.yaml'}: .*{message}".replace("[", "\\[")):
        parse_config("dpo", _yaml(tmp_path, text))


def test_make_config_checks_types_too():
    from fastpref.train import make_config

    with pytest.raises(TypeError, match=r"--learning_rate must be a number, got '1e-3'"):
        make_config("dpo", model_name_or_path="x", learning_rate="1e-3")
    with pytest.raises(TypeError, match=r"--loss_type must be a list \(a string each\), got 'sigmoid'"):
        make_config("dpo", model_name_or_path="x", loss_type="sigmoid")
