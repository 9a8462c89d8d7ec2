"""Checkers for backward functions: RMSNorm, softmax, repeat_kv and the cross-entropy loss.

Each ``check_*_backward(fn)`` takes the student's function with the signature of the library's
own in ``llama_np.training.backward`` and grades it against that function — the one
``value_and_grad`` runs — on cases built from one forward pass of the bundled model (its
recorded ``hook_normalized``, ``hook_scale`` and ``hook_pattern``, its keys, its next-token
logits) with an upstream gradient drawn at random, plus a few odd shapes. The wrong versions
below are the mistakes the hints name; they are here to be recognised, never used.

    check_rms_norm_backward(fn)       fn(grad, normalized, scale, weight) -> (grad_x, grad_weight)
    check_softmax_backward(fn)        fn(grad, weights) -> grad_scores
    check_repeat_kv_backward(fn)      fn(grad, n_rep) -> (B, KV, S, hd)
    check_cross_entropy_backward(fn)  fn(logits, targets, ignore_index=-100) -> (N, C)
"""

from __future__ import annotations

import numpy as np

from llama_np import layers
from llama_np.exercises.checking import Case, CheckResult, Mistake, run_check
from llama_np.exercises.samples import model_sample
from llama_np.training import backward

# ---------------------------------------------------------------------------- RMSNorm


def _rms_norm_backward_without_rms_term(grad, normalized, scale, weight):
    grad_weight = np.sum(grad * normalized, axis=tuple(range(grad.ndim - 1)))
    return grad * weight / scale, grad_weight


def _rms_norm_backward_sum_not_mean(grad, normalized, scale, weight):
    grad_weight = np.sum(grad * normalized, axis=tuple(range(grad.ndim - 1)))
    grad_normalized = grad * weight
    projection = np.sum(grad_normalized * normalized, axis=-1, keepdims=True)
    return (grad_normalized - normalized * projection) / scale, grad_weight


def _rms_norm_backward_not_divided_by_rms(grad, normalized, scale, weight):
    grad_weight = np.sum(grad * normalized, axis=tuple(range(grad.ndim - 1)))
    grad_normalized = grad * weight
    projection = np.mean(grad_normalized * normalized, axis=-1, keepdims=True)
    return grad_normalized - normalized * projection, grad_weight


def _rms_norm_backward_projection_without_weight(grad, normalized, scale, weight):
    grad_weight = np.sum(grad * normalized, axis=tuple(range(grad.ndim - 1)))
    projection = np.mean(grad * normalized, axis=-1, keepdims=True)
    return (grad * weight - normalized * projection) / scale, grad_weight


RMS_NORM_BACKWARD_MISTAKES = (
    Mistake("term through the rms missing",
            "grad_x misses the term through the rms: every x_j moves r = sqrt(mean(x²) + eps), and r "
            "divides every output. With dn = grad · weight, dx = (dn − n · mean(dn · n)) / r — you "
            "returned dn / r alone.", (_rms_norm_backward_without_rms_term,)),
    Mistake("sum instead of mean in the rms term",
            "The rms term averages over the D features: dx = (dn − n · mean(dn · n, axis=-1)) / r. "
            "You used the sum, which is D times too large (∂r/∂x_j = x_j / (D · r)).",
            (_rms_norm_backward_sum_not_mean,)),
    Mistake("not divided by the rms",
            "Divide by the rms r (`scale`, the forward's hook_scale): n = x / r, so every path back to "
            "x carries a 1/r.", (_rms_norm_backward_not_divided_by_rms,)),
    Mistake("weight missing in the rms term",
            "The gradient reaching n is dn = grad · weight, and the rms term projects *that*: "
            "mean(dn · n), not mean(grad · n).", (_rms_norm_backward_projection_without_weight,)),
)


def rms_norm_backward_cases(prefer_bundled: bool = True) -> list[Case]:
    sample = model_sample(prefer_bundled)
    rng = np.random.default_rng(21)

    def case(name, normalized, scale, weight, tags=()):
        grad = rng.normal(size=normalized.shape).astype(normalized.dtype)  # an upstream gradient
        return Case(name, (grad, normalized, scale, weight),
                    backward.rms_norm_backward(grad, normalized, scale, weight), tags=frozenset(tags))

    def recorded(point, layer):
        return sample.activation(f"{point}.hook_normalized", layer), sample.activation(f"{point}.hook_scale", layer)

    first, last = sample.layer(0), sample.layer(-1)
    ln1, ln2 = recorded("ln1", 0), recorded("ln2", -1)
    odd_x = rng.normal(0, 2, size=(3, 5, 7)).astype(np.float32)
    odd_scale = layers.rms(odd_x, 1e-5)  # (3, 5, 1)
    odd_normalized = layers.normalize(odd_x, odd_scale)
    odd_weight = rng.normal(1, 0.5, size=7).astype(np.float32)
    return [
        case(f"layer-0 input norm of {sample.source}, shape {ln1[0].shape}", *ln1, first.input_layernorm),
        case(f"last layer's post-attention norm, shape {ln2[0].shape}", *ln2, last.post_attention_layernorm),
        case(f"one token vector, shape {ln1[0][1, -1].shape}", ln1[0][1, -1], ln1[1][1, -1],
             first.input_layernorm, tags=["vector"]),
        case("odd shape (3, 5, 7), weights far from 1", odd_normalized, odd_scale, odd_weight),
    ]


