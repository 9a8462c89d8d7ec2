"""LlamaModel, LlamaForCausalLM and LlamaForSequenceClassification.

Thin classes that hold a config and weights and call the maths in ``layers.py``. The whole
forward pass is ``decoder_layer`` (one block) and ``LlamaModel.__call__`` (the stack):

    x = embedding(input_ids)                                        (B, T, D)
    for each layer:  h = x + self_attention(rms_norm(x))
                     x = h + swiglu(rms_norm(h))
    x = rms_norm(x)  ->  lm_head (B, T, V)  or  score pooled at the last non-pad token (B, labels)

Shape legend: B batch, T query positions, S key positions (past + current), D hidden size,
H query heads, KV key/value heads, hd head_dim, I intermediate size, V vocabulary size.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np

from llama_np import layers
from llama_np.config import LlamaConfig
from llama_np.errors import CheckpointError, InputError
from llama_np.generation import GenerationConfig, KVCache, generate

# A hook receives (name, activation) at every named point of the forward pass; see trace.py.
Hook = Callable[[str, np.ndarray], None]

# The least memory for widened weights that from_pretrained keeps by default (see keep_widened_limit).
KEEP_WIDENED_FLOOR = 2 * 1024**3


def keep_widened_limit() -> int:
    """Up to how many bytes of widened (float32) weights ``from_pretrained`` keeps by default.

    Half the memory available right now (Linux's MemAvailable), and never less than 2 GiB: a
    1.1B TinyLlama (4.4 GB in float32) then runs at full speed on a 16 GB laptop, while a 7B
    float16 checkpoint (27 GB in float32) is widened layer by layer on every use instead.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return max(KEEP_WIDENED_FLOOR, int(line.split()[1]) * 1024 // 2)
    except (OSError, ValueError, IndexError):
        pass
    return KEEP_WIDENED_FLOOR


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


# Field of LayerWeights -> tensor name under model.layers.{i}.
LAYER_TENSOR_NAMES = {
    "input_layernorm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "post_attention_layernorm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "o_bias": "self_attn.o_proj.bias",
    "gate_bias": "mlp.gate_proj.bias",
    "up_bias": "mlp.up_proj.bias",
    "down_bias": "mlp.down_proj.bias",
}


def self_attention(x, w: LayerWeights, config: LlamaConfig, cos, sin, mask, layer_index: int,
                   cache: KVCache | None = None, hook: Hook | None = None):
    """Multi-head self-attention with RoPE and grouped key/value heads.

    x (B, T, D); cos, sin (B, T, hd); mask (B, 1, T, S)  ->  output (B, T, D), weights (B, H, T, S)

    With a cache, this layer's new keys/values are appended to it and attention runs over all
    S = past + T positions. Keys are cached *after* RoPE, so they are never rotated again.
    """
    batch, length, _ = x.shape
    tp = config.pretraining_tp
    if tp > 1:
        q, k, v = (layers.linear_tp(x, weight, tp, "out") for weight in (w.q_proj, w.k_proj, w.v_proj))
    else:
        q = layers.linear(x, w.q_proj, w.q_bias)
        k = layers.linear(x, w.k_proj, w.k_bias)
        v = layers.linear(x, w.v_proj, w.v_bias)
    # (B, T, heads·hd) -> (B, T, heads, hd): the layout TransformerLens' hooks use
    q = q.reshape(batch, length, config.num_attention_heads, config.head_dim)
    k = k.reshape(batch, length, config.num_key_value_heads, config.head_dim)
    v = v.reshape(batch, length, config.num_key_value_heads, config.head_dim)
    _record(hook, f"blocks.{layer_index}.attn.hook_q", q)
    _record(hook, f"blocks.{layer_index}.attn.hook_k", k)
    _record(hook, f"blocks.{layer_index}.attn.hook_v", v)
    # (B, T, heads, hd) -> (B, heads, T, hd) for the matrix products
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    _record(hook, f"blocks.{layer_index}.attn.hook_rot_q", q.transpose(0, 2, 1, 3))
    _record(hook, f"blocks.{layer_index}.attn.hook_rot_k", k.transpose(0, 2, 1, 3))
    if cache is not None:
        k, v = cache.update(layer_index, k, v)  # (B, KV, S, hd)

    if hook is None:
        out, weights = layers.attention(q, k, v, mask, config.head_dim ** -0.5)
    else:
        out, weights = _traced_attention(q, k, v, mask, config, layer_index, hook)
    out = out.transpose(0, 2, 1, 3)  # (B, T, H, hd)
    _record(hook, f"blocks.{layer_index}.attn.hook_z", out)
    out = out.reshape(batch, length, config.num_attention_heads * config.head_dim)
    if tp > 1:
        return layers.linear_tp(out, w.o_proj, tp, "in"), weights
    return layers.linear(out, w.o_proj, w.o_bias), weights


def _traced_attention(q, k, v, mask, config, layer_index, hook):
    """``layers.attention`` written out so that the scores can be recorded (same numbers)."""
    n_rep = config.num_key_value_groups
    k, v = layers.repeat_kv(k, n_rep), layers.repeat_kv(v, n_rep)
    scores = (q @ k.swapaxes(-1, -2)) * q.dtype.type(config.head_dim ** -0.5)
    if mask is not None:
        scores = scores + mask.astype(scores.dtype, copy=False)
    hook(f"blocks.{layer_index}.attn.hook_attn_scores", scores)
    weights = layers.softmax(scores).astype(q.dtype, copy=False)
    hook(f"blocks.{layer_index}.attn.hook_pattern", weights)
    return weights @ v, weights


def decoder_layer(x, w: LayerWeights, config: LlamaConfig, cos, sin, mask, layer_index: int,
                  cache: KVCache | None = None, hook: Hook | None = None):
    """One pre-norm transformer block.  x (B, T, D) -> (B, T, D), attention weights (B, H, T, S)

        h   = x + attention(rms_norm(x))
        out = h + swiglu(rms_norm(h))
    """
    prefix = f"blocks.{layer_index}."
    _record(hook, prefix + "hook_resid_pre", x)
    normed = layers.rms_norm(x, w.input_layernorm, config.rms_norm_eps)
    _record(hook, prefix + "ln1.hook_normalized", normed)
    attn_out, weights = self_attention(normed, w, config, cos, sin, mask, layer_index, cache, hook)
    _record(hook, prefix + "hook_attn_out", attn_out)
    h = x + attn_out
    _record(hook, prefix + "hook_resid_mid", h)
    normed = layers.rms_norm(h, w.post_attention_layernorm, config.rms_norm_eps)
    _record(hook, prefix + "ln2.hook_normalized", normed)
    if hook is None:
        mlp_out = layers.swiglu(normed, w.gate_proj, w.up_proj, w.down_proj, w.gate_bias,
                                w.up_bias, w.down_bias, config.pretraining_tp)
    else:
        mlp_out = _traced_swiglu(normed, w, config, prefix, hook)
    _record(hook, prefix + "hook_mlp_out", mlp_out)
    out = h + mlp_out
    _record(hook, prefix + "hook_resid_post", out)
    return out, weights


def _traced_swiglu(x, w: LayerWeights, config, prefix, hook):
    """``layers.swiglu`` written out so that gate, up and their product can be recorded."""
    tp = config.pretraining_tp
    if tp > 1:
        gate, up = layers.linear_tp(x, w.gate_proj, tp, "out"), layers.linear_tp(x, w.up_proj, tp, "out")
    else:
        gate, up = layers.linear(x, w.gate_proj, w.gate_bias), layers.linear(x, w.up_proj, w.up_bias)
    hook(prefix + "mlp.hook_pre", gate)
    hook(prefix + "mlp.hook_pre_linear", up)
    hidden = layers.silu(gate) * up
    hook(prefix + "mlp.hook_post", hidden)
    if tp > 1:
        return layers.linear_tp(hidden, w.down_proj, tp, "in")
    return layers.linear(hidden, w.down_proj, w.down_bias)


def _record(hook: Hook | None, name: str, value: np.ndarray) -> None:
    if hook is not None:
        hook(name, value)


# ---------------------------------------------------------------------------- weights


class Weights:
    """The named tensors of a model, widened to the compute dtype when they are used.

    Values are memory-mapped checkpoint tensors (``checkpoint.StoredTensor``) or arrays. With
    ``keep_widened`` the widened copy is kept after first use; without it, every use widens
    again (slower, but the float32 copy of a layer lives only while that layer runs).
    """

    def __init__(self, tensors: dict, dtype=np.float32, keep_widened: bool = True):
        self.tensors = dict(tensors)
        self.dtype = np.dtype(dtype)
        self.keep_widened = keep_widened
        self._widened: dict[str, np.ndarray] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._widened:
            return self._widened[name]
        stored = self.tensors[name]
        if isinstance(stored, np.ndarray):
            value = stored.astype(self.dtype, copy=False)
        else:
            value = stored.numpy(self.dtype)
        if self.keep_widened:
            self._widened[name] = value
        return value

    def get(self, name: str):
        return self[name] if name in self.tensors else None

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self.tensors[name] = value
        self._widened.pop(name, None)

    def shape(self, name: str) -> tuple:
        return tuple(self.tensors[name].shape)

    def items(self):
        return ((name, self[name]) for name in self.tensors)


def expected_base_shapes(config: LlamaConfig, prefix: str = "model.") -> dict[str, tuple]:
    """Every tensor of the Llama stack with the shape the config implies (REFERENCE.md §2)."""
    D, I, V, hd = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    H, KV = config.num_attention_heads, config.num_key_value_heads
    per_layer = {
        "input_layernorm": (D,), "q_proj": (H * hd, D), "k_proj": (KV * hd, D),
        "v_proj": (KV * hd, D), "o_proj": (D, H * hd), "post_attention_layernorm": (D,),
        "gate_proj": (I, D), "up_proj": (I, D), "down_proj": (D, I),
    }
    if config.attention_bias:
        per_layer.update(q_bias=(H * hd,), k_bias=(KV * hd,), v_bias=(KV * hd,), o_bias=(D,))
    if config.mlp_bias:
        per_layer.update(gate_bias=(I,), up_bias=(I,), down_bias=(D,))
    shapes = {f"{prefix}embed_tokens.weight": (V, D), f"{prefix}norm.weight": (D,)}
    for i in range(config.num_hidden_layers):
        for field_name, shape in per_layer.items():
            shapes[f"{prefix}layers.{i}.{LAYER_TENSOR_NAMES[field_name]}"] = shape
    return shapes


# ---------------------------------------------------------------------------- the models


class LlamaPreTrainedModel:
    """Loading, saving and the shared plumbing of the three model classes."""

    base_prefix = "model."  # where the Llama stack's tensors live in a checkpoint

    def __init__(self, config: LlamaConfig, weights: Weights, generation_config=None):
        self.config = config
        self.weights = weights
        self.dtype = weights.dtype
        self.generation_config = generation_config or GenerationConfig.from_model_config(config)
        self.name_or_path = None

    # -- construction

    @classmethod
    def expected_shapes(cls, config: LlamaConfig, prefix: str = "model.") -> dict[str, tuple]:
        return expected_base_shapes(config, prefix)

    @classmethod
    def optional_tensors(cls, config: LlamaConfig) -> tuple:
        return ()

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=np.float32, keep_widened: bool | None = None):
        """Open a checkpoint directory or a bundled model by name. Memory-mapped and lazy.

        Only headers are read here; tensors are widened to ``dtype`` (float32 or float64) when
        first used. ``keep_widened`` keeps those widened copies instead of widening again on
        every call; by default it is on when they fit in ``keep_widened_limit()`` (half the
        available memory, at least 2 GiB).
        """
        from llama_np.checkpoint import Checkpoint, resolve_model_path

        dtype = _check_compute_dtype(dtype)
        directory = resolve_model_path(name_or_path)
        config = LlamaConfig.from_pretrained(directory)
        checkpoint = Checkpoint.open(directory)
        prefix = cls.base_prefix
        if cls is LlamaModel and f"{prefix}embed_tokens.weight" not in checkpoint:
            prefix = ""  # a checkpoint saved from a bare LlamaModel has no "model." prefix
        _check_layer_count(config, checkpoint, prefix)
        expected = cls.expected_shapes(config, prefix)
        checkpoint.check_shapes(expected, optional=cls.optional_tensors(config))
        tensors = {name: checkpoint[name] for name in expected if name in checkpoint}
        if prefix != cls.base_prefix:
            tensors = {cls.base_prefix + name: t for name, t in tensors.items()}
        widened_bytes = sum(int(np.prod(t.shape)) for t in tensors.values()) * np.dtype(dtype).itemsize
        if keep_widened is None:
            keep_widened = widened_bytes <= keep_widened_limit()
        generation_config = GenerationConfig.from_pretrained(directory, config)
        model = cls(config, Weights(tensors, dtype, keep_widened), generation_config)
        model.name_or_path = str(name_or_path)
        model.checkpoint = checkpoint
        return model

    @classmethod
    def from_config(cls, config: LlamaConfig, seed: int = 0, dtype=np.float32):
        """A randomly initialised model, as Transformers initialises one.

        Linear weights ~ N(0, initializer_range²), norms = 1, biases = 0, and the embedding row
        of ``pad_token_id`` = 0 (the one place ``padding_idx`` matters, REFERENCE.md §3).
        """
        dtype = _check_compute_dtype(dtype)
        rng = np.random.default_rng(seed)
        std = config.initializer_range
        tensors = {}
        for name, shape in cls.expected_shapes(config).items():
            if name.endswith("embed_tokens.weight"):
                tensors[name] = layers.init_embedding(*shape, config.pad_token_id, std, rng)
            elif name.endswith("norm.weight"):
                tensors[name] = np.ones(shape, np.float32)
            elif name.endswith(".bias"):
                tensors[name] = np.zeros(shape, np.float32)
            else:
                tensors[name] = rng.normal(0.0, std, size=shape).astype(np.float32)
        return cls(config, Weights(tensors, dtype))

    def save_pretrained(self, directory, storage_dtype=np.float32) -> None:
        """Write config.json and model.safetensors (each atomically) into ``directory``."""
        from llama_np.checkpoint import save_safetensors

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: np.ascontiguousarray(value, dtype=storage_dtype)
                   for name, value in self.weights.items()}
        save_safetensors(directory / "model.safetensors", tensors, metadata={"format": "pt"})
        self.config.save_pretrained(directory)

    # -- the Llama stack

    def layer_weights(self, i: int) -> LayerWeights:
        """The widened tensors of decoder layer i."""
        prefix = f"{self.base_prefix}layers.{i}."
        return LayerWeights(**{field_name: self.weights.get(prefix + tensor_name)
                               for field_name, tensor_name in LAYER_TENSOR_NAMES.items()})

    def num_parameters(self) -> int:
        return sum(int(np.prod(self.weights.shape(name))) for name in self.weights.tensors)

    def resize_token_embeddings(self, new_num_tokens: int, pad_token_id: int | None = None) -> None:
        """Grow (or shrink) the vocabulary to ``new_num_tokens`` rows.

        New embedding (and lm_head) rows are the mean of the existing rows, so a freshly added
        token such as ``<pad>`` starts as an "average" token. ``config.vocab_size`` follows, and
        ``config.pad_token_id`` too when ``pad_token_id`` is given:

            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            model.resize_token_embeddings(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        """
        if not isinstance(new_num_tokens, (int, np.integer)) or new_num_tokens <= 0:
            raise InputError(f"new_num_tokens must be a positive integer, got {new_num_tokens!r}")
        if pad_token_id is not None and not (
                isinstance(pad_token_id, (int, np.integer)) and 0 <= pad_token_id < new_num_tokens):
            raise InputError(f"pad_token_id must be a token id in [0, {new_num_tokens}), got {pad_token_id!r}")
        for name in (f"{self.base_prefix}embed_tokens.weight", "lm_head.weight"):
            if name not in self.weights:
                continue
            old = np.asarray(self.weights[name], dtype=np.float32)
            if new_num_tokens <= old.shape[0]:
                new = old[:new_num_tokens].copy()
            else:
                extra = np.repeat(old.mean(axis=0, keepdims=True), new_num_tokens - old.shape[0], axis=0)
                new = np.concatenate([old, extra], axis=0)
            self.weights[name] = new
        self.config.vocab_size = int(new_num_tokens)
        if pad_token_id is not None:
            self.config.pad_token_id = int(pad_token_id)

    def _run_stack(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                   use_cache=False, output_hidden_states=False, output_attentions=False,
                   hook: Hook | None = None) -> BaseModelOutput:
        """Embedding, every decoder layer and the final norm.  input_ids (B, T)."""
        config = self.config
        input_ids = _check_input_ids(input_ids, config.vocab_size)
        batch, length = input_ids.shape
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(config.num_hidden_layers)
        if cache is not None:
            _check_cache(cache, config, batch)
        past_length = cache.get_seq_length() if cache is not None else 0
        attention_mask = _check_attention_mask(attention_mask, batch, past_length + length)
        if position_ids is None:
            position_ids = np.arange(past_length, past_length + length)[None, :].repeat(batch, axis=0)
        position_ids = _check_position_ids(position_ids, batch, length)
        max_position = int(position_ids.max()) + 1
        _warn_if_past_max_positions(config, max_position)

        inv_freq, attention_factor = layers.rope_frequencies(
            config.head_dim, config.rope_parameters, config.max_position_embeddings, max_position)
        cos, sin = layers.rope_cos_sin(position_ids, inv_freq, attention_factor)
        mask = layers.attention_mask(attention_mask, length, past_length, batch, self.dtype)

        x = layers.embedding(input_ids, self.weights[f"{self.base_prefix}embed_tokens.weight"])  # (B, T, D)
        _record(hook, "hook_embed", x)
        hidden_states, attentions = [x], []
        for i in range(config.num_hidden_layers):
            self._show_progress(i)
            x, weights = decoder_layer(x, self.layer_weights(i), config, cos, sin, mask, i, cache, hook)
            hidden_states.append(x)
            attentions.append(weights)
        self._show_progress(config.num_hidden_layers)
        x = layers.rms_norm(x, self.weights[f"{self.base_prefix}norm.weight"], config.rms_norm_eps)
        _record(hook, "ln_final.hook_normalized", x)
        hidden_states[-1] = x  # Transformers reports the last hidden state after the final norm
        return BaseModelOutput(
            last_hidden_state=x,
            past_key_values=cache if (use_cache or past_key_values is not None) else None,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )

    def _show_progress(self, layer: int) -> None:
        """On a terminal, a big model (weights widened on every use) shows the layer it is on."""
        if self.weights.keep_widened or not sys.stderr.isatty():
            return
        total = self.config.num_hidden_layers
        end = "\n" if layer == total else ""
        print(f"\rlayer {layer}/{total}", end=end, file=sys.stderr, flush=True)

    def run_with_cache(self, input_ids, attention_mask=None, names_filter=None):
        """Run the model and record named activations; see ``llama_np.trace``."""
        from llama_np.trace import run_with_cache

        return run_with_cache(self, input_ids, attention_mask=attention_mask, names_filter=names_filter)

    def __repr__(self):
        return f"{type(self).__name__}({self.config!r}, dtype={self.dtype.name})"


