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
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from llama_np import layers
from llama_np.errors import InputError
from llama_np.inputs import is_integer

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
    for entry in fwd_hooks:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and callable(entry[1])):
            raise InputError(f"fwd_hooks must be (hook name or predicate, function) pairs, got {entry!r}")
        where, fn = entry
        if isinstance(where, str):
            if where not in known:
                close = difflib.get_close_matches(where, known, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else "; see llama_np.trace.hook_names"
                raise InputError(f"fwd_hooks names {where!r}, which is not a hook point of this model{hint}")
            matches = (lambda wanted: lambda name: name == wanted)(where)
        elif callable(where):
            matches = where
        else:
            raise InputError(f"a hook is named by a string or a predicate on names, got {where!r}")
        checked.append((matches, fn))

    def tap(name: str, x: np.ndarray) -> np.ndarray:
        for matches, fn in checked:
            if not matches(name):
                continue
            replaced = fn(x, hook=HookPoint(name))  # by keyword, as TransformerLens calls hooks
            if replaced is None:
                continue
            replaced = np.asarray(replaced)
            if replaced.shape != x.shape:
                raise InputError(f"the hook on {name} returned shape {replaced.shape}; the activation "
                                 f"has shape {x.shape} (return None to keep it)")
            x = replaced.astype(x.dtype, copy=False)
        return x

    return tap


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


# TransformerLens' shorthand (its utils.get_act_name): cache["pattern", 0] is
# cache["blocks.0.attn.hook_pattern"]. Aliases first, then which sub-block each short name is in.
_SHORT_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q",
                  "value": "v", "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post"}
_LAYER_TYPE_ALIASES = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}
_ATTENTION_POINTS = {"k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores"}
_MLP_POINTS = {"pre", "post", "mid", "pre_linear"}


def full_hook_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """TransformerLens' shorthand to a full hook name: ("pattern", 0) -> "blocks.0.attn.hook_pattern".

    ("resid_pre", 3) -> "blocks.3.hook_resid_pre"; ("scale", 2, "ln1") -> "blocks.2.ln1.hook_scale";
    ("embed",) -> "hook_embed"; ("scale",) -> "ln_final.hook_scale". A full name is returned as is.
    """
    if "." in name or name.startswith("hook_"):
        return name
    name = _SHORT_ALIASES.get(name, name)
    if name in _ATTENTION_POINTS:
        layer_type = "attn"
    elif name in _MLP_POINTS:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIASES:
        layer_type = _LAYER_TYPE_ALIASES[layer_type]
    if layer is None and name in ("scale", "normalized") and not layer_type:
        layer_type = "ln_final"
    prefix = "" if layer is None else f"blocks.{layer}."
    return f"{prefix}{layer_type + '.' if layer_type else ''}hook_{name}"


