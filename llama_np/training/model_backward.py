"""The backward pass of ``model.py``: a decoder layer, the stack and the two heads, in reverse.

    loss, grads = value_and_grad(model, input_ids, attention_mask, labels)

runs the model's own forward pass once with a tap that records every activation by its hook
name (the same arrays ``run_with_cache`` shows), then walks back from the loss: the head, the
final norm, each decoder layer from the last to the first, the embedding. Every step is a
function of ``backward.py``; this file only wires them as ``model.py`` wires the forward:

    forward                                   backward (read bottom to top)
    x = embedding(input_ids)                  dE += embedding_backward(dx)
    h = x + self_attention(rms_norm(x))       dx = dh + rms_norm_backward(self_attention_backward(dh))
    y = h + mlp(rms_norm(h))                  dh = dy + rms_norm_backward(mlp_backward(dy))
    logits = lm_head(rms_norm(y))             dy = rms_norm_backward(lm_head_backward(dlogits))

Shape legend: B batch, T positions, D hidden size, H query heads, KV key/value heads,
hd head_dim, I intermediate size, V vocabulary size, C classes.
"""

from __future__ import annotations

import numpy as np

from llama_np import inputs, layers
from llama_np.errors import InputError
from llama_np.model import (LayerWeights, LlamaForCausalLM, LlamaForSequenceClassification,
                            last_non_pad_index)
from llama_np.training import backward

# ---------------------------------------------------------------------------- one decoder layer


def self_attention_backward(grad, x, w: LayerWeights, config, cos, sin, seen: dict) -> tuple[np.ndarray, dict]:
    """Back through ``model.self_attention``.

    grad (B, T, D) of the attention block's output; x (B, T, D) its input (ln1's output);
    ``seen`` the layer's recorded activations by hook point (``attn.hook_rot_q``, …)
    ->  grad_x (B, T, D), {LayerWeights field: gradient}
    """
    batch, length = x.shape[:2]
    H, KV, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    heads_first = (0, 2, 1, 3)  # (B, T, heads, hd) <-> (B, heads, T, hd)
    grads = {}
    z = seen["attn.hook_z"].reshape(batch, length, H * hd)
    grad_z, grads["o_proj"], grads["o_bias"] = backward.linear_backward(grad, z, w.o_proj, w.o_bias is not None)
    grad_z = grad_z.reshape(batch, length, H, hd).transpose(heads_first)
    q, k, v = (seen[f"attn.hook_{name}"].transpose(heads_first) for name in ("rot_q", "rot_k", "v"))
    grad_q, grad_k, grad_v = backward.attention_backward(grad_z, q, k, v, seen["attn.hook_pattern"], hd ** -0.5)
    grad_q = backward.apply_rope_backward(grad_q, cos, sin)
    grad_k = backward.apply_rope_backward(grad_k, cos, sin)
    grad_x = np.zeros_like(x)
    for name, grad_heads in (("q", grad_q), ("k", grad_k), ("v", grad_v)):
        flat = grad_heads.transpose(heads_first).reshape(batch, length, -1)  # (B, T, heads·hd)
        bias = getattr(w, f"{name}_bias")
        grad_in, grads[f"{name}_proj"], grads[f"{name}_bias"] = backward.linear_backward(
            flat, x, getattr(w, f"{name}_proj"), bias is not None)
        grad_x += grad_in
    return grad_x, grads


def mlp_backward(grad, x, w: LayerWeights, seen: dict) -> tuple[np.ndarray, dict]:
    """Back through ``model.mlp``: (B, T, D) -> grad_x (B, T, D), {LayerWeights field: gradient}."""
    grad_x, grads = backward.swiglu_backward(grad, x, seen["mlp.hook_pre"], seen["mlp.hook_pre_linear"],
                                             seen["mlp.hook_post"], w.gate_proj, w.up_proj, w.down_proj,
                                             has_bias=w.gate_bias is not None)
    return grad_x, grads


