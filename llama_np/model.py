"""LlamaModel, LlamaForCausalLM and LlamaForSequenceClassification: the forward pass.

Read this file top to bottom: one decoder layer (``self_attention``, ``mlp``,
``decoder_layer``), the stack (``LlamaStack.forward``), then the two heads and their losses.

    x = embedding(input_ids)                                        (B, T, D)
    for each layer:  h = x + self_attention(rms_norm(x))
                     x = h + mlp(rms_norm(h))
    x = rms_norm(x)  ->  lm_head (B, T, V)  or  score pooled at the last non-pad token (B, labels)

The maths of each step is a function of ``layers.py``. Loading and saving live in
``pretrained.py``, argument checks in ``inputs.py``, the KV cache in ``cache.py``.

Every activation passes through ``tap(name, x)`` under its TransformerLens hook name
(``blocks.0.attn.hook_pattern``, …). A tap returns its input unless a hook replaces it, so the
traced run *is* the run: ``run_with_cache`` and ``run_with_hooks`` (``trace.py``) only pass a
tap that records or edits; an ordinary call passes ``no_tap``.

Shape legend: B batch, T query positions, S key positions (past + current), D hidden size,
H query heads, KV key/value heads, hd head_dim, I intermediate size, V vocabulary size.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import numpy as np

from llama_np import inputs, layers
from llama_np.cache import KVCache
from llama_np.config import LlamaConfig
from llama_np.errors import InputError
from llama_np.generation import generate
from llama_np.pretrained import (KEEP_WIDENED_FLOOR, LlamaPreTrainedModel, Weights,  # noqa: F401
                                 expected_base_shapes, keep_widened_limit)
from llama_np.trace import HookOptions, Tap, no_tap

# ---------------------------------------------------------------------------- outputs


class ModelOutput:
    """Base of the output records: attribute access, ``out["logits"]`` and ``out.keys()``."""

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def keys(self):
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def to_tuple(self):
        return tuple(getattr(self, name) for name in self.keys())


@dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: np.ndarray  # (B, T, D), after the final norm
    past_key_values: KVCache | None = None
    hidden_states: tuple | None = None  # L + 1 arrays (B, T, D): embeddings, then every layer
    attentions: tuple | None = None  # L arrays (B, H, T, S)


@dataclass
class CausalLMOutput(ModelOutput):
    logits: np.ndarray  # (B, T, V), or (B, logits_to_keep, V)
    loss: float | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    logits: np.ndarray  # (B, num_labels), pooled at the last non-pad token
    loss: float | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


# ---------------------------------------------------------------------------- one decoder layer


@dataclass
class LayerWeights:
    """The tensors of one decoder layer, named as in the checkpoint (``model.layers.{i}.…``)."""

    input_layernorm: np.ndarray  # (D,)
    q_proj: np.ndarray  # (H·hd, D)
    k_proj: np.ndarray  # (KV·hd, D)
    v_proj: np.ndarray  # (KV·hd, D)
    o_proj: np.ndarray  # (D, H·hd)
    post_attention_layernorm: np.ndarray  # (D,)
    gate_proj: np.ndarray  # (I, D)
    up_proj: np.ndarray  # (I, D)
    down_proj: np.ndarray  # (D, I)
    q_bias: np.ndarray | None = None  # (H·hd,) when attention_bias
    k_bias: np.ndarray | None = None
    v_bias: np.ndarray | None = None
    o_bias: np.ndarray | None = None  # (D,)
    gate_bias: np.ndarray | None = None  # (I,) when mlp_bias
    up_bias: np.ndarray | None = None
    down_bias: np.ndarray | None = None  # (D,)


def rms_norm(x, weight, eps: float, tap: Tap, name: str):
    """``layers.rms_norm`` with TransformerLens' two hook points of a norm.

    {name}.hook_scale (…, 1) is rms(x) = sqrt(mean(x²) + eps); {name}.hook_normalized (…, D)
    is x / rms(x), before the learned weight multiplies it.
    """
    scale = tap(f"{name}.hook_scale", layers.rms(x, eps))
    return weight * tap(f"{name}.hook_normalized", layers.normalize(x, scale))


def tap_heads(tap: Tap, name: str, x):
    """Tap a (B, heads, T, hd) array in TransformerLens' layout (B, T, heads, hd)."""
    return tap(name, x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)


