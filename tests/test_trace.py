"""The activation trace: every hook name is recorded, values equal the layers.py maths, and
tracing changes no number."""

import numpy as np
import pytest

from llama_np import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel, layers
from llama_np import model as model_module
from llama_np.errors import InputError
from llama_np.interp.activation_cache import ActivationCache, full_hook_name, logit_lens
from llama_np.interp.hooks import HookOptions, hook_names, no_tap, run_with_cache
from tolerance import REPEATED_TOLERANCE, assert_close

# GQA with 3 query heads per key/value head, odd sizes, two layers.
CONFIG = dict(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2, head_dim=4, pad_token_id=0,
              max_position_embeddings=64)
# Left-padded batch: row 0 has two pads, row 1 none.
INPUT_IDS = np.array([[0, 0, 5, 17, 3, 42, 8], [7, 11, 13, 19, 23, 29, 31]])
PADDING = (INPUT_IDS != 0).astype(np.int64)


@pytest.fixture(scope="module")
def model():
    return LlamaForCausalLM.from_config(LlamaConfig(**CONFIG), seed=3)


@pytest.fixture(scope="module")
def traced(model):
    return run_with_cache(model, INPUT_IDS, attention_mask=PADDING)


def test_every_hook_name_is_recorded_in_forward_order(model, traced):
    _, cache = traced
    assert list(cache.keys()) == hook_names(model.config)
    # hook_embed, 20 points per layer, ln_final's scale and output, unembed's input and output
    assert len(hook_names(model.config)) == 1 + 20 * CONFIG["num_hidden_layers"] + 4


def test_tracing_leaves_the_logits_bit_identical(model, traced):
    logits, _ = traced
    plain = model(INPUT_IDS, attention_mask=PADDING).logits
    np.testing.assert_array_equal(logits, plain)


def test_one_forward_path_an_identity_tap_reaches_every_hook_point_and_changes_nothing(model):
    reached = []

    def identity(name, x):
        reached.append(name)
        return x

    # An ordinary call is this same path with trace.no_tap, the identity that records nothing.
    assert model.__call__.__kwdefaults__ is None and model_module.LlamaForCausalLM.__call__.__defaults__[-1] is no_tap
    tapped = model(INPUT_IDS, attention_mask=PADDING, tap=identity).logits
    assert reached == hook_names(model.config)
    np.testing.assert_array_equal(tapped, model(INPUT_IDS, attention_mask=PADDING).logits)


def test_model_method_delegates_to_run_with_cache(model, traced):
    logits, cache = model.run_with_cache(INPUT_IDS, attention_mask=PADDING)
    np.testing.assert_array_equal(logits, traced[0])
    assert list(cache.keys()) == list(traced[1].keys())


def test_hook_shapes_follow_the_documented_layout(model, traced):
    _, cache = traced
    B, T = INPUT_IDS.shape
    D, H, KV, hd, I = 24, 6, 2, 4, 40
    expected = {
        "hook_embed": (B, T, D), "blocks.1.hook_resid_pre": (B, T, D),
        "blocks.1.attn.hook_q": (B, T, H, hd), "blocks.1.attn.hook_k": (B, T, KV, hd),
        "blocks.1.attn.hook_v": (B, T, KV, hd), "blocks.1.attn.hook_rot_q": (B, T, H, hd),
        "blocks.1.attn.hook_rot_k": (B, T, KV, hd), "blocks.1.attn.hook_attn_scores": (B, H, T, T),
        "blocks.1.attn.hook_pattern": (B, H, T, T), "blocks.1.attn.hook_z": (B, T, H, hd),
        "blocks.1.mlp.hook_pre": (B, T, I), "blocks.1.mlp.hook_post": (B, T, I),
        "ln_final.hook_normalized": (B, T, D),
    }
    assert {name: cache[name].shape for name in expected} == expected