def decoder_layer_backward(grad, w: LayerWeights, config, cos, sin, seen: dict) -> tuple[np.ndarray, dict]:
    """Back through ``model.decoder_layer``.  grad (B, T, D) of the layer's output -> of its input.

        h   = x + attention(rms_norm(x))          dx = dh + rms_norm_backward(attention_backward(dh))
        out = h + swiglu(rms_norm(h))             dh = dout + rms_norm_backward(swiglu_backward(dout))

    ``seen`` maps the layer's hook points (without ``blocks.{i}.``) to what the forward recorded;
    the norms' outputs are their two recorded factors multiplied again, as ``rms_norm`` returned
    them. Returns the gradient of the layer's input and {LayerWeights field: gradient}.
    """
    grads = {}
    mlp_in = w.post_attention_layernorm * seen["ln2.hook_normalized"]
    grad_mlp_in, mlp_grads = mlp_backward(grad, mlp_in, w, seen)
    grads.update(mlp_grads)
    grad_h, grads["post_attention_layernorm"] = backward.rms_norm_backward(
        grad_mlp_in, seen["ln2.hook_normalized"], seen["ln2.hook_scale"], w.post_attention_layernorm)
    grad_h = grad_h + grad
    attn_in = w.input_layernorm * seen["ln1.hook_normalized"]
    grad_attn_in, attention_grads = self_attention_backward(grad_h, attn_in, w, config, cos, sin, seen)
    grads.update(attention_grads)
    grad_x, grads["input_layernorm"] = backward.rms_norm_backward(
        grad_attn_in, seen["ln1.hook_normalized"], seen["ln1.hook_scale"], w.input_layernorm)
    return grad_x + grad_h, grads


# ---------------------------------------------------------------------------- the stack and the heads


def stack_backward(model, grad, run, seen: dict) -> dict:
    """Back through ``LlamaStack.forward`` from the gradient of its last hidden state (B, T, D).

    Returns {checkpoint name: gradient} for the embedding, every layer and the final norm.
    """
    config, prefix = model.config, model.base_prefix
    grads = {}
    grad, grads[f"{prefix}norm.weight"] = backward.rms_norm_backward(
        grad, seen["ln_final.hook_normalized"], seen["ln_final.hook_scale"], model.weights[f"{prefix}norm.weight"])
    cos, sin = model.rope_tables(run.position_ids, run.max_position)
    for i in reversed(range(config.num_hidden_layers)):
        here = f"blocks.{i}."
        layer_seen = {name[len(here):]: value for name, value in seen.items() if name.startswith(here)}
        grad, layer_grads = decoder_layer_backward(grad, model.layer_weights(i), config, cos, sin, layer_seen)
        names = model.layer_tensor_names(i)
        grads.update({names[field]: value for field, value in layer_grads.items() if value is not None})
    grads[f"{prefix}embed_tokens.weight"] = backward.embedding_backward(
        grad, run.input_ids, config.vocab_size, config.pad_token_id)
    return grads


def head_backward(model, grad_output, hidden, run) -> tuple[np.ndarray, str, np.ndarray]:
    """Back through the head: from the gradient of the model's output (logits (B, T, V), or
    pooled class logits (B, C)) to that of the final hidden state (B, T, D).

    Returns (grad_hidden, the head weight's checkpoint name, its gradient); with tied
    embeddings the head's weight is ``model.embed_tokens.weight``.
    """
    if isinstance(model, LlamaForCausalLM):
        grad_hidden, grad_head, _ = backward.linear_backward(grad_output, hidden, model.lm_head_weight())
        tied = model.config.tie_word_embeddings or "lm_head.weight" not in model.weights
        return grad_hidden, f"{model.base_prefix}embed_tokens.weight" if tied else "lm_head.weight", grad_head
    index = last_non_pad_index(run.input_ids, model.config.pad_token_id)
    grad_scores = backward.pooling_backward(grad_output, index, hidden.shape[1])  # (B, T, C)
    grad_hidden, grad_head, _ = backward.linear_backward(grad_scores, hidden, model.score_weight())
    return grad_hidden, "score.weight", grad_head


