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
    out = capsys.readouterr().out
    assert "--quick" in out and out.startswith("usage: fastpref bench")  # was: python -m fastpref.bench
    assert "--time_box SECONDS, --time-box SECONDS" in out  # underscores as everywhere else; the dashes an alias


def test_bench_writes_into_the_working_directory_by_default(tmp_path, monkeypatch):
    """`--out` defaulted to the package's own folder (site-packages once installed)."""
    from fastpref.bench.harness import parse_args

    monkeypatch.chdir(tmp_path)
    assert parse_args([]).out.resolve() == tmp_path / "bench_results"
    assert parse_args(["--time-box", "5"]).time_box == parse_args(["--time_box", "5"]).time_box == 5.0


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
    (["--use_weighting", "true", "--loss_type", "aot"], "--loss_type aot cannot be combined with --use_weighting true"),
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
        parse_config("reward", ["--model", "/some/dir", "--center_rewards_coefficient", "nan"])


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


# --- issue 22: options behave as --help and TRL say ---


def _bool_options(task):
    import typing

    from fastpref.train.config import CONFIGS

    hints = typing.get_type_hints(CONFIGS[task])
    return sorted(name for name, hint in hints.items()
                  if hint is bool or set(typing.get_args(hint)) == {bool, type(None)})


@pytest.mark.parametrize("task", ["sft", "dpo", "reward"])
def test_every_boolean_takes_a_bare_flag_as_in_trl(task):
    """`--bf16` alone (a `bool | None` option) was an argparse error; every boolean now reads a bare flag as true."""
    names = _bool_options(task)
    assert "bf16" in names and "use_peft" in names
    for name in names:
        avoid = {"use_rslora": ["--use_peft"]}.get(name, [])  # LoRA options need --use_peft (CONFLICTS)
        config = parse_config(task, ["--model", "/some/dir", *avoid, f"--{name}"])
        assert getattr(config, name) is True, name


def test_negative_and_scientific_numbers_parse():
    config = parse_config("dpo", ["--model", "/some/dir", "--loss", "simpo", "--simpo_gamma", "-1e-1"])
    assert config.simpo_gamma == -0.1
    config = parse_config("dpo", ["--model", "/some/dir", "--f_divergence_type", "alpha_divergence",
                                  "--f_alpha_divergence_coef", "-.5"])
    assert config.f_alpha_divergence_coef == -0.5
    with pytest.raises(ValueError, match=r"--learning_rate must be a finite number in \(0, inf\), got -1e-05"):
        parse_config("dpo", ["--model", "/some/dir", "--learning_rate", "-1e-5"])  # was "expected one argument"


