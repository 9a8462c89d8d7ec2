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

from dataclasses import dataclass, fields

import numpy as np

from llama_np import inputs, layers
from llama_np.cache import KVCache
from llama_np.config import LlamaConfig
from llama_np.errors import InputError
from llama_np.generation import check_generate_arguments, generate
from llama_np.layers import Tap, no_tap
from llama_np.losses import causal_lm_loss, classification_loss
from llama_np.pretrained import LlamaPreTrainedModel, expected_base_shapes

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


def project_heads(x, weight, bias, heads: int):
    """A q, k or v projection split into heads: (B, T, D) -> (B, T, heads, hd)."""
    return layers.linear(x, weight, bias).reshape(*x.shape[:2], heads, -1)


def self_attention(x, w: LayerWeights, config: LlamaConfig, cos, sin, mask, layer_index: int,
                   cache: KVCache | None = None, tap: Tap = no_tap):
    """Multi-head self-attention with RoPE and grouped key/value heads.

    x (B, T, D); cos, sin (B, T, hd); mask (B, 1, T, S)  ->  (B, T, D)

    With a cache, this layer's new keys/values are appended to it and attention runs over all
    S = past + T positions. Keys are cached *after* RoPE, so they are never rotated again.
    """
    batch, length = x.shape[:2]
    H, KV, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    # (B, T, heads, hd) is TransformerLens' layout; the products below want (B, heads, T, hd)
    q = tap("hook_q", project_heads(x, w.q_proj, w.q_bias, H)).transpose(0, 2, 1, 3)
    k = tap("hook_k", project_heads(x, w.k_proj, w.k_bias, KV)).transpose(0, 2, 1, 3)
    v = tap("hook_v", project_heads(x, w.v_proj, w.v_bias, KV)).transpose(0, 2, 1, 3)
    q = tap("hook_rot_q", layers.apply_rope(q, cos, sin).transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    k = tap("hook_rot_k", layers.apply_rope(k, cos, sin).transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    if cache is not None:
        k, v = cache.update(layer_index, k, v)  # (B, KV, S, hd)
    z = tap("hook_z", layers.attention(q, k, v, mask, hd ** -0.5, tap).transpose(0, 2, 1, 3))  # (B, T, H, hd)
    return layers.linear(z.reshape(batch, length, H * hd), w.o_proj, w.o_bias, config.pretraining_tp)


def mlp(x, w: LayerWeights, config: LlamaConfig, tap: Tap = no_tap):
    """The layer's SwiGLU MLP, ``layers.swiglu`` with its weights.  (B, T, D) -> (B, T, D)"""
    return layers.swiglu(x, w.gate_proj, w.up_proj, w.down_proj, w.gate_bias, w.up_bias, w.down_bias,
                         config.pretraining_tp, tap)


def decoder_layer(x, w: LayerWeights, config: LlamaConfig, cos, sin, mask, layer_index: int,
                  cache: KVCache | None = None, tap: Tap = no_tap):
    """One pre-norm transformer block.  x (B, T, D) -> (B, T, D)

        h   = x + attention(rms_norm(x))
        out = h + swiglu(rms_norm(h))

    Its hook points are named ``blocks.{layer_index}.…`` (``ln1.hook_scale``, ``attn.hook_pattern``).
    """
    here, eps = layers.scoped(tap, f"blocks.{layer_index}"), config.rms_norm_eps
    x = here("hook_resid_pre", x)
    attn_in = layers.rms_norm(x, w.input_layernorm, eps, layers.scoped(here, "ln1"))
    attn_out = self_attention(attn_in, w, config, cos, sin, mask, layer_index, cache, layers.scoped(here, "attn"))
    h = here("hook_resid_mid", x + here("hook_attn_out", attn_out))
    mlp_in = layers.rms_norm(h, w.post_attention_layernorm, eps, layers.scoped(here, "ln2"))
    return here("hook_resid_post", h + here("hook_mlp_out", mlp(mlp_in, w, config, layers.scoped(here, "mlp"))))


# ---------------------------------------------------------------------------- the models


class LlamaStack(LlamaPreTrainedModel):
    """The Llama stack that the three model classes share: embedding, decoder layers, final norm."""

    def layer_weights(self, i: int) -> LayerWeights:
        """The widened tensors of decoder layer i (the backward pass and the hooks ask for them
        too, so this only fetches: the forward tells the progress callback)."""
        count, weights = self.config.num_hidden_layers, self.weights
        if i == 0 and weights.keep_widened and not weights.all_widened:
            weights.widen_all([list(self.layer_tensor_names(layer).values()) for layer in range(count)])
        tensors = {field_name: weights.get(name) for field_name, name in self.layer_tensor_names(i).items()}
        if self.config.pretraining_tp > 1:
            # Transformers 4.45 drops every bias on its pretraining_tp > 1 path, so we do too
            # (docs/reference.md §3.11).
            tensors = {name: (None if name.endswith("_bias") else value) for name, value in tensors.items()}
        if self.adapter is not None:  # a LoRA adapter: W + scaling · B · A (llama_np/training/lora.py)
            tensors = self.adapter.adapt(tensors, self.layer_tensor_names(i))
        return LayerWeights(**tensors)

    def rope_tables(self, position_ids, max_position: int):
        """cos, sin (B, T, hd) of the RoPE angles at position_ids (B, T), in the compute dtype.

        ``max_position`` (the largest position + 1) matters only for dynamic RoPE. The forward
        pass and its backward (``llama_np.training``) both take their tables from here.
        """
        config = self.config
        inv_freq, attention_factor = layers.rope_frequencies(
            config.head_dim, config.rope_parameters, config.max_position_embeddings, max_position, self.dtype)
        return layers.rope_cos_sin(position_ids, inv_freq, attention_factor, self.dtype)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, output_hidden_states=False, output_attentions=False,
                tap: Tap = no_tap) -> BaseModelOutput:
        """Embedding, every decoder layer and the final norm.  input_ids (B, T)."""
        config = self.config
        self.weights.check_unchanged()  # memory-mapped weights of a file that shrank would crash
        run = inputs.check_forward(config, self.dtype, input_ids, attention_mask, position_ids,
                                   past_key_values, use_cache)
        batch, length = run.input_ids.shape
        cos, sin = self.rope_tables(run.position_ids, run.max_position)  # (B, T, hd)
        mask = layers.attention_mask(run.attention_mask, length, run.past_length, batch, self.dtype)

        attentions = []  # output_attentions: each layer's softmax weights, as its hook_pattern gave them

        def record(name, value):
            value = tap(name, value)
            if name.endswith(".attn.hook_pattern"):
                attentions.append(value)
            return value

        x = tap("hook_embed", layers.embedding(run.input_ids, self.weights[f"{self.base_prefix}embed_tokens.weight"]))
        hidden_states = [x]
        with self.weights.product_threads():  # small weights multiply on one BLAS thread (weights/workers.py)
            for i in range(config.num_hidden_layers):
                w = self.layer_weights(i)  # (LayerWeights)
                self.weights.step(i, config.num_hidden_layers)  # progress, for a pass that takes seconds
                x = decoder_layer(x, w, config, cos, sin, mask, i, run.cache,
                                  record if output_attentions else tap)
                hidden_states.append(x)
        x = layers.rms_norm(x, self.weights[f"{self.base_prefix}norm.weight"], config.rms_norm_eps,
                            layers.scoped(tap, "ln_final"))
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
    main_output = "last_hidden_state"

    def __call__(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                 use_cache=False, output_hidden_states=False, output_attentions=False,
                 tap: Tap = no_tap) -> BaseModelOutput:
        return self.forward(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                            output_hidden_states, output_attentions, tap)


class LlamaForCausalLM(LlamaStack):
    """The Llama stack with the language-model head: next-token logits (B, T, V)."""

    has_lm_head = True

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
        check_generate_arguments(kwargs)
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

    def score_weight(self) -> np.ndarray:
        """The head (num_labels, D): a LoRA adapter's own copy while it trains it (PEFT's modules_to_save)."""
        weight = self.weights["score.weight"]
        return weight if self.adapter is None else self.adapter.weight("score.weight", weight)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                 use_cache=False, labels=None, output_hidden_states=False,
                 output_attentions=False, tap: Tap = no_tap) -> SequenceClassifierOutput:
        """Class logits (B, num_labels); the loss of docs/reference.md §4.3 with labels."""
        out = self.forward(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                           output_hidden_states, output_attentions, tap)
        logits = layers.linear(out.last_hidden_state, self.score_weight())  # (B, T, labels)
        ids = inputs.check_input_ids(input_ids, self.config.vocab_size)
        pooled = logits[np.arange(logits.shape[0]), last_non_pad_index(ids, self.config.pad_token_id)]
        loss = None
        if labels is not None:
            loss, problem_type = classification_loss(pooled, labels, self.config.num_labels,
                                                     self.config.problem_type)
            self.config.problem_type = problem_type  # as Transformers does, decided on the first call
        return SequenceClassifierOutput(logits=pooled, loss=loss, past_key_values=out.past_key_values,
                                        hidden_states=out.hidden_states, attentions=out.attentions)


# ---------------------------------------------------------------------------- the classification head


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
