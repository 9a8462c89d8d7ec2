"""The maths of Llama 2, one pure NumPy function per component.

Read this file top to bottom as the textbook chapter: token embedding, RMSNorm, rotary position
embedding (RoPE) and its scaling types, grouped-query attention (GQA) with its mask, and the
SwiGLU MLP. Nothing here knows about files, classes or caches; weights come in as arguments with
the names and layouts of the Hugging Face checkpoint (``y = x @ W.T + b``).

Shape legend: B batch, T query positions, S key positions (past + current), D hidden size,
H query heads, KV key/value heads, hd head_dim, I intermediate size, V vocabulary size.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

# ---------------------------------------------------------------------------- hook points
#
# A component with TransformerLens hook points inside it (RMSNorm, attention, the MLP) hands
# each intermediate array to ``tap(name, x)`` and goes on with what the tap returns. An ordinary
# forward passes ``no_tap``, the identity, so the traced run *is* the run; run_with_cache and
# run_with_hooks (llama_np.interp) pass a tap that records or replaces.

Tap = Callable[[str, np.ndarray], np.ndarray]


def no_tap(name: str, x: np.ndarray) -> np.ndarray:
    """The tap of an ordinary forward pass: every hook point is the identity."""
    return x


def recorder(store: dict) -> Tap:
    """A tap that keeps every activation it is shown in ``store``, by name, and changes none.

        seen = {}
        output = attention(q, k, v, mask, scaling, tap=recorder(seen))
        weights = seen["hook_pattern"]                      # (B, H, T, S)
    """
    def record(name: str, x: np.ndarray) -> np.ndarray:
        store[name] = x
        return x
    return record


def scoped(tap: Tap, prefix: str) -> Tap:
    """The tap a component sees: its hook names prefixed (``ln1.`` + ``hook_scale``)."""
    if tap is no_tap:
        return no_tap
    return lambda name, x: tap(f"{prefix}.{name}", x)

# ---------------------------------------------------------------------------- embedding


def embedding(input_ids: np.ndarray, embed_tokens: np.ndarray) -> np.ndarray:
    """Look up one row of the embedding matrix per token.

    input_ids (B, T) integers in [0, V); embed_tokens (V, D)  ->  (B, T, D)

    ``padding_idx`` plays no part here: in Transformers it only zeroes the pad row at
    initialisation (and keeps its gradient at zero). A loaded checkpoint's pad row is used as
    stored (docs/reference.md §3.1); see ``init_embedding``.
    """
    return embed_tokens[input_ids]


def init_embedding(vocab_size: int, hidden_size: int, padding_idx: int | None,
                   std: float, rng: np.random.Generator) -> np.ndarray:
    """A freshly initialised embedding matrix (V, D): N(0, std²) with the pad row set to zero.

    This is the only place ``padding_idx`` changes numbers.
    """
    weight = rng.normal(0.0, std, size=(vocab_size, hidden_size)).astype(np.float32)
    if padding_idx is not None:
        weight[padding_idx] = 0.0
    return weight


# ---------------------------------------------------------------------------- RMSNorm


def rms(x: np.ndarray, eps: float) -> np.ndarray:
    """The root mean square of each vector, eps inside the root.  x (..., D) -> (..., 1)

        rms(x) = sqrt(mean(x²) + eps)

    Computed in float32 (or wider) even for half-precision x.
    """
    x_wide = x.astype(np.promote_types(x.dtype, np.float32), copy=False)
    return np.sqrt(np.mean(x_wide * x_wide, axis=-1, keepdims=True) + x_wide.dtype.type(eps))


def normalize(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """x / rms(x), cast back to x's dtype.  x (..., D); scale (..., 1) -> (..., D)"""
    return (x.astype(scale.dtype, copy=False) / scale).astype(x.dtype, copy=False)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, tap: Tap = no_tap) -> np.ndarray:
    """Root-mean-square layer norm (Zhang & Sennrich, 2019).

    x (..., D); weight (D,)  ->  (..., D)

        y = x / sqrt(mean(x²) + eps) * weight

    eps sits inside the square root. The normalisation runs in float32 (or wider) and is cast
    back to the input dtype *before* the weight multiplies it, as Transformers does.
    Hook points: ``hook_scale`` rms(x) (..., 1), ``hook_normalized`` x / rms(x) (..., D).
    """
    scale = tap("hook_scale", rms(x, eps))
    return weight * tap("hook_normalized", normalize(x, scale))