def project_heads(x, weight, bias, heads: int):
    """A q, k or v projection split into heads: (B, T, D) -> (B, T, heads, hd).

    With one input per head, (B, T, heads, D) as ``use_split_qkv_input`` gives, head h reads its
    own copy through its rows of the weight: W[h·hd:(h+1)·hd].
    """
    if x.ndim == 3:
        return layers.linear(x, weight, bias).reshape(*x.shape[:2], heads, -1)
    per_head = weight.reshape(heads, -1, weight.shape[-1])  # (heads, hd, D)
    y = (x.transpose(0, 2, 1, 3) @ per_head.swapaxes(-1, -2)).transpose(0, 2, 1, 3)
    return y if bias is None else y + bias.reshape(heads, -1)


def self_attention(x, w: LayerWeights, config: LlamaConfig, cos, sin, mask, layer_index: int,
                   cache: KVCache | None = None, tap: Tap = no_tap, options: HookOptions = HookOptions()):
    """Multi-head self-attention with RoPE and grouped key/value heads.

    x (B, T, D), or a (query, key, value) triple of per-head inputs (B, T, heads, D);
    cos, sin (B, T, hd); mask (B, 1, T, S)  ->  output (B, T, D), weights (B, H, T, S)

    With a cache, this layer's new keys/values are appended to it and attention runs over all
    S = past + T positions. Keys are cached *after* RoPE, so they are never rotated again.
    """
    x_q, x_k, x_v = x if isinstance(x, tuple) else (x, x, x)
    batch, length = x_q.shape[:2]
    H, KV, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    # (B, T, heads, hd) is TransformerLens' layout; the products below want (B, heads, T, hd)
    q = tap("attn.hook_q", project_heads(x_q, w.q_proj, w.q_bias, H))
    k = tap("attn.hook_k", project_heads(x_k, w.k_proj, w.k_bias, KV))
    v = tap("attn.hook_v", project_heads(x_v, w.v_proj, w.v_bias, KV))
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    q = tap_heads(tap, "attn.hook_rot_q", layers.apply_rope(q, cos, sin))
    k = tap_heads(tap, "attn.hook_rot_k", layers.apply_rope(k, cos, sin))
    if cache is not None:
        k, v = cache.update(layer_index, k, v)  # (B, KV, S, hd)

    scores = tap("attn.hook_attn_scores", layers.attention_scores(q, k, mask, hd ** -0.5))  # (B, H, T, S)
    pattern = tap("attn.hook_pattern", layers.softmax(scores).astype(q.dtype, copy=False))
    z = tap_heads(tap, "attn.hook_z", pattern @ layers.repeat_kv(v, H // KV))  # (B, H, T, hd)
    z = z.transpose(0, 2, 1, 3)  # (B, T, H, hd)
    if not options.use_attn_result:
        return layers.linear(z.reshape(batch, length, H * hd), w.o_proj, w.o_bias, config.pretraining_tp), pattern
    # Each head's share of o_proj: z_h · W_O[:, h]ᵀ, (B, H, T, hd) @ (H, hd, D) -> (B, T, H, D)
    per_head = z.transpose(0, 2, 1, 3) @ w.o_proj.reshape(-1, H, hd).transpose(1, 2, 0)
    result = tap("attn.hook_result", per_head.transpose(0, 2, 1, 3))
    out = result.sum(axis=2)
    return (out if w.o_bias is None else out + w.o_bias), pattern


def mlp(x, w: LayerWeights, config: LlamaConfig, tap: Tap = no_tap):
    """``layers.swiglu`` with its hook points: down( silu(gate(x)) ⊙ up(x) ).  (B, T, D) -> (B, T, D)"""
    gate = tap("mlp.hook_pre", layers.linear(x, w.gate_proj, w.gate_bias))  # (B, T, I)
    up = tap("mlp.hook_pre_linear", layers.linear(x, w.up_proj, w.up_bias))
    hidden = tap("mlp.hook_post", layers.silu(gate) * up)
    return layers.linear(hidden, w.down_proj, w.down_bias, config.pretraining_tp)


def decoder_layer(x, w: LayerWeights, config: LlamaConfig, cos, sin, mask, layer_index: int,
                  cache: KVCache | None = None, tap: Tap = no_tap, options: HookOptions = HookOptions()):
    """One pre-norm transformer block.  x (B, T, D) -> (B, T, D), attention weights (B, H, T, S)

        h   = x + attention(rms_norm(x))
        out = h + swiglu(rms_norm(h))
    """
    def here(point, value):  # this layer's hook points are named blocks.{layer_index}.{point}
        return tap(f"blocks.{layer_index}.{point}", value)

    eps = config.rms_norm_eps
    x = here("hook_resid_pre", x)
    if options.use_split_qkv_input:  # one copy of the stream per head, each normed on its own
        heads = {"q": config.num_attention_heads, "k": config.num_key_value_heads, "v": config.num_key_value_heads}
        copies = [here(f"hook_{name}_input", np.repeat(x[:, :, None], n, axis=2)) for name, n in heads.items()]
        attn_in = tuple(rms_norm(copy, w.input_layernorm, eps, here, "ln1") for copy in copies)
    else:
        attn_in = rms_norm(x, w.input_layernorm, eps, here, "ln1")
    attn_out, weights = self_attention(attn_in, w, config, cos, sin, mask, layer_index, cache, here, options)
    h = here("hook_resid_mid", x + here("hook_attn_out", attn_out))
    mlp_in = here("hook_mlp_in", h) if options.use_hook_mlp_in else h
    mlp_out = here("hook_mlp_out", mlp(rms_norm(mlp_in, w.post_attention_layernorm, eps, here, "ln2"), w, config, here))
    return here("hook_resid_post", h + mlp_out), weights


# ---------------------------------------------------------------------------- the models


class LlamaStack(LlamaPreTrainedModel):
    """The Llama stack that the three model classes share: embedding, decoder layers, final norm."""

    def layer_weights(self, i: int) -> LayerWeights:
        """The widened tensors of decoder layer i."""
        return LayerWeights(**self.weights.layer(self.base_prefix, i, self.config.num_hidden_layers,
                                                 self.config.pretraining_tp))

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, output_hidden_states=False, output_attentions=False,
                tap: Tap = no_tap) -> BaseModelOutput:
        """Embedding, every decoder layer and the final norm.  input_ids (B, T)."""
        config = self.config
        self.weights.check_unchanged()  # memory-mapped weights of a file that shrank would crash
        run = inputs.check_forward(config, self.dtype, input_ids, attention_mask, position_ids,
                                   past_key_values, use_cache)
        batch, length = run.input_ids.shape
        inv_freq, attention_factor = layers.rope_frequencies(
            config.head_dim, config.rope_parameters, config.max_position_embeddings, run.max_position, self.dtype)
        cos, sin = layers.rope_cos_sin(run.position_ids, inv_freq, attention_factor, self.dtype)  # (B, T, hd)
        mask = layers.attention_mask(run.attention_mask, length, run.past_length, batch, self.dtype)

        x = tap("hook_embed", layers.embedding(run.input_ids, self.weights[f"{self.base_prefix}embed_tokens.weight"]))
        hidden_states, attentions = [x], []
        for i in range(config.num_hidden_layers):
            x, weights = decoder_layer(x, self.layer_weights(i), config, cos, sin, mask, i, run.cache,
                                       tap, self.hook_options)
            hidden_states.append(x)
            attentions.append(weights)
        x = rms_norm(x, self.weights[f"{self.base_prefix}norm.weight"], config.rms_norm_eps, tap, "ln_final")
        hidden_states[-1] = x  # Transformers reports the last hidden state after the final norm
        return BaseModelOutput(
            last_hidden_state=x,
            past_key_values=run.cache if (use_cache or past_key_values is not None) else None,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )


class LlamaModel(LlamaStack):
    """The Llama stack without a head: returns the final hidden states (B, T, D)."""

    prefix_optional = True  # a checkpoint saved from a bare LlamaModel has no "model." prefix

    def __call__(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                 use_cache=False, output_hidden_states=False, output_attentions=False,
                 tap: Tap = no_tap) -> BaseModelOutput:
        return self.forward(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                            output_hidden_states, output_attentions, tap)


class LlamaForCausalLM(LlamaStack):
    """The Llama stack with the language-model head: next-token logits (B, T, V)."""

    @classmethod
    def expected_shapes(cls, config, prefix="model."):
        shapes = expected_base_shapes(config, prefix)
        if not config.tie_word_embeddings:
            shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
        return shapes

    @classmethod
    def head_rows(cls, config):
        return 0 if config.tie_word_embeddings else config.vocab_size

    def lm_head_weight(self) -> np.ndarray:
        """(V, D): lm_head.weight, or the embedding matrix when the embeddings are tied."""
        if self.config.tie_word_embeddings or "lm_head.weight" not in self.weights:
            return self.weights[f"{self.base_prefix}embed_tokens.weight"]
        return self.weights["lm_head.weight"]

    def __call__(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                 use_cache=False, labels=None, output_hidden_states=False,
                 output_attentions=False, logits_to_keep: int = 0, tap: Tap = no_tap) -> CausalLMOutput:
        """Logits for every position (or the last ``logits_to_keep``); the LM loss with labels."""
        logits_to_keep = inputs.check_logits_to_keep(logits_to_keep)
        out = self.forward(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                           output_hidden_states, output_attentions, tap)
        hidden = out.last_hidden_state[:, -logits_to_keep:] if logits_to_keep else out.last_hidden_state
        logits = tap("unembed.hook_out", layers.linear(tap("unembed.hook_in", hidden), self.lm_head_weight()))
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, inputs.check_labels(labels, logits.shape[:2]))
        return CausalLMOutput(logits=logits, loss=loss, past_key_values=out.past_key_values,
                              hidden_states=out.hidden_states, attentions=out.attentions)

    def generate(self, input_ids, attention_mask=None, **kwargs) -> np.ndarray:
        """Prompt + new tokens (B, T + new); see ``llama_np.generation.generate``."""
        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)