class LlamaModel(LlamaPreTrainedModel):
    """The Llama stack without a head: returns the final hidden states (B, T, D)."""

    def __call__(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                 use_cache=False, output_hidden_states=False, output_attentions=False,
                 hook: Hook | None = None) -> BaseModelOutput:
        return self._run_stack(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                               output_hidden_states, output_attentions, hook)


class LlamaForCausalLM(LlamaPreTrainedModel):
    """The Llama stack with the language-model head: next-token logits (B, T, V)."""

    @classmethod
    def expected_shapes(cls, config, prefix="model."):
        shapes = expected_base_shapes(config, prefix)
        if not config.tie_word_embeddings:
            shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
        return shapes

    def lm_head_weight(self) -> np.ndarray:
        """(V, D): lm_head.weight, or the embedding matrix when the embeddings are tied."""
        if self.config.tie_word_embeddings or "lm_head.weight" not in self.weights:
            return self.weights[f"{self.base_prefix}embed_tokens.weight"]
        return self.weights["lm_head.weight"]

    def __call__(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                 use_cache=False, labels=None, output_hidden_states=False,
                 output_attentions=False, logits_to_keep: int = 0,
                 hook: Hook | None = None) -> CausalLMOutput:
        """Logits for every position (or the last ``logits_to_keep``); the LM loss with labels."""
        out = self._run_stack(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                              output_hidden_states, output_attentions, hook)
        if not isinstance(logits_to_keep, (int, np.integer)) or logits_to_keep < 0:
            raise InputError(f"logits_to_keep must be a non-negative integer, got {logits_to_keep!r}")
        hidden = out.last_hidden_state[:, -logits_to_keep:] if logits_to_keep else out.last_hidden_state
        tp = self.config.pretraining_tp
        if tp > 1:
            logits = layers.linear_tp(hidden, self.lm_head_weight(), tp, "out")
        else:
            logits = layers.linear(hidden, self.lm_head_weight())  # (B, T, V)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, _check_labels(labels, logits.shape[:2], "labels"))
        return CausalLMOutput(logits=logits, loss=loss, past_key_values=out.past_key_values,
                              hidden_states=out.hidden_states, attentions=out.attentions)

    def generate(self, input_ids, attention_mask=None, **kwargs) -> np.ndarray:
        """Prompt + new tokens (B, T + new); see ``llama_np.generation.generate``."""
        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)