# ---------------------------------------------------------------------------- RoPE frequencies
#
# Every function below returns (inv_freq, attention_factor): inv_freq (hd/2,) holds the angular
# frequency of each rotated pair, attention_factor multiplies cos and sin (1.0 except for yarn).
# In float32 (the default) they follow torch's float recipe (docs/reference.md §3.3) so that
# cos/sin match Transformers to the last bit: an error of one ulp in inv_freq grows with
# position (1e-4 in cos near position 4000). With dtype=np.float64 the same formulas run in
# float64 throughout, for a model computing in float64.


def _theta_powers(theta: float, head_dim: int, dtype=np.float32) -> np.ndarray:
    """theta^(2i/hd) for i < hd/2, as torch computes ``theta ** (arange(0, hd, 2) / hd)``.

    The exponent 2i/hd is formed in float32, the power is taken in float64 and rounded to
    float32. (A plain float32 ``np.power`` is one ulp off for about 15% of the entries.)
    """
    exponent = np.arange(0, head_dim, 2, dtype=dtype) / np.dtype(dtype).type(head_dim)
    return np.power(np.float64(theta), exponent.astype(np.float64)).astype(dtype)


def default_rope_frequencies(head_dim: int, theta: float, dtype=np.float32) -> tuple[np.ndarray, float]:
    """Plain RoPE (Su et al., 2021): inv_freq[i] = 1 / theta^(2i/hd)."""
    return np.dtype(dtype).type(1.0) / _theta_powers(theta, head_dim, dtype), 1.0


def linear_rope_frequencies(head_dim: int, theta: float, factor: float,
                            dtype=np.float32) -> tuple[np.ndarray, float]:
    """Position interpolation: every frequency divided by ``factor`` (positions squeezed)."""
    inv_freq, _ = default_rope_frequencies(head_dim, theta, dtype)
    return inv_freq / np.dtype(dtype).type(factor), 1.0


def dynamic_rope_frequencies(head_dim: int, theta: float, factor: float,
                             max_position_embeddings: int, seq_len: int,
                             dtype=np.float32) -> tuple[np.ndarray, float]:
    """Dynamic NTK scaling: a larger base once the sequence outgrows max_position_embeddings L.

        base' = theta · ((factor · T / L) − (factor − 1)) ^ (hd / (hd − 2)),   T = seq_len > L

    For T <= L this is plain RoPE. Transformers computes base' in float32 from a tensor
    sequence length, so we do too.
    """
    if seq_len <= max_position_embeddings:
        return default_rope_frequencies(head_dim, theta, dtype)
    f32 = np.dtype(dtype).type  # float32 as Transformers, or float64
    stretch = f32(factor) * f32(seq_len) / f32(max_position_embeddings) - f32(factor - 1)
    base = f32(theta) * np.power(stretch, f32(head_dim / (head_dim - 2)))
    return default_rope_frequencies(head_dim, float(base), dtype)


def llama3_rope_frequencies(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                            high_freq_factor: float,
                            original_max_position_embeddings: int,
                            dtype=np.float32) -> tuple[np.ndarray, float]:
    """Llama 3.1 scaling: long wavelengths divided by ``factor``, short ones kept, a blend between.

    With wavelen = 2π / inv_freq, low_wl = orig / low_freq_factor, high_wl = orig / high_freq_factor:
      wavelen > low_wl   -> inv_freq / factor
      wavelen < high_wl  -> inv_freq
      otherwise          -> (1 − s) · inv_freq / factor + s · inv_freq,
                            s = (orig / wavelen − low_freq_factor) / (high_freq_factor − low_freq_factor)
    """
    f32 = np.dtype(dtype).type  # float32 as Transformers, or float64
    inv_freq, _ = default_rope_frequencies(head_dim, theta, dtype)
    orig = original_max_position_embeddings
    wavelen = f32(2 * math.pi) / inv_freq
    low_freq_wavelen = orig / low_freq_factor
    high_freq_wavelen = orig / high_freq_factor
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / f32(factor), inv_freq)
    smooth = (f32(orig) / wavelen - f32(low_freq_factor)) / f32(high_freq_factor - low_freq_factor)
    smoothed = (f32(1) - smooth) * scaled / f32(factor) + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(dtype), 1.0


