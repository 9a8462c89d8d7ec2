"""Training: every backward function, value_and_grad, named_parameters and the optimizers.

- Each function of llama_np/training/backward.py against float64 central differences of its
  forward twin in layers.py / losses.py (a directional derivative along a random direction,
  FINITE_DIFFERENCE_TOLERANCE), on small random inputs: GQA and MQA, causal and padding masks,
  ignored labels, the padding row of the embedding.
- value_and_grad on the fixture checkpoints (float64) against central differences of the whole
  model's loss, one parameter at a time.
- value_and_grad (float32) against torch autograd's gradients, and 5 AdamW steps against torch's
  losses, stored by tests/reference/make_training_reference.py in tests/data/training/.
- The optimizers, clipping and the schedule against torch's, stored in the same place.
- DPO: TRL's sigmoid loss and the summed completion log-probabilities, against torch autograd
  and float64 central differences.
Neither torch nor transformers is needed here.
"""

import functools
import json
from pathlib import Path

import numpy as np
import pytest

import llama_np
from llama_np import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel, layers, losses
from llama_np.errors import InputError
from llama_np import value_and_grad
from llama_np.training import backward, dpo
from llama_np.training.optim import SGD, AdamW, clip_grad_norm, cosine_with_warmup
from tolerance import (
    TRAINING_LOSS_TOLERANCE,
    assert_close,
    assert_directional_derivative,
    assert_gradient_close,
    assert_loss_close_to_reference,
)

FIXTURES = Path(__file__).parent / "data" / "fixtures"
FIXTURE_CASES = json.loads((FIXTURES / "manifest.json").read_text())["cases"]
TRAINING = Path(__file__).parent / "data" / "training"
TRAINING_MANIFEST = json.loads((TRAINING / "manifest.json").read_text())
EPSILON = 1e-6  # the step of the central differences, in float64

rng = np.random.default_rng(2024)


def assert_backward_matches_central_differences(forward, inputs, grads, cotangent, what):
    """For each input named in ``grads``: <grad, d> against the central difference along d of
    <cotangent, forward(**inputs)>, d a random direction. ``grads`` is what the backward
    function returned for the upstream gradient ``cotangent``."""
    for name, grad in grads.items():
        direction = rng.normal(size=np.shape(inputs[name]))

        def objective(sign):
            moved = dict(inputs, **{name: inputs[name] + sign * EPSILON * direction})
            return np.sum(cotangent * forward(**moved))

        central = (objective(1) - objective(-1)) / (2 * EPSILON)
        assert_directional_derivative(np.sum(grad * direction), central, f"{what}: d/d{name}")


def normal(*shape):
    return rng.normal(size=shape)


def causal_mask(padding, batch, length):
    """The additive mask of a batch: None, "right" or "left" padding of the second row."""
    padding_mask = None
    if padding is not None:
        padding_mask = np.ones((batch, length), dtype=np.int64)
        if padding == "right":
            padding_mask[1, -2:] = 0
        else:
            padding_mask[1, :2] = 0
    return layers.attention_mask(padding_mask, length, 0, batch, np.float64), padding_mask


# ---------------------------------------------------------------------------- each backward function


def test_embedding_backward_matches_finite_differences_with_repeated_tokens():
    input_ids = np.array([[3, 1, 3, 0], [2, 3, 5, 1]])  # token 3 three times: its row sums three gradients
    table = normal(6, 4)
    cotangent = normal(2, 4, 4)
    grad = backward.embedding_backward(cotangent, input_ids, 6)
    assert_backward_matches_central_differences(lambda table: layers.embedding(input_ids, table),
                                                {"table": table}, {"table": grad}, cotangent, "embedding")


def test_embedding_backward_gives_the_padding_row_no_gradient():
    input_ids = np.array([[0, 0, 4, 2]])
    cotangent = normal(1, 4, 3)
    plain = backward.embedding_backward(cotangent, input_ids, 5)
    padded = backward.embedding_backward(cotangent, input_ids, 5, padding_idx=0)
    assert np.all(padded[0] == 0) and np.any(plain[0] != 0)
    np.testing.assert_array_equal(padded[1:], plain[1:])