@pytest.mark.parametrize("argv", [
    ["train", "dpo", "--max_steps", "abc"],
    ["train", "dpo", "--loss", "kto"],
    ["frobnicate"],
    ["score", "--prompt", "hi"],
    ["bench", "--bogus-option"],
    ["train", "kto"],
])
def test_argparse_errors_are_one_line_and_point_to_help(argv, capsys):
    """Was: the whole 63-line usage before the message."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "--help" in lines[0], err


def test_an_unsupported_task_is_named_with_what_to_use(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "kto"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown task 'kto'" in err and "KTOTrainer" in err and "fastpref.integrations.trl.patch" in err


@pytest.mark.parametrize("value", ["0", "-5", "-2"])
def test_max_steps_out_of_range_is_refused(value):
    """`--max_steps 0` / `-5` ran a full epoch-based training; only -1 means 'use num_train_epochs'."""
    with pytest.raises(ValueError, match=rf"--max_steps must be > 0, or -1 .*got {value}"):
        parse_config("dpo", ["--model", "/some/dir", "--max_steps", value])
    assert parse_config("dpo", ["--model", "/some/dir", "--max_steps", "-1"]).max_steps == -1


# one example per entry of fastpref.train.config.CONFLICTS: (task, argv)
CONFLICT_EXAMPLES = {
    ("loss", "loss_type"): ("dpo", ["--loss", "simpo", "--loss_type", "ipo"]),
    ("loss", "loss_weights"): ("dpo", ["--loss", "cpo", "--loss_weights", "1.0"]),
    ("loss", "reference_free"): ("dpo", ["--loss", "orpo", "--reference_free"]),
    ("loss", "precompute_ref_log_probs"): ("dpo", ["--loss", "simpo", "--precompute_ref_log_probs"]),
    ("loss", "ld_alpha"): ("dpo", ["--loss", "simpo", "--ld_alpha", "0.5"]),
    ("loss", "use_weighting"): ("dpo", ["--loss", "rrhf", "--use_weighting"]),
    ("loss", "f_divergence_type"): ("dpo", ["--loss", "cpo", "--f_divergence_type", "js_divergence"]),
    ("loss", "simpo_gamma"): ("dpo", ["--loss", "cpo", "--simpo_gamma", "1.0"]),
    ("loss", "cpo_alpha"): ("dpo", ["--cpo_alpha", "1.0"]),
    ("loss", "sft_weight"): ("dpo", ["--loss", "simpo", "--sft_weight", "1.0"]),
    ("reference_free", "precompute_ref_log_probs"): ("dpo", ["--reference_free", "--precompute_ref_log_probs"]),
    ("loss_type", "precompute_ref_log_probs"): ("dpo", ["--loss_type", "sft", "--precompute_ref_log_probs"]),
    ("loss_type", "use_weighting"): ("dpo", ["--loss_type", "aot", "--use_weighting"]),
    ("sft_warmup_learning_rate", "sft_warmup_steps"): ("dpo", ["--sft_warmup_learning_rate", "1e-5"]),
    ("sft_warmup_steps", "use_peft"): ("dpo", ["--sft_warmup_steps", "5", "--use_peft"]),
    ("assistant_only_loss", "completion_only_loss"): ("sft", ["--assistant_only_loss", "--completion_only_loss",
                                                              "false"]),
    ("overwrite_output_dir", "resume_from_checkpoint"): ("dpo", ["--overwrite_output_dir", "--resume"]),
    ("warmup_steps", "warmup_ratio"): ("dpo", ["--warmup_steps", "5", "--warmup_ratio", "0.1"]),
    ("save_total_limit", "save_steps"): ("dpo", ["--save_total_limit", "2", "--save_strategy", "no"]),
    ("fsdp", "use_peft"): ("dpo", ["--fsdp", "--use_peft"]),
    ("lora_r", "use_peft"): ("dpo", ["--lora_r", "8"]),
    ("lora_alpha", "use_peft"): ("dpo", ["--lora_alpha", "8"]),
    ("lora_dropout", "use_peft"): ("dpo", ["--lora_dropout", "0.1"]),
    ("lora_target_modules", "use_peft"): ("dpo", ["--lora_target_modules", "q_proj"]),
    ("use_rslora", "use_peft"): ("dpo", ["--use_rslora"]),
}


def test_every_conflict_has_an_example():
    from fastpref.train.config import CONFLICTS

    assert [(a, b) for a, b, _, _ in CONFLICTS] == list(CONFLICT_EXAMPLES)


@pytest.mark.parametrize("pair", list(CONFLICT_EXAMPLES), ids=lambda p: "+".join(p))
def test_options_that_cannot_both_hold_are_refused_naming_both(pair):
    """Was: `--loss simpo --loss_type ipo` trained SimPO, `--reference_free --precompute_ref_log_probs` accepted."""
    task, argv = CONFLICT_EXAMPLES[pair]
    with pytest.raises(ValueError) as error:
        parse_config(task, ["--model", "/some/dir", *argv])
    message = str(error.value)
    assert "\n" not in message and f"--{pair[0]} " in message and "cannot be combined with" in message \
        and f"--{pair[1]} " in message, message


def test_a_preset_keeps_help_defaults_for_checkpoints_and_used_folders_outside_the_demo(tmp_path):
    """Was: on the user's own data the tiny-llama preset turned on overwrite_output_dir and off checkpoints."""
    from fastpref.train.config import PRESET_DEFAULTS

    data = tmp_path / "pairs.jsonl"
    data.write_text("")
    for argv in (["--dataset", str(data)], ["--output_dir", str(tmp_path / "mine")]):
        config = parse_config("dpo", argv)
        assert config.save_steps == 500 and config.overwrite_output_dir is False, argv
        assert {"save_steps", "overwrite_output_dir"}.isdisjoint(config.preset_applied)
    demo = parse_config("dpo", [])
    assert demo.save_steps is None and demo.overwrite_output_dir is True
    for preset, table in PRESET_DEFAULTS.items():  # the demo-only values are the only ones that do this
        for key, values in table.items():
            if key != "demo":
                assert "overwrite_output_dir" not in values and values.get("save_steps", 1) is not None, preset


