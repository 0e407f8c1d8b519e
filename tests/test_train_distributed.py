"""`fastpref train` as torchrun jobs of 2 gloo processes on CPU (tests/train_worker.py): sharded checkpoints (files
per process, none holding the whole model, nothing pickled), exact resume under DDP and FSDP2, resuming on another
number of processes, the reference pass split over processes, the final export, FSDP2 bf16 mixed precision with
activation checkpointing, and the host memory of saving and resuming a model of a few hundred MB."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from test_train import model_dir, pair_rows, run, tokenizer_dir, write_jsonl  # noqa: E402

from fastpref.train.metrics import read_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "train_worker.py"
MB = 1024**2
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1}


def _cli(options: dict) -> list[str]:
    args = []
    for name, value in options.items():
        values = value if isinstance(value, list) else [value]
        args += [f"--{name}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return args


def torchrun(args: list[str], log_file: Path, timeout: float = 300) -> tuple[int, str]:
    """Two gloo processes running `args` (a script or `-m module` and its arguments) -> (exit code, output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    with open(log_file, "w") as log:  # a file, not a pipe: torchrun's helpers can hold a pipe open past the job
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    return done.returncode, log_file.read_text()


def launch(out: Path, options: dict) -> Path:
    """A 2-process `fastpref train dpo` job (with the worker's probes); returns its output_dir."""
    out.mkdir(parents=True, exist_ok=True)
    code, text = torchrun([str(WORKER), "dpo", *_cli({**options, "output_dir": out, "torch_threads": 1})],
                          out.parent / f"{out.name}.log")
    assert code == 0, text[-5000:]
    return out


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r}


def probes(out: Path) -> list[dict]:
    return [json.loads((out / f"probes_rank{rank}.json").read_text()) for rank in range(2)]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()


def resume_copy(checkpoint: Path, out: Path) -> None:
    """out/<checkpoint name>, as a run that crashed right after writing it leaves it."""
    shutil.copytree(checkpoint, out / checkpoint.name)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", pair_rows())


BASE = dict(logging_steps=1, learning_rate=1e-3, max_length=64, disable_tqdm=True, plot=False,
            per_device_eval_batch_size=8)


def test_an_error_on_rank_0_stops_every_rank(tmp_path, pairs):
    """Only rank 0 loads the model: its error (here a missing model folder) reaches the other rank at once, as the
    same clear error, instead of leaving it waiting for the process group's 30-minute timeout."""
    code, text = torchrun(["-m", "fastpref.cli", "train", "dpo", "--model", str(tmp_path / "missing"), "--dataset",
                           str(pairs), "--output_dir", str(tmp_path / "out")], tmp_path / "job.log", timeout=120)
    assert code != 0
    assert text.count("fastpref train dpo: error: model") == 2, text[-3000:]  # both ranks: the CLI's clear error
    assert "(on rank 0)" in text, text[-3000:]


# --- exact resume, sharded files, the split reference pass, the export ---