def _recompute_layer(model, cache, layer):
    """Every activation of one layer, recomputed from its resid_pre with layers.py."""
    config, w = model.config, model.layer_weights(layer)
    B, T = INPUT_IDS.shape
    H, KV, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    inv_freq, _ = layers.rope_frequencies(hd, config.rope_parameters, config.max_position_embeddings, T)
    cos, sin = layers.rope_cos_sin(np.arange(T)[None].repeat(B, 0), inv_freq)
    mask = layers.attention_mask(PADDING, T, 0, B)

    def rms(x):
        return np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(config.rms_norm_eps))

    x = cache[f"blocks.{layer}.hook_resid_pre"]
    # TransformerLens' norm hooks: the scale rms(x), and x / rms(x) before the learned weight
    out = {"ln1.hook_scale": rms(x), "ln1.hook_normalized": x / rms(x)}
    normed = layers.rms_norm(x, w.input_layernorm, config.rms_norm_eps)
    out["attn.hook_q"] = layers.linear(normed, w.q_proj).reshape(B, T, H, hd)
    out["attn.hook_k"] = layers.linear(normed, w.k_proj).reshape(B, T, KV, hd)
    out["attn.hook_v"] = layers.linear(normed, w.v_proj).reshape(B, T, KV, hd)
    q = layers.apply_rope(out["attn.hook_q"].transpose(0, 2, 1, 3), cos, sin)
    k = layers.apply_rope(out["attn.hook_k"].transpose(0, 2, 1, 3), cos, sin)
    v = out["attn.hook_v"].transpose(0, 2, 1, 3)
    out["attn.hook_rot_q"], out["attn.hook_rot_k"] = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
    out["attn.hook_attn_scores"] = q @ layers.repeat_kv(k, H // KV).swapaxes(-1, -2) * hd ** -0.5 + mask
    seen = {}
    z = layers.attention(q, k, v, mask, hd ** -0.5, tap=layers.recorder(seen))
    out["attn.hook_pattern"] = seen["hook_pattern"]
    out["attn.hook_z"] = z.transpose(0, 2, 1, 3)
    out["hook_attn_out"] = layers.linear(out["attn.hook_z"].reshape(B, T, H * hd), w.o_proj)
    out["hook_resid_mid"] = x + out["hook_attn_out"]
    out["ln2.hook_scale"] = rms(out["hook_resid_mid"])
    out["ln2.hook_normalized"] = out["hook_resid_mid"] / out["ln2.hook_scale"]
    normed = layers.rms_norm(out["hook_resid_mid"], w.post_attention_layernorm, config.rms_norm_eps)
    out["mlp.hook_pre"] = layers.linear(normed, w.gate_proj)
    out["mlp.hook_pre_linear"] = layers.linear(normed, w.up_proj)
    out["mlp.hook_post"] = layers.silu(out["mlp.hook_pre"]) * out["mlp.hook_pre_linear"]
    out["hook_mlp_out"] = layers.swiglu(normed, w.gate_proj, w.up_proj, w.down_proj)
    out["hook_resid_post"] = out["hook_resid_mid"] + out["hook_mlp_out"]
    return out


@pytest.mark.parametrize("layer", [0, 1])
def test_each_hook_value_equals_recomputing_it_with_layers_py(model, traced, layer):
    _, cache = traced
    real_queries = PADDING.astype(bool)  # padded query rows carry no meaning
    for point, expected in _recompute_layer(model, cache, layer).items():
        recorded = cache[f"blocks.{layer}.{point}"]
        assert recorded.shape == expected.shape, point
        if point in ("attn.hook_attn_scores", "attn.hook_pattern"):
            recorded, expected = recorded.transpose(0, 2, 1, 3)[real_queries], expected.transpose(0, 2, 1, 3)[real_queries]
        assert_close(recorded, expected, point, REPEATED_TOLERANCE)


def test_embedding_residual_chain_and_final_norm(model, traced):
    logits, cache = traced
    embed = model.weights["model.embed_tokens.weight"]
    np.testing.assert_array_equal(cache["hook_embed"], embed[INPUT_IDS])
    np.testing.assert_array_equal(cache["blocks.0.hook_resid_pre"], cache["hook_embed"])
    np.testing.assert_array_equal(cache["blocks.1.hook_resid_pre"], cache["blocks.0.hook_resid_post"])
    final = layers.rms_norm(cache["blocks.1.hook_resid_post"], model.weights["model.norm.weight"],
                            model.config.rms_norm_eps)
    np.testing.assert_array_equal(model.weights["model.norm.weight"] * cache["ln_final.hook_normalized"], final)
    np.testing.assert_array_equal(cache["unembed.hook_in"], final)
    np.testing.assert_array_equal(cache["unembed.hook_out"], logits)
    assert_close(layers.linear(final, model.lm_head_weight()), logits, "lm_head(final norm)", REPEATED_TOLERANCE)


def test_pattern_equals_the_models_output_attentions(model, traced):
    _, cache = traced
    attentions = model(INPUT_IDS, attention_mask=PADDING, output_attentions=True).attentions
    for layer, weights in enumerate(attentions):
        np.testing.assert_array_equal(cache[f"blocks.{layer}.attn.hook_pattern"], weights)


def test_names_filter_accepts_a_substring_a_list_and_a_predicate(model):
    _, by_substring = run_with_cache(model, INPUT_IDS, names_filter="hook_pattern")
    assert list(by_substring.keys()) == ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
    _, by_list = run_with_cache(model, INPUT_IDS, names_filter=["hook_embed", "blocks.1.hook_mlp_out"])
    assert list(by_list.keys()) == ["hook_embed", "blocks.1.hook_mlp_out"]
    _, by_predicate = run_with_cache(model, INPUT_IDS, names_filter=lambda name: name.startswith("blocks.0."))
    assert len(by_predicate) == 20 and all(name.startswith("blocks.0.") for name in by_predicate)


def test_names_filter_of_another_type_is_refused(model):
    with pytest.raises(InputError, match="names_filter"):
        run_with_cache(model, INPUT_IDS, names_filter=3)


def test_stack_gathers_one_point_over_layers_and_names_what_is_missing(model):
    _, cache = run_with_cache(model, INPUT_IDS, names_filter="resid_post")
    stacked = cache.stack("hook_resid_post")
    assert stacked.shape == (2,) + INPUT_IDS.shape + (24,)
    np.testing.assert_array_equal(stacked[1], cache["blocks.1.hook_resid_post"])
    with pytest.raises(KeyError, match="blocks.0.attn.hook_pattern"):
        cache.stack("attn.hook_pattern")
    with pytest.raises(KeyError, match="hook_embed"):
        cache["hook_embed"]
    assert isinstance(cache, ActivationCache)


def test_logit_lens_of_the_last_layer_is_the_models_logits(model, traced):
    logits, cache = traced
    lens = logit_lens(model, cache)
    assert lens.shape == (2,) + logits.shape
    assert_close(lens[-1], logits, "logit lens of the last layer", REPEATED_TOLERANCE)


def test_classification_and_bare_models_return_their_own_output():
    config = LlamaConfig(**CONFIG, num_labels=3)
    classifier = LlamaForSequenceClassification.from_config(config, seed=1)
    pooled, cache = classifier.run_with_cache(INPUT_IDS, attention_mask=PADDING)
    np.testing.assert_array_equal(pooled, classifier(INPUT_IDS, attention_mask=PADDING).logits)
    assert pooled.shape == (2, 3) and "ln_final.hook_normalized" in cache
    bare = LlamaModel.from_config(LlamaConfig(**CONFIG), seed=1)
    hidden, cache = bare.run_with_cache(INPUT_IDS)
    np.testing.assert_array_equal(hidden, bare.weights["model.norm.weight"] * cache["ln_final.hook_normalized"])
    assert "unembed.hook_in" not in cache


# -------------------------------------------------------------------------------- run_with_hooks


def test_ablating_a_head_through_hook_z_equals_zeroing_its_o_proj_columns(model):
    hd, head = CONFIG["head_dim"], 4

    def zero_head(z, hook):
        assert hook.name == "blocks.1.attn.hook_z"
        z = z.copy()
        z[:, :, head] = 0.0
        return z

    ablated = model.run_with_hooks(INPUT_IDS, fwd_hooks=[("blocks.1.attn.hook_z", zero_head)],
                                   attention_mask=PADDING).logits
    tensors = dict(model.weights.tensors)
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors[name] = tensors[name].copy()
    tensors[name][:, head * hd:(head + 1) * hd] = 0.0
    surgery = LlamaForCausalLM(model.config, model.weights.__class__(tensors))
    expected = surgery(INPUT_IDS, attention_mask=PADDING).logits
    real = PADDING.astype(bool)
    assert_close(ablated[real], expected[real], "head ablated by hook vs by weights", REPEATED_TOLERANCE)
    assert not np.allclose(ablated, model(INPUT_IDS, attention_mask=PADDING).logits)


def test_a_hook_returning_none_keeps_the_activation_and_a_predicate_selects_names(model):
    seen = []
    out = model.run_with_hooks(INPUT_IDS, fwd_hooks=[(lambda name: "hook_scale" in name,
                                                       lambda x, hook: seen.append(hook.name))],
                               attention_mask=PADDING)
    np.testing.assert_array_equal(out.logits, model(INPUT_IDS, attention_mask=PADDING).logits)
    assert seen == [n for n in hook_names(model.config) if "hook_scale" in n]


def test_a_hook_with_a_wrong_shape_or_an_unknown_name_is_an_input_error(model):
    with pytest.raises(InputError, match="blocks.0.hook_resid_mid"):
        model.run_with_hooks(INPUT_IDS, fwd_hooks=[("blocks.0.hook_resid_mid", lambda x, hook: x[:, :1])])
    with pytest.raises(InputError, match="did you mean blocks.0.attn.hook_pattern"):
        model.run_with_hooks(INPUT_IDS, fwd_hooks=[("blocks.0.attn.hook_patern", lambda x, hook: None)])
    with pytest.raises(InputError, match="pairs"):
        model.run_with_hooks(INPUT_IDS, fwd_hooks=["blocks.0.hook_resid_mid"])


def test_hooks_apply_at_every_cached_decoding_step(model):
    def double_last_layer(x, hook):
        return 2 * x

    hooks = [("blocks.1.hook_mlp_out", double_last_layer)]
    full = model.run_with_hooks(INPUT_IDS[1:], fwd_hooks=hooks).logits
    first = model.run_with_hooks(INPUT_IDS[1:, :4], fwd_hooks=hooks, use_cache=True)
    second = model.run_with_hooks(INPUT_IDS[1:, 4:], fwd_hooks=hooks, use_cache=True,
                                  past_key_values=first.past_key_values)
    stepwise = np.concatenate([first.logits, second.logits], axis=1)
    assert_close(stepwise, full, "hooked decoding with the cache", REPEATED_TOLERANCE)


def test_run_with_cache_records_what_the_hooks_left(model):
    _, cache = model.run_with_cache(INPUT_IDS, fwd_hooks=[("blocks.0.hook_attn_out", lambda x, hook: 0 * x)],
                                    names_filter=["blocks.0.hook_attn_out", "blocks.0.hook_resid_mid"])
    assert not cache["blocks.0.hook_attn_out"].any()
    np.testing.assert_array_equal(cache["blocks.0.hook_resid_mid"],
                                  model.run_with_cache(INPUT_IDS)[1]["blocks.0.hook_resid_pre"])


def test_per_head_results_sum_to_the_attention_output(model):
    model.set_use_attn_result(True)
    try:
        logits, cache = model.run_with_cache(INPUT_IDS, attention_mask=PADDING)
    finally:
        model.set_use_attn_result(False)
    assert cache["blocks.0.attn.hook_result"].shape == INPUT_IDS.shape + (6, 24)
    assert_close(cache["blocks.0.attn.hook_result"].sum(axis=2), cache["blocks.0.hook_attn_out"],
                 "sum of head results", REPEATED_TOLERANCE)
    assert_close(logits, model(INPUT_IDS, attention_mask=PADDING).logits, "logits with per-head results",
                 REPEATED_TOLERANCE)
    assert list(cache.keys()) == hook_names(model.config, HookOptions(use_attn_result=True))


def test_transformerlens_shorthand_names():
    assert full_hook_name("pattern", 3) == "blocks.3.attn.hook_pattern"
    assert full_hook_name("attn", 3) == "blocks.3.attn.hook_pattern"
    assert full_hook_name("resid_pre", 0) == "blocks.0.hook_resid_pre"
    assert full_hook_name("pre", 1) == "blocks.1.mlp.hook_pre"
    assert full_hook_name("scale", 2, "ln2") == "blocks.2.ln2.hook_scale"
    assert full_hook_name("embed") == "hook_embed"
    assert full_hook_name("scale") == "ln_final.hook_scale"
    assert full_hook_name("blocks.0.hook_mlp_out") == "blocks.0.hook_mlp_out"


def _returns(value):
    def hook(x, hook):
        return value(x) if callable(value) else value
    return hook


@pytest.mark.parametrize("fwd_hooks, expected", [
    (None, "fwd_hooks must be a list"),
    ([("blocks.0.hook_resid_pre", lambda x: x)], "must take the activation and a keyword argument named 'hook'"),
    ([("blocks.0.hook_resid_pre", _returns("no"))], "returned an array of <U2"),
    ([("blocks.0.hook_resid_pre", _returns([[1, 2], [3]]))], "returned something that is not an array"),
    ([("blocks.0.hook_resid_pre", _returns(lambda x: x.astype(np.complex64)))], "returned an array of complex64"),
    ([("blocks.0.hook_resid_pre", _returns(lambda x: x.astype(object)))], "returned an array of object"),
    ([(lambda name: np.array([True, False]), _returns(None))], "predicate must return True or False"),
])
def test_a_bad_hook_is_one_input_error_naming_it(fwd_hooks, expected):
    model = LlamaForCausalLM.from_pretrained("tiny-shakespeare")
    with pytest.raises(InputError, match=expected):
        model.run_with_hooks(np.array([[1, 2, 3]]), fwd_hooks=fwd_hooks)


def test_logit_attrs_of_a_token_outside_the_vocabulary_is_an_input_error():
    model = LlamaForCausalLM.from_pretrained("tiny-shakespeare")
    _, cache = model.run_with_cache(np.array([[1, 2, 3]]))
    stack = cache.accumulated_resid()
    with pytest.raises(InputError, match=r"tokens must be ids in \[0, 2000\)"):
        cache.logit_attrs(stack, tokens=[10**9])
