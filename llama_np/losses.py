"""The training losses of the two heads: causal-LM cross-entropy and the classification losses.

    causal_lm_loss        the logits at t scored against the label at t + 1, −100 ignored
    classification_loss   regression (MSE), single-label (cross-entropy), multi-label (BCE)

Both compute in float64 and return a Python float, as ``model(..., labels=...).loss`` gives it.
Shape legend: B batch, T positions, V vocabulary size, N scored rows, C classes.
"""

from __future__ import annotations

import warnings

import numpy as np

from llama_np import inputs
from llama_np.errors import InputError


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, computed stably in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def cross_entropy(logits: np.ndarray, targets: np.ndarray, ignore_index: int = -100) -> float:
    """Mean over kept targets of logsumexp(z) − z[target]. logits (N, C); targets (N,)."""
    keep = targets != ignore_index
    if not keep.any():
        warnings.warn("every label is -100 (ignored): the loss is NaN, as in Transformers", stacklevel=3)
        return float("nan")
    log_probs = log_softmax(logits[keep])
    return float(-log_probs[np.arange(log_probs.shape[0]), targets[keep]].mean())


def causal_lm_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """Next-token loss: the logits at t are scored against labels[t + 1]; −100 is ignored.

    logits (B, T, V); labels (B, T). Labels are the input ids themselves, shifted here.
    """
    vocab = logits.shape[-1]
    shifted = labels[:, 1:]
    check_label_range(shifted, vocab)
    return cross_entropy(logits[:, :-1].reshape(-1, vocab), shifted.reshape(-1))


def check_label_range(labels: np.ndarray, vocab: int) -> None:
    """Token labels must be token ids (0 <= label < vocab) or −100 (ignored)."""
    valid = labels[labels != -100]
    if valid.size and (valid.min() < 0 or valid.max() >= vocab):
        raise InputError(f"labels must be in [0, {vocab}) or -100, got {int(valid.min())}..{int(valid.max())}")


def classification_loss(pooled: np.ndarray, labels, num_labels: int,
                        problem_type: str | None = None) -> tuple[float, str]:
    """The sequence-classification loss and the problem type it used (docs/reference.md §4.3).

    pooled (B, num_labels). Without a ``problem_type`` it is inferred as Transformers does:
    num_labels 1 -> regression (MSE); integer labels -> single-label (cross-entropy);
    otherwise multi-label (binary cross-entropy with logits, mean).
    """
    labels = inputs.check_class_labels(labels)
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif np.issubdtype(labels.dtype, np.integer):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    z = pooled.astype(np.float64)
    if problem_type == "regression":
        if labels.size != z.size:
            raise InputError(f"regression labels must hold {z.size} values (batch x num_labels), "
                             f"got shape {labels.shape}")
        target = labels.astype(np.float64).reshape(z.shape[0], -1)
        return float(np.mean((z.reshape(z.shape[0], -1) - target) ** 2)), problem_type
    if problem_type == "single_label_classification":
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"single-label classification takes integer class indices as labels, "
                             f"got dtype {labels.dtype}")
        labels = labels.reshape(-1)
        if labels.shape[0] != z.shape[0]:
            raise InputError(f"labels has {labels.shape[0]} entries for a batch of {z.shape[0]}")
        kept = labels[labels != -100]
        if kept.size and (kept.min() < 0 or kept.max() >= num_labels):
            raise InputError(f"labels must be class indices in [0, {num_labels}), got {labels.tolist()}")
        return cross_entropy(z, labels), problem_type
    target = labels.astype(np.float64)
    if target.shape != z.shape:
        raise InputError(f"multi-label labels must have shape {z.shape}, got {target.shape}")
    # log(1 + e^z) − z·y, written so that it never overflows
    return float(np.mean(np.maximum(z, 0) - z * target + np.log1p(np.exp(-np.abs(z))))), problem_type
