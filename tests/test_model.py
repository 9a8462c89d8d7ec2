"""The model classes on small random models: inputs, cache, dtypes, heads, losses, saving.

Agreement with Transformers is checked in test_fixtures.py against stored references; these
tests check our own invariants and the error paths.
"""

import warnings

import numpy as np
import pytest

from llama_np import (InputError, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                      LlamaModel)
from llama_np import layers
from llama_np.errors import CheckpointError
from llama_np.cache import KVCache
from llama_np.model import last_non_pad_index
from tolerance import FLOAT32_TOLERANCE, REPEATED_TOLERANCE, assert_close, assert_relatively_close

CONFIG = dict(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=32)


@pytest.fixture(scope="module")
def lm():
    return LlamaForCausalLM.from_config(LlamaConfig(**CONFIG), seed=3)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(3, 50, size=(2, 9))


def test_decoding_with_the_cache_gives_the_logits_of_the_whole_sequence(lm, ids):
    full = lm(ids).logits
    first = lm(ids[:, :5], use_cache=True)
    second = lm(ids[:, 5:7], past_key_values=first.past_key_values, use_cache=True)
    third = lm(ids[:, 7:], past_key_values=second.past_key_values, use_cache=True)
    stepwise = np.concatenate([first.logits, second.logits, third.logits], axis=1)
    assert_close(stepwise, full, "cached vs whole-sequence logits", REPEATED_TOLERANCE)
    assert third.past_key_values.get_seq_length() == 9


def test_left_padding_with_mask_and_positions_equals_the_unpadded_row(lm, ids):
    row = ids[:1, 3:]  # 6 tokens
    padded = np.concatenate([np.zeros((1, 3), dtype=ids.dtype), row], axis=1)
    mask = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    positions = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)
    out = lm(padded, attention_mask=mask, position_ids=positions).logits
    assert_close(out[:, 3:], lm(row).logits, "left-padded vs unpadded logits", REPEATED_TOLERANCE)


def test_float64_compute_agrees_with_float32(lm, ids):
    wide = LlamaForCausalLM(lm.config, lm.weights.__class__(lm.weights.tensors, np.float64))
    logits64 = wide(ids).logits
    assert logits64.dtype == np.float64
    assert_close(lm(ids).logits, logits64, "float32 vs float64 logits", FLOAT32_TOLERANCE)


def test_outputs_have_one_hidden_state_per_layer_plus_embeddings(lm, ids):
    out = lm(ids, output_hidden_states=True, output_attentions=True, logits_to_keep=2)
    assert len(out.hidden_states) == CONFIG["num_hidden_layers"] + 1
    assert out.attentions[0].shape == (2, 6, 9, 9)
    assert out.logits.shape == (2, 2, 50)
    assert_close(out.logits, lm(ids).logits[:, -2:], "logits_to_keep=2 vs the last two", REPEATED_TOLERANCE)
    assert_close(out.attentions[1].sum(-1), np.ones((2, 6, 9)), "attention row sums", REPEATED_TOLERANCE)
    assert out["logits"] is out.logits


def test_causal_lm_loss_is_mean_next_token_cross_entropy_ignoring_minus_100(lm, ids):
    labels = ids.copy()
    labels[0, 4] = -100
    out = lm(ids, labels=labels)
    log_probs = out.logits - np.log(np.exp(out.logits.astype(np.float64)).sum(-1, keepdims=True))
    terms = [-log_probs[b, t, labels[b, t + 1]] for b in range(2) for t in range(8) if labels[b, t + 1] != -100]
    assert out.loss == pytest.approx(np.mean(terms), rel=1e-6)


def test_loss_with_every_label_ignored_is_nan_with_a_warning(lm, ids):
    with pytest.warns(UserWarning, match="-100"):
        assert np.isnan(lm(ids, labels=np.full_like(ids, -100)).loss)


def test_bare_model_returns_final_hidden_states(lm, ids):
    bare = LlamaModel(lm.config, lm.weights)
    out = bare(ids, output_hidden_states=True)
    np.testing.assert_array_equal(out.last_hidden_state, out.hidden_states[-1])


