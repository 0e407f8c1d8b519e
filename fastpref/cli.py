"""`fastpref train sft|dpo|reward [options]`, the training loop; `fastpref bench [options]`, the
benchmarks against the textbook head and the peers (`fastpref bench --help`); `fastpref score
[options]`, in-context preference scoring (ICDPO) of candidate responses (`fastpref score --help`).

    fastpref train dpo                      # the embedded demo: tiny Llama, GPT-2 tokenizer, HHH pairs
    fastpref train dpo --model ./my-llama --dataset pairs.jsonl --loss_type sigmoid --beta 0.1
    fastpref train dpo --config run.yaml --learning_rate 5e-7     # YAML options, command line wins
    torchrun --nproc_per_node 2 -m fastpref.cli train dpo ...     # DDP (add --fsdp for FSDP2 on GPUs)

    fastpref score --model smollm2-135m --prompt "..." --candidates "..." "..." --k 2

`fastpref train <task> --help` lists every option (names follow TRL's configs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fastpref.parsers import ArgumentParser

TASKS = {
    "sft": "supervised fine-tuning on completions (prompt masked)",
    "dpo": "preference optimisation: DPO family (--loss_type), SimPO / CPO / ORPO, RRHF / PRO (--loss)",
    "reward": "Bradley-Terry reward model (scalar head, fastpref.bt_loss); `rm` is an alias",
    "grpo": "RL against a reward model / reward functions: GRPO and its loss types (--loss_type dapo, grpo, ...)",
    "rloo": "RL with REINFORCE leave-one-out baselines (TRL's RLOOTrainer)",
    "raft": "reward-ranked fine-tuning: sample, keep each prompt's best completion by reward, SFT on it",
}


# TRL trainers `fastpref train` does not run, and what to use instead
UNSUPPORTED_TASKS = {"kto": "; for KTO use TRL's KTOTrainer with fastpref.integrations.trl.patch(trainer)"}


def version() -> str:
    """The installed distribution's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("fastpref")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _top_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="fastpref", description="fastpref: fused log-prob and preference-loss heads.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `fastpref train <task> --help` for a task's options.",
    )
    parser.add_argument("--version", action="version", version=f"fastpref {version()}")
    commands = parser.add_subparsers(dest="command", metavar="command", parser_class=ArgumentParser)
    train = commands.add_parser("train", help="train a model (sft, dpo, reward)", add_help=True)
    train.add_argument("task", choices=sorted(TASKS), help="; ".join(f"{k}: {v}" for k, v in TASKS.items()))
    commands.add_parser("bench", help="benchmarks vs the textbook head and TRL / Liger / CCE (`fastpref bench --help`)")
    commands.add_parser("score", help="rank candidate responses by in-context preference (ICDPO)")
    return parser