@pytest.fixture(scope="module")
def one_process_reference(tmp_path_factory, pairs) -> Path:
    """The reference log-probs of the dropout model computed by one process: the cache file."""
    tmp = tmp_path_factory.mktemp("one-reference")
    run("dpo", tmp, pairs, **BASE, model_name_or_path=model_dir("llama", dropout=0.2), max_steps=1,
        precompute_ref_log_probs=True, ref_cache_dir=str(tmp / "cache"))
    (cached,) = (tmp / "cache").glob("*.pt")
    return cached


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resume_is_exact_on_two_processes(tmp_path, pairs, one_process_reference, mode):
    """6 steps straight == 3 steps + checkpoint-3 + --resume + 3 steps, bit for bit, on 2 processes (dropout on,
    so each process's RNG streams matter; 2-step accumulation; cosine warm-up). The same jobs check the
    checkpoint's files, the reference pass split over the processes and the final export."""
    options = dict(BASE, model_name_or_path=model_dir("llama", dropout=0.2), dataset_name=pairs, disable_dropout=False,
                   max_steps=6, save_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                   warmup_steps=2, lr_scheduler_type="cosine", precompute_ref_log_probs=True,
                   ref_cache_dir=tmp_path / "cache", fsdp=mode == "fsdp")
    straight = launch(tmp_path / "straight", options)
    resume_copy(straight / "checkpoint-3", tmp_path / "resumed")
    resumed = launch(tmp_path / "resumed", {**options, "resume_from_checkpoint": "last"})
    final, again = weights(straight), weights(resumed)
    for name, value in final.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=0, msg=name)
    assert sorted(losses(resumed)) == [4, 5, 6]

    # the reference pass split over 2 processes (each its share, gathered) == one process's, under the same key
    (cached,) = (tmp_path / "cache").glob("*.pt")
    assert cached.name == one_process_reference.name
    split, whole = (torch.load(p, weights_only=True)["logps"] for p in (cached, one_process_reference))
    for name in ("train", "eval"):
        assert split[name].shape[0] > 0
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-5)

    # every file of a checkpoint: safetensors or JSON (or the tokenizer's text files, the model card), no pickles
    files = [p for p in (straight / "checkpoint-3").rglob("*") if p.is_file()]
    assert all(p.suffix in (".safetensors", ".json", ".jinja", ".txt", ".model", ".md") for p in files), files
    model_files = sorted((straight / "checkpoint-3").glob("model-*.safetensors"))
    optimizer_files = sorted((straight / "checkpoint-3" / "optimizer").glob("shard-*.safetensors"))
    assert len(model_files) == 2  # one per process at least
    assert {p.name.split("-model")[0] for p in optimizer_files} == {"shard-00001", "shard-00002"}  # each rank's own
    model_bytes = sum(v.numel() * v.element_size() for v in final.values())
    for path in model_files:
        assert _tensor_bytes(path) < 0.75 * model_bytes, path  # no file holds the whole model
    optimizer_bytes = sum(_tensor_bytes(p) for p in optimizer_files)
    assert optimizer_bytes >= 2 * model_bytes  # AdamW's two moments, each written once
    if mode == "fsdp":  # sharded: each process's files hold about half of the moments
        for rank in ("shard-00001", "shard-00002"):
            mine = sum(_tensor_bytes(p) for p in optimizer_files if p.name.startswith(rank))
            assert mine < 0.75 * optimizer_bytes, rank

    # the final export: from_pretrained, the weights of the last checkpoint, its files linked, not written again
    checkpoint_6 = weights(straight / "checkpoint-6")
    for name, value in final.items():
        torch.testing.assert_close(checkpoint_6[name], value, rtol=0, atol=0, msg=name)
    assert (straight / "model-00001-of-00002.safetensors").samefile(
        straight / "checkpoint-6" / "model-00001-of-00002.safetensors")


def _tensor_bytes(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) * _DTYPE_BYTES[f.get_slice(k).get_dtype()] for k in f.keys())


# --- another number of processes ---


def test_resume_on_another_number_of_processes(tmp_path, pairs):
    """One process to checkpoint-3, resumed on 2 FSDP2 processes to step 8 (writing checkpoint-6), resumed on one
    process again: every step after a resume has the loss of the run that went on (same global batch of 8)."""
    options = dict(BASE, model_name_or_path=model_dir(), dataset_name=str(pairs), max_steps=8, save_steps=3,
                   gradient_accumulation_steps=2, eval_fraction=0.0)
    run("dpo", tmp_path, pairs, **options, per_device_train_batch_size=4, output_dir=str(tmp_path / "one"))
    one = losses(tmp_path / "one")
    resume_copy(tmp_path / "one" / "checkpoint-3", tmp_path / "two")
    two_dir = launch(tmp_path / "two", {**options, "per_device_train_batch_size": 2, "fsdp": True,
                                        "resume_from_checkpoint": "last"})
    two = losses(two_dir)
    assert sorted(two) == [4, 5, 6, 7, 8]
    for step in two:  # 1 -> 2
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-6), (step, one, two)
    assert json.loads((two_dir / "checkpoint-6" / "trainer_state.json").read_text())["world_size"] == 2
    resume_copy(two_dir / "checkpoint-6", tmp_path / "back")
    run("dpo", tmp_path, pairs, **options, per_device_train_batch_size=4, output_dir=str(tmp_path / "back"),
        resume_from_checkpoint="last")
    back = losses(tmp_path / "back")
    assert sorted(back) == [7, 8]
    for step in back:  # 2 -> 1
        assert back[step] == pytest.approx(two[step], rel=1e-4, abs=1e-6), (step, two, back)


# --- mixed precision ---


