"""`fastpref.integrations.trl.patch`: every TRL 1.16 trainer with a fused LM head (SFT, DPO, KTO, GRPO, RLOO) logs
the same losses and metrics with fastpref's head as stock TRL from the same seed (tiny Llama, CPU): fp32 within
1e-5 of each metric's scale; under bf16 autocast no further from the fp32 run than a few times TRL's own bf16 run
(measured worst: 3.8x, KTO's grad_norm after two Adam steps). Also the traps of the sampling trainers (their
temperature, a differentiable entropy bonus, cast_lm_head_to_fp32), the forward's signature under `generate()`,
PEFT LoRA, MoE router loss, a ZeRO-3 partitioned head, and the statistics asked of each model."""

from __future__ import annotations

import contextlib
import copy
import math
import types

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

import transformers
import trl
import trl_runs
from test_train import tiny_config

import fastpref
from fastpref.integrations import trl as fastpref_trl

KINDS = ["sft", "dpo", "kto", "grpo", "rloo"]
FP32_RTOL = 1e-5
BF16_FACTOR = 5.0  # how much further from the fp32 run than TRL's own bf16 run a patched bf16 run may land


def _assert_same_logs(stock, patched, rtol=FP32_RTOL):
    assert len(stock) == trl_runs.STEPS and all(math.isfinite(e["loss"]) for e in patched)
    differences = trl_runs.max_differences(stock, patched)
    scale = trl_runs.scales(stock)
    print("max |stock - patched| / scale:", {k: f"{v / scale[k]:.1e}" for k, v in differences.items()})
    for key, difference in differences.items():
        assert difference <= rtol * scale[key], (key, difference, scale[key])


