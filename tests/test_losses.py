"""Parity of fastpref.losses with the float64 reference (values and gradients under random non-uniform
upstream gradients), float64 gradcheck, the pair-chunking contract, and argument errors."""

import pytest
import torch

import reference as ref
from assertions import assert_close
from fastpref import losses
from tolerances import VS_FP64

RTOL, ATOL = VS_FP64[torch.float32]
LOSS_TYPES = sorted(losses.LOSS_TYPES)
COUPLED = {"aot", "aot_unpaired"}
F_DIVERGENCE_LOSS_TYPES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
SMOOTHING = {"exo_pair": 0.1, "robust": 0.2, "aot": 0.15, "aot_unpaired": 0.15}


# --- helpers ---


def pair_tensors(batch, dtype=torch.float32):
    """Policy and reference log-probs with O(1) log-ratios, completion lengths (one 0), pair weights."""
    policy_chosen = -torch.rand(batch, dtype=torch.float64) * 30 - 1
    policy_rejected = -torch.rand(batch, dtype=torch.float64) * 30 - 1
    lengths = torch.randint(0, 40, (2, batch))
    lengths[0, 0] = 0  # an empty completion: TRL clamps the count to 1
    return {
        "policy_chosen_logps": policy_chosen.to(dtype),
        "policy_rejected_logps": policy_rejected.to(dtype),
        "ref_chosen_logps": (policy_chosen + torch.randn(batch, dtype=torch.float64) * 2).to(dtype),
        "ref_rejected_logps": (policy_rejected + torch.randn(batch, dtype=torch.float64) * 2).to(dtype),
        "chosen_lengths": lengths[0],
        "rejected_lengths": lengths[1],
    }


def leaves(tensors, dtype=None):
    """Fresh leaves of the floating tensors (cast to `dtype` if given) requiring grad; others as they are."""
    out = {}
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().to(dtype or value.dtype).requires_grad_(True)
        out[name] = value
    return out


def first(output):
    return output[0] if isinstance(output, tuple) else output


def assert_parity(fast, reference, tensors, *, name="loss"):
    """fast(**fp32 leaves) vs reference(**fp64 copies of the same values): every output, and the gradient
    of the first output w.r.t. every floating input under a random non-uniform upstream gradient."""
    fast_in = leaves(tensors)
    ref_in = leaves(
        {
            k: v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in tensors.items()
        }
    )
    fast_out, ref_out = fast(**fast_in), reference(**ref_in)
    fast_all = fast_out if isinstance(fast_out, tuple) else (fast_out,)
    ref_all = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    for i, (got, want) in enumerate(zip(fast_all, ref_all)):
        assert got is None or got.dtype == torch.float32, f"{name} output {i} dtype {got.dtype}"
        assert_close(got, want, rtol=RTOL, atol=ATOL, name=f"{name} output {i}")
    upstream = torch.rand_like(ref_all[0]) * 2 + 0.25
    wrt = [k for k, v in fast_in.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    fast_grads = torch.autograd.grad(first(fast_out), [fast_in[k] for k in wrt], upstream.float(), allow_unused=True)
    ref_grads = torch.autograd.grad(first(ref_out), [ref_in[k] for k in wrt], upstream, allow_unused=True)
    for key, got, want in zip(wrt, fast_grads, ref_grads):
        got = torch.zeros_like(fast_in[key]) if got is None else got
        want = torch.zeros_like(ref_in[key]) if want is None else want
        assert_close(got, want, rtol=RTOL, atol=ATOL, name=f"{name} grad {key}")


def dpo_options(loss_type, **extra):
    options = {"beta": 0.1, "loss_type": loss_type, "label_smoothing": 0.0}
    names = [loss_type] if isinstance(loss_type, str) else loss_type
    options["label_smoothing"] = max([SMOOTHING.get(n, 0.0) for n in names])
    return {**options, **extra}


def fast_dpo(options):
    return lambda **t: losses.dpo_pair_losses(*_positional(t), **_lengths(t), **options)


def ref_dpo(options):
    def run(**t):
        kw = {k: v for k, v in options.items() if k not in ("f_alpha_divergence_coef",)}
        if "f_alpha_divergence_coef" in options:
            kw["alpha"] = options["f_alpha_divergence_coef"]
        return ref.dpo_pair_losses(*_positional(t), **_lengths(t), **kw)

    return run


def _positional(t):
    return t["policy_chosen_logps"], t["policy_rejected_logps"], t["ref_chosen_logps"], t["ref_rejected_logps"]


def _lengths(t):
    return {k: t[k] for k in ("chosen_lengths", "rejected_lengths", "pair_weights") if k in t}


# --- DPO family ---


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_loss_type_matches_reference(loss_type, batch):
    options = dpo_options(loss_type)
    assert_parity(fast_dpo(options), ref_dpo(options), pair_tensors(batch), name=loss_type)


@pytest.mark.parametrize("f_divergence_type", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", F_DIVERGENCE_LOSS_TYPES)
def test_f_divergences_match_reference(f_divergence_type, loss_type):
    options = dpo_options(loss_type, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=0.3)
    tensors = pair_tensors(7)
    assert_parity(fast_dpo(options), ref_dpo(options), tensors, name=f"{loss_type}/{f_divergence_type}")


def test_f_divergence_loss_types_are_trls():
    assert sorted(losses.F_DIVERGENCE_LOSS_TYPES) == sorted(F_DIVERGENCE_LOSS_TYPES)


def test_f_divergence_scores_keep_trls_constants():
    """TRL 1.16's scores exactly: the constants matter to ipo / sigmoid_norm, which divide each score by its length."""
    u = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0], dtype=torch.float64)
    trl = {
        "forward_kl": 1 - torch.exp(-u),
        "js_divergence": torch.log(torch.tensor(2.0, dtype=torch.float64)) + torch.nn.functional.logsigmoid(u),
        "alpha_divergence": (torch.exp(-0.7 * u) - 1) / -0.7,
    }
    for name, want in trl.items():
        got = losses.dpo.F_DIVERGENCES[name](u, 0.3)
        assert_close(got, want, rtol=1e-12, atol=1e-12, name=name)
    # TRL's float32 clamp of the alpha exponent at 80 (11 for float16) before exp(), then * 1 / (alpha - 1)
    alpha_score = losses.dpo.F_DIVERGENCES["alpha_divergence"]
    big = torch.tensor([500.0])
    assert torch.equal(alpha_score(big, 3.0), (torch.exp(torch.tensor([80.0])) - 1) * 0.5)
    half = alpha_score(big.half(), 3.0)
    assert half.dtype == torch.float16 and torch.equal(half, ((torch.exp(torch.tensor([11.0])) - 1).half() * 0.5))


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_ipo_depends_on_f_divergence_constant(loss_type):
    """Dropping f's constant would not change sigmoid, but changes the length-normalised losses."""
    tensors = pair_tensors(7)
    lengths = {"chosen_lengths": tensors["chosen_lengths"], "rejected_lengths": tensors["rejected_lengths"]}
    out = losses.dpo_pair_losses(*_positional(tensors), loss_type=loss_type, f_divergence_type="forward_kl", **lengths)
    u_c = tensors["policy_chosen_logps"].double() - tensors["ref_chosen_logps"].double()
    u_r = tensors["policy_rejected_logps"].double() - tensors["ref_rejected_logps"].double()
    n_c, n_r = (lengths[k].double().clamp(min=1) for k in ("chosen_lengths", "rejected_lengths"))
    delta = (1 - torch.exp(-u_c)) / n_c - (1 - torch.exp(-u_r)) / n_r
    want = (delta - 5.0) ** 2 if loss_type == "ipo" else -torch.nn.functional.logsigmoid(0.1 * delta)
    assert_close(out[0], want, rtol=RTOL, atol=ATOL, name=loss_type)


