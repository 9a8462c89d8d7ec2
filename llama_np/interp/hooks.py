"""Hook points: every intermediate array of a forward pass, by TransformerLens' names.

    logits, cache = model.run_with_cache(input_ids)
    cache["blocks.0.attn.hook_pattern"]          # (B, H, T, S) softmax weights of layer 0
    cache["pattern", 0]                          # the same, in TransformerLens' shorthand
    cache.stack("hook_resid_post")               # (L, B, T, D) the residual stream after each layer

    def ablate_head_3(z, hook):                  # z (B, T, H, hd)
        z = z.copy(); z[:, :, 3] = 0; return z
    out = model.run_with_hooks(input_ids, fwd_hooks=[("blocks.0.attn.hook_z", ablate_head_3)])

The forward pass in ``model.py`` hands each activation to a *tap*, ``tap(name, x)``, which
returns ``x`` or what a hook put in its place. An ordinary call passes ``no_tap``, which returns
``x`` untouched; ``run_with_cache`` passes a tap that also keeps a reference to it, and
``run_with_hooks`` one that calls the user's hooks. There is one forward pass, traced or not,
so the logits are bit-identical with and without a trace.

The names follow TransformerLens (https://transformerlensorg.github.io/TransformerLens/), so what
a learner finds here carries over to interpretability material written for it; docs/trace.md
lists every name with its shape and meaning, and docs/reference.md §8 the semantics we match.

Shape legend: B batch, T query positions, S key positions, D hidden size, H query heads,
KV key/value heads, hd head_dim, I intermediate size, V vocabulary size, L layers.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from llama_np import layers
from llama_np.interp.activation_cache import ActivationCache
from llama_np.errors import InputError

from llama_np.layers import Tap, no_tap  # noqa: F401  (no_tap: the identity tap, documented here too)

@dataclass
class HookOptions:
    """TransformerLens' switches for hook points that cost memory or change the summation order.

    use_attn_result: attn.hook_result, each head's output in the residual stream (B, T, H, D).
    use_split_qkv_input: hook_q_input / hook_k_input / hook_v_input, one copy of the residual
        stream per head (B, T, heads, D), each normed by ln1 on its own, so that a head's input
        can be patched alone.
    use_hook_mlp_in: hook_mlp_in, the residual stream as the MLP block reads it (B, T, D).
    """

    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_hook_mlp_in: bool = False


# The hook points of one decoder layer, in the order the forward pass reaches them.
LAYER_HOOK_POINTS = (
    "hook_resid_pre",
    "hook_q_input",  # only with use_split_qkv_input, like the next two
    "hook_k_input",
    "hook_v_input",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "attn.hook_result",  # only with use_attn_result
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_in",  # only with use_hook_mlp_in
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
OPTIONAL_LAYER_HOOK_POINTS = {"hook_q_input": "use_split_qkv_input", "hook_k_input": "use_split_qkv_input",
                              "hook_v_input": "use_split_qkv_input", "attn.hook_result": "use_attn_result",
                              "hook_mlp_in": "use_hook_mlp_in"}
FINAL_HOOK_POINTS = ("ln_final.hook_scale", "ln_final.hook_normalized")
UNEMBED_HOOK_POINTS = ("unembed.hook_in", "unembed.hook_out")  # LlamaForCausalLM only

NamesFilter = None | str | Iterable[str] | Callable[[str], bool]


def hook_names(config, options: HookOptions | None = None, unembed: bool = True) -> list[str]:
    """Every hook name of a model with ``config.num_hidden_layers`` layers, in forward order.

    ``options`` (a ``HookOptions``) adds the optional points it switches on; ``unembed`` the
    language-model head's ``unembed.hook_in``/``hook_out`` (a classifier and the bare stack
    have none).
    """
    options = options or HookOptions()
    points = [p for p in LAYER_HOOK_POINTS
              if p not in OPTIONAL_LAYER_HOOK_POINTS or getattr(options, OPTIONAL_LAYER_HOOK_POINTS[p])]
    names = ["hook_embed"]
    for layer in range(config.num_hidden_layers):
        names += [f"blocks.{layer}.{point}" for point in points]
    names += FINAL_HOOK_POINTS
    if unembed:
        names += UNEMBED_HOOK_POINTS
    return names


def model_hook_names(model) -> list[str]:
    """The hook names a forward of this model reaches, with its options as they are set."""
    return hook_names(model.config, model.hook_options, unembed=model.has_lm_head)


def forward_order(name: str) -> tuple:
    """A sort key that puts hook names in the order the forward pass reaches them.

    "hook_embed" first, then layer by layer in LAYER_HOOK_POINTS order, then the final norm and
    the unembedding; any other name (e.g. "logits") after those, alphabetically.
    """
    if name == "hook_embed":
        return (0, 0, 0, name)
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in LAYER_HOOK_POINTS:
        return (1, int(parts[1]), LAYER_HOOK_POINTS.index(parts[2]), name)
    final = FINAL_HOOK_POINTS + UNEMBED_HOOK_POINTS
    if name in final:
        return (2, final.index(name), 0, name)
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


# ---------------------------------------------------------------------------- hooks


class HookPoint:
    """What a hook receives besides the activation: ``hook.name`` (and ``hook.layer()``)."""

    def __init__(self, name: str):
        self.name = name

    def layer(self) -> int | None:
        """The layer index of a ``blocks.{l}.…`` hook point, None for the others."""
        parts = self.name.split(".")
        return int(parts[1]) if parts[0] == "blocks" else None

    def __repr__(self):
        return f"HookPoint({self.name!r})"


def hooks_tap(model, fwd_hooks) -> Tap:
    """A tap that calls ``fn(activation, hook)`` for each (name or predicate, fn) that matches.

    ``fn`` is called as ``fn(activation, hook=hook_point)``, as TransformerLens does, so its
    second parameter must be named ``hook``. A hook returning an array replaces the activation (same shape; it is cast to the activation's
    dtype); returning None keeps it. Hooks run in the order given.
    """
    known = model_hook_names(model)
    checked = []
    if fwd_hooks is None or isinstance(fwd_hooks, (str, bytes)) or not hasattr(fwd_hooks, "__iter__"):
        raise InputError(f"fwd_hooks must be a list of (hook name or predicate, function) pairs, got "
                         f"{fwd_hooks!r:.80}")
    for entry in fwd_hooks:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and callable(entry[1])):
            raise InputError(f"fwd_hooks must be (hook name or predicate, function) pairs, got {entry!r:.80}")
        where, fn = entry
        _check_hook_signature(fn, where)
        if isinstance(where, str):
            if where not in known:
                close = difflib.get_close_matches(where, known, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else "; see llama_np.interp.hooks.hook_names"
                raise InputError(f"fwd_hooks names {where!r}, which is not a hook point of this model{hint}")
            matches = (lambda wanted: lambda name: name == wanted)(where)
        elif callable(where):
            matches = where
        else:
            raise InputError(f"a hook is named by a string or a predicate on names, got {where!r}")
        checked.append((matches, fn))

    def tap(name: str, x: np.ndarray) -> np.ndarray:
        for matches, fn in checked:
            found = matches(name)
            if not isinstance(found, (bool, np.bool_)):
                raise InputError(f"a hook's predicate must return True or False for a hook name; for "
                                 f"{name!r} it returned {type(found).__name__} {found!r:.60}")
            if not found:
                continue
            replaced = fn(x, hook=HookPoint(name))  # by keyword, as TransformerLens calls hooks
            if replaced is None:
                continue
            x = _checked_replacement(replaced, x, name, fn)
        return x

    return tap


def _check_hook_signature(fn, where) -> None:
    """InputError unless ``fn`` can be called as ``fn(activation, hook=...)``, TransformerLens' way."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: let the call say
        return
    try:
        signature.bind(np.zeros(1), hook=HookPoint("x"))
    except TypeError:
        label = getattr(fn, "__name__", repr(fn))
        raise InputError(f"the hook {label} on {where!r:.60} must take the activation and a keyword "
                         f"argument named 'hook', as TransformerLens calls hooks: def {label}(x, hook)") from None