def test_save_and_reload_round_trips(lm, ids, tmp_path):
    lm.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    np.testing.assert_array_equal(again(ids).logits, lm(ids).logits)
    half = tmp_path / "half"
    lm.save_pretrained(half, storage_dtype=np.float16)
    assert LlamaForCausalLM.from_pretrained(half).checkpoint.storage_dtypes == {"F16"}


def test_resize_token_embeddings_adds_mean_rows_and_updates_the_config(tmp_path):
    model = LlamaForCausalLM.from_config(LlamaConfig(**CONFIG), seed=1)
    old = model.weights["model.embed_tokens.weight"].copy()
    model.resize_token_embeddings(51)
    new = model.weights["model.embed_tokens.weight"]
    assert new.shape == (51, 24) and model.config.vocab_size == 51
    assert_close(new[50], old.mean(axis=0), "new row = mean row", REPEATED_TOLERANCE)
    assert model.weights["lm_head.weight"].shape == (51, 24)
    assert model(np.array([[50, 1]])).logits.shape == (1, 2, 51)


def test_classification_pools_at_the_rightmost_non_pad_token_for_both_paddings():
    config = LlamaConfig(**CONFIG, num_labels=3, pad_token_id=0)
    model = LlamaForSequenceClassification.from_config(config, seed=2)
    row = np.array([5, 9, 14, 7])
    right = np.array([[5, 9, 14, 7, 0, 0]])
    left = np.array([[0, 0, 5, 9, 14, 7]])
    assert last_non_pad_index(np.concatenate([right, left]), 0).tolist() == [3, 5]
    alone = model(row[None]).logits
    assert_close(model(right, attention_mask=(right != 0)).logits, alone, "right-padded", REPEATED_TOLERANCE)
    positions = np.array([[0, 0, 0, 1, 2, 3]])
    assert_close(model(left, attention_mask=(left != 0), position_ids=positions).logits, alone,
                 "left-padded", REPEATED_TOLERANCE)


def test_classification_losses_infer_the_problem_type():
    logits_model = LlamaForSequenceClassification.from_config(
        LlamaConfig(**CONFIG, num_labels=3, pad_token_id=0), seed=2)
    ids = np.array([[4, 5, 6], [7, 8, 0]])
    out = logits_model(ids, labels=np.array([2, 0]))
    z = out.logits.astype(np.float64)
    log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
    assert out.loss == pytest.approx(-(log_probs[0, 2] + log_probs[1, 0]) / 2, rel=1e-6)
    assert logits_model.config.problem_type == "single_label_classification"

    multi = LlamaForSequenceClassification.from_config(LlamaConfig(**CONFIG, num_labels=3, pad_token_id=0), seed=2)
    targets = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    out = multi(ids, labels=targets)
    p = 1 / (1 + np.exp(-out.logits.astype(np.float64)))
    assert out.loss == pytest.approx(-np.mean(targets * np.log(p) + (1 - targets) * np.log(1 - p)), rel=1e-6)

    regression = LlamaForSequenceClassification.from_config(LlamaConfig(**CONFIG, num_labels=1, pad_token_id=0), seed=2)
    out = regression(ids, labels=np.array([0.5, -1.0]))
    assert out.loss == pytest.approx(np.mean((out.logits[:, 0] - [0.5, -1.0]) ** 2), rel=1e-6)


def test_classifying_a_batch_without_pad_token_is_an_input_error():
    model = LlamaForSequenceClassification.from_config(LlamaConfig(**CONFIG), seed=2)
    assert model(np.array([[3, 4]])).logits.shape == (1, 2)
    with pytest.raises(InputError, match="pad token"):
        model(np.array([[3, 4], [5, 6]]))