class LlamaForSequenceClassification(LlamaStack):
    """The Llama stack with a linear ``score`` head read at the last non-pad token."""

    @classmethod
    def expected_shapes(cls, config, prefix="model."):
        shapes = expected_base_shapes(config, prefix)
        shapes["score.weight"] = (config.num_labels, config.hidden_size)
        return shapes

    @classmethod
    def head_rows(cls, config):
        return config.num_labels

    def __call__(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                 use_cache=False, labels=None, output_hidden_states=False,
                 output_attentions=False, tap: Tap = no_tap) -> SequenceClassifierOutput:
        """Class logits (B, num_labels); the loss of docs/reference.md §4.3 with labels."""
        out = self.forward(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                           output_hidden_states, output_attentions, tap)
        logits = layers.linear(out.last_hidden_state, self.weights["score.weight"])  # (B, T, labels)
        ids = inputs.check_input_ids(input_ids, self.config.vocab_size)
        pooled = logits[np.arange(logits.shape[0]), last_non_pad_index(ids, self.config.pad_token_id)]
        loss = None
        if labels is not None:
            loss, problem_type = classification_loss(pooled, labels, self.config.num_labels,
                                                     self.config.problem_type)
            self.config.problem_type = problem_type  # as Transformers does, decided on the first call
        return SequenceClassifierOutput(logits=pooled, loss=loss, past_key_values=out.past_key_values,
                                        hidden_states=out.hidden_states, attentions=out.attentions)


# ---------------------------------------------------------------------------- heads and losses


def last_non_pad_index(input_ids: np.ndarray, pad_token_id: int | None) -> np.ndarray:
    """Where classification reads each row: the rightmost token that is not the pad token.

    input_ids (B, T) -> (B,). Works for left and right padding (Transformers 5.x rule). Without a
    pad token a batch of one reads the last position; a larger batch cannot be pooled.
    """
    batch, length = input_ids.shape
    if pad_token_id is None:
        if batch != 1:
            raise InputError("cannot classify a batch of more than one sequence without a pad token: "
                             "set config.pad_token_id so the last real token of each row can be found")
        return np.array([length - 1])
    not_pad = input_ids != pad_token_id
    return np.argmax(np.arange(length) * not_pad, axis=-1)


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
    valid = shifted[shifted != -100]
    if valid.size and (valid.min() < 0 or valid.max() >= vocab):
        raise InputError(f"labels must be in [0, {vocab}) or -100, got {int(valid.min())}..{int(valid.max())}")
    return cross_entropy(logits[:, :-1].reshape(-1, vocab), shifted.reshape(-1))


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
