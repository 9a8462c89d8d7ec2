"""The classroom checkers pass the library's own functions and name each classic mistake.

Every buggy function below is written here the way a student might write it, independently of
the wrong versions inside the checkers, so each test shows that the checker recognises the
mistake from its outputs alone.
"""

import numpy as np
import pytest

from llama_np import layers
from llama_np.formats.locate import bundled_model_names
from llama_np.exercises import (
    check_apply_rope,
    check_attention,
    check_cross_entropy_backward,
    check_head_ablation,
    check_pooling,
    check_repeat_kv,
    check_repeat_kv_backward,
    check_rms_norm,
    check_rms_norm_backward,
    check_rope_frequencies,
    check_softmax_backward,
    check_swiglu,
    check_top_p,
)
from llama_np.exercises.samples import BUNDLED_MODEL, model_sample
from llama_np.generation import top_p_filter
from llama_np.model import last_non_pad_index
from llama_np.training import backward


def assert_fails_with(result, mistake, phrase):
    assert not result.passed
    assert result.fraction_correct < 1.0
    assert result.mistake == mistake, result.report
    assert phrase in result.hint, result.hint


# ---------------------------------------------------------------------------- the library passes

LIBRARY_FUNCTIONS = [
    (check_rms_norm, layers.rms_norm),
    (check_rope_frequencies, lambda head_dim, theta: layers.default_rope_frequencies(head_dim, theta)),
    (check_apply_rope, layers.apply_rope),
    (check_repeat_kv, layers.repeat_kv),
    (check_attention, layers.attention),
    (check_swiglu, layers.swiglu),
    (check_pooling, last_non_pad_index),
    (check_top_p, top_p_filter),
]


@pytest.mark.parametrize("prefer_bundled", [True, False], ids=["bundled-if-installed", "random-stand-in"])
@pytest.mark.parametrize("checker, function", LIBRARY_FUNCTIONS, ids=lambda x: getattr(x, "__name__", ""))
def test_each_checker_passes_the_librarys_own_function(checker, function, prefer_bundled):
    result = checker(function, verbose=False, prefer_bundled=prefer_bundled)
    assert result.passed, result.report
    assert result.fraction_correct == 1.0 and result.hint is None and result.mistake is None
    assert len(result.cases) >= 4


def test_meta_layout_check_passes_the_interleaved_rotation():
    result = check_apply_rope(layers.apply_rope_interleaved, layout="meta", verbose=False)
    assert result.passed, result.report


def test_cases_come_from_the_bundled_model_when_it_is_installed():
    source = model_sample().source
    assert ("bundled" in source) == (BUNDLED_MODEL in bundled_model_names())
    assert "random" in model_sample(prefer_bundled=False).source


# ---------------------------------------------------------------------------- the listed mistakes


def rms_norm_eps_outside_root(x, weight, eps):
    rms = np.sqrt((x ** 2).mean(axis=-1, keepdims=True))
    return weight * x / (rms + eps)


def test_rms_norm_with_eps_outside_the_root_is_named():
    assert_fails_with(check_rms_norm(rms_norm_eps_outside_root, verbose=False),
                      "eps outside the square root", "inside the square root")


def rope_adjacent_pairs(x, cos, sin):
    half = x.shape[-1] // 2
    c, s = cos[:, None, :, :half], sin[:, None, :, :half]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * c - odd * s
    out[..., 1::2] = even * s + odd * c
    return out