def yarn_rope_frequencies(head_dim: int, theta: float, factor: float,
                          original_max_position_embeddings: int, beta_fast: float = 32.0,
                          beta_slow: float = 1.0, attention_factor: float | None = None,
                          mscale: float | None = None, mscale_all_dim: float | None = None,
                          truncate: bool = True, dtype=np.float32) -> tuple[np.ndarray, float]:
    """YaRN (Peng et al., 2023): interpolate low frequencies, keep high ones, ramp between.

    Dimension pairs that turn fewer than ``beta_slow`` times over the original context are
    interpolated (inv_freq / factor); those that turn more than ``beta_fast`` times are kept;
    a linear ramp blends the pairs in between. cos and sin are multiplied by an attention factor,
    0.1 · ln(factor) + 1 unless given (Transformers 5.x formulas).
    """
    f32 = np.dtype(dtype).type  # float32 as Transformers, or float64

    def mscale_of(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim))
        else:
            attention_factor = mscale_of(factor)

    def correction_dim(num_rotations):
        # The pair index i whose wavelength fits num_rotations times in the original context.
        return (head_dim * math.log(original_max_position_embeddings / (num_rotations * 2 * math.pi))
                / (2 * math.log(theta)))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=dtype) - f32(low)) / f32(high - low), 0, 1)
    extrapolation_weight = f32(1) - ramp.astype(dtype)

    powers = _theta_powers(theta, head_dim, dtype)
    inv_freq_extrapolation = f32(1) / powers
    inv_freq_interpolation = f32(1) / (f32(factor) * powers)
    inv_freq = (inv_freq_interpolation * (f32(1) - extrapolation_weight)
                + inv_freq_extrapolation * extrapolation_weight)
    return inv_freq.astype(dtype), attention_factor


def rope_frequencies(head_dim: int, rope_parameters: dict, max_position_embeddings: int,
                     seq_len: int = 0, dtype=np.float32) -> tuple[np.ndarray, float]:
    """inv_freq (hd/2,) and the cos/sin attention factor for a config's RoPE settings.

    ``rope_parameters`` is ``LlamaConfig.rope_parameters`` (rope_type, rope_theta and the
    scaling fields). ``seq_len`` (the largest position + 1) matters only for ``dynamic``.
    ``dtype`` is float32 (torch's recipe, the default) or float64.
    """
    p = rope_parameters
    rope_type, theta = p["rope_type"], p["rope_theta"]
    if rope_type == "default":
        return default_rope_frequencies(head_dim, theta, dtype)
    if rope_type == "linear":
        return linear_rope_frequencies(head_dim, theta, p["factor"], dtype)
    if rope_type == "dynamic":
        return dynamic_rope_frequencies(head_dim, theta, p["factor"], max_position_embeddings, seq_len, dtype)
    if rope_type == "llama3":
        return llama3_rope_frequencies(head_dim, theta, p["factor"], p["low_freq_factor"],
                                       p["high_freq_factor"], p["original_max_position_embeddings"], dtype)
    if rope_type == "yarn":
        return yarn_rope_frequencies(
            head_dim, theta, p["factor"], p["original_max_position_embeddings"],
            beta_fast=p.get("beta_fast") or 32.0, beta_slow=p.get("beta_slow") or 1.0,
            attention_factor=p.get("attention_factor"), mscale=p.get("mscale"),
            mscale_all_dim=p.get("mscale_all_dim"), truncate=p.get("truncate", True), dtype=dtype,
        )
    raise ValueError(f"unknown rope type {rope_type!r}")


