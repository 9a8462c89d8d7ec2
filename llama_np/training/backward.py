"""The backward pass of Llama 2, one function beside each forward function of ``layers.py``.

Read it next to ``layers.py``: the same order (embedding, RMSNorm, RoPE, attention, projections
and the MLP), then the losses of ``losses.py``. ``f_backward`` takes the gradient of the loss
with respect to ``f``'s output (``grad``, same shape as the output) and what the forward computed,
and returns the gradients with respect to ``f``'s inputs, as llm.c pairs
``layernorm_forward`` with ``layernorm_backward``. Nothing is recomputed that the forward's hook
points already hold (``hook_normalized``, ``hook_pattern``, ``hook_pre`` …): the activations a
traced run records are what a backward pass needs.

The conventions are torch autograd's, so that the gradients equal those of Transformers: the
additive attention mask is a constant, the embedding row of ``padding_idx`` gets no gradient,
and a loss's ignored labels (−100) contribute nothing.

Shape legend: B batch, T query positions, S key positions, D hidden size, H query heads,
KV key/value heads, hd head_dim, I intermediate size, V vocabulary size, N scored rows, C classes.
"""

from __future__ import annotations

import numpy as np

from llama_np import layers, losses

# ---------------------------------------------------------------------------- embedding


def embedding_backward(grad: np.ndarray, input_ids: np.ndarray, vocab_size: int,
                       padding_idx: int | None = None) -> np.ndarray:
    """The gradient of the embedding matrix.  grad (B, T, D); input_ids (B, T)  ->  (V, D)

        dE[v] = Σ_{b,t : input_ids[b,t] = v} grad[b, t]

    A token that appears twice collects both gradients, not the last one written: the positions
    are sorted by token id and each run of equal ids summed with ``np.add.reduceat`` (the same
    sums as ``np.add.at(grad_weight, input_ids, grad)``, which is many times slower).
    The row of ``padding_idx`` gets none, as ``torch.nn.Embedding(padding_idx=...)`` keeps it.
    """
    grad_weight = np.zeros((vocab_size, grad.shape[-1]), dtype=grad.dtype)
    ids = input_ids.reshape(-1)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))  # first of each run
    grad_weight[sorted_ids[starts]] = np.add.reduceat(grad.reshape(-1, grad.shape[-1])[order], starts, axis=0)
    if padding_idx is not None:
        grad_weight[padding_idx] = 0
    return grad_weight


# ---------------------------------------------------------------------------- RMSNorm


