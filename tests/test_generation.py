"""Logit processors, sampling and generate() on a small random model."""

import json

import numpy as np
import pytest

from llama_np import CheckpointError, InputError, LlamaConfig, LlamaForCausalLM
from llama_np.cache import KVCache
from llama_np.generation import (apply_repetition_penalty, next_token_logits, sample,
                                 top_k_filter, top_p_filter)

CONFIG = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def lm():
    return LlamaForCausalLM.from_config(LlamaConfig(**CONFIG, pad_token_id=0), seed=7)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = np.array([[2.0, -1.0, 3.0, 0.5]], dtype=np.float32)
    out = apply_repetition_penalty(logits, np.array([[0, 1, 1]]), 2.0)
    np.testing.assert_array_equal(out, [[1.0, -2.0, 3.0, 0.5]])


def test_top_k_keeps_the_k_largest():
    logits = np.array([[1.0, 4.0, 3.0, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(top_k_filter(logits, 2), [[-np.inf, 4.0, 3.0, -np.inf]])


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = np.log(probs).astype(np.float32)
    kept = np.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5 + 0.3 crosses it
    assert np.isfinite(top_p_filter(logits, 0.1)).sum() == 1  # always at least one token


def test_processors_run_in_transformers_order():
    logits = np.array([[3.0, 1.0, -2.0, 0.0]], dtype=np.float32)
    out = next_token_logits(logits, np.array([[0]]), True, temperature=0.5, top_k=3, top_p=1.0,
                            repetition_penalty=1.5)
    # penalty first (3 -> 2), then temperature (x2), then top-k drops the smallest
    np.testing.assert_array_equal(out, [[4.0, 2.0, -np.inf, 0.0]])  # exact: powers of two


def test_sampling_follows_the_distribution():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.2, 0.5, 0.3]] * 20000))
    counts = np.bincount(sample(logits, rng), minlength=3) / 20000
    # A statistical bound, not a rounding tolerance: 0.015 is over 4 standard deviations of a
    # share estimated from 20,000 draws (sqrt(0.25 / 20000) = 0.0035); the seed fixes the draws.
    np.testing.assert_allclose(counts, [0.2, 0.5, 0.3], rtol=0, atol=0.015)


def test_greedy_generation_equals_argmax_of_full_recomputation(lm):
    prompt = np.array([[5, 6, 7]])
    out = lm.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=[])
    sequence = prompt
    for _ in range(6):
        next_id = lm(sequence).logits[:, -1].argmax(-1)
        sequence = np.concatenate([sequence, next_id[:, None]], axis=1)
    np.testing.assert_array_equal(out, sequence)


def test_left_padded_batch_generates_what_each_prompt_generates_alone(lm):
    short, long = [9, 4], [3, 8, 12, 5]
    batch = np.array([[0, 0] + short, long])
    mask = (batch != 0).astype(np.int64)
    together = lm.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=[])
    for row, prompt in enumerate([short, long]):
        alone = lm.generate(np.array([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=[])
        np.testing.assert_array_equal(together[row, -5:], alone[0, -5:])


def test_rows_stop_at_eos_and_are_padded(lm):
    prompt = np.array([[5, 6, 7], [8, 9, 10]])
    free = lm.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=[])
    eos = int(free[0, 4])  # the second token row 0 generates
    out = lm.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert out[0, 4] == eos and (out[0, 5:] == 0).all()
    stop_row1 = np.flatnonzero(free[1, 3:] == eos)
    if stop_row1.size == 0:  # row 1 never emits eos: it runs to the end unchanged
        np.testing.assert_array_equal(out[1], free[1, :out.shape[1]])


def test_sampling_with_a_seed_is_reproducible_and_streams_every_token(lm):
    received = []
    first = lm.generate([[5, 6]], max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.9,
                        seed=11, eos_token_id=[], streamer=received.append)
    second = lm.generate([[5, 6]], max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.9,
                         seed=11, eos_token_id=[])
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(np.concatenate(received), first[0, 2:])


@pytest.mark.parametrize("kwargs, name", [
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(top_k=-2), "top_k"),
    (dict(do_sample="false"), "do_sample must be True or False, got 'false'"),
    (dict(eos_token_id=10**30), r"eos_token_id must be a token id in \[0, 40\)"),
    (dict(eos_token_id=[2, "x"]), "eos_token_id must be a token id"),
    (dict(eos_token_id=[[2]]), "eos_token_id must be a token id"),
    (dict(pad_token_id=40), r"pad_token_id must be a token id in \[0, 40\)"),
    (dict(pad_token_id=[0, 1]), "pad_token_id must be a token id"),
    (dict(seed=-1), "seed must be a non-negative integer"),
    (dict(seed=1.5), "seed must be a non-negative integer"),
    (dict(streamer=5), "streamer must have put"),
    (dict(stats=[]), "stats must be a dict"),
    (dict(attention_mask=[[0.5, 1]]), "attention_mask must hold only 0"),
    (dict(attention_mask=[["a", "b"]]), "attention_mask must hold only 0"),
    (dict(attention_mask=[[1, 1, 1]]), "attention_mask has shape"),
])
def test_invalid_generation_arguments_raise_input_error(lm, kwargs, name):
    kwargs.setdefault("max_new_tokens", 2)
    with pytest.raises(InputError, match=name):
        lm.generate([[5, 6]], **kwargs)