def recorded_forward(model, input_ids, attention_mask=None, labels=None):
    """The model's own forward pass, once, with a tap that records every activation.

    Returns (the model's output, {hook name: activation}, the checked inputs). Refuses a model
    whose parameters cannot be trained (a streamed model) before any work.
    """
    if not isinstance(model, (LlamaForCausalLM, LlamaForSequenceClassification)):
        raise InputError(f"value_and_grad takes a LlamaForCausalLM or LlamaForSequenceClassification, "
                         f"got {type(model).__name__}")
    model.named_parameters()  # widened, writable, and refused for a streamed model
    seen = {}
    out = model(input_ids, attention_mask=attention_mask, labels=labels, output_hidden_states=True,
                tap=layers.recorder(seen))
    run = inputs.check_forward(model.config, model.dtype, input_ids, attention_mask, None, None, False)
    return out, seen, run


def parameter_gradients(model, out, seen, run, grad_output) -> dict:
    """{name: gradient} for ``model.named_parameters()``, from the gradient of the model's output
    (logits (B, T, V) or pooled logits (B, C)) in a ``recorded_forward``: every weight's, or with
    a LoRA adapter enabled the adapter's only."""
    grad_hidden, head_name, grad_head = head_backward(model, grad_output, out.hidden_states[-1], run)
    grads = stack_backward(model, grad_hidden, run, seen)
    # Tied embeddings: the head's gradient adds to the embedding's, as the one tensor serves both.
    grads[head_name] = grads[head_name] + grad_head if head_name in grads else grad_head
    adapter = model.adapter if model.adapter is not None and model.adapter.enabled else None
    if adapter is not None:  # the adapted weights' gradients, taken on to A and B
        grads = adapter.gradients(grads)
    parameters = model.named_parameters()
    for name, value in parameters:
        if name not in grads:  # a bias the pretraining_tp > 1 forward leaves out: no effect, no gradient
            grads[name] = np.zeros_like(value)
    return {name: grads[name].astype(model.dtype, copy=False) for name, _ in parameters}


def value_and_grad(model, input_ids, attention_mask=None, labels=None) -> tuple[float, dict]:
    """The loss of one batch and its gradient with respect to every parameter.

    model: a LlamaForCausalLM or LlamaForSequenceClassification; input_ids (B, T);
    attention_mask (B, T) or None; labels as the model's call takes them (required)
    ->  (loss, {name: gradient}) with the names, shapes and dtype of ``model.named_parameters()``:
    every weight's, or with a LoRA adapter enabled the adapter's only (PEFT's names)

    The loss is ``model(input_ids, attention_mask=attention_mask, labels=labels).loss``, from the
    very same forward pass: it runs once, with a tap that records each activation. A causal LM's
    loss is computed here with its gradient, from one float64 softmax over the vocabulary
    (``backward.causal_lm_loss_with_gradient``: the same value as the model's, to the last bit).
    """
    if labels is None:
        raise InputError("value_and_grad needs labels: the loss it differentiates is model(..., labels=labels).loss")
    if isinstance(model, LlamaForCausalLM):
        out, seen, run = recorded_forward(model, input_ids, attention_mask)
        loss, grad_output = backward.causal_lm_loss_with_gradient(
            out.logits, inputs.check_labels(labels, out.logits.shape[:2]))
    else:
        out, seen, run = recorded_forward(model, input_ids, attention_mask, labels)
        loss, grad_output = out.loss, backward.classification_loss_backward(
            out.logits, inputs.check_class_labels(labels), model.config.problem_type)
    return loss, parameter_gradients(model, out, seen, run, grad_output)
