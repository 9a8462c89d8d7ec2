"""Checkers for what happens after the last layer: classification pooling and top-p filtering.

``check_pooling(fn)`` takes a function with the signature of ``model.last_non_pad_index``;
``check_top_p(fn)`` one with the signature of ``generation.top_p_filter``. Like the component
checkers they run cases built from the bundled model, print a report and return a
``CheckResult``; the wrong versions below are the mistakes their hints name.
"""

from __future__ import annotations

import numpy as np

from llama_np.exercises.checking import Case, CheckResult, Mistake, run_check
from llama_np.exercises.samples import model_sample
from llama_np.generation import top_p_filter
from llama_np.model import last_non_pad_index

# ---------------------------------------------------------------------------- pooling


def _pool_last_position(input_ids, pad_token_id):
    return np.full(input_ids.shape[0], input_ids.shape[1] - 1)


def _pool_count_minus_one(input_ids, pad_token_id):
    return (input_ids != pad_token_id).sum(axis=-1) - 1


def _pool_first_pad(input_ids, pad_token_id):
    return np.argmax(input_ids == pad_token_id, axis=-1)


def _pool_first_token(input_ids, pad_token_id):
    return np.argmax(input_ids != pad_token_id, axis=-1)


PAD_POSITION_HINT = (
    "You are pooling the pad position: classification must read the rightmost token that is not "
    "pad_token_id. ")

POOLING_MISTAKES = (
    Mistake("pooling the pad position",
            PAD_POSITION_HINT + "In a right-padded row the last position holds a pad token, so "
            "input_ids.shape[1] − 1 is not it.", (_pool_last_position,)),
    Mistake("pooling the pad position (left padding)",
            PAD_POSITION_HINT + "With left padding the last real token sits at T − 1, not at "
            "(number of real tokens) − 1: that index lands on a pad token.", (_pool_count_minus_one,)),
    Mistake("pooling the pad position (first pad)",
            PAD_POSITION_HINT + "Your index points at the first pad token itself.", (_pool_first_pad,)),
    Mistake("pooling the first token",
            "That is the first real token of each row; a causal model has read the whole text only at "
            "the *last* real token, which is where classification reads.", (_pool_first_token,)),
)


def _wrapped_indices(fn):
    """fn's indices as an array, negative ones (−1 for the last position) counted from the end."""
    def indices(input_ids, pad_token_id):
        out = fn(input_ids, pad_token_id)
        if out is None:
            return None
        out = np.asarray(out)
        return out % input_ids.shape[1] if np.issubdtype(out.dtype, np.integer) else out
    return indices


def _right_pad(input_ids, attention_mask, pad_token_id):
    """The same rows moved to the right-padded layout."""
    right = np.full_like(input_ids, pad_token_id)
    for row, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
        real = ids[mask.astype(bool)]
        right[row, :real.size] = real
    return right


def pooling_cases(prefer_bundled: bool = True) -> list[Case]:
    sample = model_sample(prefer_bundled)
    pad = sample.pad_token_id
    left = sample.input_ids
    right = _right_pad(left, sample.attention_mask, pad)
    shortest = int(sample.attention_mask.sum(axis=-1).min())
    unpadded = left[:, -shortest:]  # every row cut to the shortest one: no padding at all
    token = int(left[-1, -1])
    single = np.array([[token] + [pad] * 6, [token] * 7])  # a one-token row, odd length 7

    def case(name, input_ids, pad_token_id, tags=()):
        return Case(name, (input_ids, pad_token_id), last_non_pad_index(input_ids, pad_token_id),
                    tags=frozenset(tags))

    return [
        case(f"right-padded batch of {sample.source}'s text, pad id {pad}", right, pad),
        case(f"left-padded batch, pad id {pad}", left, pad),
        case("no padding at all", unpadded, pad),
        case("a row with a single token, odd length 7", single, pad),
        case("no pad token (pad_token_id=None), one row: the last position", unpadded[:1], None,
             tags=["no_pad_token"]),
    ]


def check_pooling(fn, verbose: bool = True, prefer_bundled: bool = True) -> CheckResult:
    """Check ``fn(input_ids, pad_token_id) -> (B,)`` against ``model.last_non_pad_index``.

    input_ids (B, T). −1 is accepted for the last position. With pad_token_id None a batch of
    one reads the last position.
    """
    tag_hints = {"no_pad_token": "Only the case without a pad token fails: with pad_token_id None, a "
                                 "batch of one sequence reads its last position."}
    return run_check("check_pooling", _wrapped_indices(fn), pooling_cases(prefer_bundled), POOLING_MISTAKES,
                     tag_hints, tolerance=0.0, verbose=verbose)


# ---------------------------------------------------------------------------- top-p


def _probabilities(logits):
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


def _keep_in_sorted_order(logits, keep_sorted, order):
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return np.where(keep, logits, -np.inf)


def _top_p_dropping_crossing_token(logits, top_p):
    order = np.argsort(-logits, axis=-1, kind="stable")  # most likely first
    cumulative = np.cumsum(np.take_along_axis(_probabilities(logits), order, axis=-1), axis=-1)
    keep_sorted = cumulative < top_p
    keep_sorted[:, 0] = True
    return _keep_in_sorted_order(logits, keep_sorted, order)


