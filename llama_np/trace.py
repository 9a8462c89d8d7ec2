"""Named activation capture: every intermediate array of a forward pass, by TransformerLens' names.

    logits, cache = model.run_with_cache(input_ids)
    cache["blocks.0.attn.hook_pattern"]          # (B, H, T, S) softmax weights of layer 0
    cache.stack("hook_resid_post")               # (L, B, T, D) the residual stream after each layer

The forward pass in ``model.py`` calls an optional ``hook(name, array)`` at each point listed by
``hook_names``; ``run_with_cache`` passes a hook that stores the arrays it is asked for. Without a
hook the model skips all of this (``hook=None``), so an ordinary forward pays nothing. The hook
only reads, so the logits are the same with and without it.

The names follow TransformerLens (https://transformerlensorg.github.io/TransformerLens/), so what
a learner finds here carries over to interpretability material written for it:

    hook_embed                            (B, T, D)     token embeddings
    blocks.{l}.hook_resid_pre             (B, T, D)     the residual stream entering layer l
    blocks.{l}.ln1.hook_normalized        (B, T, D)     input_layernorm output
    blocks.{l}.attn.hook_q                (B, T, H, hd) queries, before RoPE
    blocks.{l}.attn.hook_k, hook_v        (B, T, KV, hd) keys and values, before RoPE
    blocks.{l}.attn.hook_rot_q            (B, T, H, hd) queries after RoPE
    blocks.{l}.attn.hook_rot_k            (B, T, KV, hd) keys after RoPE
    blocks.{l}.attn.hook_attn_scores      (B, H, T, S)  q·kᵀ·hd^−0.5 + mask, before the softmax
    blocks.{l}.attn.hook_pattern          (B, H, T, S)  softmax weights
    blocks.{l}.attn.hook_z                (B, T, H, hd) weights · v, per head, before o_proj
    blocks.{l}.hook_attn_out              (B, T, D)     attention output after o_proj
    blocks.{l}.hook_resid_mid             (B, T, D)     residual stream after attention
    blocks.{l}.ln2.hook_normalized        (B, T, D)     post_attention_layernorm output
    blocks.{l}.mlp.hook_pre               (B, T, I)     gate projection, before SiLU
    blocks.{l}.mlp.hook_pre_linear        (B, T, I)     up projection
    blocks.{l}.mlp.hook_post              (B, T, I)     silu(gate) ⊙ up, before down_proj
    blocks.{l}.hook_mlp_out               (B, T, D)     MLP output after down_proj
    blocks.{l}.hook_resid_post            (B, T, D)     residual stream leaving layer l
    ln_final.hook_normalized              (B, T, D)     the final norm's output

Unlike TransformerLens, keys and values keep their KV heads (GQA is not expanded).

Shape legend: B batch, T query positions, S key positions, D hidden size, H query heads,
KV key/value heads, hd head_dim, I intermediate size, V vocabulary size, L layers.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from llama_np import layers
from llama_np.errors import InputError

# The hook points of one decoder layer, in the order the forward pass reaches them.
LAYER_HOOK_POINTS = (
    "hook_resid_pre",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)

NamesFilter = None | str | Iterable[str] | Callable[[str], bool]


def hook_names(config) -> list[str]:
    """Every hook name of a model with ``config.num_hidden_layers`` layers, in forward order."""
    names = ["hook_embed"]
    for layer in range(config.num_hidden_layers):
        names += [f"blocks.{layer}.{point}" for point in LAYER_HOOK_POINTS]
    names.append("ln_final.hook_normalized")
    return names


def forward_order(name: str) -> tuple:
    """A sort key that puts hook names in the order the forward pass reaches them.

    "hook_embed" first, then layer by layer in LAYER_HOOK_POINTS order, then
    "ln_final.hook_normalized"; any other name (e.g. "logits") after those, alphabetically.
    """
    if name == "hook_embed":
        return (0, 0, 0, name)
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in LAYER_HOOK_POINTS:
        return (1, int(parts[1]), LAYER_HOOK_POINTS.index(parts[2]), name)
    if name == "ln_final.hook_normalized":
        return (2, 0, 0, name)
    return (3, 0, 0, name)


def names_filter_predicate(names_filter: NamesFilter) -> Callable[[str], bool]:
    """Turn the ``names_filter`` argument into a predicate on hook names.

    None keeps every name; a string keeps names that contain it ("hook_pattern",
    "blocks.3."); a list or set keeps exactly those names; a callable is used as it is.
    """
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: names_filter in name
    if callable(names_filter):
        return names_filter
    try:
        wanted = set(names_filter)
    except TypeError:
        raise InputError(f"names_filter must be None, a string, a list of names or a function of a "
                         f"name, got {type(names_filter).__name__}") from None
    if not all(isinstance(name, str) for name in wanted):
        raise InputError(f"names_filter must list hook names as strings, got {sorted(map(repr, wanted))}")
    return lambda name: name in wanted


class ActivationCache:
    """The activations of one forward pass, by hook name: a read-only mapping to NumPy arrays.

    ``cache[name]``, ``name in cache``, ``cache.keys()``, ``cache.items()`` and ``len(cache)``
    behave like a dict's. ``cache.stack(point)`` gathers one hook point over every layer.
    """

    def __init__(self, activations: dict[str, np.ndarray], num_layers: int):
        self._activations = dict(activations)
        self.num_layers = num_layers

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self._activations[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in this cache: it holds {len(self)} activations "
                           "(see llama_np.trace.hook_names for every name, and names_filter for "
                           "what was kept)") from None

    def __contains__(self, name) -> bool:
        return name in self._activations

    def __iter__(self):
        return iter(self._activations)

    def __len__(self) -> int:
        return len(self._activations)

    def keys(self):
        return self._activations.keys()

    def values(self):
        return self._activations.values()

    def items(self):
        return self._activations.items()

    def stack(self, point: str) -> np.ndarray:
        """One hook point of every layer, stacked on a new first axis: (L, ...).

        ``point`` is the part after ``blocks.{l}.``, e.g. "hook_resid_post" or
        "attn.hook_pattern".
        """
        names = [f"blocks.{layer}.{point}" for layer in range(self.num_layers)]
        missing = [name for name in names if name not in self._activations]
        if missing:
            raise KeyError(f"cannot stack {point!r}: {missing[0]!r} is not in this cache "
                           f"(run_with_cache(..., names_filter=...) may have left it out)")
        return np.stack([self._activations[name] for name in names])

    def __repr__(self):
        return f"ActivationCache({len(self)} activations, {self.num_layers} layers)"


def run_with_cache(model, input_ids, attention_mask=None, names_filter: NamesFilter = None):
    """Run ``model`` once and keep the activations whose hook names pass ``names_filter``.

    input_ids (B, T)  ->  (output, cache)

    ``output`` is what the model's forward gives: logits (B, T, V) for LlamaForCausalLM,
    pooled logits (B, num_labels) for LlamaForSequenceClassification, the last hidden state
    (B, T, D) for LlamaModel. ``cache`` is an ``ActivationCache``. Rows of padding
    (attention_mask = 0) are recorded too; they hold no meaning (REFERENCE.md §3, "Mask").
    """
    keep = names_filter_predicate(names_filter)
    activations: dict[str, np.ndarray] = {}

    def record(name: str, value: np.ndarray) -> None:
        if keep(name):
            activations[name] = value

    out = model(input_ids, attention_mask=attention_mask, hook=record)
    output = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return output, ActivationCache(activations, model.config.num_hidden_layers)


def logit_lens(model, cache: ActivationCache) -> np.ndarray:
    """The logit lens (nostalgebraist, 2020): read every layer's residual stream as if it were last.

    -> (L, B, T, V): lm_head(rms_norm(resid_post of layer l)) with the final norm's weight.
    The last layer's entry equals the model's logits. ``model`` is a LlamaForCausalLM and
    ``cache`` must hold ``blocks.{l}.hook_resid_post`` for every layer.
    """
    residuals = cache.stack("hook_resid_post")  # (L, B, T, D)
    config = model.config
    normed = layers.rms_norm(residuals, model.weights[f"{model.base_prefix}norm.weight"], config.rms_norm_eps)
    if config.pretraining_tp > 1:
        return layers.linear_tp(normed, model.lm_head_weight(), config.pretraining_tp, "out")
    return layers.linear(normed, model.lm_head_weight())

