"""The pure functions of layers.py, checked against independent formulations.

The end-to-end comparison with Transformers lives in test_fixtures.py; these tests pin the
conventions one at a time (each test would catch one classic porting mistake).
"""

import numpy as np
import pytest

from llama_np import layers
from tolerance import REPEATED_TOLERANCE, assert_close, assert_relatively_close

rng = np.random.default_rng(1234)


def test_rms_norm_matches_the_formula_with_eps_inside_the_root():
    x = rng.normal(size=(2, 3, 8)).astype(np.float32)
    weight = rng.normal(size=8).astype(np.float32)
    eps = 1e-5
    expected = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * weight
    assert_close(layers.rms_norm(x, weight, eps), expected, "rms_norm", REPEATED_TOLERANCE)


def test_default_rope_frequencies_follow_torch_float_recipe():
    # torch: 1 / (theta ** (arange(0, d, 2).float() / d)) with the power taken in float64
    inv_freq, factor = layers.default_rope_frequencies(128, 10000.0)
    exponent = np.arange(0, 128, 2, dtype=np.float32) / np.float32(128)
    expected = np.float32(1) / np.power(10000.0, exponent.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(inv_freq, expected)
    assert inv_freq.dtype == np.float32 and factor == 1.0
    assert inv_freq[0] == 1.0 and inv_freq[-1] < 1.2e-4


def test_linear_scaling_divides_every_frequency():
    plain, _ = layers.default_rope_frequencies(64, 10000.0)
    scaled, _ = layers.linear_rope_frequencies(64, 10000.0, 4.0)
    np.testing.assert_array_equal(scaled, plain / np.float32(4))


def test_dynamic_scaling_is_plain_rope_within_max_positions_and_larger_base_beyond():
    plain, _ = layers.default_rope_frequencies(64, 10000.0)
    within, _ = layers.dynamic_rope_frequencies(64, 10000.0, 2.0, 16, 16)
    beyond, _ = layers.dynamic_rope_frequencies(64, 10000.0, 2.0, 16, 24)
    np.testing.assert_array_equal(within, plain)
    assert beyond[0] == 1.0 and (beyond[1:] < plain[1:]).all()
    base = 10000.0 * ((2.0 * 24 / 16) - 1.0) ** (64 / 62)
    assert_relatively_close(beyond, layers.default_rope_frequencies(64, base)[0], "dynamic inv_freq")


def test_llama3_scaling_keeps_high_frequencies_and_divides_low_ones():
    plain, _ = layers.default_rope_frequencies(128, 500000.0)
    scaled, _ = layers.llama3_rope_frequencies(128, 500000.0, 8.0, 1.0, 4.0, 8192)
    wavelen = 2 * np.pi / plain
    np.testing.assert_array_equal(scaled[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])
    assert_relatively_close(scaled[wavelen > 8192], plain[wavelen > 8192] / 8, "llama3 long wavelengths")
    medium = (wavelen >= 8192 / 4) & (wavelen <= 8192)
    assert medium.any()
    assert ((scaled[medium] < plain[medium]) & (scaled[medium] > plain[medium] / 8)).all()


def test_yarn_attention_factor_is_0_1_ln_factor_plus_1():
    inv_freq, attention_factor = layers.yarn_rope_frequencies(64, 10000.0, 4.0, 2048)
    assert attention_factor == pytest.approx(0.1 * np.log(4.0) + 1.0)
    plain, _ = layers.default_rope_frequencies(64, 10000.0)
    np.testing.assert_array_equal(inv_freq[0], plain[0])  # fastest pair: extrapolated (kept)
    assert_relatively_close(inv_freq[-1], plain[-1] / 4, "yarn slowest pair")  # slowest: interpolated


def rope_by_complex_numbers(x, positions, inv_freq):
    """RoPE written independently: pair (i, i + hd/2) is the complex number x_i + i·x_{i+hd/2}."""
    half = x.shape[-1] // 2
    z = x[..., :half].astype(np.complex128) + 1j * x[..., half:]
    z = z * np.exp(1j * positions[:, None, :, None] * inv_freq.astype(np.float64))
    return np.concatenate([z.real, z.imag], axis=-1)


def test_apply_rope_rotates_pair_i_with_i_plus_half():
    x = rng.normal(size=(2, 3, 5, 16)).astype(np.float32)  # (B, heads, T, hd)
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    inv_freq, _ = layers.default_rope_frequencies(16, 10000.0)
    cos, sin = layers.rope_cos_sin(positions, inv_freq)
    rotated = layers.apply_rope(x, cos, sin)
    assert_close(rotated, rope_by_complex_numbers(x, positions, inv_freq), "RoPE vs complex numbers", REPEATED_TOLERANCE)
    # a rotation keeps the norm of every pair
    assert_close(np.linalg.norm(rotated, axis=-1), np.linalg.norm(x, axis=-1), "norms after RoPE", REPEATED_TOLERANCE)


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_meta_layout_with_permuted_rows_gives_the_same_attention_scores(num_heads, num_kv_heads):
    hd, D, T = 8, 12, 6
    x = rng.normal(size=(1, T, D)).astype(np.float32)
    wq_meta = rng.normal(size=(num_heads * hd, D)).astype(np.float32)
    wk_meta = rng.normal(size=(num_kv_heads * hd, D)).astype(np.float32)
    positions = np.arange(T)[None]
    cos, sin = layers.rope_cos_sin(positions, layers.default_rope_frequencies(hd, 10000.0)[0])

    def scores(wq, wk, rope):
        q = (x @ wq.T).reshape(1, T, num_heads, hd).transpose(0, 2, 1, 3)
        k = (x @ wk.T).reshape(1, T, num_kv_heads, hd).transpose(0, 2, 1, 3)
        k = layers.repeat_kv(k, num_heads // num_kv_heads)
        return rope(q, cos, sin) @ rope(k, cos, sin).swapaxes(-1, -2)

    meta = scores(wq_meta, wk_meta, layers.apply_rope_interleaved)
    hf = scores(layers.permute_rope_rows(wq_meta, num_heads),
                layers.permute_rope_rows(wk_meta, num_kv_heads), layers.apply_rope)
    assert_close(hf, meta, "HF vs Meta layout scores", REPEATED_TOLERANCE)
    np.testing.assert_array_equal(
        layers.unpermute_rope_rows(layers.permute_rope_rows(wk_meta, num_kv_heads), num_kv_heads), wk_meta)


def test_permuting_k_with_the_query_head_count_breaks_gqa():
    wk = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 kv heads of size 8
    assert not np.array_equal(layers.permute_rope_rows(wk, 2), layers.permute_rope_rows(wk, 4))


def test_repeat_kv_repeats_each_head_in_place_not_tiled():
    kv = np.arange(2)[None, :, None, None] * np.ones((1, 2, 3, 4))  # heads hold 0 and 1
    repeated = layers.repeat_kv(kv, 3)
    assert repeated.shape == (1, 6, 3, 4)
    np.testing.assert_array_equal(repeated[0, :, 0, 0], [0, 0, 0, 1, 1, 1])


def test_attention_mask_is_causal_with_cache_offset_and_padding():
    padding = np.array([[0, 1, 1, 1, 1]])  # one left pad; 3 cached positions, 2 new queries
    mask = layers.attention_mask(padding, query_length=2, past_length=3, batch_size=1)
    lowest = np.finfo(np.float32).min
    expected = np.array([[lowest, 0, 0, 0, lowest],
                         [lowest, 0, 0, 0, 0]], dtype=np.float32)
    np.testing.assert_array_equal(mask[0, 0], expected)


def test_fully_masked_query_row_gives_uniform_weights_not_nan():
    q = rng.normal(size=(1, 2, 3, 4)).astype(np.float32)
    k = rng.normal(size=(1, 1, 3, 4)).astype(np.float32)
    v = rng.normal(size=(1, 1, 3, 4)).astype(np.float32)
    mask = layers.attention_mask(np.array([[0, 0, 1]]), 3, 0, 1)
    seen = {}
    out = layers.attention(q, k, v, mask, 0.5, tap=layers.recorder(seen))
    weights = seen["hook_pattern"]
    assert np.isfinite(out).all()
    assert_close(weights[0, :, 0], np.full((2, 3), 1 / 3), "uniform all-masked row", REPEATED_TOLERANCE)
    assert_close(weights[0, :, 2].sum(-1), np.ones((2,)), "softmax row sums", REPEATED_TOLERANCE)


def test_attention_matches_an_explicit_loop_over_heads():
    H, KV, T, hd = 4, 2, 5, 8
    q = rng.normal(size=(1, H, T, hd)).astype(np.float32)
    k = rng.normal(size=(1, KV, T, hd)).astype(np.float32)
    v = rng.normal(size=(1, KV, T, hd)).astype(np.float32)
    mask = layers.attention_mask(None, T, 0, 1)
    out = layers.attention(q, k, v, mask, hd ** -0.5)
    for head in range(H):
        kv = head // (H // KV)
        scores = q[0, head] @ k[0, kv].T / np.sqrt(hd)
        scores[np.triu_indices(T, 1)] = -np.inf
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        assert_close(out[0, head], weights @ v[0, kv], f"head {head}", REPEATED_TOLERANCE)


def test_swiglu_is_down_of_silu_gate_times_up():
    x = rng.normal(size=(1, 2, 6)).astype(np.float32)
    gate, up, down = (rng.normal(size=s).astype(np.float32) for s in [(10, 6), (10, 6), (6, 10)])
    g = x @ gate.T
    expected = ((g / (1 + np.exp(-g))) * (x @ up.T)) @ down.T
    assert_close(layers.swiglu(x, gate, up, down), expected, "swiglu", REPEATED_TOLERANCE)


def test_pretraining_tp_slicing_gives_the_same_projection():
    x = rng.normal(size=(2, 3, 8)).astype(np.float32)
    w_in = rng.normal(size=(5, 8)).astype(np.float32)
    sliced = layers.linear(x, w_in, pretraining_tp=4)
    assert_close(sliced, x @ w_in.T, "tp=4 by input columns", REPEATED_TOLERANCE)
    partial_sums = sum(x[..., 2 * i:2 * i + 2] @ w_in[:, 2 * i:2 * i + 2].T for i in range(4))
    np.testing.assert_array_equal(sliced, partial_sums)  # the summation order of Transformers 4.45


def test_embedding_uses_the_stored_pad_row_and_init_zeroes_it():
    table = rng.normal(size=(5, 3)).astype(np.float32)
    np.testing.assert_array_equal(layers.embedding(np.array([[4, 0]]), table)[0], table[[4, 0]])
    fresh = layers.init_embedding(5, 3, padding_idx=0, std=0.02, rng=np.random.default_rng(0))
    assert (fresh[0] == 0).all() and (fresh[1:] != 0).all()