class LlamaForSequenceClassification(LlamaPreTrainedModel):
    """The Llama stack with a linear ``score`` head read at the last non-pad token."""

    @classmethod
    def expected_shapes(cls, config, prefix="model."):
        shapes = expected_base_shapes(config, prefix)
        shapes["score.weight"] = (config.num_labels, config.hidden_size)
        return shapes

    def __call__(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                 use_cache=False, labels=None, output_hidden_states=False,
                 output_attentions=False, hook: Hook | None = None) -> SequenceClassifierOutput:
        """Class logits (B, num_labels); the loss of REFERENCE.md §4 with labels."""
        out = self._run_stack(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                              output_hidden_states, output_attentions, hook)
        input_ids = _as_2d_ids(input_ids)
        logits = layers.linear(out.last_hidden_state, self.weights["score.weight"])  # (B, T, labels)
        last = last_non_pad_index(input_ids, self.config.pad_token_id)
        pooled = logits[np.arange(logits.shape[0]), last]  # (B, labels)
        loss = None
        if labels is not None:
            loss = classification_loss(pooled, labels, self.config)
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


def classification_loss(pooled: np.ndarray, labels, config: LlamaConfig) -> float:
    """The sequence-classification loss, with the problem type inferred once (REFERENCE.md §4).

    num_labels 1 -> regression (MSE); integer labels -> single-label (cross-entropy);
    otherwise multi-label (binary cross-entropy with logits, mean).
    """
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iuf":
        raise InputError(f"labels must be numbers (class indices or targets), got dtype {labels.dtype}")
    if config.problem_type is None:
        if config.num_labels == 1:
            config.problem_type = "regression"
        elif np.issubdtype(labels.dtype, np.integer):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    z = pooled.astype(np.float64)
    if config.problem_type == "regression":
        if labels.size != z.size:
            raise InputError(f"regression labels must hold {z.size} values (batch x num_labels), "
                             f"got shape {labels.shape}")
        target = labels.astype(np.float64).reshape(z.shape[0], -1)
        return float(np.mean((z.reshape(z.shape[0], -1) - target) ** 2))
    if config.problem_type == "single_label_classification":
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"single-label classification takes integer class indices as labels, "
                             f"got dtype {labels.dtype}")
        labels = labels.reshape(-1)
        if labels.shape[0] != z.shape[0]:
            raise InputError(f"labels has {labels.shape[0]} entries for a batch of {z.shape[0]}")
        kept = labels[labels != -100]
        if kept.size and (kept.min() < 0 or kept.max() >= config.num_labels):
            raise InputError(f"labels must be class indices in [0, {config.num_labels}), got {labels.tolist()}")
        return cross_entropy(z, labels)
    target = labels.astype(np.float64)
    if target.shape != z.shape:
        raise InputError(f"multi-label labels must have shape {z.shape}, got {target.shape}")
    # log(1 + e^z) − z·y, written so that it never overflows
    return float(np.mean(np.maximum(z, 0) - z * target + np.log1p(np.exp(-np.abs(z)))))


