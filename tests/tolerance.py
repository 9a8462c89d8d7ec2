"""The tolerance policy for comparing llama_np with stored Transformers references, stated once.

- float32 logits, hidden states and attention weights: elementwise
      |ours - reference| <= 1e-4 * max(1, |reference|)
  i.e. an absolute 1e-4 for values of size up to 1 and a relative 1e-4 above that. Two-sided:
  the absolute difference is bounded, never just (ours - reference).
- losses: the same rule with 1e-5.
- sliding-window perplexity and its mean NLL: within 1e-4 relative. Each is a weighted mean of
  many window losses (each within 1e-5), so 1e-4 leaves room for summation order, float32 sums
  in Transformers against float64 here, and the exp that turns the NLL into a perplexity.
- token ids (greedy generations): identical.
- two llama_np computations of the same float32 maths (REPEATED_TOLERANCE): the same scaled rule
  with 1e-5. A matrix product summed in another order rounds differently — another batch size,
  `logits_to_keep`, the KV cache, another BLAS thread count or CPU kernel (OpenBLAS picks its
  kernel by CPU and cache size: `OPENBLAS_CORETYPE`, `OPENBLAS_L2_SIZE`) — so such comparisons are
  never exact and never relative-only: a logit near zero differs by ~1e-8 in absolute terms.
- elementwise float32 maths with no summation (RoPE frequencies, cos/sin tables, a mean row):
  relative 1e-6, a few units in the last place (`assert_relatively_close`).

- gradients against torch autograd (GRADIENT_TOLERANCE): per tensor, relative to its largest
  value, max |ours - reference| <= 1e-4 * max |reference|. A gradient is a sum over every
  position and layer, so its small entries carry the rounding of its large ones: an elementwise
  rule would fail on entries near zero that no one can get closer in float32. Losses of the
  5 AdamW steps that follow (TRAINING_LOSS_TOLERANCE): the loss rule with 1e-4, since each step
  moves the weights by the gradients' rounding too.
- float64 finite differences (FINITE_DIFFERENCE_TOLERANCE): a directional derivative from a
  backward function, <gradient, d>, against the central difference (f(x + εd) − f(x − εd)) / 2ε,
  relative 1e-6.

Only positions that carry meaning are compared: callers pass `where` to select the rows whose
attention_mask is 1 (a padded query row has no defined output; docs/reference.md §3.9).
"""

import numpy as np

FLOAT32_TOLERANCE = 1e-4
LOSS_TOLERANCE = 1e-5
REPEATED_TOLERANCE = 1e-5
ELEMENTWISE_TOLERANCE = 1e-6
PERPLEXITY_TOLERANCE = 1e-4  # relative, for perplexity and the mean NLL of a long text
GRADIENT_TOLERANCE = 1e-4  # per tensor, relative to its largest |value|
TRAINING_LOSS_TOLERANCE = 1e-4  # losses after optimizer steps, the loss rule's scaling
FINITE_DIFFERENCE_TOLERANCE = 1e-6  # relative, float64 directional derivatives


def scaled_deviation(ours, reference):
    """|ours - reference| / max(1, |reference|), elementwise, in float64."""
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    return np.abs(ours - reference) / np.maximum(1.0, np.abs(reference))


def assert_close(ours, reference, what, tolerance=FLOAT32_TOLERANCE, where=None):
    """Fail unless every compared element is within tolerance * max(1, |reference|).

    `where` is a boolean array broadcastable to the reference's shape selecting the elements
    to compare. Returns the largest scaled deviation, for reporting. The failure message names
    `what`, the worst element and the share of elements within tolerance.
    """
    ours = np.asarray(ours)
    reference = np.asarray(reference)
    if ours.shape != reference.shape:
        raise AssertionError(f"{what}: shape {ours.shape}, reference has shape {reference.shape}")
    selected = np.ones(reference.shape, dtype=bool) if where is None else np.broadcast_to(where, reference.shape)
    if not selected.any():
        raise AssertionError(f"{what}: nothing selected to compare")
    deviation = np.zeros(reference.shape)
    deviation[selected] = scaled_deviation(ours[selected], reference[selected])
    deviation[selected & ~np.isfinite(ours)] = np.inf  # NaN/inf in our output always fails
    worst = np.unravel_index(np.argmax(deviation), deviation.shape)
    largest = float(deviation[worst])
    if largest > tolerance:
        within = np.count_nonzero(deviation[selected] <= tolerance) / np.count_nonzero(selected)
        raise AssertionError(
            f"{what}: largest deviation {largest:.3e} > {tolerance:g} (|ours - ref| / max(1, |ref|)) "
            f"at index {tuple(int(i) for i in worst)}: ours {ours[worst]!r}, reference {reference[worst]!r}; "
            f"{within:.1%} of the compared values are within tolerance"
        )
    return largest