@pytest.mark.parametrize("bad, message", [
    (np.array([[1, 50]]), "50"),
    (np.array([[-1, 2]]), "-1"),
    (np.array([[1.5, 2.0]]), "integers"),
    (np.zeros((1, 0), dtype=np.int64), "empty"),
    ([[1, 2], [3]], "different lengths"),
    (np.ones((1, 2, 3), dtype=np.int64), "shape"),
])
def test_bad_input_ids_raise_input_error_naming_the_value(lm, bad, message):
    with pytest.raises(InputError, match=message):
        lm(bad)


def test_attention_mask_of_the_wrong_shape_is_an_input_error(lm, ids):
    with pytest.raises(InputError, match="attention_mask"):
        lm(ids, attention_mask=np.ones((2, 4)))
    with pytest.raises(InputError, match="0 .*1"):
        lm(ids, attention_mask=np.full(ids.shape, 2))


def test_positions_past_max_position_embeddings_warn_for_default_rope(lm):
    long_ids = np.ones((1, 40), dtype=np.int64)
    with pytest.warns(UserWarning, match="max_position_embeddings"):
        lm(long_ids)
    dynamic = LlamaForCausalLM(LlamaConfig(**CONFIG, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), lm.weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dynamic(long_ids)  # dynamic NTK is designed to stretch: no warning


def test_compute_dtype_other_than_float32_or_64_is_refused():
    with pytest.raises(InputError, match="float16"):
        LlamaForCausalLM.from_config(LlamaConfig(**CONFIG), dtype=np.float16)


def test_a_config_with_more_layers_than_the_checkpoint_is_refused_at_once(lm, tmp_path):
    lm.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    # 10**30 layers: listing every missing tensor would never finish, so this must fail first.
    (tmp_path / "config.json").write_text(config.replace('"num_hidden_layers": 2', '"num_hidden_layers": 1000000000000000000000000000000'))
    with pytest.raises(CheckpointError, match=r"num_hidden_layers=10{30}, but the checkpoint .* stores 2 layers"):
        LlamaForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("positions", [np.zeros((1, 1, 9), dtype=np.int64), np.array(3), "0 1 2"])
def test_position_ids_that_are_not_one_or_two_dimensional_are_an_input_error(lm, ids, positions):
    with pytest.raises(InputError, match="position_ids must be integers of shape"):
        lm(ids, position_ids=positions)


def test_a_cache_from_another_model_or_batch_is_an_input_error(lm, ids):
    with pytest.raises(InputError, match="holds 5 layers; this model has 2"):
        lm(ids, past_key_values=KVCache(5))
    cache = lm(ids[:1], use_cache=True).past_key_values
    with pytest.raises(InputError, match=r"keys for B=1 rows.*this call needs B=2"):
        lm(ids[:, :1], past_key_values=cache)


@pytest.mark.parametrize("dtype", ["bfloat16", "no-such-dtype"])
def test_a_compute_dtype_numpy_does_not_know_is_an_input_error(dtype):
    with pytest.raises(InputError, match=f"float32 or np.float64, got '{dtype}'"):
        LlamaForCausalLM.from_config(LlamaConfig(**CONFIG), dtype=dtype)


def test_classification_labels_of_the_wrong_kind_are_input_errors():
    model = LlamaForSequenceClassification.from_config(LlamaConfig(**CONFIG, num_labels=3, pad_token_id=0), seed=2)
    ids = np.array([[4, 5, 6], [7, 8, 0]])
    model(ids, labels=np.array([2, 0]))  # fixes the problem type to single-label, as in Transformers
    with pytest.raises(InputError, match="integer class indices.*float64"):
        model(ids, labels=np.array([0.5, 1.0]))
    with pytest.raises(InputError, match="labels must be numbers.*<U1"):
        model(ids, labels=np.array(["a", "b"]))
    regression = LlamaForSequenceClassification.from_config(LlamaConfig(**CONFIG, num_labels=1, pad_token_id=0), seed=2)
    with pytest.raises(InputError, match=r"regression labels must hold 2 values.*\(2, 2\)"):
        regression(ids, labels=np.ones((2, 2)))


def test_resize_token_embeddings_sets_the_pad_token_of_the_config_when_given():
    model = LlamaForCausalLM.from_config(LlamaConfig(**CONFIG), seed=1)
    model.resize_token_embeddings(51, pad_token_id=50)
    assert (model.config.vocab_size, model.config.pad_token_id) == (51, 50)
    with pytest.raises(InputError, match="pad_token_id"):
        model.resize_token_embeddings(52, pad_token_id=52)


def test_float64_mode_computes_the_rope_tables_in_float64(lm, ids):
    wide = LlamaForCausalLM(lm.config, lm.weights.__class__(lm.weights.tensors, np.float64))
    _, cache = wide.run_with_cache(ids, names_filter="attn.hook_rot_q")
    inv_freq, _ = layers.rope_frequencies(lm.config.head_dim, lm.config.rope_parameters,
                                          lm.config.max_position_embeddings, ids.shape[1], np.float64)
    assert inv_freq.dtype == np.float64
    exact = 1.0 / lm.config.rope_parameters["rope_theta"] ** (np.arange(0, lm.config.head_dim, 2) / lm.config.head_dim)
    assert_relatively_close(inv_freq, exact, "float64 inv_freq", tolerance=1e-15)
    assert cache["blocks.0.attn.hook_rot_q"].dtype == np.float64


@pytest.mark.parametrize("argument", ["input_ids", "attention_mask", "position_ids", "labels"])
def test_ragged_rows_are_an_input_error_naming_the_argument(lm, argument):
    ids = np.array([[5, 6, 7], [8, 9, 10]])
    kwargs = {"input_ids": ids}
    kwargs[argument] = [[5, 6, 7], [8, 9]] if argument != "attention_mask" else [[1, 1, 1], [1, 1]]
    with pytest.raises(InputError, match=f"{argument} rows have different lengths"):
        lm(**kwargs)


@pytest.mark.filterwarnings("ignore:the sequence reaches position")
def test_a_forward_whose_attention_cannot_fit_in_memory_is_refused_with_the_bytes(lm, monkeypatch):
    from llama_np.weights import memory

    monkeypatch.setattr(memory, "available_memory", lambda: 2**30)
    # 6 heads · 5,000² scores · 4 bytes · 3 arrays (+ the mask) is about 1.8 GiB, more than 1 GiB
    with pytest.raises(InputError, match=r"needs about 1\.8 GiB; 1\.0 GiB are available"):
        lm(np.ones((1, 5000), dtype=np.int64))
    lm(np.ones((1, 100), dtype=np.int64))  # small ones still run


@pytest.mark.parametrize("field, value", [("vocab_size", 2**40), ("num_hidden_layers", 10**9)])
def test_from_config_refuses_a_model_that_cannot_fit_before_allocating(field, value):
    config = LlamaConfig(**{**CONFIG, field: value})
    with pytest.raises(InputError, match=f"parameters, in float32, needs about .* GiB.*{field}={value}"):
        LlamaForCausalLM.from_config(config)


def test_integers_follow_one_rule_numpy_integers_yes_bools_no(lm, ids):
    assert lm(ids, logits_to_keep=np.int64(1)).logits.shape[1] == 1
    with pytest.raises(InputError, match="logits_to_keep"):
        lm(ids, logits_to_keep=True)
    config = LlamaConfig(**{**CONFIG, "hidden_size": np.int64(24)})
    assert type(config.hidden_size) is int and config.to_dict()["hidden_size"] == 24
    model = LlamaForCausalLM.from_config(LlamaConfig(**CONFIG))
    with pytest.raises(InputError, match="new_num_tokens"):
        model.resize_token_embeddings(True)
    with pytest.raises(InputError, match="top_k"):
        model.generate(ids[:1], max_new_tokens=1, do_sample=True, top_k=True)


def test_ragged_classification_labels_are_an_input_error():
    model = LlamaForSequenceClassification.from_config(LlamaConfig(**CONFIG, num_labels=2, pad_token_id=0))
    with pytest.raises(InputError, match="labels rows have different lengths"):
        model(np.array([[5, 6], [7, 8]]), labels=[[1.0, 0.0], [1.0]])