def _score_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="fastpref score", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Rank candidate responses to a prompt by ICDPO's s = log p(y | demos, x) - log p(y | x): k "
        "demonstrations (prompt, chosen) retrieved by BM25 from a preference file (fastpref.icdpo).",
    )
    parser.add_argument(
        "--model", required=True, help="a local transformers causal-LM directory or a preset: tiny-llama, smollm2-135m"
    )
    parser.add_argument("--prompt", required=True, help="the user prompt")
    parser.add_argument("--candidates", required=True, nargs="+", help="candidate responses")
    parser.add_argument(
        "--demonstrations", default="hhh", help="preference JSONL (prompt / chosen / rejected strings) or 'hhh'"
    )
    parser.add_argument("--k", type=int, default=2,
                        help="demonstrations in the expert context (1 to the pool's number of distinct prompts)")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument(
        "--max_length", type=int, default=None,
        help="drop the least similar demonstrations until context + the longest candidate fit (the output says so); "
        "None or more than the model's max_position_embeddings: the model's max_position_embeddings",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _score(argv: list[str]) -> int:
    parser = _score_parser()
    args = parser.parse_args(argv)
    for name in ("k", "batch_size", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    from fastpref import icdpo
    from fastpref.train.modeling import load_model_and_tokenizer

    try:
        pool = icdpo.DemonstrationPool(icdpo.read_pairs(args.demonstrations))
        demos = pool.retrieve(args.prompt, args.k)
        model, tokenizer = load_model_and_tokenizer(args.model, "dpo", seed=0)
        positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        limit = f"--max_length {args.max_length}"
        if positions and (args.max_length is None or args.max_length > positions):
            args.max_length = positions  # a longer context than the model has positions scores garbage
            limit = f"the model's max_position_embeddings {positions}"
        scores = icdpo.score(model, tokenizer, args.prompt, args.candidates, demos,
                             batch_size=args.batch_size, max_length=args.max_length)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"fastpref score: error: {e}", file=sys.stderr)
        return 1
    ranked = [
        {"candidate": args.candidates[i], "score": scores.score[i].item(), "expert_logp": scores.expert[i].item(),
         "amateur_logp": scores.amateur[i].item(), "tokens": int(scores.lengths[i])}
        for i in scores.ranking
    ]
    used = scores.demonstrations_used
    kept = demos[len(demos) - used:]  # the least similar ones go first
    if used < len(demos):
        print(f"fastpref score: note: {len(demos) - used} of the {len(demos)} demonstrations dropped so that the "
              f"longest candidate fits {limit}; k = {used}", file=sys.stderr)
    if args.json:
        result = {"prompt": args.prompt, "k": used, "demonstrations": [d.prompt for d in kept],
                  "demonstrations_dropped": len(demos) - used, "ranked": ranked}
        print(json.dumps(result, indent=1))
    else:
        print(f"{'score':>9} {'expert':>9} {'amateur':>9}  candidate (best first; k = {used} demonstrations)")
        for row in ranked:
            print(f"{row['score']:9.3f} {row['expert_logp']:9.3f} {row['amateur_logp']:9.3f}  {row['candidate']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] == "--version":
        parser.parse_args(argv[:1])  # prints the version and exits 0
    if argv[0] == "bench":
        from fastpref.bench.harness import main as bench_main

        return bench_main(argv[1:])
    if argv[0] == "score":
        return _score(argv[1:])
    if argv[0] != "train":
        parser.error(f"unknown command {argv[0]!r} (choose: train, bench, score)")
    if len(argv) >= 2 and argv[1] == "rm":  # fastpref's older name for `reward`
        argv[1] = "reward"
    if len(argv) < 2 or argv[1] not in TASKS:
        if len(argv) >= 2 and argv[1] in ("-h", "--help"):
            parser.parse_args(argv)  # prints `train`'s help and exits
        if len(argv) < 2 or argv[1].startswith("-"):
            parser.error(f"`fastpref train` needs a task: {', '.join(sorted(TASKS))}")
        hint = UNSUPPORTED_TASKS.get(argv[1], "")
        parser.error(f"unknown task {argv[1]!r} for `fastpref train`; choose one of {', '.join(sorted(TASKS))} "
                     f"(`rm` is an alias of reward){hint}")
    task, options = argv[1], argv[2:]
    try:
        from fastpref.requirements import check

        check("train", "fastpref train")
        from fastpref.train.config import describe_presets, parse_config
    except ImportError as e:
        print(f"fastpref train {task}: error: {e}", file=sys.stderr)
        return 1
    if "--list_presets" in options:
        print(describe_presets(task))
        return 0
    try:
        config = parse_config(task, options, prog=f"fastpref train {task}")
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"fastpref train {task}: error: {e}", file=sys.stderr)
        return 2
    from fastpref.train import distributed

    dist = distributed.init()
    code = _run(task, config, dist)
    if dist.enabled:
        # A finished multi-process job leaves without the interpreter's finalization: some gloo jobs aborted
        # there (SIGABRT, "terminate called without an active exception") after their work was done, saved and
        # the process group destroyed, and torchrun reported the job as failed. Every file is closed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(task: str, config, dist) -> int:
    """`fastpref train <task>` on this process: the exit status (0, 1 on a clear error, 130 when interrupted)."""
    from fastpref.train import distributed
    from fastpref.train.loop import TrainingInterrupted, TrainingStopped, train

    try:
        summary = train(config)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"fastpref train {task}: error: {e}", file=sys.stderr)
        return 1
    except TrainingStopped as e:
        print(f"fastpref train {task}: stopped: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:  # SIGINT / SIGTERM during training: checkpoint written on every rank
        if dist.main:
            print(f"fastpref train {task}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the first step, or a second Ctrl-C: no checkpoint of this moment
        if dist.main:
            print(f"fastpref train {task}: interrupted before a checkpoint could be written; "
                  f"earlier checkpoints, if any, are in {config.run_dir()}", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown(dist)
    if dist.main:
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    lines = [f"done: {summary.get('steps')} steps in {summary.get('train_seconds')} s"]
    for split, prefix in (("train (full pass, end)", "train_eval_"), ("held-out", "eval_")):
        n = summary.get(f"{prefix}samples")
        if not n:
            continue
        shown = []
        for key, label in (("loss", "loss"), ("rewards/accuracies", "reward accuracy"),
                           ("rewards/margins", "margin"), ("mean_token_accuracy", "token accuracy"),
                           ("reward", "mean reward"), ("kl", "kl")):
            value = summary.get(prefix + key)
            if value is not None:
                shown.append(f"{label} {value:.3f}")
        lines.append(f"  {split} ({n} examples): " + ", ".join(shown))
    if "eval_reward_start" in summary:  # the RL stage
        lines.append(f"  held-out mean reward {summary['eval_reward_start']:.3f} at step 0 -> "
                     f"{summary['eval_reward_end']:.3f} (step-to-step noise {summary['eval_reward_step_noise']:.3f})"
                     + (f", kl {summary['eval_kl']:.4f}" if summary.get("eval_kl") is not None else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