def rope_halves(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def test_rope_rotating_adjacent_pairs_is_named():
    assert_fails_with(check_apply_rope(rope_adjacent_pairs, verbose=False),
                      "adjacent pairs instead of halves", "pairs dimension i with i + hd/2")


def test_meta_rope_rotating_halves_is_named():
    assert_fails_with(check_apply_rope(rope_halves, layout="meta", verbose=False),
                      "halves instead of adjacent pairs", "adjacent dimensions")


def repeat_kv_tiled(x, n_rep):
    return np.concatenate([x] * n_rep, axis=1)


def attention_with_tiled_heads(q, k, v, mask, scaling):
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv_tiled(k, n_rep), repeat_kv_tiled(v, n_rep)
    scores = q @ np.swapaxes(k, 2, 3) * scaling
    if mask is not None:
        scores = scores + mask
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    return weights @ v


def attention_with_minus_inf_mask(q, k, v, mask, scaling):
    n_rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, n_rep, axis=1), np.repeat(v, n_rep, axis=1)
    scores = q @ np.swapaxes(k, 2, 3) * scaling
    if mask is not None:
        scores = np.where(mask == 0, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    return weights @ v


def test_repeat_kv_tiling_heads_is_named():
    assert_fails_with(check_repeat_kv(repeat_kv_tiled, verbose=False), "tiled heads", "np.repeat")


def test_attention_tiling_heads_is_named():
    assert_fails_with(check_attention(attention_with_tiled_heads, verbose=False), "tiled heads", "k0 k0 k1 k1")


def test_attention_minus_inf_mask_that_makes_padded_rows_nan_is_named():
    result = check_attention(attention_with_minus_inf_mask, verbose=False)
    assert_fails_with(result, "−inf mask", "NaN")
    # the meaningful rows are right; only the padded rows (NaN) count against it
    assert 0.5 < result.fraction_correct < 1.0


def pool_last_position(input_ids, pad_token_id):
    return np.array([input_ids.shape[1] - 1] * input_ids.shape[0])


def pool_count_minus_one(input_ids, pad_token_id):
    return np.sum(input_ids != pad_token_id, axis=1) - 1


@pytest.mark.parametrize("pool, mistake", [
    (pool_last_position, "pooling the pad position"),
    (pool_count_minus_one, "pooling the pad position (left padding)"),
])
def test_pooling_the_pad_position_is_named(pool, mistake):
    assert_fails_with(check_pooling(pool, verbose=False), mistake, "pooling the pad position")


def top_p_dropping_crossing_token(logits, top_p):
    if top_p >= 1.0:
        return logits
    z = logits - logits.max(-1, keepdims=True)
    probabilities = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    order = np.argsort(-probabilities, axis=-1)
    cumulative = np.cumsum(np.take_along_axis(probabilities, order, -1), axis=-1)
    keep_sorted = cumulative < top_p
    keep_sorted[:, 0] = True
    out = np.full_like(logits, -np.inf)
    rows = np.arange(logits.shape[0])[:, None]
    out[rows, order] = np.where(keep_sorted, np.take_along_axis(logits, order, -1), -np.inf)
    return out


def test_top_p_dropping_the_crossing_token_is_named():
    assert_fails_with(check_top_p(top_p_dropping_crossing_token, verbose=False),
                      "dropping the crossing token", "crosses the threshold")


def without_head_by_zeroing_z(z, o_proj, head):
    batch, length, heads, head_dim = z.shape
    z = z.copy()
    z[:, :, head] = 0
    return z.reshape(batch, length, heads * head_dim) @ o_proj.T


def without_head_by_per_head_results(z, o_proj, head):
    # Each head's own output o_proj[:, h·hd:(h+1)·hd] · z_h, then the sum of all but one.
    batch, length, heads, head_dim = z.shape
    per_head = np.einsum("btkd,ekd->btke", z, o_proj.reshape(o_proj.shape[0], heads, head_dim))  # (B, T, H, D)
    return per_head.sum(axis=2) - per_head[:, :, head]


@pytest.mark.parametrize("prefer_bundled", [True, False], ids=["bundled-if-installed", "random-stand-in"])
@pytest.mark.parametrize("function", [without_head_by_zeroing_z, without_head_by_per_head_results],
                         ids=lambda f: f.__name__)
def test_head_ablation_checker_passes_two_independent_correct_versions(function, prefer_bundled):
    result = check_head_ablation(function, verbose=False, prefer_bundled=prefer_bundled)
    assert result.passed, result.report
    assert result.fraction_correct == 1.0 and result.hint is None and result.mistake is None
    assert len(result.cases) >= 4


def ablate_whole_layer(z, o_proj, head):
    z = z * 0
    return z.reshape(z.shape[0], z.shape[1], -1) @ o_proj.T


def ablate_rows_of_o_proj(z, o_proj, head):
    head_dim = z.shape[-1]
    o_proj = o_proj.copy()
    o_proj[head * head_dim:(head + 1) * head_dim] = 0
    return z.reshape(z.shape[0], z.shape[1], -1) @ o_proj.T


def ablate_after_o_proj(z, o_proj, head):
    head_dim = z.shape[-1]
    out = z.reshape(z.shape[0], z.shape[1], -1) @ o_proj.T
    out[:, :, head * head_dim:(head + 1) * head_dim] = 0
    return out


def ablate_a_position(z, o_proj, head):
    z = z.copy()
    z[:, head, :, :] = 0
    return z.reshape(z.shape[0], z.shape[1], -1) @ o_proj.T


@pytest.mark.parametrize("function, mistake, phrase", [
    (ablate_whole_layer, "whole layer", "You ablated the whole layer"),
    (ablate_rows_of_o_proj, "rows instead of columns, or after o_proj", "You zeroed rows instead of columns of o_proj"),
    (ablate_after_o_proj, "rows instead of columns, or after o_proj", "you ablated after o_proj"),
    (ablate_a_position, "zeroed a position", "you zeroed position `head` (axis 1)"),
], ids=["whole-layer", "rows", "after-o_proj", "position"])
def test_head_ablation_mistakes_are_named(function, mistake, phrase):
    assert_fails_with(check_head_ablation(function, verbose=False), mistake, phrase)


def test_head_ablation_that_takes_head_dim_from_the_hidden_size_gets_the_shape_hint():
    def head_dim_from_hidden_size(z, o_proj, head):
        batch, length, heads, _ = z.shape
        head_dim = o_proj.shape[0] // heads  # wrong unless D = H·hd
        columns = o_proj.copy()
        columns[:, head * head_dim:(head + 1) * head_dim] = 0
        return z.reshape(batch, length, -1) @ columns.T

    result = check_head_ablation(head_dim_from_hidden_size, verbose=False)
    assert not result.passed and result.mistake is None
    assert "D differs from H·hd" in result.hint, result.report


# ---------------------------------------------------------------------------- more named mistakes


def test_rms_norm_that_subtracts_the_mean_is_layer_norm():
    def layer_norm(x, weight, eps):
        centred = x - x.mean(-1, keepdims=True)
        return weight * centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + eps)

    assert_fails_with(check_rms_norm(layer_norm, verbose=False), "mean subtracted", "LayerNorm")