# ---------------------------------------------------------------------------- input checks


def _check_layer_count(config: LlamaConfig, checkpoint, prefix: str) -> None:
    """Refuse a config with more layers than the checkpoint stores, before listing each tensor
    it would miss: a corrupt num_hidden_layers such as 10**30 would never finish that list."""
    layers_prefix = f"{prefix}layers."
    stored = {name[len(layers_prefix):].split(".")[0] for name in checkpoint
              if name.startswith(layers_prefix)}
    if config.num_hidden_layers > len(stored):
        raise CheckpointError(
            f"config.json has num_hidden_layers={config.num_hidden_layers}, but the checkpoint in "
            f"{checkpoint.directory} stores {len(stored)} layers ({layers_prefix}N.*)")


def _check_compute_dtype(dtype):
    try:
        dtype = np.dtype(dtype)
    except TypeError:  # a name NumPy does not know, such as "bfloat16"
        raise InputError(f"dtype must be np.float32 or np.float64, got {dtype!r}") from None
    if dtype not in (np.float32, np.float64):
        raise InputError(f"dtype must be np.float32 or np.float64, got {dtype.name}")
    return dtype


def _as_2d_ids(input_ids) -> np.ndarray:
    try:
        ids = np.asarray(input_ids)
    except ValueError:
        raise InputError("input_ids rows have different lengths; pad them and pass an attention_mask") from None
    if ids.ndim == 1:
        ids = ids[None, :]
    return ids


