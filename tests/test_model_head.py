"""`fastpref.model_head`: every family's logit settings (softcap, pre-softcap scale) read from its text config,
checked against a tiny model of that family's own logits, through the three users of the head boundary: the
transformers drop-in, the training loop and the TRL patch (values and gradients, float64)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import transformers
from test_integrations_transformers import _assert_grads_close, _batch, _grads, _textbook

from fastpref.integrations.transformers import sequence_logps
from fastpref.model_head import head_of
from fastpref.train import modeling

VOCAB = 97
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def _configs():
    """family -> (config builder, the (softcap, logit_scale) the family's forward applies)."""
    t = transformers
    return {
        "llama": (lambda: t.LlamaConfig(**SMALL), (None, 1.0)),
        "gemma2": (lambda: t.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=5.0), (5.0, 1.0)),
        "cohere": (lambda: t.CohereConfig(**SMALL, logit_scale=2.5), (None, 2.5)),  # multiplies
        "granite": (lambda: t.GraniteConfig(**SMALL, logits_scaling=4.0), (None, 0.25)),  # divides
        "minicpm3": (  # divides its hidden states by hidden_size / dim_model_base = 4
            lambda: t.MiniCPM3Config(**{**SMALL, "num_key_value_heads": 4}, dim_model_base=8, q_lora_rank=16,
                                     kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
            (None, 0.25),
        ),
        "hyperclovax": (lambda: t.HyperCLOVAXConfig(**SMALL, logits_scaling=2.5), (None, 2.5)),  # multiplies
        "falcon_h1": (
            lambda: t.FalconH1Config(**SMALL, lm_head_multiplier=2.5, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                                     mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=16),
            (None, 2.5),
        ),
        "mpt": (  # MPT's config may carry a logit_scale that its transformers model does not apply
            lambda: t.MptConfig(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, max_seq_len=128, logit_scale=3.0,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2),
            (None, 1.0),
        ),
        "muse_glimmer": (  # a vision-language model: its text config multiplies by 3 before the softcap 5
            lambda: t.MuseGlimmerConfig(
                text_config=dict(**SMALL, head_dim=8, final_logit_softcapping=5.0, output_multiplier=3.0),
                vision_config=TINY_VISION,
            ),
            (5.0, 3.0),
        ),
        "paligemma-gemma2": (  # a vision-language model with a Gemma-2 text part: its softcap is the text config's
            lambda: t.PaliGemmaConfig(
                text_config=dict(model_type="gemma2", **SMALL, head_dim=8, final_logit_softcapping=5.0),
                vision_config=dict(**TINY_VISION, patch_size=4, image_size=8),
                projection_dim=32,
            ),
            (5.0, 1.0),
        ),
    }


FAMILIES = list(_configs())


def _model(family):
    config = _configs()[family][0]()
    torch.manual_seed(0)
    vision_language = family in ("muse_glimmer", "paligemma-gemma2")
    auto = transformers.AutoModelForImageTextToText if vision_language else transformers.AutoModelForCausalLM
    model = auto.from_config(config).double().eval()
    with torch.no_grad():  # logits of a few units, so that a wrong scale or softcap shows
        model.get_output_embeddings().weight.mul_(8.0)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_head_settings_are_the_familys(family):
    head = head_of(_model(family))
    assert (head.softcap, head.logit_scale) == _configs()[family][1]


def _check_against_the_model(model, ours_fn, batch, *, rtol=1e-9):
    """ours_fn(model, input_ids, attention_mask, labels) -> (M,) summed log-probs, against the model's logits."""
    upstream = torch.rand(batch[0].shape[0], dtype=torch.float64) + 0.5  # non-uniform upstream gradient
    expected = _textbook(model, *batch)
    (expected * upstream).sum().backward()
    expected_grads = _grads(model)
    model.zero_grad()
    ours = ours_fn(model, *batch)
    (ours * upstream).sum().backward()
    torch.testing.assert_close(ours, expected.detach(), rtol=rtol, atol=rtol)
    _assert_grads_close(_grads(model), expected_grads)


# PaliGemma's own body differs from its language model alone by ~1e-7 in float64 (its hidden states, without any
# mask): the drop-ins score with the language model, so PaliGemma is checked on the head settings and the TRL head.
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "paligemma-gemma2"])
def test_transformers_drop_in_and_training_loop_score_as_the_model(family):
    model = _model(family)
    batch = _batch(VOCAB)
    _check_against_the_model(model, sequence_logps, batch)
    model.zero_grad()

    def training_loop(model, input_ids, attention_mask, labels):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return modeling.sequence_logps(model, batch)

    _check_against_the_model(model, training_loop, batch)


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite", "muse_glimmer", "paligemma-gemma2"])
def test_trl_head_scores_as_the_model_at_a_sampling_temperature(family):
    """The TRL patch's head: the family's scale and softcap, then the trainer's temperature (GRPO / RLOO)."""
    pytest.importorskip("trl")
    from fastpref.integrations.trl import HeadContract, head_log_probs

    model = _model(family)
    input_ids, attention_mask, labels = _batch(VOCAB)
    temperature = 0.7
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1] / temperature
        mask = labels[:, 1:] != -100
        want = torch.log_softmax(logits, -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1) * mask
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # as the patch
        got, _ = head_log_probs(model, hidden[:, :-1], labels[:, 1:], HeadContract(temperature=temperature))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("value", [0.0, -2.0])
def test_a_scale_that_is_not_a_positive_number_names_the_config_attribute(value):
    config = transformers.CohereConfig(**SMALL)
    config.logit_scale = value
    model = transformers.CohereForCausalLM(config)
    with pytest.raises(ValueError, match=r"CohereConfig\.logit_scale must be a positive number"):
        head_of(model)


def test_a_lora_adapter_on_the_lm_head_is_refused():
    peft = pytest.importorskip("peft")
    model = _model("llama").float()
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="LM head carries a PEFT adapter"):
        head_of(adapted.get_base_model())
    saved = peft.get_peft_model(_model("llama").float(), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                        modules_to_save=["lm_head"]))
    assert head_of(saved.get_base_model()).weight is saved.get_base_model().lm_head.modules_to_save["default"].weight