def test_rope_frequencies_with_exponent_i_over_d_is_named():
    def frequencies(head_dim, theta):
        return 1.0 / theta ** (np.arange(head_dim // 2) / head_dim)

    assert_fails_with(check_rope_frequencies(frequencies, verbose=False), "exponent i/hd", "2i/hd")


def test_attention_without_scaling_is_named():
    def unscaled(q, k, v, mask, scaling):
        return layers.attention(q, k, v, mask, 1.0)

    assert_fails_with(check_attention(unscaled, verbose=False), "scaling missing", "scaling")


def test_swiglu_with_silu_on_up_is_named():
    def swapped(x, gate_proj, up_proj, down_proj):
        return layers.swiglu(x, up_proj, gate_proj, down_proj)

    assert_fails_with(check_swiglu(swapped, verbose=False), "silu on the up projection", "gate")


# ---------------------------------------------------------------------------- generic hints


def test_not_implemented_is_reported_not_raised(capsys):
    def blank(x, weight, eps):
        raise NotImplementedError

    result = check_rms_norm(blank)
    assert not result.passed and result.fraction_correct == 0.0 and result.mistake is None
    assert "NotImplementedError" in result.hint
    printed = capsys.readouterr().out
    assert "check_rms_norm: FAILED" in printed and "0.0% of values correct" in printed and "Hint:" in printed


def test_an_error_raised_only_on_gqa_cases_gets_the_gqa_hint():
    def without_repeat(q, k, v, mask, scaling):
        scores = q @ k.swapaxes(-1, -2) * scaling  # fails to broadcast when 1 < KV < H
        if mask is not None:
            scores = scores + mask
        weights = layers.softmax(scores)
        return weights @ v

    result = check_attention(without_repeat, verbose=False)
    assert not result.passed and result.mistake is None
    assert "GQA" in result.hint


def test_an_unexpected_error_is_named_with_its_message():
    def broken(x, n_rep):
        raise KeyError("heads")

    result = check_repeat_kv(broken, verbose=False)
    assert "raised KeyError" in result.hint and "heads" in result.hint


def test_transposed_output_is_named():
    def transposed(x, n_rep):
        return np.repeat(x, n_rep, axis=1).swapaxes(-1, -2)

    result = check_repeat_kv(transposed, verbose=False)
    assert not result.passed and "transposed" in result.hint


def test_wrong_shape_is_named():
    def dropped_last(x, weight, eps):
        return layers.rms_norm(x, weight, eps)[..., :-1]

    result = check_rms_norm(dropped_last, verbose=False)
    assert not result.passed and "has shape" in result.hint


def test_float_indices_are_a_dtype_problem():
    def float_indices(input_ids, pad_token_id):
        return last_non_pad_index(input_ids, pad_token_id).astype(np.float64)

    result = check_pooling(float_indices, verbose=False)
    assert not result.passed and "dtype" in result.hint


def test_a_constant_factor_is_named():
    def doubled(x, gate_proj, up_proj, down_proj):
        return 2 * layers.swiglu(x, gate_proj, up_proj, down_proj)

    result = check_swiglu(doubled, verbose=False)
    assert not result.passed and "times 2" in result.hint


def test_returning_none_is_named():
    def forgot_return(logits, top_p):
        top_p_filter(logits, top_p)

    result = check_top_p(forgot_return, verbose=False)
    assert not result.passed and "None" in result.hint


def test_negative_index_for_the_last_position_is_accepted():
    def negative(input_ids, pad_token_id):
        index = last_non_pad_index(input_ids, pad_token_id)
        return np.where(index == input_ids.shape[1] - 1, -1, index)

    assert check_pooling(negative, verbose=False).passed


def test_student_function_cannot_change_the_checkers_arrays():
    def vandal(x, weight, eps):
        out = layers.rms_norm(x, weight, eps)
        x[...] = 0
        weight[...] = 0
        return out

    assert check_rms_norm(vandal, verbose=False).passed
    assert check_rms_norm(layers.rms_norm, verbose=False).passed


# ---------------------------------------------------------------------------- the bundled path


@pytest.fixture
def bundled_style_model(tmp_path, monkeypatch):
    """A float16 GQA checkpoint with a sentencepiece tokenizer, installed as the bundled model."""
    import shutil
    from pathlib import Path

    from llama_np import LlamaConfig, LlamaForCausalLM
    from llama_np.formats import locate

    directory = tmp_path / BUNDLED_MODEL
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5,
                         max_position_embeddings=256)
    LlamaForCausalLM.from_config(config, seed=7).save_pretrained(directory, storage_dtype=np.float16)
    shutil.copy(Path(__file__).parent / "data" / "tokenizer" / "tokenizer.model", directory / "tokenizer.model")
    monkeypatch.setattr(locate, "ASSETS_DIR", tmp_path)
    model_sample.cache_clear()
    yield
    model_sample.cache_clear()


def test_checkers_run_on_a_bundled_style_checkpoint(bundled_style_model):
    sample = model_sample()
    assert "bundled" in sample.source and sample.attention_mask.min() == 0  # padded batch
    for checker, function in LIBRARY_FUNCTIONS:
        result = checker(function, verbose=False)
        assert result.passed, result.report
    assert_fails_with(check_rms_norm(rms_norm_eps_outside_root, verbose=False),
                      "eps outside the square root", "inside the square root")
    assert_fails_with(check_attention(attention_with_tiled_heads, verbose=False), "tiled heads", "k0 k0 k1 k1")
    assert_fails_with(check_top_p(top_p_dropping_crossing_token, verbose=False),
                      "dropping the crossing token", "crosses the threshold")
    assert_fails_with(check_pooling(pool_last_position, verbose=False), "pooling the pad position",
                      "pooling the pad position")
    assert check_head_ablation(without_head_by_zeroing_z, verbose=False).passed
    assert_fails_with(check_head_ablation(ablate_rows_of_o_proj, verbose=False),
                      "rows instead of columns, or after o_proj", "columns of o_proj")


def test_rms_norm_with_a_sum_instead_of_a_mean_is_named_with_its_factor():
    def summed(x, weight, eps):
        return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + eps) * weight

    assert_fails_with(check_rms_norm(summed, verbose=False), "sum instead of mean", "1/√D")