def rms_norm_backward(grad: np.ndarray, normalized: np.ndarray, scale: np.ndarray,
                      weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Through y = n · w with n = x / r, r = sqrt(mean(x²) + eps).

    grad (..., D) the gradient of y; normalized n (..., D) and scale r (..., 1) as the forward's
    ``hook_normalized`` and ``hook_scale`` hold them; weight w (D,)
    ->  grad_x (..., D), grad_weight (D,)

        dw = Σ over positions of dy · n
        dn = dy · w
        dx = (dn − n · mean(dn · n)) / r

    The second term is the path through the rms: every x_j moves r, and r divides every n_i.
    """
    grad_weight = np.sum(grad * normalized, axis=tuple(range(grad.ndim - 1)))
    grad_normalized = grad * weight
    projection = np.mean(grad_normalized * normalized, axis=-1, keepdims=True)
    grad_x = (grad_normalized - normalized * projection) / scale
    return grad_x.astype(grad.dtype, copy=False), grad_weight


# ---------------------------------------------------------------------------- applying RoPE


def apply_rope_backward(grad: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Through x' = x · cos + rotate_half(x) · sin: the rotation by −angle.

    grad (B, heads, T, hd); cos, sin (B, T, hd)  ->  grad_x (B, heads, T, hd)

    rotate_half is the matrix R = [[0, −1], [1, 0]] on the two halves, and Rᵀ = −R, so

        dx = dx' · cos − rotate_half(dx' · sin)

    i.e. each pair of the gradient is turned back by position · inv_freq (times yarn's factor).
    """
    cos, sin = cos[:, None].astype(grad.dtype), sin[:, None].astype(grad.dtype)  # broadcast over heads
    return grad * cos - layers.rotate_half(grad * sin)


# ---------------------------------------------------------------------------- attention


def repeat_kv_backward(grad: np.ndarray, n_rep: int) -> np.ndarray:
    """Through repeat_kv: each key/value head collects the gradients of its n_rep query heads.

    grad (B, KV·n_rep, S, hd)  ->  (B, KV, S, hd)

        dk[:, j] = Σ_{r < n_rep} dk_repeated[:, j·n_rep + r]

    Heads were repeated in place (k0 k0 k1 k1), so the group of head j is consecutive.
    """
    if n_rep == 1:
        return grad
    batch, heads, length, head_dim = grad.shape
    return grad.reshape(batch, heads // n_rep, n_rep, length, head_dim).sum(axis=2)


def softmax_backward(grad: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Through p = softmax(s) over the last axis.  grad, weights p (..., S)  ->  grad_s (..., S)

        ds_j = p_j · (dp_j − Σ_i p_i · dp_i)

    The Jacobian is diag(p) − p pᵀ; the weighted sum is what every row must subtract.
    """
    return weights * (grad - np.sum(grad * weights, axis=-1, keepdims=True))


def attention_scores_backward(grad: np.ndarray, q: np.ndarray, k: np.ndarray,
                              scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """Through scores = q · kᵀ · scaling + mask.

    grad (B, H, T, S); q (B, H, T, hd); k (B, KV, S, hd)  ->  grad_q (B, H, T, hd), grad_k (B, KV, S, hd)

        dq = dscores · k · scaling,   dk = dscoresᵀ · q · scaling   (summed over each GQA group)

    The mask is a constant: it adds nothing. (A query row whose keys are all masked, a
    left-padding row, has a uniform softmax; its gradient flows as autograd's does.)
    """
    n_rep = q.shape[1] // k.shape[1]
    scale = q.dtype.type(scaling)
    grad_q = (grad @ layers.repeat_kv(k, n_rep)) * scale
    grad_k = repeat_kv_backward((grad.swapaxes(-1, -2) @ q) * scale, n_rep)
    return grad_q, grad_k


def attention_backward(grad: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                       weights: np.ndarray, scaling: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Through output = softmax(q · kᵀ · scaling + mask) · v, with grouped key/value heads.

    grad (B, H, T, hd); q (B, H, T, hd) and k, v (B, KV, S, hd) as the forward used them (q and
    k after RoPE); weights (B, H, T, S) the softmax, the forward's ``hook_pattern``
    ->  grad_q (B, H, T, hd), grad_k (B, KV, S, hd), grad_v (B, KV, S, hd)

        dweights = dout · vᵀ          dv = weightsᵀ · dout
        dscores  = softmax_backward(dweights, weights)
        dq, dk   = attention_scores_backward(dscores)
    """
    n_rep = q.shape[1] // v.shape[1]
    grad_weights = grad @ layers.repeat_kv(v, n_rep).swapaxes(-1, -2)  # (B, H, T, S)
    grad_v = repeat_kv_backward(weights.swapaxes(-1, -2) @ grad, n_rep)
    grad_scores = softmax_backward(grad_weights, weights)
    grad_q, grad_k = attention_scores_backward(grad_scores, q, k, scaling)
    return grad_q, grad_k, grad_v


# ---------------------------------------------------------------------------- projections and MLP


def linear_backward(grad: np.ndarray, x: np.ndarray, weight: np.ndarray,
                    has_bias: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Through y = x · Wᵀ + b.

    grad (..., out); x (..., in); weight (out, in)
    ->  grad_x (..., in), grad_weight (out, in), grad_bias (out,) or None

        dx = dy · W,   dW = Σ over positions of dyᵀ · x,   db = Σ over positions of dy

    ``pretraining_tp`` slices are the same maths summed in another order, so they have the same
    gradients: nothing here depends on them.
    """
    grad_2d = grad.reshape(-1, grad.shape[-1])  # (positions, out): one matrix product, not one per row of B
    grad_weight = grad_2d.T @ x.reshape(-1, x.shape[-1])
    grad_bias = grad_2d.sum(axis=0) if has_bias else None
    grad_x = (grad_2d @ weight).reshape(*grad.shape[:-1], weight.shape[1])
    return grad_x, grad_weight, grad_bias


def silu_backward(grad: np.ndarray, x: np.ndarray, sigmoid: np.ndarray | None = None) -> np.ndarray:
    """Through silu(x) = x · σ(x).  grad, x (...); sigmoid σ(x) (...) if the caller has it  ->  (...)

        silu'(x) = σ(x) · (1 + x · (1 − σ(x)))
    """
    one = x.dtype.type(1)
    if sigmoid is None:
        sigmoid = one / (one + np.exp(-x))
    return grad * sigmoid * (one + x * (one - sigmoid))


def swiglu_backward(grad: np.ndarray, x: np.ndarray, gate: np.ndarray, up: np.ndarray,
                    hidden: np.ndarray, gate_proj: np.ndarray, up_proj: np.ndarray,
                    down_proj: np.ndarray, has_bias: bool = False) -> tuple[np.ndarray, dict]:
    """Through mlp(x) = down( silu(gate(x)) ⊙ up(x) ).

    grad (B, T, D); x (B, T, D) the MLP's input; gate, up, hidden (B, T, I) as the forward's
    ``hook_pre``, ``hook_pre_linear`` and ``hook_post`` hold them; gate_proj, up_proj (I, D),
    down_proj (D, I)
    ->  grad_x (B, T, D), {"gate_proj", "up_proj", "down_proj" (and "…_bias" with has_bias): gradient}

        dhidden = down_backward(dy)
        dgate   = dhidden ⊙ up ⊙ silu'(gate),   dup = dhidden ⊙ silu(gate)
        dx      = gate_backward(dgate) + up_backward(dup)
    """
    grads = {}
    grad_hidden, grads["down_proj"], grads["down_bias"] = linear_backward(grad, hidden, down_proj, has_bias)
    sigmoid = gate.dtype.type(1) / (gate.dtype.type(1) + np.exp(-gate))  # σ(gate), one exp for both paths
    grad_gate = silu_backward(grad_hidden * up, gate, sigmoid)
    grad_up = grad_hidden * (gate * sigmoid)  # silu(gate)
    grad_x_gate, grads["gate_proj"], grads["gate_bias"] = linear_backward(grad_gate, x, gate_proj, has_bias)
    grad_x_up, grads["up_proj"], grads["up_bias"] = linear_backward(grad_up, x, up_proj, has_bias)
    if not has_bias:
        grads = {name: value for name, value in grads.items() if not name.endswith("_bias")}
    return grad_x_gate + grad_x_up, grads


# ---------------------------------------------------------------------------- the losses


def cross_entropy_with_gradient(logits: np.ndarray, targets: np.ndarray,
                                ignore_index: int = -100) -> tuple[float, np.ndarray]:
    """The mean cross-entropy over the kept targets and its gradient, from one float64 softmax.

    logits z (N, C); targets (N,)  ->  (loss, dz (N, C) in the logits' dtype)

        loss = (1 / n) Σ_{kept i} (logsumexp(z_i) − z_i[target_i]),   n = number of kept targets
        dz_i = (softmax(z_i) − onehot(target_i)) / n   for a kept row, 0 for an ignored one

    The loss is ``losses.cross_entropy``'s to the last bit (the same float64 operations on each
    row); the exponentials it sums are the softmax's numerators, so the gradient costs one
    division more. The (N, C) array is the largest of a step (C is the vocabulary): the softmax
    is taken in place in one float64 copy. Every target ignored makes the loss NaN (as in
    Transformers, with its warning) and the gradient NaN too.
    """
    keep = targets != ignore_index
    kept = int(np.count_nonzero(keep))
    if kept == 0:
        return losses.cross_entropy(logits, targets, ignore_index), np.full(logits.shape, np.nan, dtype=logits.dtype)
    rows = np.flatnonzero(keep)
    grad = logits.astype(np.float64)  # (N, C): shifted logits, then exp, then softmax / n
    grad -= grad.max(axis=-1, keepdims=True)
    target_logits = grad[rows, targets[rows]]
    np.exp(grad, out=grad)
    sums = grad.sum(axis=-1, keepdims=True)  # (N, 1)
    loss = float(-(target_logits - np.log(sums[rows, 0])).mean())  # −mean of log_softmax at the targets
    grad *= 1.0 / (kept * sums)
    grad[rows, targets[rows]] -= 1.0 / kept
    grad[~keep] = 0.0
    return loss, grad.astype(logits.dtype)


def cross_entropy_backward(logits: np.ndarray, targets: np.ndarray, ignore_index: int = -100) -> np.ndarray:
    """The gradient of the mean cross-entropy over the kept targets.  logits (N, C); targets (N,)

        dz_i = (softmax(z_i) − onehot(target_i)) / n   for a kept row, 0 for an ignored one

    n the number of kept targets; computed in float64 as the loss is (``cross_entropy_with_gradient``).
    """
    return cross_entropy_with_gradient(logits, targets, ignore_index)[1]


def causal_lm_loss_with_gradient(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """``losses.causal_lm_loss`` and its gradient.  logits (B, T, V); labels (B, T)  ->  (loss, (B, T, V))

    The logits at t are scored against labels[t + 1], so the last position, which has no next
    label, is scored against −100 (no gradient); the mean runs over every kept label of the
    batch (not per row).
    """
    batch, length, vocab = logits.shape
    losses.check_label_range(labels[:, 1:], vocab)
    next_labels = np.full((batch, length), -100, dtype=np.int64)  # (B, T): labels[t + 1]
    next_labels[:, :-1] = labels[:, 1:]
    loss, grad = cross_entropy_with_gradient(logits.reshape(-1, vocab), next_labels.reshape(-1))
    return loss, grad.reshape(batch, length, vocab)


def causal_lm_loss_backward(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The gradient of ``losses.causal_lm_loss``.  logits (B, T, V); labels (B, T)  ->  (B, T, V)"""
    return causal_lm_loss_with_gradient(logits, labels)[1]


def classification_loss_backward(pooled: np.ndarray, labels: np.ndarray, problem_type: str) -> np.ndarray:
    """The gradient of ``losses.classification_loss`` with the problem type it used.

    pooled z (B, C); labels (B,) or (B, C)  ->  (B, C), in the dtype of z

        regression      loss = mean((z − y)²)                  dz = 2 (z − y) / (B·C)
        single label    loss = cross_entropy(z, y)             dz = (softmax(z) − onehot(y)) / kept
        multi label     loss = mean(log(1 + e^z) − z·y)        dz = (σ(z) − y) / (B·C)
    """
    z = pooled.astype(np.float64)
    if problem_type == "single_label_classification":
        return cross_entropy_backward(pooled, np.asarray(labels).reshape(-1))
    target = np.asarray(labels, dtype=np.float64).reshape(z.shape)
    if problem_type == "regression":
        grad = 2.0 * (z - target) / z.size
    else:
        grad = (1.0 / (1.0 + np.exp(-z)) - target) / z.size
    return grad.astype(pooled.dtype)


def pooling_backward(grad: np.ndarray, index: np.ndarray, length: int) -> np.ndarray:
    """Through pooled[b] = logits[b, index[b]] (the last non-pad token of each row).

    grad (B, C); index (B,)  ->  (B, T, C): the gradient at each row's pooled position, 0 elsewhere.
    """
    batch, classes = grad.shape
    full = np.zeros((batch, length, classes), dtype=grad.dtype)
    full[np.arange(batch), index] = grad
    return full