class ActivationCache:
    """The activations of one forward pass, by hook name: a read-only mapping to NumPy arrays.

    ``cache[name]``, ``cache["pattern", 0]`` (TransformerLens' shorthand), ``name in cache``,
    ``keys()``, ``items()`` and ``len(cache)`` behave like a dict's. ``stack(point)`` gathers
    one hook point over every layer; ``accumulated_resid``, ``decompose_resid``,
    ``stack_head_results``, ``apply_ln_to_stack`` and ``logit_attrs`` are TransformerLens'
    tools for attributing the output to layers and heads.
    """

    def __init__(self, activations: dict[str, np.ndarray], num_layers: int, model=None):
        self._activations = dict(activations)
        self.num_layers = num_layers
        self.model = model

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):  # TransformerLens' shorthand; ("pattern", -1) is the last layer
            if len(key) > 1 and is_integer(key[1]) and key[1] < 0:
                key = (key[0], self.num_layers + key[1]) + key[2:]
            name = full_hook_name(*key)
        else:
            name = key
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
        return np.stack([self[f"blocks.{layer}.{point}"] for layer in range(self.num_layers)])

    # -- TransformerLens' attribution tools. Component stacks are (components, B, T, D);
    # ``pos_slice`` keeps some positions: None all, an int one (the T axis goes), a (start, stop)
    # pair a slice, a list those positions.

    def _layer(self, layer: int | None) -> int:
        """None and −1 mean "after the last layer" (L), as in TransformerLens."""
        return self.num_layers if layer is None or layer == -1 else layer

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice=None, mlp_input: bool = False, return_labels: bool = False):
        """The residual stream as it stands before each layer up to ``layer``: (components, B, T, D).

        resid_pre of layers 0 … layer ("0_pre", …), the final resid_post ("final_post") when
        ``layer`` is L (the default), resid_mid between them with ``incl_mid`` ("0_mid", …) and
        of ``layer`` itself with ``mlp_input``. ``apply_ln`` at the end of the model puts every
        entry through the final norm, weight included (the logit lens' input); at an earlier
        layer it divides by that layer's recorded ln1 (ln2 with ``mlp_input``) scale.
        """
        layer = self._layer(layer)
        labels, parts = [], []
        for l in range(layer + 1):
            if l == self.num_layers:
                labels.append("final_post")
                parts.append(self[f"blocks.{self.num_layers - 1}.hook_resid_post"])
                break
            labels.append(f"{l}_pre")
            parts.append(self[f"blocks.{l}.hook_resid_pre"])
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                labels.append(f"{l}_mid")
                parts.append(self[f"blocks.{l}.hook_resid_mid"])
        stack = np.stack(parts)
        if apply_ln and layer == self.num_layers:
            model = self._model_for("accumulated_resid(apply_ln=True)")
            stack = layers.rms_norm(stack, model.weights[f"{model.base_prefix}norm.weight"],
                                    model.config.rms_norm_eps)
        elif apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input)
        stack = _positions(stack, pos_slice, axis=-2)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice=None, incl_embeds: bool = True,
                        return_labels: bool = False):
        """The residual stream at ``layer`` as the sum of what wrote to it: (components, B, T, D).

        "embed", then "{l}_attn_out" and "{l}_mlp_out" of every earlier layer (``mode`` "attn" or
        "mlp" keeps one kind), and ``layer``'s own attention output with ``mlp_input`` (the stream
        the MLP reads). Rotary models have no positional embedding in the stream. ``apply_ln``
        divides by the scale of the norm that reads the stream there (``apply_ln_to_stack``).
        """
        if mode not in ("all", "attn", "mlp"):
            raise InputError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        layer = self._layer(layer)
        labels, parts = [], []
        if incl_embeds:
            labels.append("embed")
            parts.append(self["hook_embed"])
        for l in range(layer):
            if mode != "mlp":
                labels.append(f"{l}_attn_out")
                parts.append(self[f"blocks.{l}.hook_attn_out"])
            if mode != "attn":
                labels.append(f"{l}_mlp_out")
                parts.append(self[f"blocks.{l}.hook_mlp_out"])
        if mlp_input and layer < self.num_layers:
            labels.append(f"{layer}_attn_out")
            parts.append(self[f"blocks.{layer}.hook_attn_out"])
        stack = np.stack(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input)
        stack = _positions(stack, pos_slice, axis=-2)
        return (stack, labels) if return_labels else stack

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice=None, apply_ln: bool = False):
        """Every head's output in the residual stream, layers 0 … layer − 1: (layer·H, B, T, D).

        Labels "L{l}H{h}". Read from ``attn.hook_result`` when the run recorded it
        (``model.set_use_attn_result(True)``), else computed from ``attn.hook_z`` and o_proj.
        ``incl_remainder`` adds "remainder": resid_post of layer − 1 minus the heads.
        """
        layer = self._layer(layer)
        labels, parts = [], []
        for l in range(layer):
            result = self._head_results(l)  # (B, T, H, D)
            for h in range(result.shape[2]):
                labels.append(f"L{l}H{h}")
                parts.append(result[:, :, h])
        if incl_remainder:
            labels.append("remainder")
            parts.append(self[f"blocks.{layer - 1}.hook_resid_post"] - sum(parts))
        stack = np.stack(parts) if parts else np.zeros((0,) + self["hook_embed"].shape, dtype=self["hook_embed"].dtype)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer)
        stack = _positions(stack, pos_slice, axis=-2)
        return (stack, labels) if return_labels else stack

    def _head_results(self, layer: int) -> np.ndarray:
        """(B, T, H, D): each head's z times its columns of o_proj, as recorded or recomputed."""
        name = f"blocks.{layer}.attn.hook_result"
        if name in self:
            return self[name]
        model = self._model_for("stack_head_results without attn.hook_result")
        z = self[f"blocks.{layer}.attn.hook_z"]  # (B, T, H, hd)
        o_proj = model.layer_weights(layer).o_proj  # (D, H·hd)
        per_head = o_proj.reshape(o_proj.shape[0], z.shape[2], z.shape[3]).transpose(1, 2, 0)  # (H, hd, D)
        return (z.transpose(0, 2, 1, 3) @ per_head).transpose(0, 2, 1, 3)

    def apply_ln_to_stack(self, residual_stack: np.ndarray, layer: int | None = None,
                          mlp_input: bool = False, pos_slice=None) -> np.ndarray:
        """Divide each component by the scale of the norm that reads the stream at ``layer``.

        residual_stack (components, B, T, D). The scale is rms(x) of the whole stream, recorded
        by that norm's hook_scale: ln_final's for layer None or L, else ln1's (ln2's with
        ``mlp_input``). RMSNorm does not centre, so this is all it does; the learned weight is
        not applied (as in TransformerLens without weight folding). Dividing is linear, so the
        components still sum to the normalised stream. ``pos_slice`` says which positions the
        stack already holds.
        """
        layer = self._layer(layer)
        if layer == self.num_layers:
            scale = self["ln_final.hook_scale"]
        else:
            scale = self[f"blocks.{layer}.{'ln2' if mlp_input else 'ln1'}.hook_scale"]
        return residual_stack / _positions(scale, pos_slice, axis=-2)

    def logit_attrs(self, residual_stack: np.ndarray, tokens, incorrect_tokens=None, pos_slice=None) -> np.ndarray:
        """How much each component pushes the logit of ``tokens``: (stack / final scale) · W_U[:, token].

        residual_stack (components, B, T, D), or (components, B, D) for one position picked by
        ``pos_slice``; tokens an id, (B,) or (B, T) ids matching the stack  ->  (components, B, T)
        (or (components, B)). The stack is divided by ln_final's recorded scale here, as in
        TransformerLens; the final norm's weight is not folded into W_U, so the attributions sum
        to the logit divided by that weight. With ``incorrect_tokens``, the logit difference.
        """
        model = self._model_for("logit_attrs")
        if not model.has_lm_head:
            raise InputError("logit_attrs needs the cache of a LlamaForCausalLM run (its lm_head)")
        scaled = residual_stack / _positions(self["ln_final.hook_scale"], pos_slice, axis=-2)
        unembed = model.lm_head_weight()  # (V, D): row t is token t's direction in the stream
        directions = unembed[np.asarray(tokens)]
        if incorrect_tokens is not None:
            if np.shape(incorrect_tokens) != np.shape(tokens):
                raise InputError(f"incorrect_tokens has shape {np.shape(incorrect_tokens)}; tokens has "
                                 f"{np.shape(tokens)}")
            directions = directions - unembed[np.asarray(incorrect_tokens)]
        if directions.ndim == 2 and scaled.ndim == 4:  # one token per row: (B, D) -> (B, 1, D)
            directions = directions[:, None, :]
        return (scaled * directions).sum(axis=-1)

    def _model_for(self, what: str):
        if self.model is None:
            raise InputError(f"{what} needs the model: use the cache that run_with_cache returned")
        return self.model

    def __repr__(self):
        return f"ActivationCache({len(self)} activations, {self.num_layers} layers)"


