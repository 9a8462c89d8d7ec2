"""llama_np's logit processors against Transformers' own, stored in tests/data/processors/.

The reference is made by tests/reference/make_processor_reference.py (see tests/reference/README.md).
Every stored output must be reproduced: the same tokens removed (−inf), and every kept logit within
1e-6 relative. The one exception is set by Transformers itself: top-p sorts with an unstable sort,
so among tied logits that straddle the cut, *which* ones go depends on torch's sort kernel. Those
tokens are marked in ``*.order_dependent``; for them the number removed must still match.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from llama_np.generation import (apply_repetition_penalty, apply_temperature, next_token_logits, top_k_filter,
                                 top_p_filter)

DATA = Path(__file__).parent / "data" / "processors"
REFERENCE = dict(np.load(DATA / "reference.npz"))
MANIFEST = json.loads((DATA / "manifest.json").read_text())
ROW_NAMES = [row["name"] for row in MANIFEST["rows"]]
LOGITS, INPUT_IDS = REFERENCE["logits"], REFERENCE["input_ids"]  # (B, V), (B, S)
RELATIVE_TOLERANCE = 1e-6


def assert_matches_reference(actual, expected, order_dependent=None):
    """Same removed set (row by row, named), same count, kept logits within RELATIVE_TOLERANCE."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == np.float32
    assert not np.isnan(actual).any() and not np.isposinf(actual).any()
    removed, expected_removed = np.isneginf(actual), np.isneginf(expected)
    determined = np.ones_like(removed) if order_dependent is None else ~order_dependent
    for row, name in enumerate(ROW_NAMES):
        wrongly_removed = np.flatnonzero(removed[row] & ~expected_removed[row] & determined[row])
        wrongly_kept = np.flatnonzero(~removed[row] & expected_removed[row] & determined[row])
        assert wrongly_removed.size == 0 and wrongly_kept.size == 0, (
            f"row {row} ({name}): removed tokens {wrongly_removed.tolist()} that Transformers keeps and kept "
            f"{wrongly_kept.tolist()} that it removes")
        assert removed[row].sum() == expected_removed[row].sum(), (
            f"row {row} ({name}): {removed[row].sum()} tokens removed, Transformers removes "
            f"{expected_removed[row].sum()}")
    kept = ~removed & ~expected_removed
    np.testing.assert_allclose(actual[kept], expected[kept], rtol=RELATIVE_TOLERANCE, atol=0)


@pytest.mark.parametrize("index", range(len(REFERENCE["repetition_penalty.values"])),
                         ids=[f"penalty={v}" for v in REFERENCE["repetition_penalty.values"]])
def test_repetition_penalty_matches_transformers(index):
    penalty = float(REFERENCE["repetition_penalty.values"][index])
    out = apply_repetition_penalty(LOGITS, INPUT_IDS, penalty)
    assert_matches_reference(out, REFERENCE["repetition_penalty.out"][index])


@pytest.mark.parametrize("index", range(len(REFERENCE["temperature.values"])),
                         ids=[f"temperature={v}" for v in REFERENCE["temperature.values"]])
def test_temperature_matches_transformers(index):
    out = apply_temperature(LOGITS, float(REFERENCE["temperature.values"][index]))
    assert_matches_reference(out, REFERENCE["temperature.out"][index])


@pytest.mark.parametrize("index", range(len(REFERENCE["top_k.values"])),
                         ids=[f"top_k={v}" for v in REFERENCE["top_k.values"]])
def test_top_k_removes_the_same_tokens_as_transformers(index):
    out = top_k_filter(LOGITS, int(REFERENCE["top_k.values"][index]))
    assert_matches_reference(out, REFERENCE["top_k.out"][index])


@pytest.mark.parametrize("index", range(len(REFERENCE["top_p.values"])),
                         ids=[f"top_p={v}" for v in REFERENCE["top_p.values"]])
def test_top_p_removes_the_same_tokens_as_transformers(index):
    out = top_p_filter(LOGITS, float(REFERENCE["top_p.values"][index]))
    assert_matches_reference(out, REFERENCE["top_p.out"][index], REFERENCE["top_p.order_dependent"][index])


def _chain_id(index):
    return "-".join(f"{name}={REFERENCE['chain.' + name][index]}"
                    for name in ["repetition_penalty", "temperature", "top_k", "top_p"])


@pytest.mark.parametrize("index", range(len(REFERENCE["chain.out"])), ids=_chain_id)
def test_sampling_chain_matches_the_processor_list_transformers_generate_builds(index):
    settings = {name: REFERENCE["chain." + name][index].item()
                for name in ["temperature", "top_k", "top_p", "repetition_penalty"]}
    out = next_token_logits(LOGITS, INPUT_IDS, do_sample=True, **settings)
    assert_matches_reference(out, REFERENCE["chain.out"][index], REFERENCE["chain.order_dependent"][index])


@pytest.mark.parametrize("index", range(len(REFERENCE["greedy.out"])),
                         ids=[f"penalty={v}" for v in REFERENCE["greedy.repetition_penalty"]])
def test_greedy_chain_applies_only_the_repetition_penalty_as_transformers_generate_does(index):
    # Sampling settings that greedy decoding must ignore.
    out = next_token_logits(LOGITS, INPUT_IDS, do_sample=False, temperature=0.5, top_k=5, top_p=0.5,
                            repetition_penalty=float(REFERENCE["greedy.repetition_penalty"][index]))
    assert_matches_reference(out, REFERENCE["greedy.out"][index])


@pytest.mark.parametrize("index", range(len(REFERENCE["padded.out"])),
                         ids=[f"penalty={v}" for v in REFERENCE["padded.repetition_penalty"]])
def test_repetition_penalty_skips_left_padding_as_transformers_generate_does(index):
    out = next_token_logits(LOGITS, REFERENCE["padded.input_ids"], do_sample=False, temperature=1.0, top_k=0,
                            top_p=1.0, repetition_penalty=float(REFERENCE["padded.repetition_penalty"][index]),
                            attention_mask=REFERENCE["padded.attention_mask"])
    assert_matches_reference(out, REFERENCE["padded.out"][index])


def test_reference_covers_ties_underflow_and_negative_infinity():
    """The stored cases exercise what they are meant to, so the tests above can fail for those reasons."""
    assert np.isneginf(LOGITS).any(), "no −inf among the input logits"
    assert REFERENCE["top_p.order_dependent"].any(), "no top-p cut through tied logits"
    top_p_one = list(REFERENCE["top_p.values"]).index(1.0)
    underflow = np.isneginf(REFERENCE["top_p.out"][top_p_one]) & np.isfinite(LOGITS)
    assert underflow.any(), "top_p=1.0 never removes a token whose float32 probability is 0"
    seen_negative = np.take_along_axis(LOGITS, INPUT_IDS, axis=-1) < 0
    assert seen_negative.any() and (~seen_negative).any(), "the history must see negative and positive logits"