def _calls(monkeypatch) -> list:
    """The return_stats argument of every fastpref.linear_token_logps call from here on."""
    calls = []
    real = fastpref.linear_token_logps

    def counting(*args, **kwargs):
        calls.append(kwargs.get("return_stats", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(fastpref, "linear_token_logps", counting)
    return calls


# the per-token statistics each TRL 1.16 trainer reads from its policy's fused head (TokenStats' names)
READS = {
    "sft": frozenset({"entropy", "is_top1"}),
    "dpo": frozenset({"entropy", "mean_logit", "is_top1"}),
    "kto": frozenset({"entropy", "mean_logit"}),
    "grpo": frozenset({"entropy"}),
    "rloo": frozenset({"entropy"}),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.smoke
def test_patched_trainer_logs_what_stock_trl_logs(kind, monkeypatch):
    stock = trl_runs.stock_logs(kind)
    calls = _calls(monkeypatch)
    patched = trl_runs.logs(kind, True)
    # the policy's head is fastpref's, asked for exactly the statistics the trainer reads; the reference
    # model's head too, asked for nothing but log-probs
    expected = {READS[kind]} if kind == "sft" else {READS[kind], False}
    assert {frozenset(c) if c else False for c in calls} == expected, calls
    _assert_same_logs(stock, patched)


@pytest.mark.parametrize("kind", KINDS)
def test_patched_trainer_under_bf16_autocast_is_as_close_to_fp32_as_trl(kind):
    """Both heads run their GEMMs on bf16 operands under autocast and round differently: the patched bf16 run
    may differ from the fp32 run by no more than a few times what TRL's own bf16 run does."""
    reference = trl_runs.stock_logs(kind)
    stock = trl_runs.stock_logs(kind, bf16=True)
    patched = trl_runs.logs(kind, True, bf16=True)
    trl_error = trl_runs.max_differences(reference, stock)
    our_error = trl_runs.max_differences(reference, patched)
    scale = trl_runs.scales(reference)
    print("bf16 vs fp32, TRL / fastpref:", {k: f"{trl_error[k] / scale[k]:.1e} / {v / scale[k]:.1e}"
                                            for k, v in our_error.items()})
    for key, error in our_error.items():
        assert error <= BF16_FACTOR * trl_error[key] + FP32_RTOL * scale[key], (key, error, trl_error[key])


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_sampling_temperature_reaches_the_head(kind):
    """GRPO and RLOO give the head their `temperature`: the patched head divides the logits by it, on the policy
    and the reference (fastpref's earlier patch read only the model's config: log-probs of T = 1)."""
    trainer = trl_runs.trainer(kind)
    fastpref_trl.patch(trainer)
    temperature = trl_runs.SAMPLING["temperature"]
    ids = torch.randint(3, trainer.model.config.vocab_size, (2, 12))
    labels = ids.masked_fill(torch.arange(12) < 4, -100)
    for model in (trainer.model, trainer.ref_model):
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1] / temperature
            want = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * (labels[:, 1:] != -100)
            got = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_moe_router_aux_loss_is_computed_as_trl_does():
    """A Mixtral with `output_router_logits`: the trainer asks the head for the load-balancing loss (`aux_loss`,
    logged and added to the loss) as TRL's own head computes it."""
    config = transformers.MixtralConfig(**{k: getattr(tiny_config("llama"), k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "bos_token_id", "eos_token_id", "pad_token_id")}, num_local_experts=4,
        num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5)
    stock = trl_runs.logs("sft", False, model_config=config)
    assert stock[0]["aux_loss"] > 0
    _assert_same_logs(stock, trl_runs.logs("sft", True, model_config=config))


def test_grpo_entropy_bonus_backpropagates_through_the_head():
    """With entropy_coef != 0, GRPO subtracts coef * mean entropy from the loss and backpropagates through the
    head's entropy; a non-differentiable entropy would silently drop the bonus (the grad norm shows it)."""
    options = {"entropy_coef": 0.5}
    stock = trl_runs.stock_logs("grpo", **options)
    assert "policy_loss" in stock[0]
    _assert_same_logs(stock, trl_runs.logs("grpo", True, **options))


def test_grpo_cast_lm_head_to_fp32_under_bf16_autocast():
    """GRPO's cast_lm_head_to_fp32: the head (its weight cast to fp32 by the trainer) runs outside autocast, in
    fp32, for the policy and the reference, so the bf16 run's head matches TRL's to fp32 rounding."""
    options = {"bf16": True, "cast_lm_head_to_fp32": True}
    trainer = trl_runs.trainer("grpo", **options)
    assert all(c.cast_lm_head_to_fp32 for c in fastpref_trl.contracts(trainer))
    stock = trl_runs.stock_logs("grpo", **options)
    patched = trl_runs.logs("grpo", True, **options)
    reference, bf16 = trl_runs.stock_logs("grpo"), trl_runs.stock_logs("grpo", bf16=True)
    trl_error, our_error = trl_runs.max_differences(reference, bf16), trl_runs.max_differences(stock, patched)
    scale = trl_runs.scales(stock)
    for key, error in our_error.items():  # far below the bf16 head's own rounding
        assert error <= 0.1 * trl_error[key] + FP32_RTOL * scale[key], (key, error, trl_error[key])


def test_contracts_ask_each_model_for_what_its_trainer_reads():
    expected = {
        "sft": ({"entropy", "is_top1"}, set()),
        "dpo": ({"entropy", "mean_logits", "is_top1"}, set()),
        "kto": ({"entropy", "mean_logits"}, set()),
        "grpo": ({"entropy"}, set()),
        "rloo": ({"entropy"}, set()),
    }
    for kind, (policy_outputs, reference_outputs) in expected.items():
        policy, reference = fastpref_trl.contracts(trl_runs.trainer(kind))
        assert (set(policy.outputs), set(reference.outputs)) == (policy_outputs, reference_outputs), kind
    policy, _ = fastpref_trl.contracts(trl_runs.trainer("dpo", use_weighting=True))
    assert "log_sum_sq_probs" in policy.outputs  # WPO's weights


def test_patched_forward_gives_only_the_fields_asked_for(caplog):
    trainer = trl_runs.trainer("kto")
    with caplog.at_level("INFO", logger="fastpref"):
        assert fastpref_trl.patch(trainer) is trainer  # returned, so `trainer = patch(KTOTrainer(...))` reads well
    assert "KTOTrainer LM heads patched: policy (log-probs, entropy, mean_logits); reference (log-probs)" in caplog.text
    with pytest.warns(UserWarning, match="was patched already"):
        fastpref_trl.patch(trainer)  # patching twice patches once, and says so
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    labels = torch.tensor([[-100, -100, 5, 6, 7]])
    policy = trainer.model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert policy.entropy is not None and policy.mean_logits is not None
    assert policy.is_top1 is None and policy.log_sum_sq_probs is None
    reference = trainer.ref_model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert reference.entropy is None and reference.mean_logits is None
    torch.testing.assert_close(reference.log_probs, policy.log_probs.detach())
    assert reference.log_probs[0, :1].eq(0).all() and reference.label_mask.tolist() == [[False, True, True, True]]


@pytest.mark.parametrize("kind", ["dpo", "grpo"])
@pytest.mark.smoke
def test_generate_keeps_the_models_signature_and_prefills_one_position(kind):
    """generate() looks for `logits_to_keep` in the forward's signature; without it the prefill builds the logits
    of every prompt position, (B, T, V) instead of (B, 1, V)."""
    trainer = trl_runs.trainer(kind)
    fastpref_trl.patch(trainer)
    model = trainer.model
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
    prompt = torch.randint(3, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2, do_sample=False)
    hook.remove()
    assert shapes and all(shape[:2] == (2, 1) for shape in shapes), shapes
    assert "logits_to_keep" in __import__("inspect").signature(model.forward).parameters


def test_generation_path_is_unchanged():
    trainer = trl_runs.trainer("dpo")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        before = trainer.model(input_ids=ids).logits
        fastpref_trl.patch(trainer)
        after = trainer.model(input_ids=ids).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_lora_trainer_logs_what_stock_trl_logs(kind):
    """PEFT LoRA on the attention projections: the adapter is in the backbone, the head is the base model's; DPO's
    reference is the same model with the adapter disabled."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    stock = trl_runs.logs(kind, False, peft_config=config)
    patched = trl_runs.logs(kind, True, peft_config=config)
    _assert_same_logs(stock, patched)


def test_patch_wants_a_trainer_with_a_fused_head():
    with pytest.raises(TypeError, match=r"SFTTrainer, DPOTrainer, KTOTrainer, GRPOTrainer, RLOOTrainer\), got object"):
        fastpref_trl.patch(object())
    reward_model = transformers.AutoModelForSequenceClassification.from_config(tiny_config("llama", num_labels=1))

    class RewardLike(trl.RewardTrainer):
        def __init__(self):  # no training set-up needed to be refused
            self.model = reward_model

    with pytest.raises(TypeError, match="got RewardLike .a reward model scores with a .hidden x 1. head"):
        fastpref_trl.patch(RewardLike())


class _FakeZero3:
    """DeepSpeed ZeRO-3's view of one parameter: its values are not there (NaN here) except inside `gather`."""

    def __init__(self, parameter):
        self.parameter, self.full = parameter, parameter.data
        parameter.data = torch.full_like(self.full, float("nan"))
        self.gathers = 0

    @contextlib.contextmanager
    def gather(self, *parameters):
        if not any(p is self.parameter for p in parameters):
            yield
            return
        self.gathers += 1
        partitioned, self.parameter.data = self.parameter.data, self.full
        try:
            yield
        finally:
            self.parameter.data = partitioned


def test_zero3_partitioned_head_is_gathered_for_forward_and_backward(monkeypatch):
    """fastpref's backward recomputes the logits from the head weight, which ZeRO-3 partitions again after the
    forward: it is gathered around that backward too."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    reference = copy.deepcopy(model)
    contract = fastpref_trl.HeadContract(("entropy",))
    for m in (model, reference):
        m.forward = types.MethodType(fastpref_trl._fused_forward(m, contract, m.forward), m)
    ids = torch.randint(3, model.config.vocab_size, (2, 10))
    labels = ids.masked_fill(torch.arange(10) < 3, -100)
    expected = reference(input_ids=ids, labels=labels, fused_lm_head=True)
    (expected.log_probs.sum() + expected.entropy.sum()).backward()

    zero3 = _FakeZero3(model.lm_head.weight)
    monkeypatch.setattr(fastpref_trl, "is_deepspeed_zero3_enabled", lambda: True)
    monkeypatch.setattr(fastpref_trl, "maybe_gather_lm_head_ctx", zero3.gather)
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    (out.log_probs.sum() + out.entropy.sum()).backward()
    assert zero3.gathers == 2 and model.lm_head.weight.isnan().all()  # forward, backward; partitioned after
    torch.testing.assert_close(out.log_probs, expected.log_probs.detach())
    torch.testing.assert_close(model.lm_head.weight.grad, reference.lm_head.weight.grad)
    torch.testing.assert_close(model.model.norm.weight.grad, reference.model.norm.weight.grad)


def test_a_zero3_partition_passes_the_head_check():
    """Under ZeRO-3 a partitioned weight is empty, its (V, H) shape kept in `ds_shape`."""
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    weight = model.lm_head.weight
    weight.ds_shape, weight.data = weight.shape, torch.empty(0)
    from fastpref.model_head import head_of

    assert head_of(model).weight is weight