def _positions(array: np.ndarray, pos_slice, axis: int) -> np.ndarray:
    """The positions ``pos_slice`` keeps along ``axis``: None all, an int one (the axis goes),
    a (start, stop) pair a slice, a list or array those positions (TransformerLens' Slice)."""
    if pos_slice is None:
        return array
    if is_integer(pos_slice):
        return np.take(array, int(pos_slice), axis=axis)
    if isinstance(pos_slice, tuple):
        index = slice(*pos_slice)
    elif isinstance(pos_slice, slice):
        index = pos_slice
    else:
        index = np.asarray(pos_slice)
    selector = [slice(None)] * array.ndim
    selector[axis] = index
    return array[tuple(selector)]


def logit_lens(model, cache: ActivationCache) -> np.ndarray:
    """The logit lens (nostalgebraist, 2020): read every layer's residual stream as if it were last.

    -> (L, B, T, V): lm_head(rms_norm(resid_post of layer l)) with the final norm's weight.
    The last layer's entry equals the model's logits. ``model`` is a LlamaForCausalLM and
    ``cache`` must hold ``blocks.{l}.hook_resid_post`` for every layer.
    """
    residuals = cache.stack("hook_resid_post")  # (L, B, T, D)
    config = model.config
    normed = layers.rms_norm(residuals, model.weights[f"{model.base_prefix}norm.weight"], config.rms_norm_eps)
    return layers.linear(normed, model.lm_head_weight())