def test_fsdp_bf16_mixed_precision_with_activation_checkpointing(tmp_path, pairs):
    """--fsdp --bf16: decoder weights are bf16 in the forward (FSDP2 all-gathers them in bf16), the reference
    log-probs reach the loss in fp32, the live reference (sharded too) holds only its shard between forwards, the
    master weights stay fp32, and with gradient checkpointing the two steps follow the fp32 run within bf16
    rounding (so the first step's gradients were right)."""
    options = dict(BASE, model_name_or_path=model_dir(), dataset_name=str(pairs), max_steps=2, learning_rate=1e-2,
                   per_device_train_batch_size=2, eval_fraction=0.0)
    run("dpo", tmp_path, pairs, **{**options, "per_device_train_batch_size": 4}, output_dir=str(tmp_path / "fp32"))
    out = launch(tmp_path / "bf16", {**options, "fsdp": True, "bf16": True, "gradient_checkpointing": True})
    for probe in probes(out):  # the sharded reference gives its gathered weights back after each forward
        assert probe["forward"] == {"weight": "torch.bfloat16", "ref_chosen": "torch.float32",
                                    "reference_head_after_forward": "DTensor"}, probe
    fp32, bf16 = losses(tmp_path / "fp32"), losses(out)
    assert abs(fp32[2] - fp32[1]) > 0.05  # the second step moved: it tells right gradients from wrong ones
    assert bf16[1] == pytest.approx(fp32[1], abs=1e-6)  # policy == reference: log 2 whatever the precision
    assert bf16[2] == pytest.approx(fp32[2], rel=2e-2), (fp32, bf16)
    assert bf16[2] != fp32[2]  # bf16 is in effect
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference, sharded alike
    with safe_open(str(out / "model-00001-of-00002.safetensors"), framework="pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())


# --- host memory of saving and resuming ---


def test_host_memory_of_saving_and_resuming_stays_near_one_shard(tmp_path):
    """A ~300 MB model (fp32; AdamW moments 600 MB) on 2 FSDP2 processes, each holding a ~440 MB shard of weights
    + moments: while a checkpoint is saved, and while it is loaded (which makes the moments), each process's RSS
    high-water mark rises by less than 1.25 shards. Holding the whole state on one process (the former rank-0
    gather, every rank reading whole files) takes two shards more; no checkpoint file holds the whole model. At
    start-up only rank 0 holds the whole model."""
    rows = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4, 1))
    folder = tmp_path / "model"
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir())
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256,
                                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    shutil.copytree(tokenizer_dir(), folder, dirs_exist_ok=True)
    model_mb = sum(p.numel() * 4 for p in model.parameters()) / MB
    del model
    options = dict(BASE, model_name_or_path=folder, dataset_name=rows, loss="simpo", max_steps=1, save_steps=1,
                   per_device_train_batch_size=2, eval_fraction=0.0, fsdp=True, max_length=32)
    out = launch(tmp_path / "run", options)
    saving = probes(out)
    files = sorted((out / "checkpoint-1").rglob("*.safetensors"))
    launch(out, {**options, "max_steps": 2, "save_steps": 100, "resume_from_checkpoint": "last"})
    shard_mb = 3 * model_mb / 2  # weights + two AdamW moments, half of each per process
    sizes = {str(p.relative_to(out / "checkpoint-1")): round(_tensor_bytes(p) / MB, 1) for p in files}
    report = {"model_mb": round(model_mb, 1), "shard_mb": round(shard_mb, 1), "files_mb": sizes}
    for rank, (save_probe, load_probe) in enumerate(zip(saving, probes(out))):
        (save,), (load,) = save_probe["save"], load_probe["load"]
        report[f"rank{rank}"] = {"save_rise_mb": save["peak_rise_mb"], "load_rise_mb": load["peak_rise_mb"],
                                 "startup": save_probe["startup"]}
    print(json.dumps(report))
    for rank in range(2):
        assert report[f"rank{rank}"]["save_rise_mb"] < 1.25 * shard_mb, report
        assert report[f"rank{rank}"]["load_rise_mb"] < 1.25 * shard_mb, report
    assert max(sizes.values()) < model_mb  # no file holds the whole model
    # start-up: only rank 0 ever holds the whole model (it loads it); rank 1 receives its shard
    startup = [report[f"rank{rank}"]["startup"]["peak_mb"] for rank in range(2)]
    assert startup[0] - startup[1] > 0.75 * model_mb, report