def test_alpha_divergence_with_coefficient_one_is_reverse_kl():
    tensors = pair_tensors(5)
    alpha_one = losses.dpo_loss(
        *_positional(tensors), f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0
    )
    reverse = losses.dpo_loss(*_positional(tensors), f_divergence_type="reverse_kl")
    assert torch.equal(alpha_one.loss, reverse.loss)


def test_f_alpha_divergence_coef_defaults_to_dpo_configs():
    tensors = pair_tensors(5)
    default = losses.dpo_loss(*_positional(tensors), f_divergence_type="alpha_divergence")
    half = losses.dpo_loss(*_positional(tensors), f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5)
    assert torch.equal(default.loss, half.loss)


@pytest.mark.parametrize("f_divergence_type", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", sorted(set(LOSS_TYPES) - set(F_DIVERGENCE_LOSS_TYPES)))
def test_f_divergence_rejected_for_other_loss_types(loss_type, f_divergence_type):
    options = dpo_options([loss_type, "sigmoid"], f_divergence_type=f_divergence_type)
    with pytest.raises(ValueError, match="f_divergence_type"):
        losses.check_dpo_options(**options)
    losses.check_dpo_options(**{**options, "f_divergence_type": "reverse_kl"})


def test_loss_type_list_is_weighted_sum():
    options = dpo_options(["sigmoid", "sft", "ipo", "bco_pair"], loss_weights=[0.8, 0.2, 1.0, 0.5])
    assert_parity(fast_dpo(options), ref_dpo(options), pair_tensors(7), name="mpo")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("loss_type", ["robust", "aot", "aot_unpaired", "exo_pair", "sigmoid"])
def test_label_smoothing(loss_type, label_smoothing):
    if loss_type == "exo_pair" and label_smoothing == 0.0:
        pytest.skip("exo_pair needs label_smoothing > 0")
    options = dpo_options(loss_type, label_smoothing=label_smoothing)
    assert_parity(fast_dpo(options), ref_dpo(options), pair_tensors(7), name=f"{loss_type}/{label_smoothing}")


def test_sigmoid_ignores_label_smoothing_as_trl():
    tensors = pair_tensors(7)
    plain = losses.dpo_loss(*_positional(tensors))
    smoothed = losses.dpo_loss(*_positional(tensors), label_smoothing=0.2)
    assert torch.equal(plain.loss, smoothed.loss)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "aot", "apo_zero", "bco_pair"])