def test_rms_norm_backward_matches_finite_differences_through_the_rms():
    x, weight, eps = normal(2, 5, 8), normal(8), 1e-5
    cotangent = normal(2, 5, 8)
    seen = {}
    layers.rms_norm(x, weight, eps, layers.recorder(seen))
    grad_x, grad_weight = backward.rms_norm_backward(cotangent, seen["hook_normalized"], seen["hook_scale"], weight)
    assert_backward_matches_central_differences(lambda x, weight: layers.rms_norm(x, weight, eps),
                                                {"x": x, "weight": weight}, {"x": grad_x, "weight": grad_weight},
                                                cotangent, "rms_norm")


@pytest.mark.parametrize("attention_factor", [1.0, 1.25], ids=["plain", "yarn_factor"])
def test_apply_rope_backward_matches_finite_differences(attention_factor):
    inv_freq, _ = layers.default_rope_frequencies(8, 10000.0, np.float64)
    positions = np.array([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
    cos, sin = layers.rope_cos_sin(positions, inv_freq, attention_factor, np.float64)
    x, cotangent = normal(2, 3, 5, 8), normal(2, 3, 5, 8)
    grad = backward.apply_rope_backward(cotangent, cos, sin)
    assert_backward_matches_central_differences(lambda x: layers.apply_rope(x, cos, sin), {"x": x}, {"x": grad},
                                                cotangent, "apply_rope")


def test_apply_rope_backward_of_a_plain_rotation_is_the_rotation_by_minus_the_angle():
    inv_freq, _ = layers.default_rope_frequencies(8, 10000.0, np.float64)
    cos, sin = layers.rope_cos_sin(np.array([[0, 5, 17]]), inv_freq, 1.0, np.float64)
    x = normal(1, 2, 3, 8)
    np.testing.assert_allclose(backward.apply_rope_backward(layers.apply_rope(x, cos, sin), cos, sin), x,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_rep", [1, 2, 4])
def test_repeat_kv_backward_sums_each_group_and_matches_finite_differences(n_rep):
    x = normal(2, 2, 5, 4)
    cotangent = normal(2, 2 * n_rep, 5, 4)
    grad = backward.repeat_kv_backward(cotangent, n_rep)
    assert grad.shape == x.shape
    assert_backward_matches_central_differences(lambda x: layers.repeat_kv(x, n_rep), {"x": x}, {"x": grad},
                                                cotangent, f"repeat_kv n_rep={n_rep}")


def test_softmax_backward_matches_finite_differences():
    scores, cotangent = normal(2, 3, 6), normal(2, 3, 6)
    grad = backward.softmax_backward(cotangent, layers.softmax(scores))
    assert_backward_matches_central_differences(lambda scores: layers.softmax(scores), {"scores": scores},
                                                {"scores": grad}, cotangent, "softmax")


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_attention_scores_backward_matches_finite_differences(heads, kv_heads):
    # The additive mask is a constant (test_attention_backward… covers it): its finfo.min
    # entries would only overflow the objective here.
    q, k, scaling = normal(2, heads, 5, 8), normal(2, kv_heads, 5, 8), 8 ** -0.5
    cotangent = normal(2, heads, 5, 5)
    grad_q, grad_k = backward.attention_scores_backward(cotangent, q, k, scaling)
    assert_backward_matches_central_differences(lambda q, k: layers.attention_scores(q, k, None, scaling),
                                                {"q": q, "k": k}, {"q": grad_q, "k": grad_k}, cotangent,
                                                "attention_scores")


@pytest.mark.parametrize("padding", [None, "right", "left"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_attention_backward_matches_finite_differences_with_causal_and_padding_masks(heads, kv_heads, padding):
    batch, length, head_dim = 2, 6, 8
    q, k, v = normal(batch, heads, length, head_dim), normal(batch, kv_heads, length, head_dim), normal(
        batch, kv_heads, length, head_dim)
    mask, padding_mask = causal_mask(padding, batch, length)
    cotangent = normal(batch, heads, length, head_dim)
    if padding_mask is not None:
        # A left-padding query row sees no key: its weights are uniform and meaningless, and its
        # float64 scores round to finfo.min whatever q and k are, so nothing reads it.
        cotangent *= padding_mask[:, None, :, None]
    seen = {}
    layers.attention(q, k, v, mask, head_dim ** -0.5, layers.recorder(seen))
    grad_q, grad_k, grad_v = backward.attention_backward(cotangent, q, k, v, seen["hook_pattern"], head_dim ** -0.5)
    assert grad_k.shape == k.shape and grad_v.shape == v.shape
    assert_backward_matches_central_differences(
        lambda q, k, v: layers.attention(q, k, v, mask, head_dim ** -0.5), {"q": q, "k": k, "v": v},
        {"q": grad_q, "k": grad_k, "v": grad_v}, cotangent, f"attention {heads}/{kv_heads} padding={padding}")


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("pretraining_tp", [1, 2])
def test_linear_backward_matches_finite_differences(with_bias, pretraining_tp):
    x, weight, bias = normal(2, 3, 6), normal(5, 6), normal(5)
    cotangent = normal(2, 3, 5)
    grad_x, grad_weight, grad_bias = backward.linear_backward(cotangent, x, weight, with_bias)
    inputs, grads = {"x": x, "weight": weight}, {"x": grad_x, "weight": grad_weight}
    if with_bias:
        inputs["bias"], grads["bias"] = bias, grad_bias
    else:
        assert grad_bias is None
    assert_backward_matches_central_differences(
        lambda x, weight, bias=None: layers.linear(x, weight, bias, pretraining_tp), inputs, grads, cotangent,
        f"linear pretraining_tp={pretraining_tp}")


def test_silu_backward_matches_finite_differences():
    x, cotangent = 3 * normal(4, 7), normal(4, 7)
    assert_backward_matches_central_differences(layers.silu, {"x": x}, {"x": backward.silu_backward(cotangent, x)},
                                                cotangent, "silu")


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_swiglu_backward_matches_finite_differences(with_bias):
    x, gate_proj, up_proj, down_proj = normal(2, 3, 6), normal(10, 6), normal(10, 6), normal(6, 10)
    biases = {"gate_bias": normal(10), "up_bias": normal(10), "down_bias": normal(6)} if with_bias else {}
    cotangent = normal(2, 3, 6)
    seen = {}
    layers.swiglu(x, gate_proj, up_proj, down_proj, **biases, tap=layers.recorder(seen))
    grad_x, grads = backward.swiglu_backward(cotangent, x, seen["hook_pre"], seen["hook_pre_linear"],
                                             seen["hook_post"], gate_proj, up_proj, down_proj, with_bias)
    inputs = {"x": x, "gate_proj": gate_proj, "up_proj": up_proj, "down_proj": down_proj, **biases}
    assert sorted(grads) == sorted(name for name in inputs if name != "x")
    assert_backward_matches_central_differences(lambda **given: layers.swiglu(**given), inputs,
                                                {"x": grad_x, **grads}, cotangent, "swiglu")


# ---------------------------------------------------------------------------- the losses' gradients


def test_cross_entropy_backward_divides_by_the_kept_targets_and_ignores_minus_100():
    logits = normal(6, 5)
    targets = np.array([1, -100, 4, 0, -100, 2])
    grad = backward.cross_entropy_backward(logits, targets)
    assert np.all(grad[targets == -100] == 0)
    assert_backward_matches_central_differences(lambda logits: losses.cross_entropy(logits, targets),
                                                {"logits": logits}, {"logits": grad}, 1.0, "cross_entropy")


def test_causal_lm_loss_backward_matches_finite_differences_with_ignored_labels():
    logits = normal(2, 5, 7)
    labels = np.array([[-100, 3, 6, -100, 1], [2, 0, -100, 5, 5]])
    grad = backward.causal_lm_loss_backward(logits, labels)
    assert np.all(grad[:, -1] == 0)  # the last position predicts nothing
    assert_backward_matches_central_differences(lambda logits: losses.causal_lm_loss(logits, labels),
                                                {"logits": logits}, {"logits": grad}, 1.0, "causal_lm_loss")


@pytest.mark.parametrize("problem_type,labels", [
    ("regression", np.array([0.5, -1.0, 2.0])),
    ("single_label_classification", np.array([2, -100, 0])),
    ("multi_label_classification", np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])),
], ids=["regression", "single_label", "multi_label"])
def test_classification_loss_backward_matches_finite_differences(problem_type, labels):
    num_labels = 1 if problem_type == "regression" else 3
    pooled = normal(3, num_labels)
    grad = backward.classification_loss_backward(pooled, labels, problem_type)
    assert_backward_matches_central_differences(
        lambda pooled: losses.classification_loss(pooled, labels, num_labels, problem_type)[0],
        {"pooled": pooled}, {"pooled": grad}, 1.0, problem_type)


def test_pooling_backward_puts_the_gradient_at_the_last_non_pad_token():
    logits, index = normal(3, 5, 2), np.array([4, 2, 0])
    cotangent = normal(3, 2)
    grad = backward.pooling_backward(cotangent, index, 5)
    assert_backward_matches_central_differences(lambda logits: logits[np.arange(3), index], {"logits": logits},
                                                {"logits": grad}, cotangent, "pooling")


# ---------------------------------------------------------------------------- value_and_grad on the fixtures


@functools.lru_cache(maxsize=None)
def fixture_batch(case, call):
    with np.load(FIXTURES / case / "reference.npz") as stored:
        return tuple(stored[f"{call}.{field}"] for field in ("input_ids", "attention_mask", "labels"))


def load_fixture(case, dtype=np.float32):
    model_class = getattr(llama_np, FIXTURE_CASES[case]["model_class"])
    return model_class.from_pretrained(str(FIXTURES / case), dtype=dtype)


FINITE_DIFFERENCE_CALLS = [
    ("gqa_f32", "forward"), ("gqa_f32", "padded"), ("mqa_tied_f16", "forward"),
    ("mha_bf16_sharded_4x", "forward"), ("bias_head_dim", "forward"), ("pretraining_tp2", "forward"),
    ("rope_llama3", "forward"), ("rope_yarn", "forward"), ("rope_dynamic", "forward"),
    ("seqcls_regression", "left"), ("seqcls_regression", "right"), ("seqcls_single_label", "left"),
    ("seqcls_single_label", "right"), ("seqcls_multi_label", "left"), ("seqcls_multi_label", "right"),
]


@pytest.mark.parametrize("case,call", FINITE_DIFFERENCE_CALLS, ids=[f"{c}-{k}" for c, k in FINITE_DIFFERENCE_CALLS])
def test_value_and_grad_matches_finite_differences_of_the_whole_model_in_float64(case, call):
    model = load_fixture(case, np.float64)
    input_ids, attention_mask, labels = fixture_batch(case, call)
    if model.config.pad_token_id is None and not attention_mask.all():
        # A left-padding row's logits are those of a query that sees no key (uniform weights whose
        # float64 scores round to finfo.min, so a central difference cannot see q or k move them):
        # score only real rows, as a training batch should.
        labels = labels.copy()
        labels[:, 1:][attention_mask[:, :-1] == 0] = -100
    loss, grads = value_and_grad(model, input_ids, attention_mask, labels)
    for name, parameter in model.named_parameters():
        direction = rng.normal(size=parameter.shape)

        def moved_loss(sign):
            parameter[...] += sign * EPSILON * direction
            try:
                return model(input_ids, attention_mask=attention_mask, labels=labels).loss
            finally:
                parameter[...] -= sign * EPSILON * direction

        central = (moved_loss(1) - moved_loss(-1)) / (2 * EPSILON)
        assert_directional_derivative(np.sum(grads[name] * direction), central, f"{case} {call}: {name}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case,call", [("gqa_f32", "padded"), ("seqcls_single_label", "left")])
def test_value_and_grad_gives_the_models_own_loss_and_the_parameters_shapes(case, call, dtype):
    model = load_fixture(case, dtype)
    input_ids, attention_mask, labels = fixture_batch(case, call)
    logits = model(input_ids, attention_mask=attention_mask).logits
    loss, grads = value_and_grad(model, input_ids, attention_mask, labels)
    assert loss == model(input_ids, attention_mask=attention_mask, labels=labels).loss
    parameters = model.named_parameters()
    assert list(grads) == [name for name, _ in parameters]
    assert all(grads[name].shape == value.shape and grads[name].dtype == dtype for name, value in parameters)
    np.testing.assert_array_equal(model(input_ids, attention_mask=attention_mask).logits, logits)


def test_value_and_grad_refuses_a_model_without_a_head_and_a_call_without_labels():
    model = load_fixture("gqa_f32")
    input_ids = fixture_batch("gqa_f32", "forward")[0]
    with pytest.raises(InputError, match="needs labels"):
        value_and_grad(model, input_ids)
    with pytest.raises(InputError, match="LlamaModel"):
        value_and_grad(LlamaModel(model.config, model.weights), input_ids, labels=input_ids)


# ---------------------------------------------------------------------------- named_parameters


def test_named_parameters_lists_every_checkpoint_tensor_once_writable_in_the_compute_dtype():
    for case in ("gqa_f32", "bias_head_dim", "seqcls_regression"):
        model = load_fixture(case, np.float64)
        parameters = model.named_parameters()
        assert sorted(name for name, _ in parameters) == sorted(model.checkpoint)
        assert all(value.dtype == np.float64 and value.flags.writeable for _, value in parameters)


def test_named_parameters_lists_tied_embeddings_once():
    model = load_fixture("mqa_tied_f16")
    names = [name for name, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and names.count("model.embed_tokens.weight") == 1


def test_a_parameter_changed_in_place_is_what_the_next_forward_uses():
    model = load_fixture("mqa_tied_f16")  # float16 storage: the parameters are widened copies
    input_ids = fixture_batch("mqa_tied_f16", "forward")[0]
    before = model(input_ids).logits
    parameters = dict(model.named_parameters())
    parameters["model.norm.weight"] *= 2  # the final norm's weight scales every logit
    assert model.weights["model.norm.weight"] is parameters["model.norm.weight"]
    assert_close(model(input_ids).logits, 2 * before, "logits after doubling the final norm")


def test_a_float32_checkpoint_is_trained_on_a_copy_and_its_file_is_left_alone():
    model = load_fixture("gqa_f32")
    stored = model.checkpoint["model.norm.weight"].numpy()  # a read-only view of the memory map
    parameters = dict(model.named_parameters())
    parameters["model.norm.weight"] += 1
    np.testing.assert_array_equal(load_fixture("gqa_f32").weights["model.norm.weight"], stored)


def test_named_parameters_refuses_a_streamed_model():
    model = LlamaForCausalLM.from_pretrained(str(FIXTURES / "mqa_tied_f16"), keep_widened=False)
    with pytest.raises(InputError, match="keep_widened=True"):
        model.named_parameters()


# ---------------------------------------------------------------------------- against torch autograd


def training_reference(case):
    with np.load(TRAINING / f"{case}.npz") as stored:
        return {key: stored[key] for key in stored.files}


def training_model(case, dtype=np.float32):
    return load_fixture(TRAINING_MANIFEST["cases"][case]["fixture"], dtype)


@pytest.mark.parametrize("case", sorted(TRAINING_MANIFEST["cases"]))
def test_gradients_match_torch_autograd(case):
    reference = training_reference(case)
    model = training_model(case)
    loss, grads = value_and_grad(model, reference["inputs.input_ids"], reference["inputs.attention_mask"],
                                 reference["inputs.labels"])
    assert_loss_close_to_reference(loss, reference["loss"], f"{case}: loss")
    assert list(grads) == list(reference["parameter_names"]), f"{case}: parameters differ from torch's, or their order"
    for name in grads:
        assert_gradient_close(grads[name], reference[f"grad.{name}"], f"{case}: gradient of {name}")


@pytest.mark.parametrize("case", sorted(TRAINING_MANIFEST["cases"]))
def test_five_adamw_steps_track_torchs_losses(case):
    reference = training_reference(case)
    settings = TRAINING_MANIFEST["adamw"]
    model = training_model(case)
    batch = (reference["inputs.input_ids"], reference["inputs.attention_mask"], reference["inputs.labels"])
    optimizer = AdamW(model.named_parameters(), lr=settings["lr"], betas=tuple(settings["betas"]),
                      eps=settings["eps"], weight_decay=settings["weight_decay"])
    losses_seen = []
    for _ in range(settings["steps"]):
        loss, grads = value_and_grad(model, *batch)
        losses_seen.append(loss)
        optimizer.step(grads)
    losses_seen.append(model(batch[0], attention_mask=batch[1], labels=batch[2]).loss)
    assert_close(losses_seen, reference["adamw_losses"], f"{case}: losses of {settings['steps']} AdamW steps",
                 TRAINING_LOSS_TOLERANCE)


# ---------------------------------------------------------------------------- the optimizers


@functools.lru_cache(maxsize=None)
def optim_reference():
    with np.load(TRAINING / "optim.npz") as stored:
        return {key: stored[key] for key in stored.files}


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_steps_equal_torchs(name):
    reference = optim_reference()
    parameter = reference["start"].copy()
    optimizer = (AdamW({"p": parameter}, lr=0.1, weight_decay=0.1) if name == "adamw"
                 else SGD({"p": parameter}, lr=0.1, momentum=0.9, weight_decay=0.01))
    for step, expected in enumerate(reference[f"{name}.after"]):
        optimizer.step({"p": reference["grads"][step]})
        assert_close(parameter, expected, f"{name} after step {step + 1}", 1e-6)


def test_clip_grad_norm_equals_torchs():
    reference = optim_reference()
    grads = {"a": reference["clip.grad_a"].copy(), "b": reference["clip.grad_b"].copy()}
    norm = clip_grad_norm(grads, max_norm=1.0)
    assert_close(norm, reference["clip.norm"], "norm before clipping", 1e-6)
    assert_close(grads["a"], reference["clip.clipped_a"], "clipped gradient a", 1e-6)
    assert_close(grads["b"], reference["clip.clipped_b"], "clipped gradient b", 1e-6)


def test_cosine_with_warmup_equals_transformers_schedule_until_the_last_step():
    rates = [cosine_with_warmup(step, 1e-3, warmup_steps=10, total_steps=50) for step in range(60)]
    np.testing.assert_allclose(rates[:51], optim_reference()["schedule.lr"][:51], rtol=1e-12, atol=1e-18)
    # Past total_steps Transformers' cosine climbs back up; ours stays at min_lr.
    assert optim_reference()["schedule.lr"][55] > 0 and rates[51:] == [0.0] * 9


def test_a_step_without_a_parameters_gradient_is_refused():
    optimizer = AdamW({"w": np.zeros(3)}, lr=0.1)
    with pytest.raises(InputError, match="no gradient for parameter 'w'"):
        optimizer.step({})
    with pytest.raises(InputError, match="has shape"):
        optimizer.step({"w": np.zeros(4)})


def test_classifier_training_takes_the_problem_type_the_loss_inferred():
    model = LlamaForSequenceClassification.from_pretrained(str(FIXTURES / "seqcls_multi_label"))
    input_ids, attention_mask, labels = fixture_batch("seqcls_multi_label", "right")
    assert model.config.problem_type is None
    value_and_grad(model, input_ids, attention_mask, labels)
    assert model.config.problem_type == "multi_label_classification"


# ---------------------------------------------------------------------------- DPO


def test_dpo_loss_is_ln_2_when_the_policy_is_the_reference():
    policy = rng.normal(-30.0, 5.0, size=4)
    assert abs(dpo.dpo_loss(policy[:2], policy[2:], policy[:2], policy[2:]) - np.log(2)) < 1e-15


def test_dpo_loss_backward_and_token_log_probs_backward_match_finite_differences():
    arrays = [rng.normal(-20.0, 3.0, size=3) for _ in range(4)]
    grad_chosen, grad_rejected = dpo.dpo_loss_backward(*arrays, beta=0.5)
    assert_backward_matches_central_differences(
        lambda chosen, rejected: dpo.dpo_loss(chosen, rejected, arrays[2], arrays[3], beta=0.5),
        {"chosen": arrays[0], "rejected": arrays[1]}, {"chosen": grad_chosen, "rejected": grad_rejected},
        1.0, "dpo_loss")
    logits, input_ids = normal(2, 6, 9), rng.integers(0, 9, size=(2, 6))
    mask = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=bool)
    cotangent = normal(2)
    grad = dpo.token_log_probs_backward(cotangent, logits, input_ids, mask)
    assert_backward_matches_central_differences(lambda logits: dpo.token_log_probs(logits, input_ids, mask),
                                                {"logits": logits}, {"logits": grad}, cotangent, "token_log_probs")


def dpo_reference():
    with np.load(TRAINING / "dpo.npz") as stored:
        return {key: stored[key] for key in stored.files}


def test_dpo_value_and_grad_matches_torch_autograd_on_trls_sigmoid_loss():
    reference = dpo_reference()
    model = load_fixture("gqa_f32")
    ids, mask, completion = reference["input_ids"], reference["attention_mask"], reference["completion_mask"]
    assert_close(dpo.sequence_log_probs(model, ids, completion, mask), reference["policy_log_probs"],
                 "summed completion log-probabilities")
    loss, grads = dpo.dpo_value_and_grad(model, ids, completion, reference["reference_log_probs"], mask,
                                         beta=float(reference["beta"]))
    assert_loss_close_to_reference(loss, reference["loss"], "DPO loss")
    assert list(grads) == list(reference["parameter_names"])
    for name in grads:
        assert_gradient_close(grads[name], reference[f"grad.{name}"], f"DPO gradient of {name}")


def test_dpo_value_and_grad_matches_finite_differences_in_float64():
    reference = dpo_reference()
    model = load_fixture("gqa_f32", np.float64)
    ids, mask, completion = reference["input_ids"], reference["attention_mask"], reference["completion_mask"]
    ref_log_probs = reference["reference_log_probs"].astype(np.float64)

    def loss_now():
        policy = dpo.sequence_log_probs(model, ids, completion, mask)
        return dpo.dpo_loss(policy[:2], policy[2:], ref_log_probs[:2], ref_log_probs[2:], beta=0.1)

    loss, grads = dpo.dpo_value_and_grad(model, ids, completion, ref_log_probs, mask, beta=0.1)
    assert loss == loss_now()
    for name, parameter in model.named_parameters():
        direction = rng.normal(size=parameter.shape)
        parameter += EPSILON * direction
        plus = loss_now()
        parameter -= 2 * EPSILON * direction
        minus = loss_now()
        parameter += EPSILON * direction
        assert_directional_derivative(np.sum(grads[name] * direction), (plus - minus) / (2 * EPSILON), name)


def test_dpo_refuses_an_odd_batch_and_a_misshapen_reference():
    model = load_fixture("gqa_f32")
    ids = np.ones((3, 5), dtype=np.int64)
    with pytest.raises(InputError, match="even number of rows"):
        dpo.dpo_value_and_grad(model, ids, np.ones_like(ids), np.zeros(3))
    with pytest.raises(InputError, match="one value per row"):
        dpo.dpo_value_and_grad(model, ids[:2], np.ones_like(ids[:2]), np.zeros(3))


def test_value_and_grad_of_a_causal_lm_gives_the_models_loss_to_the_last_bit():
    model = LlamaForCausalLM.from_pretrained(str(FIXTURES / "gqa_f32"))
    ids = rng.integers(3, model.config.vocab_size, size=(2, 9))
    mask = np.ones_like(ids)
    mask[0, :3] = 0  # left padding
    labels = np.where(mask == 1, ids, -100)
    loss, _ = value_and_grad(model, ids, attention_mask=mask, labels=labels)
    assert loss == model(ids, attention_mask=mask, labels=labels).loss  # one softmax serves loss and gradient
    with pytest.raises(InputError, match=r"labels must be in \[0, "):
        value_and_grad(model, ids, labels=np.full_like(ids, model.config.vocab_size))


def test_the_optimizers_are_reached_as_llama_np_optim():
    import llama_np
    from llama_np.training import optim

    assert llama_np.optim is optim and llama_np.optim.AdamW is optim.AdamW
