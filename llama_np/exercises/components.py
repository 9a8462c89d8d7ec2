"""Checkers for the components of a layer: rms_norm, RoPE, repeat_kv, attention, swiglu.

Each ``check_*(fn)`` takes the student's function — same signature as the one in
``llama_np.layers`` — runs it on cases taken from the bundled model plus a few odd shapes, prints
a short report and returns a ``CheckResult``. The wrong versions written below are the mistakes
the hints name; they are here to be recognised, never used.
"""

from __future__ import annotations

import numpy as np

from llama_np import layers
from llama_np.exercises.checking import Case, CheckResult, Mistake, run_check
from llama_np.exercises.samples import model_sample

# ---------------------------------------------------------------------------- RMSNorm


def _rms_norm_eps_outside(x, weight, eps):
    return x / (np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + eps) * weight


def _rms_norm_without_eps(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) * weight


def _rms_norm_without_root(x, weight, eps):
    return x / (np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _layer_norm(x, weight, eps):
    centred = x - x.mean(axis=-1, keepdims=True)
    return centred / np.sqrt(np.mean(centred * centred, axis=-1, keepdims=True) + eps) * weight


def _rms_norm_over_everything(x, weight, eps):
    return x / np.sqrt(np.mean(x * x) + eps) * weight


def _rms_norm_sum_not_mean(x, weight, eps):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + eps) * weight