def _check_input_ids(input_ids, vocab_size: int) -> np.ndarray:
    """input_ids as an int64 (B, T) array; InputError naming the problem otherwise."""
    ids = _as_2d_ids(input_ids)
    if ids.dtype == object or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise InputError(f"input_ids must be integers, got dtype {ids.dtype}")
    if ids.ndim != 2:
        raise InputError(f"input_ids must have shape (batch, sequence), got {ids.shape}")
    if ids.size == 0:
        raise InputError(f"input_ids is empty (shape {ids.shape}): give at least one token")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InputError(f"input_ids holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    return ids.astype(np.int64, copy=False)


def _check_cache(cache, config: LlamaConfig, batch: int) -> None:
    """past_key_values must be a KVCache this model filled for these same rows."""
    if not isinstance(cache, KVCache):
        raise InputError(f"past_key_values must be the KVCache a previous call returned, got {type(cache).__name__}")
    if len(cache) != config.num_hidden_layers:
        raise InputError(f"past_key_values holds {len(cache)} layers; this model has {config.num_hidden_layers}")
    if cache.get_seq_length() == 0:
        return
    rows, kv_heads, _, head_dim = cache.keys[0].shape  # (B, KV, capacity, hd)
    if (rows, kv_heads, head_dim) != (batch, config.num_key_value_heads, config.head_dim):
        raise InputError(
            f"past_key_values holds keys for B={rows} rows, KV={kv_heads} heads of size hd={head_dim}; "
            f"this call needs B={batch}, KV={config.num_key_value_heads}, hd={config.head_dim}: "
            "pass the cache this model returned for the same rows")


def _check_attention_mask(attention_mask, batch: int, key_length: int):
    if attention_mask is None:
        return None
    mask = np.asarray(attention_mask)
    if mask.ndim == 1:
        mask = mask[None, :]
    if mask.shape != (batch, key_length):
        raise InputError(f"attention_mask has shape {mask.shape}; expected (batch, past + new tokens) = "
                         f"{(batch, key_length)}")
    if not np.isin(mask, (0, 1)).all():
        raise InputError("attention_mask must hold only 0 (padding) and 1 (token)")
    return mask.astype(np.int64)


def _check_position_ids(position_ids, batch: int, length: int) -> np.ndarray:
    ids = np.asarray(position_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[-1] != length or ids.shape[0] not in (1, batch) or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"position_ids must be integers of shape {(batch, length)}, got {ids.dtype} {ids.shape}")
    if ids.min() < 0:
        raise InputError(f"position_ids must be non-negative, got {int(ids.min())}")
    return np.broadcast_to(ids, (batch, length))


def _warn_if_past_max_positions(config: LlamaConfig, positions: int) -> None:
    """Warn, do not refuse, when a sequence is longer than max_position_embeddings.

    Transformers computes such sequences, so we compute the same numbers; but only ``dynamic``
    RoPE is designed to stretch past the configured length at run time. For the other types
    (default, linear, llama3, yarn: their max_position_embeddings already includes any scaling)
    the model has never seen these positions and its outputs degrade.
    """
    rope_type = config.rope_parameters["rope_type"]
    if positions > config.max_position_embeddings and rope_type != "dynamic":
        warnings.warn(
            f"the sequence reaches position {positions - 1}, past max_position_embeddings="
            f"{config.max_position_embeddings}; with rope type {rope_type!r} the model was not "
            "trained on such positions and its outputs may be poor", stacklevel=4)


def _check_labels(labels, shape, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 1:
        labels = labels[None, :]
    if labels.shape != tuple(shape) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{name} must be integers of shape {tuple(shape)}, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)