@pytest.mark.parametrize("prompt, message", [
    ("abc", "integers"), (None, "integers"), (5, "shape"), ([[5, 6], [7]], "different lengths"),
    ([[5, 40]], "token id 40, outside the vocabulary"),
])
def test_invalid_prompts_raise_input_error_before_generating(lm, prompt, message):
    with pytest.raises(InputError, match=message):
        lm.generate(prompt, max_new_tokens=2)


@pytest.mark.parametrize("settings, message", [
    ({"do_sample": "no"}, "do_sample must be True or False"),
    ({"max_length": "20"}, "max_length must be a non-negative integer"),
    ({"eos_token_id": 1e30}, "eos_token_id must be a token id"),
    ({"temperature": "hot", "do_sample": True}, "temperature must be > 0"),
])
def test_a_bad_generation_config_json_is_a_checkpoint_error_naming_it(lm, tmp_path, settings, message):
    lm.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match=f"generation_config.json: {message}"):
        LlamaForCausalLM.from_pretrained(tmp_path)


def test_kv_cache_grows_and_returns_everything_stored():
    cache = KVCache(1)
    for step in range(40):
        k = np.full((1, 2, 1, 3), step, dtype=np.float32)
        keys, values = cache.update(0, k, k)
    assert cache.get_seq_length() == 40
    np.testing.assert_array_equal(keys[0, 0, :, 0], np.arange(40))


def test_streamer_objects_get_the_prompt_first_then_each_token_then_end(lm):
    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, ids):
            self.calls.append(np.asarray(ids))

        def end(self):
            self.calls.append("end")

    recorder, stats = Recorder(), {}
    out = lm.generate([[5, 6, 7]], max_new_tokens=4, do_sample=False, eos_token_id=[],
                      streamer=recorder, stats=stats)
    np.testing.assert_array_equal(recorder.calls[0], [[5, 6, 7]])
    np.testing.assert_array_equal(np.concatenate(recorder.calls[1:5]), out[0, 3:])
    assert recorder.calls[5] == "end" and len(recorder.calls) == 6
    assert (stats["new_tokens"], stats["decode_steps"]) == (4, 3)


def test_numpy_scalars_are_accepted_as_sampling_settings(lm):
    out = lm.generate([[5, 6]], max_new_tokens=3, do_sample=True, temperature=np.float32(0.7),
                      top_p=np.float64(0.9), repetition_penalty=np.float32(1.1), seed=0, eos_token_id=[])
    assert out.shape == (1, 5)


@pytest.mark.parametrize("temperature", [1e-50, 1e-40])
def test_a_temperature_that_overflows_float32_is_refused_not_turned_into_nan(lm, temperature):
    with pytest.raises(InputError, match="temperature.*greedy"):
        lm.generate(np.array([[5, 6, 7]]), max_new_tokens=2, do_sample=True, temperature=temperature, seed=0)
    tiny = lm.generate(np.array([[5, 6, 7]]), max_new_tokens=3, do_sample=True, temperature=1e-6, seed=0)
    np.testing.assert_array_equal(tiny, lm.generate(np.array([[5, 6, 7]]), max_new_tokens=3))  # its limit


def test_generation_stops_at_the_context_length_unless_asked_to_go_past_it():
    model = LlamaForCausalLM.from_pretrained("tiny-shakespeare")
    context = model.config.max_position_embeddings
    prompt = np.array([[1, 2, 3]])
    with pytest.warns(UserWarning, match=f"stops at the context length, max_position_embeddings={context}"):
        out = model.generate(prompt, max_new_tokens=10**12, do_sample=False, eos_token_id=[])
    assert out.shape == (1, context)
    with pytest.warns(UserWarning, match="past max_position_embeddings"):
        longer = model.generate(prompt, max_new_tokens=context, do_sample=False, eos_token_id=[],
                                allow_past_context=True)
    assert longer.shape == (1, 3 + context)
    np.testing.assert_array_equal(longer[:, :context], out)
    with pytest.raises(InputError, match="allow_past_context must be True or False"):
        model.generate(prompt, max_new_tokens=2, allow_past_context="yes")