def _grpo(out: Path, prompts: Path, **options) -> Path:
    """A 2-process `fastpref train grpo` job (gloo; with the worker's probes); each rank samples its own prompts."""
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(model_name_or_path=model_dir(), dataset_name=prompts, reward_funcs="rl_rewards:glad",
                    num_generations=4, per_device_train_batch_size=8, max_completion_length=6, learning_rate=1e-3,
                    logging_steps=1, disable_tqdm=True, plot=False, torch_threads=1, output_dir=out, **options)
    code, text = torchrun([str(WORKER), "grpo", *_cli(settings)], out.parent / f"{out.name}.log")
    assert code == 0, text[-5000:]
    return out


def test_grpo_two_processes_ddp_and_fsdp_resume_exactly(tmp_path):
    """2 gloo processes, each sampling its own prompts with its own seed, a live reference (beta > 0), the old
    policy's log-probs (num_iterations 2), the entropy quantile over both ranks, held-out evaluations with the KL
    (3 held-out prompts, one per pass: rank 1 samples a filler pass to match rank 0's two). DDP and FSDP2 each: 4 steps
    straight == 2 steps, a restart from checkpoint-2, 2 more (identical weights); FSDP2 follows DDP (same metrics,
    same weights within rounding); under FSDP2 each sampling call gathers every layer once (not once per new
    token) and reshards it after; each rank's checkpoint holds its half of the optimizer state."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in pair_rows(12, 1)])
    options = dict(max_steps=4, save_steps=2, beta=0.04, num_iterations=2, top_entropy_quantile=0.5, eval_steps=2,
                   per_device_eval_batch_size=2)  # one held-out prompt per pass: 2 passes on rank 0, 1 on rank 1
    runs = {}
    for mode in ("ddp", "fsdp"):
        straight = _grpo(tmp_path / f"{mode}-straight", prompts, fsdp=mode == "fsdp", **options)
        resume_copy(straight / "checkpoint-2", tmp_path / f"{mode}-resumed")
        resumed = _grpo(tmp_path / f"{mode}-resumed", prompts, fsdp=mode == "fsdp", resume_from_checkpoint="last",
                        **options)
        a, b = weights(straight), weights(resumed)
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=f"{mode} {name}")
        runs[mode] = (straight, a)
    rows = {mode: read_jsonl(out / "metrics.jsonl") for mode, (out, _) in runs.items()}
    train = {mode: [r for r in rows[mode] if "reward" in r or "loss" in r] for mode in rows}
    assert [r["step"] for r in train["fsdp"]] == [1, 2, 3, 4] and train["fsdp"][0]["num_tokens"] > 0
    evals = {mode: [r for r in rows[mode] if "eval_reward" in r] for mode in rows}
    assert [r["step"] for r in evals["fsdp"]] == [0, 2, 4] and "eval_kl" in evals["fsdp"][-1]
    for ddp, fsdp in zip(train["ddp"] + evals["ddp"], train["fsdp"] + evals["fsdp"], strict=True):
        assert set(fsdp) == set(ddp)
        for name, value in ddp.items():
            if name not in ("elapsed_s", "tokens_per_second", "peak_memory_mb"):  # the clock's and the memory's
                assert fsdp[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, ddp, fsdp)
    assert train["fsdp"][1]["kl"] > 0 and train["fsdp"][0]["loss"] != train["fsdp"][2]["loss"]
    (_, ddp_weights), (_, fsdp_weights) = runs["ddp"], runs["fsdp"]
    for name, value in ddp_weights.items():
        torch.testing.assert_close(fsdp_weights[name], value, rtol=1e-5, atol=1e-6, msg=name)

    fsdp_straight = runs["fsdp"][0]
    for probe in probes(fsdp_straight):
        units = 3  # tiny_config's 2 decoder layers and the root's own weights (gathered once, kept until backward)
        assert probe["sample"] and all(call["all_gathers"] <= units for call in probe["sample"]), probe["sample"]
        assert min(call["forwards"] for call in probe["sample"]) > units
        assert {call["layer_weight_after"] for call in probe["sample"]} == {"DTensor"}
        assert probe["forward"]["reference_head_after_forward"] == "DTensor"  # the reference resharded too
    optimizer_files = sorted((fsdp_straight / "checkpoint-2" / "optimizer").glob("shard-*.safetensors"))
    total = sum(_tensor_bytes(p) for p in optimizer_files)
    for rank in ("shard-00001", "shard-00002"):
        assert sum(_tensor_bytes(p) for p in optimizer_files if p.name.startswith(rank)) < 0.75 * total, rank