def test_reference_free_is_zero_reference(loss_type):
    tensors = pair_tensors(7)
    zeros = torch.zeros(7)
    options = dpo_options(loss_type)

    def fast(**t):
        return losses.dpo_pair_losses(
            t["policy_chosen_logps"],
            t["policy_rejected_logps"],
            None,
            None,
            reference_free=True,
            **_lengths(t),
            **options,
        )

    def reference(**t):
        return ref.dpo_pair_losses(
            t["policy_chosen_logps"],
            t["policy_rejected_logps"],
            zeros.double(),
            zeros.double(),
            **_lengths(t),
            **options,
        )

    del tensors["ref_chosen_logps"], tensors["ref_rejected_logps"]
    assert_parity(fast, reference, tensors, name=f"reference_free/{loss_type}")
    _, chosen_rewards, _ = fast(**tensors)
    assert_close(chosen_rewards, 0.1 * tensors["policy_chosen_logps"], rtol=RTOL, atol=ATOL)


def chosen_token_logps(chosen_logps, chosen_lengths):
    """Per-token chosen log-probs (a flat tensor, differentiable in chosen_logps) whose per-pair sums are
    chosen_logps; an empty completion has none (its log-prob must be 0)."""
    tokens = []
    for logp, count in zip(chosen_logps, chosen_lengths.tolist()):
        if count:
            share = torch.rand(count, dtype=torch.float64) + 0.1
            tokens.append(logp * share / share.sum())
    return torch.cat(tokens)


