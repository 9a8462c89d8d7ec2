"""Sliding-window perplexity (``llama_np.perplexity``) against Transformers.

tests/data/perplexity/reference.json holds what the recipe of Transformers' documentation
("Perplexity of fixed-length models") computes for the bundled ``tiny-shakespeare`` on a held-out
passage (Julius Caesar III.2, ``julius_caesar_3_2.txt``), for two (context, stride) pairs, with
every window; tests/reference/make_perplexity_reference.py wrote it. Perplexity and NLL must agree
within PERPLEXITY_TOLERANCE (relative), the windows and token counts exactly. Neither torch nor
transformers is needed.
"""

import functools
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

import llama_np
from llama_np.errors import InputError
from llama_np.model import log_softmax
from llama_np.perplexity import perplexity, sliding_windows
from tolerance import PERPLEXITY_TOLERANCE

DATA = Path(__file__).parent / "data" / "perplexity"
REFERENCE = json.loads((DATA / "reference.json").read_text())
PASSAGE = DATA / REFERENCE["passage"]["file"]
RUNS = {f"context{run['context']}_stride{run['stride']}": run for run in REFERENCE["runs"]}
MODEL = REFERENCE["model"]


@functools.lru_cache(maxsize=None)
def bundled_model():
    return llama_np.LlamaForCausalLM.from_pretrained(MODEL)


# ---------------------------------------------------------------------------- the stored reference


def test_reference_was_made_from_the_shipped_checkpoint():
    folder = Path(llama_np.__file__).parent / "assets" / MODEL
    for name, digest in REFERENCE["checkpoint"].items():
        actual = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert actual == digest, f"{name} changed since reference.json was made; rerun make_perplexity_reference.py"


def test_tokenizer_gives_the_stored_ids_with_bos_once():
    tokenizer = llama_np.LlamaTokenizer.from_pretrained(MODEL)
    ids = tokenizer.encode(PASSAGE.read_bytes().decode("utf-8"))
    assert ids == REFERENCE["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("name", RUNS)
def test_windows_are_those_of_the_documented_recipe(name):
    reference = RUNS[name]
    windows = sliding_windows(len(REFERENCE["input_ids"]), reference["context"], reference["stride"])
    ours = [(w.begin, w.end, w.targets, w.loss_tokens) for w in windows]
    theirs = [(w["begin"], w["end"], w["trg_len"], w["num_loss_tokens"]) for w in reference["windows"]]
    assert ours == theirs


@pytest.mark.parametrize("name", RUNS)
def test_perplexity_matches_transformers_recipe(name):
    reference = RUNS[name]
    result = perplexity(bundled_model(), REFERENCE["input_ids"], reference["context"], reference["stride"])
    assert result.tokens == reference["tokens"]
    np.testing.assert_allclose(result.nll, reference["nll"], rtol=PERPLEXITY_TOLERANCE, atol=0)
    np.testing.assert_allclose(result.perplexity, reference["perplexity"], rtol=PERPLEXITY_TOLERANCE, atol=0)


# ---------------------------------------------------------------------------- the recipe's edges


def test_the_recipe_weights_an_overlapping_window_by_one_token_less_than_it_averages():
    """context 8, stride 4 over 12 tokens: the first window scores tokens 1..7; the second
    (tokens 4..11) keeps the labels of tokens 8..11 and its loss is their mean over four, but
    the documented recipe weights it by 3."""
    model = bundled_model()
    ids = np.array(REFERENCE["input_ids"][:12])
    first = per_token_nll(model, ids[:8]).mean()  # tokens 1..7
    second = per_token_nll(model, ids[4:12])[3:].mean()  # tokens 8..11, seen from token 4 on
    labels = ids[None, 4:12].copy()
    labels[:, :4] = -100
    np.testing.assert_allclose(model(ids[None, 4:12], labels=labels).loss, second, rtol=1e-12)
    result = perplexity(model, ids, context=8, stride=4)
    assert result.tokens == 7 + 3
    np.testing.assert_allclose(result.nll, (7 * first + 3 * second) / 10, rtol=1e-12)


def per_token_nll(model, ids):
    """NLL of each token after the first, (T - 1,), from one pass over ids (T,)."""
    log_probs = log_softmax(model(ids[None, :]).logits[0])  # (T, V)
    return -log_probs[np.arange(len(ids) - 1), ids[1:]]


def test_a_last_window_of_one_token_without_overlap_is_skipped_not_nan():
    """Over context + 1 tokens with stride = context, the recipe's last window holds one token,
    whose loss over no labels is NaN (multiplied by a weight of 0); it adds nothing here."""
    model = bundled_model()
    ids = np.array(REFERENCE["input_ids"][:9])
    result = perplexity(model, ids, context=8, stride=8)
    assert [w.loss_tokens for w in sliding_windows(9, 8, 8)] == [7, 0]
    assert result.tokens == 7
    np.testing.assert_allclose(result.nll, model(ids[None, :8], labels=ids[None, :8]).loss, rtol=1e-12)
    assert math.isclose(result.perplexity, math.exp(result.nll))


def test_stride_equal_to_context_is_the_chunked_mean_of_disjoint_windows():
    model = bundled_model()
    ids = np.array(REFERENCE["input_ids"][:20])
    chunks = [ids[None, 0:8], ids[None, 8:16], ids[None, 16:20]]
    losses = [model(chunk, labels=chunk).loss for chunk in chunks]
    result = perplexity(model, ids, context=8, stride=8)
    assert result.tokens == 7 + 7 + 3
    np.testing.assert_allclose(result.nll, (7 * losses[0] + 7 * losses[1] + 3 * losses[2]) / 17, rtol=1e-12)


def test_progress_is_called_once_per_window():
    calls = []
    perplexity(bundled_model(), REFERENCE["input_ids"][:40], context=16, stride=8,
               progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 4) for i in range(1, 5)]


@pytest.mark.parametrize("ids, context, stride, message", [
    ([1], 8, 4, "at least 2"),
    ([[1, 2, 3], [1, 2, 3]], 8, 4, "one sequence"),
    ([1.0, 2.0], 8, 4, "integers"),
    ([1, 2, 3], 1, 1, "context must be an integer >= 2"),
    ([1, 2, 3], True, 1, "context must be an integer >= 2"),
    ([1, 2, 3], 8, 0, "stride must be an integer in [1, context=8]"),
    ([1, 2, 3], 8, 9, "stride must be an integer in [1, context=8]"),
    ([1, 2, 3], 8, 2.0, "stride must be an integer"),
])
def test_bad_arguments_are_input_errors_naming_them(ids, context, stride, message):
    with pytest.raises(InputError, match=re.escape(message)):
        perplexity(bundled_model(), ids, context, stride)