def _checked_replacement(replaced, x: np.ndarray, name: str, fn) -> np.ndarray:
    """What a hook returned, as an array of the activation's shape and dtype, or InputError."""
    label = getattr(fn, "__name__", "a hook")
    try:
        array = np.asarray(replaced)
    except ValueError as error:  # a ragged list
        raise InputError(f"the hook {label} on {name} returned something that is not an array ({error})") from None
    if array.dtype.kind not in "fiub":  # strings, objects, complex numbers: nothing to cast silently
        raise InputError(f"the hook {label} on {name} returned an array of {array.dtype}; the activation "
                         f"is {x.dtype} (return real numbers, or None to keep it)")
    if array.shape != x.shape:
        raise InputError(f"the hook on {name} returned shape {array.shape}; the activation "
                         f"has shape {x.shape} (return None to keep it)")
    return array.astype(x.dtype, copy=False)


# ---------------------------------------------------------------------------- TransformerLens' modes
#
# The forward pass of model.py reaches the hook points every model has. model_tap turns a tap
# into the one a traced run of this model uses, with the optional hook points its options switch
# on: they are carried out here, by replacing activations as they pass, so that the student's
# path in model.py stays the plain one.


def model_tap(model, tap: Tap) -> Tap:
    """``tap`` with the optional hook points that ``model.hook_options`` switches on.

    use_split_qkv_input: the attention's q, k and v are computed from per-head copies of the
    residual stream, each normed by ln1 on its own (``split_qkv_input_tap``); use_attn_result:
    the attention output is the sum of each head's result (``attn_result_tap``); use_hook_mlp_in:
    ln2 reads a copy of the residual stream that a hook may edit (``mlp_in_tap``).
    """
    options = model.hook_options
    traced = tap
    if options.use_hook_mlp_in:
        traced = mlp_in_tap(model, traced)
    if options.use_attn_result:
        traced = attn_result_tap(model, traced)
    if options.use_split_qkv_input:
        traced = split_qkv_input_tap(model, traced)
    return traced