def test_sft_needs_no_reference():
    tensors = pair_tensors(7)
    without = losses.dpo_loss(
        tensors["policy_chosen_logps"],
        tensors["policy_rejected_logps"],
        None,
        None,
        loss_type="sft",
        chosen_lengths=tensors["chosen_lengths"],
    )
    with_ref = losses.dpo_loss(*_positional(tensors), loss_type="sft", chosen_lengths=tensors["chosen_lengths"])
    assert torch.equal(without.loss, with_ref.loss)
    expected = -tensors["policy_chosen_logps"].double().sum() / tensors["chosen_lengths"].sum()
    assert_close(without.loss, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("loss_type", ["sft", ["sigmoid", "sft", "ipo"]])
def test_pair_losses_mean_is_trls_batch_loss(loss_type, weighted):
    """The mean of the per-pair values is TRL's loss, sft's being -mean(chosen token log-probs) (times the mean
    pair weight under WPO weighting), in value and in gradient."""
    tensors = pair_tensors(7)
    empty = tensors["chosen_lengths"] == 0  # pair 0 at least: an empty completion has no token log-probs
    tensors["policy_chosen_logps"][empty] = 0.0
    options = dpo_options(loss_type, loss_weights=None if loss_type == "sft" else [0.7, 0.4, 1.3])
    if weighted:
        tensors["pair_weights"] = torch.rand(7) + 0.1
    fast_in = leaves(tensors)
    ref_in = leaves({k: v.double() if v.is_floating_point() else v for k, v in tensors.items()})
    token_logps = chosen_token_logps(ref_in["policy_chosen_logps"], tensors["chosen_lengths"])
    got = losses.dpo_loss(*_positional(fast_in), **_lengths(fast_in), **options).loss
    want = ref.trl_dpo_loss(*_positional(ref_in), token_logps, **_lengths(ref_in), **options)
    assert_close(got, want, rtol=RTOL, atol=ATOL, name="trl loss")
    # TRL's sft term gives each chosen token's log-prob -1/N, so each sequence's sum -1/N; a sequence without
    # completion tokens has no gradient path in TRL (its log-prob is the constant 0), so only the others count.
    keys = [k for k in ("policy_chosen_logps", "pair_weights") if k in fast_in]
    grads = torch.autograd.grad(got, [fast_in[k] for k in keys])
    want_grads = torch.autograd.grad(want, [ref_in[k] for k in keys])
    for key, g, w in zip(keys, grads, want_grads):
        rows = ~empty if key == "policy_chosen_logps" else slice(None)
        assert_close(g[rows], w[rows], rtol=RTOL, atol=ATOL, name=f"trl loss grad {key}")


def test_sft_halves_with_batch_totals_match_whole_batch():
    """sft is not batch-coupled: two halves computed apart, given the batch totals, give the whole batch's
    per-pair losses (and so the same gradient)."""
    tensors = pair_tensors(8)
    totals = {"batch_chosen_tokens": tensors["chosen_lengths"].sum(), "batch_pairs": 8}
    whole = losses.dpo_pair_losses(*_positional(tensors), loss_type="sft", chosen_lengths=tensors["chosen_lengths"])
    halves = [
        losses.dpo_pair_losses(
            *(t[half] for t in _positional(tensors)),
            loss_type="sft",
            chosen_lengths=tensors["chosen_lengths"][half],
            **totals,
        )
        for half in (slice(0, 4), slice(4, 8))
    ]
    assert torch.equal(torch.cat([h[0] for h in halves]), whole[0])
    as_int = {**totals, "batch_chosen_tokens": int(totals["batch_chosen_tokens"])}
    first = losses.dpo_pair_losses(
        *(t[:4] for t in _positional(tensors)), loss_type="sft", chosen_lengths=tensors["chosen_lengths"][:4], **as_int
    )
    assert torch.equal(first[0], whole[0][:4])
    alone = losses.dpo_pair_losses(
        *(t[:4] for t in _positional(tensors)), loss_type="sft", chosen_lengths=tensors["chosen_lengths"][:4]
    )
    assert not torch.allclose(alone[0], whole[0][:4])  # without the totals, a half is its own batch


def test_sft_batch_totals_match_reference():
    tensors = pair_tensors(5)
    options = dpo_options("sft", batch_chosen_tokens=int(tensors["chosen_lengths"].sum()) + 17, batch_pairs=9)
    assert_parity(fast_dpo(options), ref_dpo(options), tensors, name="sft totals")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sft", ["hinge", "discopop"]])
def test_pair_weights_multiply_each_pair(loss_type):
    tensors = pair_tensors(7)
    tensors["pair_weights"] = torch.rand(7) + 0.1
    options = dpo_options(loss_type)
    assert_parity(fast_dpo(options), ref_dpo(options), tensors, name="pair_weights")


@pytest.mark.parametrize("bco_delta", [0.0, 0.37, "tensor"])
def test_bco_delta(bco_delta):
    delta = torch.tensor(-0.2) if bco_delta == "tensor" else bco_delta
    options = dpo_options("bco_pair", bco_delta=delta)
    assert_parity(fast_dpo(options), ref_dpo(options), pair_tensors(7), name="bco_delta")


def test_bco_delta_none_is_trls_unshifted_bco_pair():
    tensors = pair_tensors(7)
    out = losses.dpo_pair_losses(*_positional(tensors), loss_type="bco_pair")
    assert torch.equal(out[0], losses.dpo_pair_losses(*_positional(tensors), loss_type="bco_pair", bco_delta=0.0)[0])
    chosen, rejected = out[1].double(), out[2].double()  # beta * log-ratios
    want = -torch.nn.functional.logsigmoid(chosen) - torch.nn.functional.logsigmoid(-rejected)
    assert_close(out[0], want, rtol=RTOL, atol=ATOL, name="bco_pair")


def test_dpo_loss_is_mean_of_pair_losses():
    tensors = pair_tensors(7)
    lengths = {"chosen_lengths": tensors["chosen_lengths"], "rejected_lengths": tensors["rejected_lengths"]}
    out = losses.dpo_loss(*_positional(tensors), loss_type=["ipo", "sigmoid"], **lengths)
    pair_losses, chosen_rewards, rejected_rewards = losses.dpo_pair_losses(
        *_positional(tensors), loss_type=["ipo", "sigmoid"], **lengths
    )
    assert isinstance(out, losses.PreferenceOutput) and out.loss.dim() == 0
    assert out.chosen_logps is None and out.rejected_logps is None
    assert torch.equal(out.loss, pair_losses.mean())
    assert torch.equal(out.chosen_rewards, chosen_rewards) and torch.equal(out.rejected_rewards, rejected_rewards)
    expected = 0.1 * (tensors["policy_rejected_logps"] - tensors["ref_rejected_logps"])
    assert torch.equal(out.rejected_rewards, expected) and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_is_batch_coupled_and_chunking(loss_type):
    """A loss that is not batch-coupled gives the same per-pair values on pair chunks, given the batch totals,
    as on the batch."""
    assert losses.is_batch_coupled(loss_type) is (loss_type in COUPLED)
    tensors = pair_tensors(7)
    if loss_type not in COUPLED:
        tensors["pair_weights"] = torch.rand(7) + 0.1
    options = dpo_options(loss_type)
    whole = fast_dpo(options)(**tensors)[0]
    if loss_type == "sft":  # needs the whole batch's pair weights, which a chunk does not have
        del tensors["pair_weights"]
        whole = fast_dpo(options)(**tensors)[0]
    totals = {"batch_chosen_tokens": tensors["chosen_lengths"].sum(), "batch_pairs": 7}
    chunks = [
        fast_dpo({**options, **totals})(**{k: v[s] for k, v in tensors.items()})[0] for s in (slice(0, 3), slice(3, 7))
    ]
    chunked = torch.cat(chunks)
    if loss_type in COUPLED:
        assert not torch.allclose(chunked, whole)
    else:
        assert_close(chunked, whole, rtol=RTOL, atol=ATOL, name=f"chunked {loss_type}")


def test_is_batch_coupled_lists():
    assert losses.is_batch_coupled(["sigmoid", "aot"])
    assert not losses.is_batch_coupled(["sigmoid", "ipo", "bco_pair", "sft"])
    with pytest.raises(TypeError):
        losses.is_batch_coupled("bco_pair", bco_delta=0.0)  # no such parameter any more


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_gradcheck(loss_type):
    tensors = leaves(pair_tensors(3, torch.float64))
    tensors["chosen_lengths"] = tensors["chosen_lengths"].clamp(min=1)
    tensors["pair_weights"] = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    if loss_type in ("aot", "aot_unpaired"):
        del tensors["pair_weights"]  # not allowed with sorting losses
    options = dpo_options(loss_type, bco_delta=0.1)
    if loss_type in ("nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down"):
        pass  # reverse_kl only, as TRL
    elif loss_type not in ("aot", "aot_unpaired"):
        options["f_divergence_type"] = "js_divergence"
    names = [k for k, v in tensors.items() if v.is_floating_point()]

    def pair_losses(*values):
        return fast_dpo(options)(**{**tensors, **dict(zip(names, values))})[0]

    assert torch.autograd.gradcheck(pair_losses, [tensors[k] for k in names])


# --- LD-DPO and WPO weighting ---


def paired_labels(pairs, positions, vocab=11):
    """Chosen-then-rejected labels with prompt prefixes and right padding ignored, one row all ignored."""
    labels = torch.randint(0, vocab, (2 * pairs, positions))
    for row in range(2 * pairs):
        prompt = int(torch.randint(0, positions, ()))
        end = int(torch.randint(prompt, positions + 1, ()))
        labels[row, :prompt] = -100
        labels[row, end:] = -100
    labels[-1] = -100
    return labels


@pytest.mark.parametrize("ld_alpha", [0.0, 0.35, 1.0])
@pytest.mark.parametrize("shape", [(1, 1), (3, 9), (7, 16)])
def test_ld_token_weights_give_trl_logps(ld_alpha, shape):
    pairs, positions = shape
    labels = paired_labels(pairs, positions)
    token_logps = -torch.rand(2 * pairs, positions) * 5
    weights = losses.ld_token_weights(labels, ld_alpha)
    assert weights.dtype == torch.float32 and weights.shape == labels.shape
    assert torch.all(weights[labels == -100] == 0)
    expected = ref.ld_sequence_logps(token_logps, labels, ld_alpha)
    assert_close((token_logps * weights).sum(-1), expected, rtol=RTOL, atol=ATOL, name="ld logps")


def test_ld_token_weights_dtype():
    labels = paired_labels(3, 9)
    wide = losses.ld_token_weights(labels, 0.35, dtype=torch.float64)
    assert wide.dtype == torch.float64 and set(wide.unique().tolist()) <= {0.0, 0.35, 1.0}
    assert torch.equal(wide.float(), losses.ld_token_weights(labels, 0.35))
    token_logps = -torch.rand(6, 9, dtype=torch.float64) * 5
    expected = ref.ld_sequence_logps(token_logps, labels, 0.35)
    assert_close((token_logps * wide).sum(-1), expected, rtol=1e-14, atol=1e-14, name="ld logps fp64")


def test_ld_token_weights_custom_ignore_index():
    labels = paired_labels(3, 8)
    shifted = torch.where(labels == -100, 0, labels + 1)
    assert torch.equal(losses.ld_token_weights(shifted, 0.5, ignore_index=0), losses.ld_token_weights(labels, 0.5))


@pytest.mark.parametrize("shape", [(1, 1), (3, 9)])
def test_wpo_weights_match_trl_formula(shape):
    pairs, positions = shape
    labels = paired_labels(pairs, positions)
    logits = torch.randn(2 * pairs, positions, 13, dtype=torch.float64) * 3
    stats = ref.token_stats(logits, labels)
    token_logps = ref.token_logps(logits, labels).float().requires_grad_()
    weights = losses.wpo_weights(token_logps, stats["log_sum_sq_probs"].float(), labels != -100)
    assert weights.shape == (pairs,) and not weights.requires_grad
    assert_close(weights, ref.wpo_weights_from_logits(logits, labels), rtol=RTOL, atol=ATOL, name="wpo")


# --- reward model, reference-free, listwise, KL ---


@pytest.mark.parametrize("margin", [None, 0.5, "tensor"])
@pytest.mark.parametrize("center_rewards_coefficient", [None, 0.01])
@pytest.mark.parametrize("batch", [1, 7])
def test_bt_loss(margin, center_rewards_coefficient, batch):
    tensors = {"rc": torch.randn(batch) * 2, "rr": torch.randn(batch) * 2}
    if margin == "tensor":
        tensors["margin"] = torch.rand(batch)
    options = {} if margin in (None, "tensor") else {"margin": margin}
    options["center_rewards_coefficient"] = center_rewards_coefficient

    def fast(rc, rr, **kw):
        return losses.bt_loss(rc, rr, **kw, **options)

    def reference(rc, rr, **kw):
        return ref.bt_loss(rc, rr, **kw, **options)

    assert_parity(fast, reference, tensors, name="bt")


def cpo_tensors(batch):
    tensors = pair_tensors(batch)
    del tensors["ref_chosen_logps"], tensors["ref_rejected_logps"]
    tensors["chosen_lengths"] = tensors["chosen_lengths"] + 1
    scale = torch.cat([tensors["chosen_lengths"], tensors["rejected_lengths"].clamp(min=1)]).float() / 20
    tensors["policy_chosen_logps"] = tensors["policy_chosen_logps"] * scale[:batch]  # average log-probs in [-1.6, 0)
    tensors["policy_rejected_logps"] = tensors["policy_rejected_logps"] * scale[batch:]
    return tensors


def _cpo_call(fn, t, **options):
    return fn(
        t["policy_chosen_logps"],
        t["policy_rejected_logps"],
        chosen_lengths=t["chosen_lengths"],
        rejected_lengths=t["rejected_lengths"],
        **options,
    )


@pytest.mark.parametrize("alpha", [0.0, 0.25])
@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo", "hinge", "ipo"])
def test_cpo_loss(loss_type, cpo_alpha, alpha):
    options = {
        "beta": 0.5,
        "loss_type": loss_type,
        "cpo_alpha": cpo_alpha,
        "alpha": alpha,
        "label_smoothing": 0.1,
        "simpo_gamma": 0.3,
    }
    assert_parity(
        lambda **t: tuple(_cpo_call(losses.cpo_loss, t, **options)),
        lambda **t: _cpo_call(ref.cpo_loss, t, **options),
        cpo_tensors(7),
        name=f"cpo/{loss_type}",
    )


@pytest.mark.parametrize("batch", [1, 7])
def test_simpo_loss_is_cpo_simpo_without_nll(batch):
    tensors = cpo_tensors(batch)
    options = {"beta": 2.0, "simpo_gamma": 0.8}
    assert_parity(
        lambda **t: tuple(_cpo_call(losses.simpo_loss, t, **options)),
        lambda **t: _cpo_call(ref.cpo_loss, t, loss_type="simpo", cpo_alpha=0.0, **options),
        tensors,
        name="simpo",
    )


@pytest.mark.parametrize("nll", [None, "given"])
@pytest.mark.parametrize("batch", [1, 7])
def test_orpo_loss(nll, batch):
    tensors = cpo_tensors(batch)
    if nll == "given":
        tensors["nll_loss"] = torch.tensor(1.7)
    # average log-probs on both sides of -ln 2, where log(1 - exp(x)) switches form, and a pair close to 0
    chosen, rejected = tensors["policy_chosen_logps"], tensors["policy_rejected_logps"]
    chosen[0], rejected[0] = -1e-4 * tensors["chosen_lengths"][0], -2e-4 * tensors["rejected_lengths"][0].clamp(min=1)
    if batch > 1:
        rejected[1] = -0.3 * tensors["rejected_lengths"][1].clamp(min=1)

    def fast(**t):
        return tuple(
            losses.orpo_loss(
                t.pop("policy_chosen_logps"),
                t.pop("policy_rejected_logps"),
                t.pop("chosen_lengths"),
                t.pop("rejected_lengths"),
                beta=0.2,
                **t,
            )
        )

    def reference(**t):
        return ref.orpo_loss(
            t.pop("policy_chosen_logps"),
            t.pop("policy_rejected_logps"),
            t.pop("chosen_lengths"),
            t.pop("rejected_lengths"),
            beta=0.2,
            **t,
        )

    assert_parity(fast, reference, tensors, name="orpo")


def ranked_tensors(batch, responses):
    lengths = torch.randint(0, 30, (batch, responses))
    return {"logps": -torch.rand(batch, responses) * 20, "lengths": lengths}


@pytest.mark.parametrize("shape", [(1, 2), (7, 4)])
def test_rrhf_loss(shape):
    assert_parity(
        lambda **t: losses.rrhf_loss(**t, sft_weight=0.3),
        lambda **t: ref.rrhf_loss(**t, sft_weight=0.3),
        ranked_tensors(*shape),
        name="rrhf",
    )


@pytest.mark.parametrize("with_rewards", [False, True])
@pytest.mark.parametrize("shape", [(1, 2), (7, 4)])
def test_pro_loss(shape, with_rewards):
    tensors = ranked_tensors(*shape)
    kw = {}
    if with_rewards:
        kw["reward_scores"] = torch.sort(torch.randn(shape), dim=1, descending=True).values
    assert_parity(lambda **t: losses.pro_loss(**t, **kw), lambda **t: ref.pro_loss(**t, **kw), tensors, name="pro")


def test_listwise_with_two_responses_is_pairwise():
    t = ranked_tensors(5, 2)
    average = t["logps"] / t["lengths"].clamp(min=1)
    pairwise = -torch.nn.functional.logsigmoid(average[:, 0] - average[:, 1]) - 0.05 * t["logps"][:, 0]
    assert_close(losses.pro_loss(**t), pairwise.mean(), rtol=RTOL, atol=ATOL, name="pro K=2")
    hinge = torch.relu(average[:, 1] - average[:, 0]) - t["logps"][:, 0]
    assert_close(losses.rrhf_loss(**t), hinge.mean(), rtol=RTOL, atol=ATOL, name="rrhf K=2")


def test_listwise_gradcheck():
    t = leaves(ranked_tensors(3, 3), torch.float64)
    rewards = torch.tensor([[2.0, 1.0, -0.5], [0.3, 0.2, 0.1], [1.0, 0.0, -1.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: losses.rrhf_loss(x, t["lengths"]), [t["logps"]])
    assert torch.autograd.gradcheck(lambda x: losses.pro_loss(x, t["lengths"], reward_scores=rewards), [t["logps"]])


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalty(kind):
    tensors = {"logps": -torch.rand(3, 5) * 4, "ref_logps": -torch.rand(3, 5) * 4}
    assert_parity(
        lambda **t: losses.kl_penalty(**t, kind=kind), lambda **t: ref.kl_penalty(**t, kind=kind), tensors, name=kind
    )
    if kind != "k1":
        assert torch.all(losses.kl_penalty(**tensors, kind=kind) >= 0)


def test_reference_free_gradcheck():
    t = leaves(cpo_tensors(3), torch.float64)
    lengths = {"chosen_lengths": t["chosen_lengths"], "rejected_lengths": t["rejected_lengths"]}
    for loss_type in ("sigmoid", "simpo", "ipo"):
        assert torch.autograd.gradcheck(
            lambda c, r, loss_type=loss_type: losses.cpo_loss(c, r, loss_type=loss_type, alpha=0.3, **lengths).loss,
            [t["policy_chosen_logps"], t["policy_rejected_logps"]],
        )
    assert torch.autograd.gradcheck(
        lambda c, r: losses.orpo_loss(c, r, **lengths).loss, [t["policy_chosen_logps"], t["policy_rejected_logps"]]
    )
    assert torch.autograd.gradcheck(
        lambda c, r: losses.bt_loss(c, r, center_rewards_coefficient=0.1),
        [t["policy_chosen_logps"], t["policy_rejected_logps"]],
    )


# --- bad input: every error names the argument ---

P = torch.randn(4) - 5
LEN = torch.full((4,), 3)


def _dpo(**kw):
    args = {"policy_chosen_logps": P, "policy_rejected_logps": P, "ref_chosen_logps": P, "ref_rejected_logps": P}
    args.update(kw)
    return losses.dpo_loss(
        args.pop("policy_chosen_logps"),
        args.pop("policy_rejected_logps"),
        args.pop("ref_chosen_logps"),
        args.pop("ref_rejected_logps"),
        **args,
    )


BAD_DPO = [
    ({"loss_type": "kto"}, ValueError, "loss_type.*sigmoid"),
    ({"loss_type": []}, ValueError, "loss_type"),
    ({"loss_type": ["sigmoid", "nope"]}, ValueError, "loss_type"),
    ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0]}, ValueError, "loss_weights"),
    ({"loss_weights": ["a"]}, TypeError, "loss_weights"),
    ({"beta": 0.0}, ValueError, "beta"),
    ({"beta": -1.0}, ValueError, "beta"),
    ({"beta": "0.1"}, TypeError, "beta"),
    ({"label_smoothing": 0.5}, ValueError, "label_smoothing"),
    ({"label_smoothing": -0.1}, ValueError, "label_smoothing"),
    ({"loss_type": "exo_pair"}, ValueError, "label_smoothing"),
    ({"f_divergence_type": "kl"}, ValueError, "f_divergence_type"),
    ({"loss_type": "nca_pair", "f_divergence_type": "forward_kl"}, ValueError, "f_divergence_type"),
    ({"loss_type": ["sigmoid", "aot"], "f_divergence_type": "alpha_divergence"}, ValueError, "f_divergence_type"),
    ({"f_alpha_divergence_coef": float("nan")}, ValueError, "f_alpha_divergence_coef"),
    ({"discopop_tau": 0.0}, ValueError, "discopop_tau"),
    ({"reference_free": 1}, TypeError, "reference_free"),
    ({"bco_delta": torch.zeros(2)}, ValueError, "bco_delta"),
    ({"bco_delta": "x"}, TypeError, "bco_delta"),
    ({"policy_chosen_logps": [1.0]}, TypeError, "policy_chosen_logps"),
    ({"policy_chosen_logps": torch.ones(4, dtype=torch.long)}, TypeError, "policy_chosen_logps"),
    ({"policy_chosen_logps": P.reshape(2, 2)}, ValueError, "policy_chosen_logps"),
    ({"policy_chosen_logps": P[:0], "policy_rejected_logps": P[:0]}, ValueError, "policy_chosen_logps"),
    ({"policy_rejected_logps": P[:3]}, ValueError, "policy_rejected_logps"),
    ({"ref_rejected_logps": P[:3]}, ValueError, "ref_rejected_logps"),
    ({"ref_chosen_logps": None}, ValueError, "ref_chosen_logps"),
    ({"reference_free": True}, ValueError, "ref_chosen_logps"),
    ({"loss_type": "ipo"}, ValueError, "chosen_lengths"),
    ({"loss_type": "sigmoid_norm", "chosen_lengths": LEN}, ValueError, "rejected_lengths"),
    ({"loss_type": "sft"}, ValueError, "chosen_lengths"),
    ({"loss_type": "ipo", "chosen_lengths": LEN[:2], "rejected_lengths": LEN}, ValueError, "chosen_lengths"),
    ({"loss_type": "ipo", "chosen_lengths": LEN > 0, "rejected_lengths": LEN}, TypeError, "chosen_lengths"),
    ({"pair_weights": torch.ones(3)}, ValueError, "pair_weights"),
    ({"loss_type": "aot", "pair_weights": torch.ones(4)}, ValueError, "pair_weights"),
    ({"ref_chosen_logps": P.to("meta")}, ValueError, "ref_chosen_logps on meta"),
    ({"loss_type": "sft", "chosen_lengths": LEN, "batch_pairs": 4}, ValueError, "batch_chosen_tokens"),
    ({"batch_chosen_tokens": 12}, ValueError, "batch_pairs"),
    ({"batch_chosen_tokens": 12, "batch_pairs": 3}, ValueError, "batch_pairs"),
    ({"batch_chosen_tokens": 12, "batch_pairs": 4.0}, TypeError, "batch_pairs"),
    ({"batch_chosen_tokens": 12.0, "batch_pairs": 4}, TypeError, "batch_chosen_tokens"),
    ({"batch_chosen_tokens": -1, "batch_pairs": 4}, ValueError, "batch_chosen_tokens"),
    ({"batch_chosen_tokens": LEN, "batch_pairs": 4}, ValueError, "batch_chosen_tokens"),
    ({"batch_chosen_tokens": torch.tensor(True), "batch_pairs": 4}, TypeError, "batch_chosen_tokens"),
    ({"batch_chosen_tokens": torch.tensor(12, device="meta"), "batch_pairs": 4}, ValueError, "batch_chosen_tokens"),
    (
        {
            "loss_type": "sft",
            "chosen_lengths": LEN,
            "pair_weights": torch.ones(4),
            "batch_chosen_tokens": 20,
            "batch_pairs": 8,
        },
        ValueError,
        "pair_weights",
    ),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_DPO, ids=[m for _, _, m in BAD_DPO])