def rope_cos_sin(position_ids: np.ndarray, inv_freq: np.ndarray, attention_factor: float = 1.0,
                 dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The cos and sin tables of the HF layout for some positions.

    position_ids (B, T) integers; inv_freq (hd/2,)  ->  cos, sin (B, T, hd) in ``dtype``

    angle[b, t, i] = position · inv_freq[i] in ``dtype``, duplicated to hd (pair i ↔ i + hd/2);
    cos and sin are evaluated in float64 from those angles and rounded, which for float32 (the
    default) matches torch's float32 cos/sin.
    """
    angles = position_ids.astype(dtype)[..., None] * inv_freq.astype(dtype)  # (B, T, hd/2)
    angles = np.concatenate([angles, angles], axis=-1).astype(np.float64)  # (B, T, hd)
    cos = (np.cos(angles) * attention_factor).astype(dtype)
    sin = (np.sin(angles) * attention_factor).astype(dtype)
    return cos, sin


# ---------------------------------------------------------------------------- applying RoPE


def rotate_half(x: np.ndarray) -> np.ndarray:
    """(x1, x2) -> (−x2, x1) on the two halves of the last axis: dimension i pairs with i + hd/2."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate queries or keys by their positions, Hugging Face (rotate-half) layout.

    x (B, heads, T, hd); cos, sin (B, T, hd)  ->  (B, heads, T, hd)

        x' = x · cos + rotate_half(x) · sin

    i.e. each pair (x_i, x_{i+hd/2}) is turned by the angle position · inv_freq[i].
    """
    cos, sin = cos[:, None].astype(x.dtype), sin[:, None].astype(x.dtype)  # broadcast over heads
    return x * cos + rotate_half(x) * sin


def apply_rope_interleaved(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """The same rotation in Meta's layout, where adjacent dimensions (2i, 2i+1) form a pair.

    x (B, heads, T, hd); cos, sin (B, T, hd) in the HF layout (only the first hd/2 are used)

    Meta's reference treats each pair as a complex number and multiplies it by e^{i·angle}.
    Queries/keys of a Meta checkpoint rotated this way give the same attention scores as the
    HF checkpoint (rows permuted by ``permute_rope_rows``) rotated by ``apply_rope``.
    """
    half = x.shape[-1] // 2
    cos, sin = cos[:, None, :, :half].astype(x.dtype), sin[:, None, :, :half].astype(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = np.empty_like(x)
    rotated[..., 0::2] = even * cos - odd * sin
    rotated[..., 1::2] = even * sin + odd * cos
    return rotated


def permute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Map q_proj or k_proj rows from Meta's interleaved layout to the HF rotate-half layout.

    weight (heads·hd, D) -> (heads·hd, D). Per head: HF row half·hd/2 + i = Meta row 2i + half
    (half ∈ {0, 1}, i < hd/2). Use num_attention_heads for q_proj and num_key_value_heads for
    k_proj — with GQA, permuting k with the query head count scrambles every key head.
    """
    rows, columns = weight.shape
    head_dim = rows // num_heads
    # (heads, hd/2, 2, D): pair i, member half  ->  (heads, 2, hd/2, D): half-major
    return (weight.reshape(num_heads, head_dim // 2, 2, columns)
            .transpose(0, 2, 1, 3).reshape(rows, columns))


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """The inverse of ``permute_rope_rows``: HF rotate-half rows back to Meta's interleaved rows."""
    rows, columns = weight.shape
    head_dim = rows // num_heads
    return (weight.reshape(num_heads, 2, head_dim // 2, columns)
            .transpose(0, 2, 1, 3).reshape(rows, columns))


# ---------------------------------------------------------------------------- attention


def repeat_kv(x: np.ndarray, n_rep: int) -> np.ndarray:
    """Share each key/value head with n_rep consecutive query heads (GQA).

    x (B, KV, S, hd)  ->  (B, KV·n_rep, S, hd)

    Query head j reads key/value head j // n_rep: every head is repeated *in place*
    (k0 k0 k1 k1), not tiled (k0 k1 k0 k1).
    """
    if n_rep == 1:
        return x
    return np.repeat(x, n_rep, axis=1)


def attention_mask(padding_mask: np.ndarray | None, query_length: int, past_length: int,
                   batch_size: int, dtype=np.float32) -> np.ndarray:
    """The additive attention mask: 0 where a query may look, the dtype's lowest value elsewhere.

    padding_mask (B, S) of 0/1 or None, S = past_length + query_length  ->  (B, 1, T, S)

    Query t (at absolute position past_length + t) may attend to key s when s <= past_length + t
    (causal) and padding_mask[b, s] = 1. The lowest finite value (finfo.min), not −inf, is used so
    that a row with every key masked (a left-padding query row) gives a uniform softmax instead of
    NaN; such rows are meaningless and never read.
    """
    key_length = past_length + query_length
    query_positions = past_length + np.arange(query_length)[:, None]  # (T, 1)
    allowed = np.arange(key_length)[None, :] <= query_positions  # (T, S)
    allowed = np.broadcast_to(allowed, (batch_size, 1, query_length, key_length))
    if padding_mask is not None:
        allowed = allowed & (padding_mask[:, None, None, :] != 0)
    return np.where(allowed, 0.0, np.finfo(dtype).min).astype(dtype)


def softmax(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(x − max x) / Σ exp(x − max x), in float32 or wider."""
    scores = scores.astype(np.promote_types(scores.dtype, np.float32), copy=False)
    shifted = scores - np.max(scores, axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / np.sum(exp, axis=axis, keepdims=True)


def attention_scores(q: np.ndarray, k: np.ndarray, mask: np.ndarray | None, scaling: float) -> np.ndarray:
    """How much each query matches each key, before the softmax.

    q (B, H, T, hd); k (B, KV, S, hd); mask (B, 1, T, S) additive or None  ->  (B, H, T, S)

        scores = q · kᵀ · scaling + mask

    Each key head serves H / KV query heads (``repeat_kv``). scaling is hd^−0.5 for Llama.
    """
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    scores = (q @ k.swapaxes(-1, -2)) * q.dtype.type(scaling)
    if mask is not None:
        scores = scores + mask.astype(scores.dtype, copy=False)
    return scores


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None,
              scaling: float, tap: Tap = no_tap) -> np.ndarray:
    """Scaled dot-product attention with grouped-query key/value heads.

    q (B, H, T, hd); k, v (B, KV, S, hd); mask (B, 1, T, S) additive or None
    ->  output (B, H, T, hd)

        weights = softmax(q · kᵀ · scaling + mask),   output = weights · v

    scaling is hd^−0.5 for Llama. The softmax runs in float32 even for float16 inputs.
    Hook points: ``hook_attn_scores`` (B, H, T, S) before the softmax and ``hook_pattern``, the
    weights (B, H, T, S) — which is where ``output_attentions`` reads them.
    """
    scores = tap("hook_attn_scores", attention_scores(q, k, mask, scaling))
    weights = tap("hook_pattern", softmax(scores).astype(q.dtype, copy=False))
    return weights @ repeat_kv(v, q.shape[1] // v.shape[1])


# ---------------------------------------------------------------------------- projections and MLP


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
           pretraining_tp: int = 1) -> np.ndarray:
    """y = x · Wᵀ + b. x (..., in); weight (out, in); bias (out,) or None  ->  (..., out).

    The weight is stored (out, in) as in torch.nn.Linear, hence the transpose.

    ``pretraining_tp`` > 1 reproduces the summation order of Transformers 4.45, which sums the
    product in that many slices of the input columns (for o_proj and down_proj):
    y = Σ_i x[..., cols_i] · W[:, cols_i]ᵀ. The same maths, rounded differently
    (docs/reference.md §3.11). Its slices of the output rows (q/k/v, gate/up,
    lm_head) are the same dot products as one product, so they need no argument here.
    """
    if pretraining_tp == 1:
        y = x @ weight.T
    else:
        columns = weight.shape[1] // pretraining_tp
        slices = [slice(i * columns, (i + 1) * columns) for i in range(pretraining_tp)]
        y = sum(x[..., part] @ weight[:, part].T for part in slices)
    return y if bias is None else y + bias


def silu(x: np.ndarray) -> np.ndarray:
    """silu(x) = x · sigmoid(x) = x / (1 + e^−x)."""
    return x / (x.dtype.type(1) + np.exp(-x))


def swiglu(x: np.ndarray, gate_proj: np.ndarray, up_proj: np.ndarray, down_proj: np.ndarray,
           gate_bias=None, up_bias=None, down_bias=None, pretraining_tp: int = 1,
           tap: Tap = no_tap) -> np.ndarray:
    """The Llama MLP (Shazeer, 2020): a SiLU-gated linear unit.

    x (B, T, D); gate_proj, up_proj (I, D); down_proj (D, I)  ->  (B, T, D)

        mlp(x) = down( silu(gate(x)) ⊙ up(x) )

    Hook points: ``hook_pre`` gate(x), ``hook_pre_linear`` up(x), ``hook_post`` their gated
    product, all (B, T, I).
    """
    gate = tap("hook_pre", linear(x, gate_proj, gate_bias))  # (B, T, I)
    up = tap("hook_pre_linear", linear(x, up_proj, up_bias))
    hidden = tap("hook_post", silu(gate) * up)
    return linear(hidden, down_proj, down_bias, pretraining_tp)