def layer_point(name: str) -> tuple[int, str] | None:
    """"blocks.3.attn.hook_z" -> (3, "attn.hook_z"); None for a name outside the layers."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None


def mlp_in_tap(model, tap: Tap) -> Tap:
    """use_hook_mlp_in: hook_mlp_in (B, T, D), a copy of hook_resid_mid that only the MLP reads.

    ln2's two hook points are recomputed from it, so an edit reaches the MLP and not the
    residual stream that hook_resid_post adds the MLP's output to.
    """
    eps = model.config.rms_norm_eps
    resid_mid, mlp_in, scale = {}, {}, {}

    def traced(name: str, x: np.ndarray) -> np.ndarray:
        where = layer_point(name)
        if where is None:
            return tap(name, x)
        layer, point = where
        if point == "hook_resid_mid":
            resid_mid[layer] = x = tap(name, x)
            return x
        if point == "ln2.hook_scale":
            mlp_in[layer] = tap(f"blocks.{layer}.hook_mlp_in", resid_mid.pop(layer).copy())
            x = scale[layer] = tap(name, layers.rms(mlp_in[layer], eps))
            return x
        if point == "ln2.hook_normalized":
            x = layers.normalize(mlp_in.pop(layer), scale.pop(layer))
        return tap(name, x)

    return traced


def attn_result_tap(model, tap: Tap) -> Tap:
    """use_attn_result: hook_attn_out becomes Σ_h attn.hook_result[:, :, h], each head's share.

    Head h's result is z_h · W_O[:, h]ᵀ (B, T, D), with W_O's columns h·hd … (h+1)·hd; a hook that
    edits one head's result changes the layer's output by exactly that much.
    """
    config = model.config
    H, hd = config.num_attention_heads, config.head_dim
    z_of_layer = {}

    def traced(name: str, x: np.ndarray) -> np.ndarray:
        where = layer_point(name)
        if where is None:
            return tap(name, x)
        layer, point = where
        if point == "attn.hook_z":
            z_of_layer[layer] = x = tap(name, x)  # (B, T, H, hd)
            return x
        if point == "hook_attn_out":
            w = model.layer_weights(layer)
            z = z_of_layer.pop(layer)
            # (B, H, T, hd) @ (H, hd, D) -> (B, H, T, D) -> (B, T, H, D)
            per_head = z.transpose(0, 2, 1, 3) @ w.o_proj.reshape(-1, H, hd).transpose(1, 2, 0)
            result = tap(f"blocks.{layer}.attn.hook_result", per_head.transpose(0, 2, 1, 3))
            out = result.sum(axis=2)
            x = out if w.o_bias is None else out + w.o_bias
        return tap(name, x)

    return traced


def split_qkv_input_tap(model, tap: Tap) -> Tap:
    """use_split_qkv_input: q, k and v read per-head copies of the residual stream.

    hook_q_input (B, T, H, D), hook_k_input and hook_v_input (B, T, KV, D) are copies of
    hook_resid_pre, each normed by ln1 on its own (ln1's hook points see (B, T, heads, ·)), and
    head h of q, k or v reads its own copy through its rows of the weight, W[h·hd:(h+1)·hd].
    The plain path's ln1 on the shared stream is not shown to hooks; its q, k, v are replaced.
    """
    config = model.config
    heads = {"q": config.num_attention_heads, "k": config.num_key_value_heads, "v": config.num_key_value_heads}
    resid_pre, projected = {}, {}

    def per_head(x, weight, bias, count):  # (B, T, heads, D) -> (B, T, heads, hd)
        rows = weight.reshape(count, -1, weight.shape[-1])  # (heads, hd, D)
        y = (x.transpose(0, 2, 1, 3) @ rows.swapaxes(-1, -2)).transpose(0, 2, 1, 3)
        return y if bias is None else y + bias.reshape(count, -1)

    def traced(name: str, x: np.ndarray) -> np.ndarray:
        where = layer_point(name)
        if where is None:
            return tap(name, x)
        layer, point = where
        if point == "hook_resid_pre":
            resid_pre[layer] = x = tap(name, x)
            return x
        if point.startswith("ln1."):
            if point == "ln1.hook_scale":  # the plain norm begins: run the per-head inputs instead
                w, stream = model.layer_weights(layer), resid_pre.pop(layer)
                copies = {part: tap(f"blocks.{layer}.hook_{part}_input", np.repeat(stream[:, :, None], count, axis=2))
                          for part, count in heads.items()}
                for part, count in heads.items():
                    normed = layers.rms_norm(copies[part], w.input_layernorm, config.rms_norm_eps,
                                             layers.scoped(tap, f"blocks.{layer}.ln1"))
                    projected[layer, part] = per_head(normed, getattr(w, f"{part}_proj"),
                                                      getattr(w, f"{part}_bias"), count)
            return x
        if point in ("attn.hook_q", "attn.hook_k", "attn.hook_v"):
            x = projected.pop((layer, point[-1]))
        return tap(name, x)

    return traced


def run_with_hooks(model, input_ids, fwd_hooks=(), attention_mask=None, **kwargs):
    """Run ``model`` once with hooks that may read or replace activations.

    ``fwd_hooks`` is a list of ``(name, fn)`` or ``(predicate, fn)``; ``fn(activation, hook)``
    gets the array and a ``HookPoint`` (``hook.name``) and returns a replacement of the same
    shape, or None to keep the activation. Other keyword arguments go to the model's call
    (``labels``, ``past_key_values``, ``use_cache``, …); the model's usual output is returned.
    """
    return model(input_ids, attention_mask=attention_mask, tap=model_tap(model, hooks_tap(model, fwd_hooks)),
                 **kwargs)


def run_with_cache(model, input_ids, attention_mask=None, names_filter: NamesFilter = None,
                   fwd_hooks=(), **kwargs):
    """Run ``model`` once and keep the activations whose hook names pass ``names_filter``.

    input_ids (B, T)  ->  (output, cache)

    ``output`` is what the model's forward gives: logits (B, T, V) for LlamaForCausalLM,
    pooled logits (B, num_labels) for LlamaForSequenceClassification, the last hidden state
    (B, T, D) for LlamaModel. ``cache`` is an ``ActivationCache``. With ``fwd_hooks`` (as in
    ``run_with_hooks``) the cache holds the activations as the hooks left them. Rows of padding
    (attention_mask = 0) are recorded too; they hold no meaning (docs/reference.md §3.9).
    """
    keep = names_filter_predicate(names_filter)
    hooked = hooks_tap(model, fwd_hooks)
    activations: dict[str, np.ndarray] = {}

    def record(name: str, x: np.ndarray) -> np.ndarray:
        x = hooked(name, x)
        if keep(name):
            activations[name] = x
        return x

    out = model(input_ids, attention_mask=attention_mask, tap=model_tap(model, record), **kwargs)
    output = getattr(out, model.main_output)
    return output, ActivationCache(activations, model.config.num_hidden_layers, model)


# ---------------------------------------------------------------------------- the cache


