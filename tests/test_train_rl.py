"""`fastpref train grpo | rloo | raft` end to end on the tiny offline model: rollouts, rewards (functions and a
reward model), TRL's metric names, the held-out reward evaluation, checkpoints that load with from_pretrained,
exact resume, seeded sampling with the KV cache, no tokens x vocab tensor, and TRL's options it does not support
refused by name."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402
from test_train import (  # noqa: E402
    REPO,
    _weights,
    model_dir,
    pair_rows,
    pairs_file,  # noqa: F401 (a fixture)
    run,
    tiny_config,
    tokenizer_dir,
    write_jsonl,
)

from fastpref.train import loop  # noqa: E402
from fastpref.train.config import parse_config  # noqa: E402
from fastpref.train.metrics import read_jsonl  # noqa: E402
from fastpref.train.rewards import RewardModel  # noqa: E402

RL = dict(reward_funcs=["rl_rewards:glad"], num_generations=4, per_device_train_batch_size=8,
          max_completion_length=6, temperature=0.9, learning_rate=1e-3, eval_steps=2, per_device_eval_batch_size=8,
          max_prompt_length=32)
TRL_GRPO_NAMES = {"reward", "reward_std", "rewards/glad/mean", "frac_reward_zero_std", "entropy", "kl",
                  "completions/mean_length", "completions/min_length", "completions/max_length",
                  "completions/clipped_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean",
                  "clip_ratio/region_mean", "num_tokens", "loss", "grad_norm", "learning_rate"}


@pytest.fixture
def prompts_file(tmp_path):
    rows = [{"id": r["id"], "prompt": r["prompt"]} for r in pair_rows(12, 1)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def test_grpo_end_to_end(tmp_path, prompts_file):
    summary, out = run("grpo", tmp_path, prompts_file, max_steps=4, save_steps=4, beta=0.04,
                       **{**RL, "reward_funcs": ["rl_rewards:glad", "rl_rewards:prompt_length"],
                          "reward_weights": [1.0, 0.5]})
    rows = read_jsonl(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert TRL_GRPO_NAMES | {"rewards/prompt_length/mean"} <= set(train_rows[0]), set(train_rows[0])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows)
    assert train_rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference
    evals = [r for r in rows if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and "eval_kl" in evals[-1]
    assert summary["reference"] == {"kind": "live"} and "eval_reward" in summary
    assert summary["eval_reward_start"] == evals[0]["eval_reward"]
    assert summary["eval_reward_end"] == evals[-1]["eval_reward"] and summary["eval_reward_step_noise"] >= 0
    final = _weights(out)
    checkpoint = _weights(out / "checkpoint-4")
    for name, value in final.items():
        torch.testing.assert_close(checkpoint[name], value, rtol=0, atol=0)
    start = _weights(model_dir())
    assert any(not torch.equal(value, start[name]) for name, value in final.items())


@pytest.mark.parametrize("loss_type,num_iterations", [("grpo", 1), ("dapo", 2)])
def test_grpo_resume_is_exact(tmp_path, prompts_file, monkeypatch, loss_type, num_iterations):
    """4 steps straight == 2 steps, a crash after checkpoint-2, --resume, 2 more: identical weights (the second
    generation batch is sampled with the same seed from the same weights; with num_iterations 2 the checkpoint
    falls between generation batches, and the old policy's log-probs are recomputed as they were)."""
    options = dict(max_steps=4, loss_type=loss_type, num_iterations=num_iterations, beta=0.02,
                   **{**RL, "eval_steps": None})
    run("grpo", tmp_path, prompts_file, output_dir=str(tmp_path / "straight"), **options)

    class Crash(Exception):
        pass

    original = loop.Trainer._save

    def save_then_crash(self):
        original(self)
        if self.global_step == 2:
            raise Crash

    monkeypatch.setattr(loop.Trainer, "_save", save_then_crash)
    with pytest.raises(Crash):
        run("grpo", tmp_path, prompts_file, output_dir=str(tmp_path / "resumed"), save_steps=2, **options)
    monkeypatch.setattr(loop.Trainer, "_save", original)
    run("grpo", tmp_path, prompts_file, output_dir=str(tmp_path / "resumed"), save_steps=2,
        resume_from_checkpoint="last", **options)
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)
    rewards = [r["reward"] for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "reward" in r]
    assert rewards == [r["reward"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if "reward" in r]


@pytest.mark.parametrize("argv,message", [
    (["--use_vllm", "true"], "--use_vllm"),
    (["--vllm_mode", "server"], "--vllm_mode"),
    (["--steps_per_generation", "4"], "--steps_per_generation"),
    (["--num_generations", "3"], "multiple of --num_generations"),
    (["--loss_type", "ppo"], "--loss_type"),
    (["--importance_sampling_level", "batch"], "--importance_sampling_level"),
    (["--scale_rewards", "max"], "--scale_rewards"),
    (["--reward_funcs", "nocolon"], "module:function"),
    (["--reward_model", "x", "--reward_funcs", "a:b", "--reward_weights", "1"], "--reward_weights"),
    (["--num_iterations", "2", "--save_steps", "3"], "--save_steps"),
    (["--top_p", "0"], "--top_p"),
    (["--use_peft", "--sft_warmup_steps", "3"], "--sft_warmup_steps"),
    (["--use_peft", "--beta", "0.1"], "--use_peft"),
])
def test_grpo_refusals_name_the_option(argv, message):
    with pytest.raises(ValueError, match=message.replace("-", r"\-")):
        parse_config("grpo", ["--reward_funcs", "m:f", "--per_device_train_batch_size", "8", *argv])


@pytest.mark.parametrize("task", ["grpo", "rloo", "raft"])
def test_smollm2_preset_samples_whole_groups(task):
    """`--model smollm2-135m` for the RL tasks: its preset's batch holds whole groups (the common preset's batch
    of 4 against GRPO's 8 completions per prompt was refused) and completions short enough for a CPU."""
    config = parse_config(task, ["--model", "smollm2-135m", "--reward_funcs", "m:f"])
    assert (config.per_device_train_batch_size * config.gradient_accumulation_steps) % config.num_generations == 0
    assert config.max_completion_length <= 64 and config.max_steps > 0 and config.sft_warmup_steps == 0


def test_trl_grpo_defaults():
    """The defaults are GRPOConfig's (those of fastpref's own choosing aside: the preset fills the demo's)."""
    trl = pytest.importorskip("trl")
    from fastpref.train.rl_config import GRPOConfig

    ours = GRPOConfig()
    theirs = trl.GRPOConfig(output_dir="unused", use_cpu=True)
    for name in ("num_generations", "max_completion_length", "temperature", "top_p", "top_k", "beta", "loss_type",
                 "num_iterations", "epsilon", "epsilon_high", "delta", "importance_sampling_level", "scale_rewards",
                 "mask_truncated_completions", "top_entropy_quantile", "entropy_coef", "use_bias_correction_kl",
                 "sapo_temperature_neg", "sapo_temperature_pos", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                 "vespo_lambda_neg", "learning_rate", "reward_weights"):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_reward_model_scores_batched_as_one_by_one(tmp_path):
    """A one-label sequence classifier scores prompt + completion rendered as it was trained (chat template for
    conversations), the same in batches as alone, and equal to its own forward."""
    torch.manual_seed(1)
    config = tiny_config("llama", num_labels=1)
    model = transformers.LlamaForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "rm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir())
    tokenizer.save_pretrained(tmp_path / "rm")
    prompts = ["what colour is the sky number 1 ?", [{"role": "user", "content": "hello there"}],
               "what colour is the sea number 2 ?"]
    completions = ["the sky is blue , i am glad to help .", "hi", "no ."]
    batched = RewardModel(str(tmp_path / "rm"), torch.device("cpu"), batch_size=8)(prompts, completions)
    alone = torch.cat([RewardModel(str(tmp_path / "rm"), torch.device("cpu"), 1)([p], [c])
                       for p, c in zip(prompts, completions)])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
    ids = tokenizer(prompts[0], add_special_tokens=True).input_ids + \
        tokenizer(completions[0], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0, 0]
    torch.testing.assert_close(batched[0], expected, rtol=1e-5, atol=1e-6)
    assert not torch.is_grad_enabled() or batched.grad_fn is None


def test_reward_model_must_have_one_label(tmp_path):
    transformers.LlamaForSequenceClassification(tiny_config("llama", num_labels=2)).save_pretrained(tmp_path / "rm")
    with pytest.raises(ValueError, match="labels"):
        RewardModel(str(tmp_path / "rm"), torch.device("cpu"), 4)
    with pytest.raises(ValueError, match="sequence-classification"):
        RewardModel(model_dir(), torch.device("cpu"), 4)


def test_grpo_without_a_reward_says_how_to_make_one(tmp_path, prompts_file):
    env_cwd = tmp_path  # no runs/reward here
    done = subprocess.run(
        [sys.executable, "-m", "fastpref.cli", "train", "grpo", "--model", model_dir(), "--dataset",
         str(prompts_file), "--output_dir", str(tmp_path / "out"), "--max_steps", "1"],
        cwd=env_cwd, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 1, done.stderr
    assert "fastpref train reward" in done.stderr and "--reward_funcs" in done.stderr
    refused = subprocess.run([sys.executable, "-m", "fastpref.cli", "train", "grpo", "--use_vllm", "true"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--use_vllm True is not supported" in refused.stderr, refused.stderr


def test_rloo_end_to_end(tmp_path, prompts_file):
    """`fastpref train rloo` shares the loop: leave-one-out advantages, the KL taken off the reward (logged as
    `kl`), the sequence-level clip ratios."""
    summary, out = run("rloo", tmp_path, prompts_file, max_steps=2, **{**RL, "eval_steps": None})
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert {"reward", "reward_std", "rewards/glad/mean", "entropy", "kl", "clip_ratio/low_mean",
            "completions/mean_length", "num_tokens"} <= set(rows[0]), set(rows[0])
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first batch: policy == reference
    assert summary["reference"] == {"kind": "live"}  # RLOO's beta defaults to 0.05
    with pytest.raises(ValueError, match="loss_type"):  # GRPO's options are not RLOO's
        parse_config("rloo", ["--reward_funcs", "m:f", "--loss_type", "dapo"])


def test_each_rank_samples_its_own_prompts_with_its_own_seed():
    from fastpref.train.rl import RolloutSampler, sampling_seed

    sampler = RolloutSampler(20, per_rank=3, world=2, num_iterations=2, seed=0)
    assert sampler.steps_per_epoch == 3 * 2  # 3 generation batches of 6 prompts, each trained on twice
    for generation in range(4):
        mine, theirs = sampler.prompts(generation, 0), sampler.prompts(generation, 1)
        assert len(mine) == len(theirs) == 3 and not set(mine) & set(theirs)
    assert sampler.prompts(3, 0) != sampler.prompts(0, 0)  # a new epoch, a new order
    seeds = {sampling_seed(0, g, r) for g in range(4) for r in range(2)}
    assert len(seeds) == 8


def test_the_embedded_pipeline_chains_the_default_outputs(tmp_path, monkeypatch):
    """With no arguments, grpo starts from `fastpref train sft`'s default output and scores with `fastpref train
    reward`'s when they exist; without runs/sft the tiny preset warms up itself."""
    from fastpref.train.rl import reward_model_path, starting_policy

    monkeypatch.chdir(tmp_path)
    config = parse_config("grpo", [])
    assert config.model_name_or_path == "tiny-llama" and config.sft_warmup_steps > 0 and config.beta > 0
    assert starting_policy(config) is config
    with pytest.raises(FileNotFoundError, match="fastpref train reward"):
        reward_model_path(config)
    for folder in ("runs/sft", "runs/reward"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "config.json").write_text("{}")
    started = starting_policy(config)
    assert started.model_name_or_path == "runs/sft" and started.sft_warmup_steps == 0
    assert reward_model_path(config) == "runs/reward"
    assert reward_model_path(parse_config("grpo", ["--reward_funcs", "m:f"])) is None  # functions alone


@pytest.mark.parametrize("task", ["grpo", "rloo"])
def test_unsupported_trl_options_are_accepted_only_at_trls_defaults(task):
    """Every TRL name fastpref train grpo / rloo does not implement is listed with its TRL 1.16 default (read from
    the installed config): at that value it is accepted, at any other refused by name."""
    trl = pytest.importorskip("trl")
    import dataclasses

    from fastpref.train.trl_names import TASK_DEFAULTS

    config_cls = {"grpo": trl.GRPOConfig, "rloo": trl.RLOOConfig}[task]
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    for name, value in TASK_DEFAULTS[task].items():
        assert name in defaults and defaults[name] == value, name
    parse_config(task, ["--reward_funcs", "m:f", "--use_vllm", "false", "--repetition_penalty", "1.0"])
    with pytest.raises(ValueError, match="--repetition_penalty"):
        parse_config(task, ["--reward_funcs", "m:f", "--repetition_penalty", "1.2"])


def test_raft_trains_on_each_prompts_best_completion(tmp_path, prompts_file, monkeypatch):
    """`fastpref train raft`: per generation batch, the best completion of each group by reward is kept and an SFT
    step (token-mean NLL) is taken on the kept ones."""
    from fastpref.train import rl

    kept = []
    original = rl.RLStage._keep_best

    def spy(self, rollouts, rewards):
        out, values = original(self, rollouts, rewards)
        kept.append((rewards.view(-1, self.config.num_generations), out["texts"], rollouts["texts"]))
        return out, values

    monkeypatch.setattr(rl.RLStage, "_keep_best", spy)
    summary, out = run("raft", tmp_path, prompts_file, max_steps=2, gradient_accumulation_steps=2,
                       **{**RL, "eval_steps": None})
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert {"reward", "raft/kept_reward", "entropy", "completions/mean_length"} <= set(rows[0]), set(rows[0])
    assert summary["reference"] == {"kind": "none"}
    for rewards, texts, all_texts in kept:
        assert len(texts) == rewards.shape[0] == 4  # 8 x 2 completions / 4 per prompt
        for group, (row, text) in enumerate(zip(rewards, texts)):
            best = int(torch.nan_to_num(row, nan=-1e9).argmax())
            assert text == all_texts[group * 4 + best]
    assert rows[0]["raft/kept_reward"] >= rows[0]["reward"]


def test_generation_uses_the_kv_cache_and_the_last_positions_logits(tmp_path, prompts_file):
    """Sampling runs the model's generate with its KV cache: after the prompt, one new position per forward, and
    the LM head only ever sees the last position (never (positions x vocab) logits for the whole sequence)."""
    from fastpref.train.config import make_config

    config = make_config("grpo", model_name_or_path=model_dir(), dataset_name=str(prompts_file),
                         output_dir=str(tmp_path / "out"), torch_threads=1, **{**RL, "max_completion_length": 5})
    trainer = loop.Trainer(config)
    try:
        seen, fed = [], []
        head, embed = trainer.model.get_output_embeddings(), trainer.model.get_input_embeddings()
        hooks = [head.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape))),
                 embed.register_forward_hook(lambda module, args, out: fed.append(tuple(args[0].shape)))]
        rollouts = trainer.rl.sample(trainer.splits.train[:2], 4, seed=3)
        for hook in hooks:
            hook.remove()
        assert seen and all(shape[1] == 1 for shape in seen), seen  # (completions, 1, hidden) each call
        assert fed[0][1] > 1 and all(shape[1] == 1 for shape in fed[1:]), fed  # the prompt once, then 1 token
        assert len(seen) <= 5  # one forward per new token
        again = trainer.rl.sample(trainer.splits.train[:2], 4, seed=3)
        assert torch.equal(again["completion_ids"], rollouts["completion_ids"])  # seeded
        other = trainer.rl.sample(trainer.splits.train[:2], 4, seed=4)
        assert not torch.equal(other["completion_ids"], rollouts["completion_ids"])
    finally:
        trainer.run.release()


def test_no_tokens_by_vocab_tensor_for_policy_old_policy_or_reference(tmp_path, prompts_file, monkeypatch):
    """An allocation log (tests/test_memory.py's) over the RL step's log-prob passes: the old policy's and the
    reference's (no grad) and the policy's loss forward + backward (with entropy) never allocate a tensor of
    (completion tokens x vocab) elements; the gradients of the (V, H) embedding are the largest."""
    from test_memory import AllocationLog

    from fastpref.backends import torch_chunked
    from fastpref.train.config import make_config

    for name in ("TILE_BYTES", "LINEAR_TILE_BYTES"):  # tiles of 64k fp32 elements: fewer than N x V here
        monkeypatch.setattr(torch_chunked, name, 1 << 18)
    vocab, completions, length = 8192, 8, 16
    torch.manual_seed(0)
    folder = tmp_path / "wide"
    transformers.AutoModelForCausalLM.from_config(tiny_config("llama", vocab=vocab)).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(folder)
    config = make_config("grpo", model_name_or_path=str(folder), dataset_name=str(prompts_file),
                         output_dir=str(tmp_path / "out"), torch_threads=1, beta=0.04, num_iterations=2,
                         **{**RL, "max_completion_length": length, "per_device_train_batch_size": completions})
    trainer = loop.Trainer(config)
    try:
        trainer.tokenizer.batch_decode = lambda seqs, **_: [" ".join(map(str, s.tolist())) for s in seqs]
        rollouts, values = trainer.rl.generate(0)
        trainer.rl.cache = (0, rollouts, values)
        n_by_v = int(rollouts["completion_mask"].sum()) * vocab
        assert n_by_v >= completions * (length - 2) * vocab  # the completions ran (nearly) to their length
        with AllocationLog() as log:
            trainer.rl._logps(trainer.rl.ref_model, rollouts)
            trainer.rl._logps(trainer.rl.policy, rollouts)
            trainer.rl.step()
        assert "aten.matmul.default" in log.ops() or "aten.mm.default" in log.ops()
        assert log.largest() <= vocab * 32  # the (V, H) gradients and weights; never N x V
        assert log.largest() < n_by_v // 3
    finally:
        trainer.run.release()


def test_grpo_sft_warmup_on_preference_data(tmp_path, pairs_file):
    """On preference rows the prompts are sampled once each, and --sft_warmup_steps first fine-tunes the policy on
    the chosen responses (the start of the RL stage and its reference)."""
    summary, out = run("grpo", tmp_path, pairs_file, max_steps=1, sft_warmup_steps=2, beta=0.04,
                       **{**RL, "eval_steps": None})
    assert (out / "sft-warmup" / "warmup.json").exists()
    assert summary["model"] == str(out / "sft-warmup") and summary["reference"] == {"kind": "live"}
    train_config = json.loads((out / "train_config.json").read_text())
    assert train_config["sft_warmup_steps"] == 0