def test_a_preset_never_sets_a_value_that_conflicts_with_the_users():
    config = parse_config("dpo", ["--loss", "simpo"])  # the preset's precompute_ref_log_probs would conflict
    assert config.loss == "simpo" and not config.precompute_ref_log_probs
    assert parse_config("dpo", ["--resume"]).overwrite_output_dir is False  # the demo's overwrite vs --resume
    assert parse_config("dpo", ["--warmup_steps", "3"]).warmup_ratio == 0.0


@pytest.mark.parametrize("task", ["sft", "dpo", "reward"])
def test_list_presets_names_every_option_a_preset_changes(task, capsys):
    from fastpref.train.config import PRESET_DEFAULTS, preset_values

    assert cli.main(["train", task, "--list_presets"]) == 0
    out = capsys.readouterr().out
    for preset in PRESET_DEFAULTS:
        section = out.split(f"--model {preset}:")[1].split("--model ")[0]
        for name in preset_values(preset, task, demo=True):
            assert f"--{name} " in section, (preset, name)
    config = parse_config(task, [])
    assert set(config.preset_applied) <= set(preset_values("tiny-llama", task, demo=True))


def test_the_options_a_preset_applies_are_printed_when_the_run_starts(tmp_path, monkeypatch, capsys):
    from test_train import model_dir, pair_rows, write_jsonl

    from fastpref.train import config as config_module
    from fastpref.train import train

    monkeypatch.setitem(config_module.PRESET_DEFAULTS, model_dir(), {"*": {"learning_rate": 5e-3}})
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4, 1))
    config = parse_config("dpo", ["--model", model_dir(), "--dataset", str(data), "--max_steps", "1", "--output_dir",
                                  str(tmp_path / "out"), "--disable_tqdm", "--plot", "false", "--torch_threads", "1",
                                  "--eval_fraction", "0", "--per_device_train_batch_size", "2"])
    train(config)
    err = capsys.readouterr().err
    assert f"preset --model {model_dir()} sets: --learning_rate 0.005 (default 1e-06)" in err


def test_help_shows_every_default_and_sft_help_speaks_of_sequences(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "sft", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for option, default in (("--adam_beta1", "0.9"), ("--adam_beta2", "0.999"), ("--adam_epsilon", "1e-08")):
        assert f"(default: {default})" in out.split(option, 2)[-1].split("--", 1)[0] or \
            f"(default: {default})" in out.split(f"{option} ")[-1][:300], option
    assert "pairs" not in out.split("--per_device_train_batch_size")[-1][:200]
    assert "--list_presets" in out
    with pytest.raises(SystemExit):
        cli.main(["score", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 2)" in out and "(default: 8)" in out and "(default: hhh)" in out


def test_score_refuses_a_k_it_cannot_honour(capsys):
    assert cli.main(["score", "--model", "tiny-llama", "--prompt", "hi", "--candidates", "a", "b", "--k", "1000"]) == 1
    assert "k = 1000 but the pool holds" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["score", "--model", "tiny-llama", "--prompt", "hi", "--candidates", "a", "--k", "0"])
    assert exit_info.value.code == 2 and "--k must be >= 1, got 0" in capsys.readouterr().err