def check_rms_norm_backward(fn, verbose: bool = True, prefer_bundled: bool = True) -> CheckResult:
    """Check ``fn(grad, normalized, scale, weight) -> (grad_x, grad_weight)`` against
    ``training.backward.rms_norm_backward``.

    grad, normalized (..., D); scale (..., 1) as the forward's hook_scale; weight (D,)
    ->  grad_x (..., D), grad_weight (D,)
    """
    tag_hints = {"vector": "Only the single vector (D,) fails: sum grad_weight over every axis but the "
                           "last (axis=tuple(range(grad.ndim - 1))) and keep axis=-1, keepdims=True "
                           "for the mean."}
    return run_check("check_rms_norm_backward", fn, rms_norm_backward_cases(prefer_bundled),
                     RMS_NORM_BACKWARD_MISTAKES, tag_hints, verbose=verbose)


# ---------------------------------------------------------------------------- softmax


def _softmax_backward_without_weighted_sum(grad, weights):
    return weights * grad


def _softmax_backward_diagonal_only(grad, weights):
    return grad * weights * (1 - weights)


def _softmax_backward_plain_sum(grad, weights):
    return weights * (grad - np.sum(grad, axis=-1, keepdims=True))


def _softmax_backward_mean(grad, weights):
    return weights * (grad - np.mean(grad, axis=-1, keepdims=True))


def _softmax_backward_wrong_axis(grad, weights):
    return weights * (grad - np.sum(grad * weights, axis=-2, keepdims=True))


SOFTMAX_BACKWARD_MISTAKES = (
    Mistake("weighted sum not subtracted",
            "Subtract the weighted sum: ds_j = p_j · (dp_j − Σ_i p_i · dp_i). Every score moves every "
            "weight of its row (they add up to 1), so the Jacobian is diag(p) − p pᵀ, not diag(p).",
            (_softmax_backward_without_weighted_sum,)),
    Mistake("diagonal of the Jacobian only",
            "p(1 − p) is only the diagonal of the Jacobian diag(p) − p pᵀ: the off-diagonal −p_i p_j "
            "terms are missing. ds_j = p_j · (dp_j − Σ_i p_i · dp_i).", (_softmax_backward_diagonal_only,)),
    Mistake("unweighted sum subtracted",
            "Weight the sum by the probabilities: Σ_i p_i · dp_i, not Σ_i dp_i (nor its mean).",
            (_softmax_backward_plain_sum, _softmax_backward_mean)),
    Mistake("sum over the wrong axis",
            "The softmax ran over the last axis (the keys), so its sum does too: "
            "np.sum(grad * weights, axis=-1, keepdims=True).", (_softmax_backward_wrong_axis,)),
)


def softmax_backward_cases(prefer_bundled: bool = True) -> list[Case]:
    sample = model_sample(prefer_bundled)
    rng = np.random.default_rng(22)

    def case(name, weights, tags=()):
        grad = rng.normal(size=weights.shape).astype(weights.dtype)
        return Case(name, (grad, weights), backward.softmax_backward(grad, weights), tags=frozenset(tags))

    last = sample.config.num_hidden_layers - 1
    pattern = sample.activation("attn.hook_pattern", 0)  # (B, H, T, S)
    scores = rng.normal(0, 3, size=(4, 7)).astype(np.float32)
    confident = np.zeros((2, 5), np.float32)
    confident[:, 1] = 1.0  # one key takes all the weight
    return [
        case(f"layer-0 attention weights of {sample.source} (causal, left-padded), shape {pattern.shape}",
             pattern),
        case(f"layer-{last} attention weights, shape {pattern.shape}", sample.activation("attn.hook_pattern", last)),
        case("a softmax over 7 classes, 4 rows (not square)", layers.softmax(scores)),
        case("rows where one key has all the weight", confident),
    ]