def test_a_shape_error_from_a_missing_keepdims_gets_the_broadcasting_hint():
    def no_keepdims(x, weight, eps):
        return x / np.sqrt(np.mean(x * x, axis=-1) + eps) * weight

    result = check_rms_norm(no_keepdims, verbose=False)
    assert not result.passed and "keepdims=True" in result.hint, result.hint


def test_rope_without_the_head_axis_passes_no_case_by_coincidence():
    def no_head_axis(x, cos, sin):
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    result = check_apply_rope(no_head_axis, verbose=False)
    assert not result.passed
    keys = next(outcome for outcome in result.cases if "keys" in outcome.case.name)
    assert not keys.passed, "the keys case must not pass by lining batch up with the heads"

# ---------------------------------------------------------------------------- backward checkers

BACKWARD_FUNCTIONS = [
    (check_rms_norm_backward, backward.rms_norm_backward),
    (check_softmax_backward, backward.softmax_backward),
    (check_repeat_kv_backward, backward.repeat_kv_backward),
    (check_cross_entropy_backward, backward.cross_entropy_backward),
]


@pytest.mark.parametrize("prefer_bundled", [True, False], ids=["bundled-if-installed", "random-stand-in"])
@pytest.mark.parametrize("checker, function", BACKWARD_FUNCTIONS, ids=lambda x: getattr(x, "__name__", ""))
def test_each_backward_checker_passes_the_backward_that_value_and_grad_runs(checker, function, prefer_bundled):
    result = checker(function, verbose=False, prefer_bundled=prefer_bundled)
    assert result.passed, result.report
    assert result.fraction_correct == 1.0 and result.hint is None and result.mistake is None
    assert len(result.cases) >= 4


