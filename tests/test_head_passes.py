"""How many times a training step runs the LM head: a TorchDispatchMode (the allocation log's pattern,
re-entering fastpref's custom ops) adds up the flops of every GEMM with the vocabulary as one of its
dimensions, in units of one pass over the step's valid tokens (2·n·H·V). The metrics TRL logs come
from the loss's own pass: `fastpref train dpo` makes 3 passes (the fused single pass: logits, dh, dW;
a second no-grad forward for the metrics made it 4), sft and simpo 4 (the two-pass op: the backward
recomputes the logits), reward none (its head is the (1, H) score)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

import transformers  # noqa: E402

from fastpref.train import make_config, modeling  # noqa: E402

VOCAB, HIDDEN = 1031, 32  # the vocabulary is no other dimension of the model
aten = torch.ops.aten
GEMMS = {aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm, aten.matmul}  # matmul: inside a custom op


class HeadGemmLog(TorchDispatchMode):
    """Flops of the GEMMs whose dimensions include VOCAB (batched GEMVs such as row-wise dot products,
    with a dimension of 1, are not GEMMs of the head)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastpref":
            with self:  # a custom op is opaque to the mode: re-enter its CPU kernel with the log on
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        if func.overloadpacket in GEMMS:
            a, b = args[-2], args[-1]
            m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
            batch = a.shape[:-2].numel()
            if VOCAB in (m, k, n) and min(m, k, n) > 1:
                self.flops += 2 * batch * m * k * n
        return func(*args, **kwargs)


def _model(task):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=1, pad_token_id=0,
    )  # fmt: skip
    if task == "reward":
        return transformers.LlamaForSequenceClassification(config)
    return transformers.LlamaForCausalLM(config)


def _batch(n_seqs=4, length=13):
    torch.manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (n_seqs, length))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 10:] = 0  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # the prompt
    refs = -torch.rand(n_seqs // 2) * 30
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
        "ref_chosen": refs, "ref_rejected": refs - 1,
    }  # fmt: skip


METRICS = {
    "sft": {"loss", "entropy", "mean_token_accuracy"},
    "dpo": {"rewards/accuracies", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"},
    "reward": {"accuracy", "margin", "mean_reward"},
}


@pytest.mark.parametrize(
    "task, options, passes",
    [("sft", {}, 4), ("dpo", {}, 3), ("dpo", {"loss": "simpo"}, 4), ("dpo", {"use_weighting": True}, 3),
     ("reward", {}, 0)],
)  # fmt: skip
def test_a_step_runs_the_head_as_often_as_its_loss_needs(monkeypatch, task, options, passes):
    monkeypatch.setenv("FASTPREF_BACKEND", "torch")
    model = _model(task)
    module = modeling.MODULES[task](model, make_config(task, model_name_or_path="unused", **options))
    batch = _batch()
    n_valid = int((batch["labels"][:, 1:] != -100).sum())
    with HeadGemmLog() as log:
        loss, metrics = module(batch)
        loss.backward()
    assert log.flops == pytest.approx(passes * 2 * n_valid * HIDDEN * VOCAB, rel=1e-9), log.flops / (
        2 * n_valid * HIDDEN * VOCAB
    )
    assert METRICS[task] <= set(metrics)
    assert all(torch.isfinite(value).all() for value, _ in metrics.values())