def _top_p_dropping_crossing_token_and_all(logits, top_p):
    order = np.argsort(-logits, axis=-1, kind="stable")
    cumulative = np.cumsum(np.take_along_axis(_probabilities(logits), order, axis=-1), axis=-1)
    return _keep_in_sorted_order(logits, cumulative < top_p, order)


def _top_p_least_likely(logits, top_p):
    order = np.argsort(logits, axis=-1, kind="stable")  # least likely first
    cumulative = np.cumsum(np.take_along_axis(_probabilities(logits), order, axis=-1), axis=-1)
    return _keep_in_sorted_order(logits, cumulative <= top_p, order)


def _top_p_zero_instead_of_minus_inf(logits, top_p):
    filtered = top_p_filter(logits, top_p)
    return np.where(np.isneginf(filtered), 0.0, filtered).astype(logits.dtype)


def _top_p_returning_probabilities(logits, top_p):
    return _probabilities(top_p_filter(logits, top_p))


TOP_P_MISTAKES = (
    Mistake("dropping the crossing token",
            "You drop the token that crosses the threshold. Keep the smallest set of most likely "
            "tokens whose probabilities add up to *at least* top_p — the token that takes the sum past "
            "top_p stays (sorted ascending: remove a token only when the cumulative probability up to "
            "and including it is <= 1 − top_p), and the most likely token always stays.",
            (_top_p_dropping_crossing_token, _top_p_dropping_crossing_token_and_all)),
    Mistake("keeping the least likely tokens",
            "You kept the *least* likely tokens: add probabilities up from the most likely token "
            "(or, sorted ascending, remove the tokens whose cumulative probability is <= 1 − top_p).",
            (_top_p_least_likely,)),
    Mistake("zero instead of −inf",
            "Removed tokens must get −inf, so that softmax gives them probability 0; a logit of 0 is an "
            "ordinary, quite likely value.", (_top_p_zero_instead_of_minus_inf,)),
    Mistake("probabilities returned",
            "Return filtered *logits* (removed ones set to −inf), not probabilities: the softmax comes "
            "after every filter.", (_top_p_returning_probabilities,)),
)


def _safe_top_p(logits, top_p, margin=2e-5):
    """top_p moved a little, if needed, so that no cumulative probability lies within ``margin`` of
    1 − top_p — float32 and float64 sums then agree on every token."""
    cumulative = np.cumsum(np.sort(_probabilities(logits), axis=-1), axis=-1)
    for step in range(50):
        candidate = top_p + 0.001 * ((step + 1) // 2) * (-1) ** step
        if np.abs(cumulative - (1 - candidate)).min() > margin:
            return round(candidate, 4)
    return top_p


def _next_token_logits(prefer_bundled: bool) -> tuple[np.ndarray, str]:
    """(N, V) real next-token logits, from a few real positions of the sample batch."""
    sample = model_sample(prefer_bundled)
    real = sample.logits[sample.attention_mask.astype(bool)]  # (positions, V)
    rows = real[np.linspace(0, real.shape[0] - 1, 4).astype(int)].astype(np.float32)
    if sample.source.startswith("a random"):
        rows = rows * np.float32(3 / rows.std())  # untrained logits are nearly flat: give them a real spread
    return rows, sample.source


def top_p_cases(prefer_bundled: bool = True) -> list[Case]:
    rows, source = _next_token_logits(prefer_bundled)
    sharpened = rows[:1] * np.float32(4.0)
    while _probabilities(sharpened).max() < 0.7:
        sharpened = sharpened * np.float32(2.0)
    confident_p = _safe_top_p(sharpened, 0.5)
    crafted = np.log(np.array([[0.05, 0.4, 0.02, 0.15, 0.25, 0.03, 0.1]], dtype=np.float32))

    def case(name, logits, top_p, tags=()):
        return Case(name, (logits, top_p), top_p_filter(logits, top_p), tags=frozenset(tags))

    high, low = _safe_top_p(rows, 0.9), _safe_top_p(rows, 0.5)
    return [
        case(f"next-token logits of {source}, top_p = {high}", rows, high),
        case(f"the same logits, top_p = {low}", rows, low),
        case(f"a confident row whose top token alone has more than top_p = {confident_p}", sharpened,
             confident_p, tags=["confident"]),
        case("7 tokens with probabilities .4 .25 .15 .1 .05 .03 .02 (shuffled), top_p = 0.6", crafted, 0.6),
        case("top_p = 1.0 keeps every token", rows, 1.0, tags=["keep_all"]),
    ]


def check_top_p(fn, verbose: bool = True, prefer_bundled: bool = True) -> CheckResult:
    """Check ``fn(logits, top_p)`` against ``generation.top_p_filter``.

    logits (B, V) -> (B, V) with the removed tokens set to −inf.
    """
    tag_hints = {"confident": "Only the confident row fails: when the most likely token alone has more "
                              "than top_p, it must still be kept (never remove every token).",
                 "keep_all": "Only top_p = 1.0 fails: then no token is removed."}
    return run_check("check_top_p", fn, top_p_cases(prefer_bundled), TOP_P_MISTAKES, tag_hints, verbose=verbose)