def check_softmax_backward(fn, verbose: bool = True, prefer_bundled: bool = True) -> CheckResult:
    """Check ``fn(grad, weights) -> grad_scores`` against ``training.backward.softmax_backward``.

    grad, weights (..., S): the gradient of p = softmax(s, axis=-1) and p itself  ->  (..., S)
    """
    return run_check("check_softmax_backward", fn, softmax_backward_cases(prefer_bundled),
                     SOFTMAX_BACKWARD_MISTAKES, verbose=verbose)


# ---------------------------------------------------------------------------- repeat_kv


def _repeat_kv_backward_first_of_group(grad, n_rep):
    return grad[:, ::n_rep]


def _repeat_kv_backward_first_heads(grad, n_rep):
    return grad[:, :grad.shape[1] // n_rep]


def _repeat_kv_backward_tiled(grad, n_rep):
    batch, heads, length, head_dim = grad.shape
    return grad.reshape(batch, n_rep, heads // n_rep, length, head_dim).sum(axis=1)


def _repeat_kv_backward_mean(grad, n_rep):
    batch, heads, length, head_dim = grad.shape
    return grad.reshape(batch, heads // n_rep, n_rep, length, head_dim).mean(axis=2)


REPEAT_KV_BACKWARD_MISTAKES = (
    Mistake("group not summed",
            "Key/value head j was used by n_rep query heads, j·n_rep … j·n_rep + n_rep − 1, so its "
            "gradient is the *sum* of theirs: reshape (B, KV, n_rep, S, hd) and sum axis 2. You kept "
            "one head of each group.", (_repeat_kv_backward_first_of_group, _repeat_kv_backward_first_heads)),
    Mistake("summed the wrong heads",
            "You summed heads j, j + KV, j + 2·KV … — the groups of a *tiled* repeat (k0 k1 k0 k1). "
            "repeat_kv repeats each head in place (k0 k0 k1 k1), so head j's group is the consecutive "
            "heads j·n_rep … j·n_rep + n_rep − 1: reshape (B, KV, n_rep, S, hd), not (B, n_rep, KV, S, hd).",
            (_repeat_kv_backward_tiled,)),
    Mistake("group averaged",
            "Sum the group's gradients, don't average them: the copy k_j reaches the loss n_rep times, "
            "and each path adds its own gradient.", (_repeat_kv_backward_mean,)),
)


def check_repeat_kv_backward(fn, verbose: bool = True, prefer_bundled: bool = True) -> CheckResult:
    """Check ``fn(grad, n_rep)`` against ``training.backward.repeat_kv_backward``.

    grad (B, KV·n_rep, S, hd), the gradient of repeat_kv's output  ->  (B, KV, S, hd)
    """
    sample = model_sample(prefer_bundled)
    config = sample.config
    rng = np.random.default_rng(23)
    queries = sample.activation("attn.hook_rot_q", 0).transpose(0, 2, 1, 3)  # (B, H, T, hd)
    model_case = (f"gradient of {sample.source}'s repeated keys: {config.num_key_value_heads} key/value heads × "
                  f"{config.num_key_value_groups}, shape {queries.shape}")
    settings = [(model_case, queries.shape, config.num_key_value_groups),
                ("n_rep = 1 (multi-head attention: nothing was repeated)", (1, 4, 3, 5), 1),
                ("3 key/value heads × 2", (2, 6, 5, 4), 2),
                ("one key/value head × 4 (multi-query attention)", (1, 4, 3, 6), 4)]
    cases = []
    for name, shape, n_rep in settings:
        grad = rng.normal(size=shape).astype(np.float32)
        cases.append(Case(name, (grad, n_rep), backward.repeat_kv_backward(grad, n_rep)))
    return run_check("check_repeat_kv_backward", fn, cases, REPEAT_KV_BACKWARD_MISTAKES, verbose=verbose)


# ---------------------------------------------------------------------------- cross-entropy


def _softmax_rows(logits):
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _cross_entropy_backward_with(logits, targets, ignore_index=-100, count="kept", skip_ignored=True, sign=1.0):
    """The gradient written out, with one step swappable to build the wrong versions."""
    keep = targets != ignore_index if skip_ignored else np.ones(targets.shape, bool)
    grad = _softmax_rows(logits)
    rows = np.flatnonzero(keep)
    grad[rows, targets[rows]] -= 1.0
    grad[~keep] = 0.0
    divisor = {"kept": np.count_nonzero(targets != ignore_index), "all": targets.size, "none": 1}[count]
    return (sign * grad / divisor).astype(logits.dtype)


def _cross_entropy_backward_all_rows(logits, targets, ignore_index=-100):
    return _cross_entropy_backward_with(logits, targets, ignore_index, count="all")


def _cross_entropy_backward_not_divided(logits, targets, ignore_index=-100):
    return _cross_entropy_backward_with(logits, targets, ignore_index, count="none")


def _cross_entropy_backward_ignored_scored(logits, targets, ignore_index=-100):
    return _cross_entropy_backward_with(logits, targets, ignore_index, skip_ignored=False)


def _cross_entropy_backward_ignored_scored_all_rows(logits, targets, ignore_index=-100):
    return _cross_entropy_backward_with(logits, targets, ignore_index, count="all", skip_ignored=False)


def _cross_entropy_backward_flipped(logits, targets, ignore_index=-100):
    return _cross_entropy_backward_with(logits, targets, ignore_index, sign=-1.0)


CROSS_ENTROPY_BACKWARD_MISTAKES = (
    Mistake("divided by every label, −100 included",
            "Divide by the number of *kept* labels, not by every row: the loss is the mean over the "
            "targets that are not −100 (ignore_index), so n = np.count_nonzero(targets != ignore_index). "
            "Counting the ignored rows makes every gradient too small.", (_cross_entropy_backward_all_rows,)),
    Mistake("not divided by the count",
            "The loss is a *mean* over the kept labels: divide softmax(z) − onehot(target) by their "
            "number n = np.count_nonzero(targets != ignore_index).", (_cross_entropy_backward_not_divided,)),
    Mistake("−100 labels scored",
            "Rows whose target is −100 (ignore_index) add nothing to the loss: their gradient is 0. "
            "Yours scores them — and targets[i] = −100 as an index picks the 100th column from the end.",
            (_cross_entropy_backward_ignored_scored, _cross_entropy_backward_ignored_scored_all_rows)),
    Mistake("sign flipped",
            "The gradient of −log softmax(z)[y] is softmax(z) − onehot(y): the target's entry is "
            "negative (raising its logit lowers the loss). Yours has the opposite sign.",
            (_cross_entropy_backward_flipped,)),
)


CROSS_ENTROPY_TOLERANCE = 1e-6


def cross_entropy_backward_cases(prefer_bundled: bool = True) -> list[Case]:
    sample = model_sample(prefer_bundled)
    vocab = sample.config.vocab_size
    # The causal-LM scoring of the sample: logits at t against the token at t + 1, pad labels −100.
    logits = sample.logits[:, :-1].reshape(-1, vocab)  # (B·(T − 1), V)
    labels = np.where(sample.attention_mask.astype(bool), sample.input_ids, -100)[:, 1:].reshape(-1)
    real = labels != -100
    rng = np.random.default_rng(24)
    small = rng.normal(0, 2, size=(6, 5)).astype(np.float32)
    small_targets = np.array([3, -100, 0, 4, -100, 1])

    def case(name, z, targets, tags=()):
        return Case(name, (z, targets), backward.cross_entropy_backward(z, targets), tags=frozenset(tags))

    return [
        case(f"next-token logits of {sample.source}, {np.count_nonzero(~real)} of {labels.size} labels −100 "
             f"(padding)", logits, labels, tags=["ignored"]),
        case(f"the same logits' real rows only ({np.count_nonzero(real)} labels, none ignored)",
             logits[real], labels[real]),
        case("6 rows of 5 classes, 2 labels −100", small, small_targets, tags=["ignored"]),
        case("6 rows of 5 classes, every label kept", small, np.array([3, 2, 0, 4, 4, 1])),
    ]


def check_cross_entropy_backward(fn, verbose: bool = True, prefer_bundled: bool = True) -> CheckResult:
    """Check ``fn(logits, targets, ignore_index=-100) -> grad_logits`` against
    ``training.backward.cross_entropy_backward``: the gradient of the mean cross-entropy over the
    targets that are not ignore_index.

    logits (N, C); targets (N,) class indices or −100  ->  (N, C)

    The tolerance is 1e-6 rather than the project's 1e-4: the gradient is divided by the number of
    kept labels, so most of its entries are far below 1e-4 and a looser rule would call them right
    whatever they were. float32 arithmetic stays well inside 1e-6.
    """
    tag_hints = {"ignored": "Only the cases with −100 labels fail: their rows get no gradient, and the "
                            "mean runs over the kept labels only."}
    return run_check("check_cross_entropy_backward", fn, cross_entropy_backward_cases(prefer_bundled),
                     CROSS_ENTROPY_BACKWARD_MISTAKES, tag_hints, tolerance=CROSS_ENTROPY_TOLERANCE,
                     verbose=verbose)
