"""Direct preference optimisation (Rafailov et al., 2023): the sigmoid loss as TRL computes it.

A preference pair is a prompt with a chosen and a rejected completion. The policy should raise
the chosen completion's log-probability, relative to a frozen reference model, more than the
rejected one's:

    logits = (log π(chosen) − log π(rejected)) − (log π_ref(chosen) − log π_ref(rejected))
    loss   = mean over pairs of −log σ(β · logits)

With the policy equal to the reference every logit is 0 and the loss is ln 2. A sequence's
log-probability is the sum over its completion tokens of log p(token | the tokens before it).

TRL's layout is followed: one batch of 2B rows, the B chosen sequences then the B rejected ones
(prompt + completion each, padded), with a completion mask that is 1 on completion tokens.
With a LoRA adapter on the policy, the reference is the same model with the adapter disabled,
as TRL does with a PEFT model.

Shape legend: B pairs, T positions, V vocabulary size.
"""

from __future__ import annotations

import numpy as np

from llama_np import inputs
from llama_np.errors import InputError
from llama_np.training.model_backward import parameter_gradients, recorded_forward


def _completion_mask(completion_mask, shape) -> np.ndarray:
    mask = np.asarray(completion_mask)
    if mask.shape != tuple(shape):
        raise InputError(f"completion_mask must have the shape of input_ids {tuple(shape)}, got {mask.shape}")
    return mask != 0


def token_log_probs(logits: np.ndarray, input_ids: np.ndarray, completion_mask: np.ndarray) -> np.ndarray:
    """Summed log-probabilities of the completion tokens.  logits (B, T, V); ids, mask (B, T) -> (B,)

        log π(completion) = Σ_{t ≥ 1, mask[t] = 1} log softmax(logits[t − 1])[input_ids[t]]

    in float64 (the logits at t − 1 predict the token at t, so position 0 is never scored).
    """
    z = logits[:, :-1].astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # (B, T − 1, V)
    picked = np.take_along_axis(log_probs, input_ids[:, 1:, None], axis=-1)[..., 0]
    return np.sum(picked * completion_mask[:, 1:], axis=-1)


def token_log_probs_backward(grad: np.ndarray, logits: np.ndarray, input_ids: np.ndarray,
                             completion_mask: np.ndarray) -> np.ndarray:
    """The gradient of ``token_log_probs``.  grad (B,); logits (B, T, V)  ->  (B, T, V)

        dlogits[b, t − 1] = grad[b] · mask[b, t] · (onehot(input_ids[b, t]) − softmax(logits[b, t − 1]))
    """
    z = logits[:, :-1].astype(np.float64)
    probabilities = np.exp(z - z.max(axis=-1, keepdims=True))
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    onehot = np.zeros_like(probabilities)
    np.put_along_axis(onehot, input_ids[:, 1:, None], 1.0, axis=-1)
    weight = (np.asarray(grad, dtype=np.float64)[:, None] * completion_mask[:, 1:])[..., None]  # (B, T − 1, 1)
    full = np.zeros(logits.shape, dtype=np.float64)
    full[:, :-1] = weight * (onehot - probabilities)
    return full.astype(logits.dtype)


def sequence_log_probs(model, input_ids, completion_mask, attention_mask=None) -> np.ndarray:
    """log π(completion) of each row under ``model`` (a LlamaForCausalLM).  (B, T) -> (B,) float64"""
    ids = inputs.check_input_ids(input_ids, model.config.vocab_size)
    logits = model(ids, attention_mask=attention_mask).logits
    return token_log_probs(logits, ids, _completion_mask(completion_mask, ids.shape))


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float = 0.1) -> float:
    """TRL's sigmoid DPO loss from the four (B,) arrays of sequence log-probabilities.

        loss = mean(−log σ(β · ((πc − πr) − (ref_c − ref_r))))       (ln 2 when policy = reference)
    """
    logits = beta * ((np.asarray(policy_chosen, np.float64) - np.asarray(policy_rejected, np.float64))
                     - (np.asarray(reference_chosen, np.float64) - np.asarray(reference_rejected, np.float64)))
    return float(np.mean(np.logaddexp(0.0, -logits)))  # −log σ(x) = log(1 + e^−x), without overflow


def dpo_loss_backward(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                      beta: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The gradient of ``dpo_loss`` with respect to the policy's log-probabilities, (B,) each:

        d loss / d πc = −β · σ(−β · logits) / B,    d loss / d πr = +β · σ(−β · logits) / B
    """
    logits = beta * ((np.asarray(policy_chosen, np.float64) - np.asarray(policy_rejected, np.float64))
                     - (np.asarray(reference_chosen, np.float64) - np.asarray(reference_rejected, np.float64)))
    weight = beta / (1.0 + np.exp(logits)) / logits.size  # β σ(−x) / B
    return -weight, weight


def dpo_value_and_grad(model, input_ids, completion_mask, reference_log_probs, attention_mask=None,
                       beta: float = 0.1) -> tuple[float, dict]:
    """The DPO loss of a batch of pairs and its gradient with respect to the policy's parameters.

    input_ids, completion_mask, attention_mask (2B, T): the B chosen rows, then the B rejected
    rows; reference_log_probs (2B,): the reference model's ``sequence_log_probs`` of the same rows
    ->  (loss, {name: gradient}) as ``value_and_grad`` gives them (the adapter's with an adapter)
    """
    ids = inputs.check_input_ids(input_ids, model.config.vocab_size)
    if ids.shape[0] % 2:
        raise InputError(f"a DPO batch holds the chosen rows then the rejected rows: an even number of rows, "
                         f"got {ids.shape[0]}")
    reference = np.asarray(reference_log_probs, dtype=np.float64)
    if reference.shape != (ids.shape[0],):
        raise InputError(f"reference_log_probs must hold one value per row, shape ({ids.shape[0]},), "
                         f"got {reference.shape}")
    mask = _completion_mask(completion_mask, ids.shape)
    out, seen, run = recorded_forward(model, ids, attention_mask)
    policy = token_log_probs(out.logits, ids, mask)
    pairs = ids.shape[0] // 2
    halves = (policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:])
    grad_chosen, grad_rejected = dpo_loss_backward(*halves, beta)
    grad_logits = token_log_probs_backward(np.concatenate([grad_chosen, grad_rejected]), out.logits, ids, mask)
    return dpo_loss(*halves, beta), parameter_gradients(model, out, seen, run, grad_logits)
