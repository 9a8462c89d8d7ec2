"""llama_np against the stored Transformers references in tests/data/fixtures/.

Each fixture directory is a tiny random-weight checkpoint plus reference.npz, written by
tests/reference/make_fixtures.py (Transformers 5.x) and make_fixtures_tp.py (4.45.2, for
pretraining_tp); manifest.json says what each case covers and what each array holds. Arrays are
named "<call>.<field>": every test below is parametrized over the (case, call) pairs that store
the fields it needs, so a new fixture is picked up without editing this file.

Tolerances are those of tests/tolerance.py (docs/reference.md §10.3). Neither torch nor
transformers is needed here.
"""

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from tolerance import (
    assert_close_to_reference,
    assert_loss_close_to_reference,
    assert_same_token_ids,
)

FIXTURES = Path(__file__).parent / "data" / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
CASES = MANIFEST["cases"]


@functools.lru_cache(maxsize=None)
def reference(case):
    """The stored arrays of one case as {"<call>.<field>": array}."""
    with np.load(FIXTURES / case / "reference.npz") as stored:
        return {key: stored[key] for key in stored.files}


def calls_with(*fields, model_class="LlamaForCausalLM"):
    """pytest params (case, call) for every stored call that has all `fields`."""
    params = []
    for case in sorted(CASES):
        if CASES[case]["model_class"] != model_class:
            continue
        keys = reference(case).keys()
        calls = sorted({key.split(".", 1)[0] for key in keys})
        for call in calls:
            if all(f"{call}.{field}" in keys for field in fields):
                params.append(pytest.param(case, call, id=f"{case}-{call}"))
    return params


@functools.lru_cache(maxsize=None)
def load_model(case):
    """The llama_np model for a case, loaded from its checkpoint directory (float32)."""
    import llama_np

    model_class = getattr(llama_np, CASES[case]["model_class"])
    return model_class.from_pretrained(str(FIXTURES / case))


def mask_or_none(attention_mask):
    """Pass no mask when every token is real, to exercise the default path as users call it."""
    return None if attention_mask.all() else attention_mask


def real_tokens(attention_mask):
    """(B, T, 1) boolean selector of the query positions whose attention_mask is 1."""
    return attention_mask.astype(bool)[:, :, None]


# ---------------------------------------------------------------------------------------------
# The fixtures themselves
# ---------------------------------------------------------------------------------------------


def test_manifest_describes_every_fixture_directory_and_array():
    directories = sorted(path.name for path in FIXTURES.iterdir() if path.is_dir())
    assert directories == sorted(CASES), "fixture directories and manifest cases differ"
    for case, entry in CASES.items():
        assert sorted(entry["reference_npz"]) == sorted(reference(case)), f"{case}: npz keys differ from manifest"
        for filename in entry["files"]:
            assert (FIXTURES / case / filename).is_file(), f"{case}: {filename} listed but missing"
        assert entry["generator"] in MANIFEST["generators"], f"{case}: unknown generator"


# ---------------------------------------------------------------------------------------------
# LlamaForCausalLM
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, call", calls_with("input_ids", "attention_mask", "logits"))
def test_logits_match_transformers_on_real_tokens(case, call):
    ref = reference(case)
    mask = ref[f"{call}.attention_mask"]
    out = load_model(case)(ref[f"{call}.input_ids"], attention_mask=mask_or_none(mask))
    assert_close_to_reference(out.logits, ref[f"{call}.logits"], f"{case} {call} logits", where=real_tokens(mask))


@pytest.mark.parametrize("case, call", calls_with("labels", "loss"))
def test_causal_lm_loss_ignoring_minus_100_labels_matches_transformers(case, call):
    ref = reference(case)
    labels = ref[f"{call}.labels"]
    assert (labels == -100).any(), "the fixture should contain ignored labels"
    mask = ref[f"{call}.attention_mask"]
    out = load_model(case)(ref[f"{call}.input_ids"], attention_mask=mask_or_none(mask), labels=labels)
    assert_loss_close_to_reference(out.loss, ref[f"{call}.loss"], f"{case} {call} loss")


@pytest.mark.parametrize("case, call", calls_with("hidden_states"))
def test_hidden_states_of_every_layer_match_transformers(case, call):
    ref = reference(case)
    mask = ref[f"{call}.attention_mask"]
    expected = ref[f"{call}.hidden_states"]  # (L + 1, B, T, D)
    out = load_model(case)(ref[f"{call}.input_ids"], attention_mask=mask_or_none(mask), output_hidden_states=True)
    assert len(out.hidden_states) == len(expected), "expected the embeddings plus one output per layer"
    for index, (ours, theirs) in enumerate(zip(out.hidden_states, expected)):
        what = f"{case} {call} hidden_states[{index}]" + (" (after the final norm)" if index == len(expected) - 1 else "")
        assert_close_to_reference(ours, theirs, what, where=real_tokens(mask))