# The name the reference tests read best with; the rule is the same.
assert_close_to_reference = assert_close


def assert_relatively_close(ours, expected, what, tolerance=ELEMENTWISE_TOLERANCE):
    """Elementwise |ours - expected| <= tolerance * |expected|, for maths without summation."""
    ours = np.asarray(ours, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if ours.shape != expected.shape:
        raise AssertionError(f"{what}: shape {ours.shape}, expected shape {expected.shape}")
    outside = ~(np.abs(ours - expected) <= tolerance * np.abs(expected))  # NaN counts as outside
    if outside.any():
        worst = np.unravel_index(np.argmax(np.where(outside, np.abs(ours - expected), -1)), ours.shape)
        raise AssertionError(f"{what}: {np.count_nonzero(outside)} of {ours.size} values differ by more "
                             f"than {tolerance:g} relative; at {tuple(int(i) for i in worst)}: ours "
                             f"{ours[worst]!r}, expected {expected[worst]!r}")


def assert_loss_close_to_reference(ours, reference, what):
    """A scalar loss within 1e-5 * max(1, |reference|)."""
    if ours is None:
        raise AssertionError(f"{what}: loss is None, reference is {float(reference)!r}")
    return assert_close_to_reference(np.float64(ours), np.float64(reference), what, tolerance=LOSS_TOLERANCE)


def assert_same_token_ids(ours, reference, what):
    """Token id arrays identical in shape and value; the message names the first difference."""
    ours = np.asarray(ours)
    reference = np.asarray(reference)
    if ours.shape != reference.shape:
        raise AssertionError(f"{what}: shape {ours.shape}, reference has shape {reference.shape}\n"
                             f"ours:\n{ours}\nreference:\n{reference}")
    differ = np.argwhere(ours != reference)
    if len(differ):
        row, column = differ[0]
        raise AssertionError(
            f"{what}: {len(differ)} token ids differ, first at row {row} position {column}: ours "
            f"{ours[row, column]}, reference {reference[row, column]}\nours:\n{ours}\nreference:\n{reference}"
        )


def assert_gradient_close(ours, reference, what, tolerance=GRADIENT_TOLERANCE):
    """max |ours - reference| <= tolerance * max |reference| over one tensor; returns the ratio."""
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if ours.shape != reference.shape:
        raise AssertionError(f"{what}: shape {ours.shape}, reference has shape {reference.shape}")
    if not np.isfinite(ours).all():
        raise AssertionError(f"{what}: {np.count_nonzero(~np.isfinite(ours))} values are NaN or inf")
    scale = float(np.abs(reference).max())
    difference = np.abs(ours - reference)
    largest = float(difference.max()) / scale if scale else float(difference.max())
    if largest > tolerance:
        worst = np.unravel_index(np.argmax(difference), difference.shape)
        raise AssertionError(
            f"{what}: largest deviation {largest:.3e} of the largest |reference| {scale:.3e} > {tolerance:g}, "
            f"at index {tuple(int(i) for i in worst)}: ours {ours[worst]!r}, reference {reference[worst]!r}")
    return largest


def assert_directional_derivative(analytic, central_difference, what, tolerance=FINITE_DIFFERENCE_TOLERANCE):
    """|analytic - central difference| <= tolerance * |central difference| (two scalars)."""
    analytic, central_difference = float(analytic), float(central_difference)
    gap = abs(analytic - central_difference)
    if not gap <= tolerance * abs(central_difference):
        raise AssertionError(f"{what}: <gradient, d> = {analytic!r}, central difference {central_difference!r}, "
                             f"relative gap {gap / max(abs(central_difference), 1e-300):.3e} > {tolerance:g}")
    return gap / max(abs(central_difference), 1e-300)
