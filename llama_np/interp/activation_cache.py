"""The activations of one traced forward pass, by hook name, with TransformerLens' tools.

    logits, cache = model.run_with_cache(input_ids)
    cache["pattern", 0]                          # blocks.0.attn.hook_pattern (B, H, T, S)
    cache.stack("hook_resid_post")               # (L, B, T, D)
    cache.accumulated_resid(apply_ln=True)       # the logit lens's input

Shape legend: B batch, T query positions, S key positions, D hidden size, H query heads,
hd head_dim, V vocabulary size, L layers.
"""

from __future__ import annotations
import numpy as np
from llama_np import layers
from llama_np.errors import InputError
from llama_np.inputs import is_integer
from llama_np.layers import Tap, no_tap  # noqa: F401  (no_tap: the identity tap, documented here too)


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
                           "(see llama_np.interp.hooks.hook_names for every name, and names_filter for "
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
        directions = unembed[_token_ids(tokens, "tokens", unembed.shape[0])]
        if incorrect_tokens is not None:
            if np.shape(incorrect_tokens) != np.shape(tokens):
                raise InputError(f"incorrect_tokens has shape {np.shape(incorrect_tokens)}; tokens has "
                                 f"{np.shape(tokens)}")
            directions = directions - unembed[_token_ids(incorrect_tokens, "incorrect_tokens", unembed.shape[0])]
        if directions.ndim == 2 and scaled.ndim == 4:  # one token per row: (B, D) -> (B, 1, D)
            directions = directions[:, None, :]
        return (scaled * directions).sum(axis=-1)

    def _model_for(self, what: str):
        if self.model is None:
            raise InputError(f"{what} needs the model: use the cache that run_with_cache returned")
        return self.model

    def __repr__(self):
        return f"ActivationCache({len(self)} activations, {self.num_layers} layers)"


def _token_ids(tokens, name: str, vocab_size: int) -> np.ndarray:
    """``tokens`` as an integer array of ids in [0, vocab_size), or InputError naming ``name``."""
    try:
        ids = np.asarray(tokens)
    except (ValueError, TypeError) as error:
        raise InputError(f"{name} must be token ids, got {tokens!r:.60} ({error})") from None
    if ids.dtype == bool or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{name} must be integer token ids, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise InputError(f"{name} must be ids in [0, {vocab_size}), got {int(ids.min())}..{int(ids.max())}")
    return ids


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