@pytest.mark.parametrize("case, call", calls_with("attentions"))
def test_attention_weights_of_every_layer_match_transformers(case, call):
    ref = reference(case)
    mask = ref[f"{call}.attention_mask"]
    expected = ref[f"{call}.attentions"]  # (L, B, H, T, S)
    out = load_model(case)(ref[f"{call}.input_ids"], attention_mask=mask_or_none(mask), output_attentions=True)
    assert len(out.attentions) == len(expected), "expected one attention tensor per layer"
    real_queries = mask.astype(bool)[:, None, :, None]  # (B, 1, T, 1)
    for layer, (ours, theirs) in enumerate(zip(out.attentions, expected)):
        assert_close_to_reference(ours, theirs, f"{case} {call} attentions[{layer}]", where=real_queries)


@pytest.mark.parametrize("case, call", calls_with("logits_to_keep"))
def test_logits_to_keep_returns_only_the_last_positions(case, call):
    ref = reference(case)
    keep = int(ref[f"{call}.logits_to_keep"])
    out = load_model(case)(ref[f"{call}.input_ids"], logits_to_keep=keep)
    assert_close_to_reference(out.logits, ref[f"{call}.logits"], f"{case} logits_to_keep={keep}")


@pytest.mark.parametrize("case, call", calls_with("prefix_logits", "continuation_logits", "full_logits"))
def test_cached_decode_matches_cached_and_uncached_transformers_logits(case, call):
    ref = reference(case)
    input_ids = ref[f"{call}.input_ids"]
    prefix_length = int(ref[f"{call}.prefix_length"])
    model = load_model(case)
    prefix = model(input_ids[:, :prefix_length], use_cache=True)
    assert_close_to_reference(prefix.logits, ref[f"{call}.prefix_logits"], f"{case} prefix logits")
    continuation = model(input_ids[:, prefix_length:], past_key_values=prefix.past_key_values, use_cache=True)
    assert_close_to_reference(
        continuation.logits, ref[f"{call}.continuation_logits"], f"{case} cached continuation logits"
    )
    assert_close_to_reference(
        continuation.logits, ref[f"{call}.full_logits"][:, prefix_length:],
        f"{case} cached continuation logits vs uncached logits of the whole sequence",
    )


@pytest.mark.parametrize("case, call", calls_with("sequences"))
def test_greedy_generation_gives_identical_token_ids(case, call):
    ref = reference(case)
    sequences = load_model(case).generate(
        ref[f"{call}.input_ids"],
        attention_mask=mask_or_none(ref[f"{call}.attention_mask"]),
        max_new_tokens=int(ref[f"{call}.max_new_tokens"]),
        do_sample=False,
        eos_token_id=[int(token) for token in ref[f"{call}.eos_token_id"]],
        pad_token_id=int(ref[f"{call}.pad_token_id"]),
    )
    assert_same_token_ids(sequences, ref[f"{call}.sequences"], f"{case} {call} greedy sequences")


# ---------------------------------------------------------------------------------------------
# LlamaForSequenceClassification
# ---------------------------------------------------------------------------------------------

CLASSIFICATION_CALLS = calls_with("input_ids", "labels", "logits", "loss", model_class="LlamaForSequenceClassification")


@pytest.mark.parametrize("case, side", CLASSIFICATION_CALLS)
def test_sequence_classification_pools_logits_at_last_real_token(case, side):
    ref = reference(case)
    out = load_model(case)(ref[f"{side}.input_ids"], attention_mask=ref[f"{side}.attention_mask"])
    assert_close_to_reference(out.logits, ref[f"{side}.logits"], f"{case} {side}-padded pooled logits")


@pytest.mark.parametrize("case, side", CLASSIFICATION_CALLS)
def test_sequence_classification_loss_for_its_problem_type_matches_transformers(case, side):
    ref = reference(case)
    out = load_model(case)(
        ref[f"{side}.input_ids"], attention_mask=ref[f"{side}.attention_mask"], labels=ref[f"{side}.labels"]
    )
    assert_loss_close_to_reference(out.loss, ref[f"{side}.loss"], f"{case} {side}-padded loss")