def _rms_norm_without_weight(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


RMS_NORM_MISTAKES = (
    Mistake("eps outside the square root",
            "Is eps inside the square root? RMSNorm divides by sqrt(mean(x²) + eps), not by "
            "sqrt(mean(x²)) + eps. The two agree only for tokens with a large mean square and part "
            "ways as mean(x²) shrinks towards eps.", (_rms_norm_eps_outside,)),
    Mistake("eps missing",
            "eps is missing: an all-zero vector (such as a freshly initialised pad embedding) then "
            "gives 0/0 = NaN. Divide by sqrt(mean(x²) + eps).", (_rms_norm_without_eps,)),
    Mistake("no square root",
            "Divide by the *root* of the mean square: sqrt(mean(x²) + eps), not mean(x²) + eps.",
            (_rms_norm_without_root,)),
    Mistake("mean subtracted",
            "That is LayerNorm: RMSNorm does not subtract the mean, it only divides by the root "
            "mean square of x itself.", (_layer_norm,)),
    Mistake("mean over every axis",
            "Take the mean of x² over the last axis only (axis=-1, keepdims=True): every token gets "
            "its own root mean square.", (_rms_norm_over_everything,)),
    Mistake("sum instead of mean",
            "You divide by the root of the *sum* of squares: your values come out 1/√D of the expected "
            "ones (D, the hidden size, is the last axis). RMSNorm takes the mean: np.mean(x * x, "
            "axis=-1, keepdims=True), the sum divided by D.", (_rms_norm_sum_not_mean,)),
    Mistake("weight missing",
            "Multiply the normalised vector by `weight` (one learned gain per hidden dimension).",
            (_rms_norm_without_weight,)),
)


def rms_norm_cases(prefer_bundled: bool = True) -> list[Case]:
    sample = model_sample(prefer_bundled)
    eps = sample.config.rms_norm_eps
    first, last = sample.layer(0), sample.layer(-1)
    embedded = sample.activation("hook_resid_pre", 0)  # (B, T, D), layer 0's input
    mid = sample.activation("hook_resid_mid", -1)
    rng = np.random.default_rng(11)
    odd = rng.normal(0, 2, size=(3, 5, 7)).astype(np.float32)
    odd_weight = rng.normal(1, 0.5, size=7).astype(np.float32)
    # Rescale real tokens to a root mean square of 1e-4, where eps changes the answer.
    tokens = embedded[sample.attention_mask.astype(bool)]  # (N, D): real tokens only, pad rows may be 0
    quiet = (tokens / np.sqrt(np.mean(tokens ** 2, axis=-1, keepdims=True)) * 1e-4).astype(np.float32)
    with_zero_row = np.stack([np.zeros_like(embedded[0, -1]), embedded[0, -1]])  # (2, D)

    def case(name, x, weight, eps_, tags=()):
        return Case(name, (x, weight, eps_), layers.rms_norm(x, weight, eps_), tags=frozenset(tags))

    return [
        case(f"layer-0 input of {sample.source}, shape {embedded.shape}", embedded, first.input_layernorm, eps),
        case(f"last layer's post-attention input, shape {mid.shape}", mid, last.post_attention_layernorm, eps),
        case(f"one token vector, shape {embedded[1, -1].shape}", embedded[1, -1], first.input_layernorm, eps,
             tags=["vector"]),
        case("odd shape (3, 5, 7), eps = 1e-5", odd, odd_weight, 1e-5),
        case(f"nearly silent tokens (root mean square 1e-4), eps = {eps:g}", quiet, first.input_layernorm, eps),
        case("an all-zero vector (a fresh pad embedding) and a real one", with_zero_row, first.input_layernorm, eps),
    ]


def check_rms_norm(fn, verbose: bool = True, prefer_bundled: bool = True) -> CheckResult:
    """Check ``fn(x, weight, eps)`` against ``layers.rms_norm``.  x (..., D); weight (D,)."""
    tag_hints = {"vector": "Only the single vector (D,) fails: use axis=-1 and keepdims=True so any "
                           "leading shape works."}
    return run_check("check_rms_norm", fn, rms_norm_cases(prefer_bundled), RMS_NORM_MISTAKES, tag_hints,
                     verbose=verbose)


# ---------------------------------------------------------------------------- RoPE frequencies


def _frequencies_exponent_i_over_d(head_dim, theta):
    return 1.0 / theta ** (np.arange(head_dim // 2, dtype=np.float64) / head_dim)


def _frequencies_without_reciprocal(head_dim, theta):
    return theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def _frequencies_for_every_dimension(head_dim, theta):
    return 1.0 / theta ** (np.arange(head_dim, dtype=np.float64) / head_dim)


ROPE_FREQUENCY_MISTAKES = (
    Mistake("exponent i/hd",
            "The exponent is 2i/hd for pair i < hd/2 (np.arange(0, hd, 2) / hd), not i/hd: your "
            "frequencies fall off half as fast as they should.", (_frequencies_exponent_i_over_d,)),
    Mistake("reciprocal missing",
            "inv_freq is 1 / theta^(2i/hd): it starts at 1 and *decreases*. You return theta^(2i/hd).",
            (_frequencies_without_reciprocal,)),
    Mistake("one frequency per dimension",
            "There is one frequency per *pair* of dimensions: hd/2 values, from np.arange(0, hd, 2) / hd.",
            (_frequencies_for_every_dimension,)),
)


def _first_output(fn):
    """Accept fn returning inv_freq or (inv_freq, attention_factor) like layers' own functions."""
    def first(*args):
        out = fn(*args)
        return out[0] if isinstance(out, tuple) else out
    return first


def check_rope_frequencies(fn, verbose: bool = True, prefer_bundled: bool = True) -> CheckResult:
    """Check ``fn(head_dim, theta) -> inv_freq (hd/2,)`` against ``layers.default_rope_frequencies``."""
    config = model_sample(prefer_bundled).config
    settings = [(config.head_dim, float(config.rope_theta), f"the model's head_dim {config.head_dim}"),
                (128, 10000.0, "Llama 2: head_dim 128, theta 10000"),
                (6, 10000.0, "a small head_dim 6"),
                (64, 500000.0, "Llama 3's theta 500000, head_dim 64")]
    cases = [Case(f"{label}", (hd, theta), layers.default_rope_frequencies(hd, theta)[0])
             for hd, theta, label in settings]
    return run_check("check_rope_frequencies", _first_output(fn), cases, ROPE_FREQUENCY_MISTAKES,
                     verbose=verbose)


# ---------------------------------------------------------------------------- applying RoPE


def _rope_adjacent_pairs_duplicated_angles(x, cos, sin):
    # GPT-J style rotate-every-two, fed the HF (duplicated-halves) cos/sin
    rotated = np.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)
    return x * cos[:, None] + rotated * sin[:, None]


def _rope_minus_on_first_half(x, cos, sin):
    half = x.shape[-1] // 2
    wrong = np.concatenate([x[..., half:], -x[..., :half]], axis=-1)
    return x * cos[:, None] + wrong * sin[:, None]


def _rope_cos_sin_swapped(x, cos, sin):
    return layers.apply_rope(x, sin, cos)


def _rope_interleaved_minus_sin(x, cos, sin):
    return layers.apply_rope_interleaved(x, cos, -sin)


def _rope_interleaved_strided_angles(x, cos, sin):
    half = x.shape[-1] // 2
    strided_cos = np.concatenate([cos[..., 0::2], cos[..., 0::2]], axis=-1)[..., :2 * half]
    strided_sin = np.concatenate([sin[..., 0::2], sin[..., 0::2]], axis=-1)[..., :2 * half]
    return layers.apply_rope_interleaved(x, strided_cos, strided_sin)


HF_ROPE_MISTAKES = (
    Mistake("adjacent pairs instead of halves",
            "You rotate adjacent pairs (x0, x1), (x2, x3), … — Meta's layout. The Hugging Face layout "
            "pairs dimension i with i + hd/2: x' = x·cos + rotate_half(x)·sin with "
            "rotate_half(x) = concat(−x[..., hd/2:], x[..., :hd/2]).",
            (layers.apply_rope_interleaved, _rope_adjacent_pairs_duplicated_angles)),
    Mistake("rotation the wrong way",
            "Your vectors turn the wrong way: rotate_half(x) = concat(−x2, x1), with the minus on the "
            "*second* half, and x' = x·cos + rotate_half(x)·sin (a plus).", (_rope_minus_on_first_half,)),
    Mistake("cos and sin swapped",
            "cos and sin are swapped: x' = x·cos + rotate_half(x)·sin.", (_rope_cos_sin_swapped,)),
)

META_ROPE_MISTAKES = (
    Mistake("halves instead of adjacent pairs",
            "You rotate dimension i with i + hd/2 — the Hugging Face layout. Meta's layout pairs "
            "adjacent dimensions (2i, 2i + 1) and turns each pair by angle i.", (layers.apply_rope,)),
    Mistake("rotation the wrong way",
            "Your pairs turn the wrong way: (a, b) -> (a·cos − b·sin, a·sin + b·cos).",
            (_rope_interleaved_minus_sin,)),
    Mistake("strided angles",
            "cos and sin come in the HF layout (the hd/2 angles written twice): pair i uses "
            "cos[..., i] and sin[..., i], i < hd/2 — not cos[..., 2i].", (_rope_interleaved_strided_angles,)),
)


def _cos_sin(position_ids, inv_freq):
    return layers.rope_cos_sin(np.asarray(position_ids), inv_freq)


def apply_rope_cases(reference, prefer_bundled: bool = True) -> list[Case]:
    sample = model_sample(prefer_bundled)
    config = sample.config
    batch, length = sample.input_ids.shape
    inv_freq, _ = layers.default_rope_frequencies(config.head_dim, config.rope_theta)
    q = sample.activation("attn.hook_q", 0).transpose(0, 2, 1, 3)  # (B, H, T, hd)
    k = sample.activation("attn.hook_k", 0).transpose(0, 2, 1, 3)  # (B, KV, T, hd)
    positions = np.arange(length)[None].repeat(batch, axis=0)
    per_row = np.maximum(np.cumsum(sample.attention_mask, axis=-1) - 1, 0)  # left padding: each row from 0
    rng = np.random.default_rng(12)
    odd = rng.normal(size=(3, 5, 4, 6)).astype(np.float32)
    odd_inv_freq, _ = layers.default_rope_frequencies(6, 10000.0)

    def case(name, x, position_ids, frequencies, tags=()):
        cos, sin = _cos_sin(position_ids, frequencies)
        return Case(name, (x, cos, sin), reference(x, cos, sin), tags=frozenset(tags))

    # The keys get a batch of 3, never equal to their head count, so that a cos (B, T, hd) that
    # is not given its head axis (cos[:, None]) cannot line up with the heads by coincidence.
    k = np.concatenate([k, k[:1], k[:1]], axis=0)[:3] if batch < 3 else k
    k_positions = np.arange(length)[None].repeat(k.shape[0], axis=0)
    return [
        case(f"layer-0 queries of {sample.source}, shape {q.shape}", q, positions, inv_freq),
        case(f"layer-0 keys ({config.num_key_value_heads} key/value heads), shape {k.shape}", k, k_positions,
             inv_freq),
        case(f"queries at positions 100–{99 + length}, as after a cache", q, positions + 100, inv_freq),
        case("positions that differ per row (left padding counted from each row's first token)",
             q, per_row, inv_freq, tags=["per_row"]),
        case("odd shape: batch 3, 5 heads, 4 positions, head_dim 6", odd, positions[:1].repeat(3, 0)[:, :4],
             odd_inv_freq),
    ]


def check_apply_rope(fn, layout: str = "hf", verbose: bool = True, prefer_bundled: bool = True) -> CheckResult:
    """Check ``fn(x, cos, sin)`` against ``layers.apply_rope`` (layout "hf") or
    ``layers.apply_rope_interleaved`` (layout "meta").

    x (B, heads, T, hd); cos, sin (B, T, hd) in the HF layout, from ``layers.rope_cos_sin``.
    """
    if layout not in ("hf", "meta"):
        raise ValueError(f"layout must be 'hf' or 'meta', got {layout!r}")
    reference = layers.apply_rope if layout == "hf" else layers.apply_rope_interleaved
    mistakes = HF_ROPE_MISTAKES if layout == "hf" else META_ROPE_MISTAKES
    tag_hints = {"per_row": "Only the case whose rows have different positions fails: cos and sin are "
                            "(B, T, hd), one table per row — broadcast them over the head axis "
                            "(cos[:, None]), don't take row 0 for everyone."}
    return run_check(f"check_apply_rope ({layout} layout)", fn, apply_rope_cases(reference, prefer_bundled),
                     mistakes, tag_hints, verbose=verbose)


# ---------------------------------------------------------------------------- repeat_kv and attention


def _repeat_kv_tiled(x, n_rep):
    return np.tile(x, (1, n_rep, 1, 1))


def _repeat_kv_on_positions(x, n_rep):
    return np.repeat(x, n_rep, axis=2)


TILED_HEADS_HINT = (
    "Key/value heads are tiled (k0 k1 k0 k1) instead of repeated in place (k0 k0 k1 k1). Query head "
    "j belongs to key/value head j // (H/KV): use np.repeat(x, n_rep, axis=1), not np.tile.")

REPEAT_KV_MISTAKES = (
    Mistake("tiled heads", TILED_HEADS_HINT, (_repeat_kv_tiled,)),
    Mistake("repeated along positions",
            "Repeat along the head axis (axis 1 of (B, KV, S, hd)), not along positions.",
            (_repeat_kv_on_positions,)),
)


def check_repeat_kv(fn, verbose: bool = True, prefer_bundled: bool = True) -> CheckResult:
    """Check ``fn(x, n_rep)`` against ``layers.repeat_kv``.  x (B, KV, S, hd) -> (B, KV·n_rep, S, hd)."""
    sample = model_sample(prefer_bundled)
    config = sample.config
    k = sample.activation("attn.hook_rot_k", 0).transpose(0, 2, 1, 3)  # (B, KV, S, hd)
    rng = np.random.default_rng(13)
    three = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
    one = rng.normal(size=(1, 1, 3, 6)).astype(np.float32)
    settings = [(f"layer-0 keys of {sample.source}, {config.num_key_value_heads} key/value heads × "
                 f"{config.num_key_value_groups}", k, config.num_key_value_groups),
                ("n_rep = 1 (multi-head attention: nothing to repeat)", k, 1),
                ("3 key/value heads × 2", three, 2),
                ("one key/value head × 4 (multi-query attention)", one, 4)]
    cases = [Case(name, (x, n_rep), layers.repeat_kv(x, n_rep)) for name, x, n_rep in settings]
    return run_check("check_repeat_kv", fn, cases, REPEAT_KV_MISTAKES, verbose=verbose)


def _attention_with(q, k, v, mask, scaling, repeat=layers.repeat_kv, scale=None, mask_fn=None, axis=-1):
    """layers.attention written out, with one step swappable to build the wrong versions."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat(k, n_rep), repeat(v, n_rep)
    scores = q @ k.swapaxes(-1, -2)
    scores = scores * q.dtype.type(scaling) if scale is None else scale(scores, scaling)
    if mask is not None:
        scores = scores + mask if mask_fn is None else mask_fn(scores, mask)
    weights = layers.softmax(scores, axis=axis).astype(q.dtype)
    return weights @ v


def _attention_tiled(q, k, v, mask, scaling):
    return _attention_with(q, k, v, mask, scaling, repeat=_repeat_kv_tiled)


def _attention_minus_inf(q, k, v, mask, scaling):
    return _attention_with(q, k, v, mask, scaling, mask_fn=lambda s, m: np.where(m < 0, -np.inf, s))


def _attention_unscaled(q, k, v, mask, scaling):
    return _attention_with(q, k, v, mask, scaling, scale=lambda s, c: s)


def _attention_divided_by_scaling(q, k, v, mask, scaling):
    return _attention_with(q, k, v, mask, scaling, scale=lambda s, c: s / c)


def _attention_mask_ignored(q, k, v, mask, scaling):
    return _attention_with(q, k, v, mask, scaling, mask_fn=lambda s, m: s)


def _attention_softmax_over_queries(q, k, v, mask, scaling):
    return _attention_with(q, k, v, mask, scaling, axis=-2)


MINUS_INF_HINT = (
    "Padded rows came out as NaN: a query row whose every key is masked with −inf gives "
    "softmax(−inf, …, −inf) = 0/0. Add the mask as given — np.finfo(float32).min, a finite number — "
    "so those rows become a harmless uniform average. A NaN does not stay in its row: in the next "
    "layer it reaches every query through the keys.")

ATTENTION_MISTAKES = (
    Mistake("tiled heads", TILED_HEADS_HINT, (_attention_tiled,)),
    Mistake("−inf mask", MINUS_INF_HINT, (_attention_minus_inf,)),
    Mistake("scaling missing",
            "Multiply the scores q·kᵀ by `scaling` (hd^−0.5) before the softmax.", (_attention_unscaled,)),
    Mistake("scaling inverted",
            "`scaling` is already hd^−0.5: multiply the scores by it, don't divide.",
            (_attention_divided_by_scaling,)),
    Mistake("mask ignored",
            "Add the mask to the scores before the softmax: it is 0 where a query may look and a very "
            "negative number elsewhere (the future, padding).", (_attention_mask_ignored,)),
    Mistake("softmax over queries",
            "Take the softmax over the keys (the last axis): each query's weights add up to 1.",
            (_attention_softmax_over_queries,)),
)

ATTENTION_TAG_HINTS = {
    "gqa": "Only cases with fewer key/value heads than query heads fail (GQA): query head j uses "
           "key/value head j // (H/KV) — repeat each of k and v H/KV times in place (repeat_kv).",
    "past": "Only the case with keys from a cache fails: the scores are (T, S) with S > T — nothing "
            "may assume they are square.",
    "no_mask": "Only the case with mask=None fails: skip the addition when there is no mask.",
    "padding": "Only padded batches fail: add the (B, 1, T, S) mask to the scores before the softmax.",
}


def _random_attention_case(name, rng, batch, heads, kv_heads, queries, keys, head_dim, padding=None,
                           use_mask=True, tags=()):
    q = rng.normal(size=(batch, heads, queries, head_dim)).astype(np.float32)
    k = rng.normal(size=(batch, kv_heads, keys, head_dim)).astype(np.float32)
    v = rng.normal(size=(batch, kv_heads, keys, head_dim)).astype(np.float32)
    mask = layers.attention_mask(padding, queries, keys - queries, batch) if use_mask else None
    return _attention_case(name, q, k, v, mask, head_dim, padding, tags)


def _attention_case(name, q, k, v, mask, head_dim, padding, tags):
    """A case whose compared elements are the query rows of real tokens."""
    scaling = head_dim ** -0.5
    expected = layers.attention(q, k, v, mask, scaling)
    where = None
    if padding is not None:
        real_queries = padding[:, -q.shape[2]:].astype(bool)  # (B, T)
        where = real_queries[:, None, :, None]  # (B, 1, T, 1): broadcasts to the output
    tags = set(tags) | ({"gqa"} if k.shape[1] < q.shape[1] else set())
    return Case(name, (q, k, v, mask, scaling), expected, where=where, tags=frozenset(tags))


def attention_cases(prefer_bundled: bool = True) -> list[Case]:
    sample = model_sample(prefer_bundled)
    config = sample.config
    batch, length = sample.input_ids.shape
    mask = layers.attention_mask(sample.attention_mask, length, 0, batch)
    cases = []
    for layer in (0, config.num_hidden_layers - 1):
        q = sample.activation("attn.hook_rot_q", layer).transpose(0, 2, 1, 3)
        k = sample.activation("attn.hook_rot_k", layer).transpose(0, 2, 1, 3)
        v = sample.activation("attn.hook_v", layer).transpose(0, 2, 1, 3)
        cases.append(_attention_case(
            f"layer {layer} of {sample.source}: left-padded batch, {config.num_attention_heads} query "
            f"heads / {config.num_key_value_heads} key/value heads", q, k, v, mask, config.head_dim,
            sample.attention_mask, {"padding"}))
    rng = np.random.default_rng(14)
    right_padded = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    left_padded = np.array([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    cases += [
        _random_attention_case("multi-head (4 heads, 4 key/value heads), mask=None", rng, 1, 4, 4, 5, 5, 8,
                               use_mask=False, tags=["no_mask"]),
        _random_attention_case("3 query heads per key/value head, right-padded, head_dim 6", rng, 2, 6, 2, 5, 5,
                               6, padding=right_padded, tags=["padding"]),
        _random_attention_case("2 query heads per key/value head, left-padded batch of 3", rng, 3, 4, 2, 6, 6, 4,
                               padding=left_padded, tags=["padding"]),
        _random_attention_case("one key/value head for 4 query heads: 3 new queries over 7 keys (4 cached)",
                               rng, 1, 4, 1, 3, 7, 4, padding=np.ones((1, 7), np.int64), tags=["past"]),
    ]
    return cases


def check_attention(fn, verbose: bool = True, prefer_bundled: bool = True) -> CheckResult:
    """Check ``fn(q, k, v, mask, scaling) -> output`` against ``layers.attention``.

    q (B, H, T, hd); k, v (B, KV, S, hd); mask (B, 1, T, S) additive or None. Rows of padded
    queries are not compared (they mean nothing) but must be finite.
    """
    return run_check("check_attention", fn, attention_cases(prefer_bundled), ATTENTION_MISTAKES,
                     ATTENTION_TAG_HINTS, verbose=verbose)


# ---------------------------------------------------------------------------- SwiGLU


def _swiglu_silu_on_up(x, gate_proj, up_proj, down_proj):
    return (x @ gate_proj.T * layers.silu(x @ up_proj.T)) @ down_proj.T


def _swiglu_sigmoid(x, gate_proj, up_proj, down_proj):
    gate = x @ gate_proj.T
    return (1 / (1 + np.exp(-gate)) * (x @ up_proj.T)) @ down_proj.T


def _swiglu_silu_after_product(x, gate_proj, up_proj, down_proj):
    return layers.silu((x @ gate_proj.T) * (x @ up_proj.T)) @ down_proj.T


def _swiglu_relu(x, gate_proj, up_proj, down_proj):
    return (np.maximum(x @ gate_proj.T, 0) * (x @ up_proj.T)) @ down_proj.T


def _swiglu_untransposed(x, gate_proj, up_proj, down_proj):
    return (layers.silu(x @ gate_proj) * (x @ up_proj)) @ down_proj


SWIGLU_MISTAKES = (
    Mistake("silu on the up projection",
            "SiLU goes on the *gate* projection: down(silu(gate(x)) ⊙ up(x)). You applied it to up.",
            (_swiglu_silu_on_up,)),
    Mistake("sigmoid instead of silu",
            "silu(x) = x · sigmoid(x): you used sigmoid alone.", (_swiglu_sigmoid,)),
    Mistake("silu after the product",
            "Apply SiLU to the gate before multiplying by up: silu(gate(x)) ⊙ up(x), not silu(gate ⊙ up).",
            (_swiglu_silu_after_product,)),
    Mistake("relu instead of silu",
            "Llama's activation is SiLU, x · sigmoid(x), not ReLU.", (_swiglu_relu,)),
    Mistake("weights not transposed",
            "Weights are stored (out, in) like torch.nn.Linear: a projection is x @ W.T. Without the "
            "transpose only a square MLP (I = D) runs at all, and gives the wrong numbers.",
            (_swiglu_untransposed,)),
)


def swiglu_cases(prefer_bundled: bool = True) -> list[Case]:
    sample = model_sample(prefer_bundled)
    cases = []
    for layer in (0, sample.config.num_hidden_layers - 1):
        w = sample.layer(layer)
        x = w.post_attention_layernorm * sample.activation("ln2.hook_normalized", layer)  # the MLP's input
        cases.append(Case(f"layer-{layer} MLP input of {sample.source}, shape {x.shape}",
                          (x, w.gate_proj, w.up_proj, w.down_proj),
                          layers.swiglu(x, w.gate_proj, w.up_proj, w.down_proj)))
    rng = np.random.default_rng(15)
    for name, batch, length, hidden, intermediate in [("a square MLP (I = D = 8)", 2, 3, 8, 8),
                                                      ("one token, D = 5, I = 7", 1, 1, 5, 7)]:
        x = rng.normal(size=(batch, length, hidden)).astype(np.float32)
        gate, up = (rng.normal(0, 0.5, size=(intermediate, hidden)).astype(np.float32) for _ in range(2))
        down = rng.normal(0, 0.5, size=(hidden, intermediate)).astype(np.float32)
        cases.append(Case(name, (x, gate, up, down), layers.swiglu(x, gate, up, down)))
    return cases


def check_swiglu(fn, verbose: bool = True, prefer_bundled: bool = True) -> CheckResult:
    """Check ``fn(x, gate_proj, up_proj, down_proj)`` against ``layers.swiglu``.

    x (B, T, D); gate_proj, up_proj (I, D); down_proj (D, I)  ->  (B, T, D)
    """
    return run_check("check_swiglu", fn, swiglu_cases(prefer_bundled), SWIGLU_MISTAKES, verbose=verbose)