def test_dpo_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        _dpo(**kwargs)


def test_check_dpo_options_alone():
    losses.check_dpo_options("sigmoid", beta=0.5)
    with pytest.raises(ValueError, match="loss_type"):
        losses.check_dpo_options("dpo")
    with pytest.raises(ValueError, match="loss_type"):
        losses.is_batch_coupled("dpo")


LABELS = paired_labels(2, 5)
BAD_OTHER = [
    (lambda: losses.ld_token_weights(LABELS.float(), 0.5), TypeError, "labels"),
    (lambda: losses.ld_token_weights(LABELS[:3], 0.5), ValueError, "labels"),
    (lambda: losses.ld_token_weights(LABELS, 1.5), ValueError, "ld_alpha"),
    (lambda: losses.ld_token_weights(LABELS, 0.5, dtype=torch.long), TypeError, "dtype"),
    (
        lambda: losses.wpo_weights(P.reshape(2, 2), P.reshape(2, 2)[:1], LABELS[:2, :2] != 0),
        ValueError,
        "log_sum_sq_probs",
    ),
    (lambda: losses.wpo_weights(P.reshape(2, 2), P.reshape(2, 2), LABELS != 0), ValueError, "mask"),
    (lambda: losses.wpo_weights(P[:3].reshape(3, 1), P[:3].reshape(3, 1), LEN[:3, None]), ValueError, "token_logps"),
    (lambda: losses.bt_loss(P, P[:3]), ValueError, "rejected_rewards"),
    (lambda: losses.bt_loss(P, P, margin=torch.ones(3)), ValueError, "margin"),
    (lambda: losses.bt_loss(P, P, center_rewards_coefficient="a"), TypeError, "center_rewards_coefficient"),
    (lambda: losses.cpo_loss(P, P, loss_type="kto_pair"), ValueError, "loss_type"),
    (lambda: losses.cpo_loss(P, P, cpo_alpha=0.0, loss_type="simpo"), ValueError, "chosen_lengths"),
    (lambda: losses.cpo_loss(P, P, chosen_lengths=LEN, loss_type="ipo", cpo_alpha=0.0), ValueError, "rejected_lengths"),
    (lambda: losses.cpo_loss(P, P), ValueError, "chosen_lengths"),
    (lambda: losses.cpo_loss(P, P, beta=0), ValueError, "beta"),
    (lambda: losses.cpo_loss(P, P, label_smoothing=0.7), ValueError, "label_smoothing"),
    (lambda: losses.simpo_loss(P, P, LEN, LEN, simpo_gamma=None), TypeError, "simpo_gamma"),
    (lambda: losses.orpo_loss(P, P, None, LEN), ValueError, "chosen_lengths"),
    (lambda: losses.orpo_loss(P, P, LEN, LEN, nll_loss=P), ValueError, "nll_loss"),
    (lambda: losses.orpo_loss(P, P[:2], LEN, LEN), ValueError, "policy_rejected_logps"),
    (lambda: losses.rrhf_loss(P.reshape(4, 1), LEN.reshape(4, 1)), ValueError, "logps"),
    (lambda: losses.rrhf_loss(P.reshape(2, 2), LEN), ValueError, "lengths"),
    (lambda: losses.rrhf_loss(P.reshape(2, 2), LEN.reshape(2, 2), sft_weight=None), TypeError, "sft_weight"),
    (lambda: losses.pro_loss(P.reshape(2, 2), LEN.reshape(2, 2), reward_scores=P), ValueError, "reward_scores"),
    (lambda: losses.kl_penalty(P, P[:2]), ValueError, "ref_logps"),
    (lambda: losses.kl_penalty(P, P, kind="k4"), ValueError, "kind"),
    (lambda: losses.kl_penalty(LEN, P), TypeError, "logps"),
]


@pytest.mark.parametrize("call,error,match", BAD_OTHER, ids=[m for _, _, m in BAD_OTHER])
def test_other_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