def rms_norm_backward_by_hand(grad, normalized, scale, weight):
    # A float32 version written from the chain rule, as a student would.
    d = normalized.shape[-1]
    dn = grad * weight
    dx = dn / scale - normalized * (dn * normalized).sum(-1, keepdims=True) / (d * scale)
    return dx, (grad * normalized).reshape(-1, d).sum(0)


def rms_norm_backward_without_rms_term(grad, normalized, scale, weight):
    d = normalized.shape[-1]
    return grad * weight / scale, (grad * normalized).reshape(-1, d).sum(0)


def softmax_backward_by_jacobian(grad, weights):
    jacobian = weights[..., :, None] * (np.eye(weights.shape[-1]) - weights[..., None, :])  # (..., S, S)
    return np.einsum("...i,...ij->...j", grad, jacobian)


def softmax_backward_no_weighted_sum(grad, weights):
    return grad * weights


def repeat_kv_backward_by_loop(grad, n_rep):
    batch, heads, length, head_dim = grad.shape
    out = np.zeros((batch, heads // n_rep, length, head_dim), grad.dtype)
    for head in range(heads):
        out[:, head // n_rep] += grad[:, head]
    return out


def repeat_kv_backward_one_head_per_group(grad, n_rep):
    return grad[:, 0::n_rep].copy()


def repeat_kv_backward_tiled_groups(grad, n_rep):
    kv = grad.shape[1] // n_rep
    return sum(grad[:, r * kv:(r + 1) * kv] for r in range(n_rep))


def cross_entropy_backward_by_hand(logits, targets, ignore_index=-100):
    out = np.zeros(logits.shape, np.float32)
    kept = [i for i, t in enumerate(targets) if t != ignore_index]
    for i in kept:
        p = np.exp(logits[i] - logits[i].max())
        p = p / p.sum()
        p[targets[i]] -= 1
        out[i] = p / len(kept)
    return out


def cross_entropy_backward_mean_over_rows(logits, targets, ignore_index=-100):
    out = np.zeros(logits.shape, np.float32)
    for i, t in enumerate(targets):
        if t != ignore_index:
            p = np.exp(logits[i] - logits[i].max())
            p = p / p.sum()
            p[t] -= 1
            out[i] = p / len(targets)  # counts the −100 rows too
    return out


def cross_entropy_backward_sum(logits, targets, ignore_index=-100):
    return cross_entropy_backward_by_hand(logits, targets, ignore_index) * np.count_nonzero(targets != ignore_index)


@pytest.mark.parametrize("checker, function", [
    (check_rms_norm_backward, rms_norm_backward_by_hand),
    (check_softmax_backward, softmax_backward_by_jacobian),
    (check_repeat_kv_backward, repeat_kv_backward_by_loop),
    (check_cross_entropy_backward, cross_entropy_backward_by_hand),
], ids=lambda x: getattr(x, "__name__", ""))
def test_backward_checkers_pass_independent_correct_versions(checker, function):
    result = checker(function, verbose=False)
    assert result.passed, result.report


@pytest.mark.parametrize("checker, function, mistake, phrase", [
    (check_rms_norm_backward, rms_norm_backward_without_rms_term, "term through the rms missing",
     "misses the term through the rms"),
    (check_softmax_backward, softmax_backward_no_weighted_sum, "weighted sum not subtracted",
     "Subtract the weighted sum"),
    (check_repeat_kv_backward, repeat_kv_backward_one_head_per_group, "group not summed", "*sum* of theirs"),
    (check_repeat_kv_backward, repeat_kv_backward_tiled_groups, "summed the wrong heads", "in place (k0 k0 k1 k1)"),
    (check_cross_entropy_backward, cross_entropy_backward_mean_over_rows, "divided by every label, −100 included",
     "number of *kept* labels"),
    (check_cross_entropy_backward, cross_entropy_backward_sum, "not divided by the count",
     "divide softmax(z) − onehot(target) by their"),
], ids=["rms-term", "softmax-weighted-sum", "gqa-group-not-summed", "gqa-wrong-heads", "ce-counts-ignored",
        "ce-not-divided"])
def test_backward_mistakes_are_named(checker, function, mistake, phrase):
    assert_fails_with(checker(function, verbose=False), mistake, phrase)


def rms_norm_backward_sum_in_rms_term(grad, normalized, scale, weight):
    dn = grad * weight
    dx = (dn - normalized * (dn * normalized).sum(-1, keepdims=True)) / scale  # no 1/D
    return dx, (grad * normalized).reshape(-1, normalized.shape[-1]).sum(0)


def rms_norm_backward_forgets_scale(grad, normalized, scale, weight):
    dn = grad * weight
    dx = dn - normalized * (dn * normalized).mean(-1, keepdims=True)
    return dx, (grad * normalized).reshape(-1, normalized.shape[-1]).sum(0)


def rms_norm_backward_projects_grad(grad, normalized, scale, weight):
    dx = (grad * weight - normalized * (grad * normalized).mean(-1, keepdims=True)) / scale
    return dx, (grad * normalized).reshape(-1, normalized.shape[-1]).sum(0)


def softmax_backward_p_one_minus_p(grad, weights):
    return grad * weights - grad * weights ** 2


def softmax_backward_unweighted(grad, weights):
    return weights * (grad - grad.sum(-1, keepdims=True))


def softmax_backward_sum_over_queries(grad, weights):
    return weights * (grad - (grad * weights).sum(-2, keepdims=True))


def repeat_kv_backward_mean(grad, n_rep):
    return repeat_kv_backward_by_loop(grad, n_rep) / n_rep


def cross_entropy_backward_scores_ignored_rows(logits, targets, ignore_index=-100):
    kept = np.count_nonzero(targets != ignore_index)
    out = np.zeros(logits.shape, np.float64)
    for i, t in enumerate(targets):
        p = np.exp(logits[i] - logits[i].max())
        p = p / p.sum()
        p[t] -= 1  # t = −100 picks a column from the end
        out[i] = p / kept
    return out


def cross_entropy_backward_onehot_minus_softmax(logits, targets, ignore_index=-100):
    return -cross_entropy_backward_by_hand(logits, targets, ignore_index)


@pytest.mark.parametrize("checker, function, mistake, phrase", [
    (check_rms_norm_backward, rms_norm_backward_sum_in_rms_term, "sum instead of mean in the rms term",
     "averages over the D features"),
    (check_rms_norm_backward, rms_norm_backward_forgets_scale, "not divided by the rms", "Divide by the rms"),
    (check_rms_norm_backward, rms_norm_backward_projects_grad, "weight missing in the rms term",
     "not mean(grad · n)"),
    (check_softmax_backward, softmax_backward_p_one_minus_p, "diagonal of the Jacobian only", "only the diagonal"),
    (check_softmax_backward, softmax_backward_unweighted, "unweighted sum subtracted", "Weight the sum"),
    (check_softmax_backward, softmax_backward_sum_over_queries, "sum over the wrong axis", "axis=-1"),
    (check_repeat_kv_backward, repeat_kv_backward_mean, "group averaged", "don't average them"),
    (check_cross_entropy_backward, cross_entropy_backward_scores_ignored_rows, "−100 labels scored",
     "their gradient is 0"),
    (check_cross_entropy_backward, cross_entropy_backward_onehot_minus_softmax, "sign flipped", "opposite sign"),
], ids=lambda x: getattr(x, "__name__", None) if callable(x) else None)
def test_every_other_backward_mistake_is_named(checker, function, mistake, phrase):
    assert_fails_with(checker(function, verbose=False), mistake, phrase)
