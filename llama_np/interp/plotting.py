"""Figures for looking inside the model: attention patterns, RoPE, the logit lens, norms.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot, so nothing here
touches a global backend: it works headless, in a notebook (the figure displays itself) and in
the CLI (``fig.savefig(path)``). Every figure has a title, labelled axes and readable token
labels (``display_token``).

Shape legend: B batch, T query positions, S key positions, D hidden size, H query heads,
KV key/value heads, hd head_dim, L layers, V vocabulary size.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Callable, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from llama_np import layers
from llama_np.errors import InputError
from llama_np.interp.activation_cache import logit_lens

SPACE_MARK = "␣"  # shown for sentencepiece's "▁" (a word start) and for real spaces
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
MAX_TICK_LABELS = 48  # beyond this many positions, label every n-th one
TICK_FONT_SIZE = 8  # points
# A token label needs a line of 1.25 times its font size, or neighbours run into each other.
LABEL_LINE_HEIGHT = 1.25
POINTS_PER_INCH = 72
MAX_ANNOTATED_CELLS = 600  # the logit lens writes a token into each cell up to this many


# ---------------------------------------------------------------------------- token labels


def display_token(piece: str) -> str:
    """A token as it should appear on an axis: spaces visible, control bytes spelled out.

    "▁the" -> "␣the", " " -> "␣", "\\n" -> "<0x0A>". Byte-fallback pieces such as "<0x0A>"
    already read well and are kept; so are special tokens such as "<s>".
    """
    if BYTE_PIECE.fullmatch(piece):
        return piece
    shown = piece.replace("▁", SPACE_MARK).replace(" ", SPACE_MARK)
    return "".join(f"<0x{ord(c):02X}>" if ord(c) < 32 or ord(c) == 127 else c for c in shown)


def _tick_label(piece: str) -> str:
    # A "$" would start matplotlib's mathtext; escape it so "$5" is drawn as written.
    return display_token(piece).replace("$", r"\$")


def labels_that_fit(inches: float, font_size: float = TICK_FONT_SIZE) -> int:
    """How many token labels of ``font_size`` points can stand side by side along ``inches``."""
    return int(inches * POINTS_PER_INCH / (font_size * LABEL_LINE_HEIGHT))


def _inches_for_labels(count: int, font_size: float = TICK_FONT_SIZE) -> float:
    return count * font_size * LABEL_LINE_HEIGHT / POINTS_PER_INCH


def _ordinal(n: int) -> str:
    """2 -> '2nd', 3 -> '3rd', 11 -> '11th'."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _set_token_ticks(ax, tokens: Sequence[str] | None, axis: str, rotate: bool = False,
                     max_labels: int = MAX_TICK_LABELS) -> int:
    """Token labels on one axis, thinned to at most ``max_labels``; returns the step (1: all)."""
    if tokens is None:
        return 1
    step = max(1, math.ceil(len(tokens) / max(1, max_labels)))
    positions = np.arange(0, len(tokens), step)
    labels = [_tick_label(tokens[i]) for i in positions]
    if axis == "x":
        ax.set_xticks(positions, labels, rotation=90 if rotate else 0, fontsize=TICK_FONT_SIZE)
    else:
        ax.set_yticks(positions, labels, fontsize=TICK_FONT_SIZE)
    return step


def _token_lookup(id_to_token) -> Callable[[int], str]:
    """A callable id -> piece from a tokenizer method, a callable or a list of pieces."""
    if callable(id_to_token):
        return lambda i: str(id_to_token(int(i)))
    return lambda i: str(id_to_token[int(i)])


# ---------------------------------------------------------------------------- attention

# The widest an attention figure gets. Saved 1200 pixels wide (96 dpi), its smallest text (8 pt
# tick labels) is then still 10.7 pixels high.
MAX_FIGURE_WIDTH_INCHES = 12.5
HEAD_FIGURE_MARGIN_INCHES = 1.6  # colour bar and token labels beside the pattern
LAYER_PANEL_INCHES = 2.4
# The share of a panel of the layer figure left for the pattern itself by its title and labels.
PANEL_IMAGE_SHARE = 0.8


def _layer_pattern(attentions, layer: int) -> np.ndarray:
    """(B, H, T, S) weights of one layer from a trace cache or a model's ``attentions`` tuple."""
    if hasattr(attentions, "keys"):
        return np.asarray(attentions[f"blocks.{layer}.attn.hook_pattern"])
    return np.asarray(attentions[layer])


def _blank_padding(pattern: np.ndarray, attention_mask, batch_index: int) -> np.ndarray:
    """pattern (H, T, S) with padded key columns and padded query rows set to NaN (drawn blank)."""
    if attention_mask is None:
        return pattern
    mask = np.asarray(attention_mask)[batch_index].astype(bool)  # (S,)
    pattern = pattern.astype(np.float64, copy=True)
    pattern[..., ~mask] = np.nan
    pattern[:, ~mask[-pattern.shape[1]:], :] = np.nan  # queries are the last T positions
    return pattern


def plot_attention_head(attentions, layer: int, head: int, tokens: Sequence[str] | None = None,
                        batch_index: int = 0, attention_mask=None) -> Figure:
    """One head's attention pattern: which key each query position reads.

    attentions: a cache from ``run_with_cache`` or a model output's ``attentions`` (L arrays
    (B, H, T, S)); tokens: S pieces (the queries are the last T of them); attention_mask (B, S)
    optional — padded rows and columns are left blank.
    """
    pattern = _blank_padding(_layer_pattern(attentions, layer)[batch_index], attention_mask, batch_index)
    weights = pattern[head]  # (T, S)
    queries, keys = weights.shape
    # 0.3 inch a token, up to a page's width: long passages shrink instead of growing without end
    scale = min(0.3, (MAX_FIGURE_WIDTH_INCHES - HEAD_FIGURE_MARGIN_INCHES) / max(keys, queries))
    fig = Figure(figsize=(HEAD_FIGURE_MARGIN_INCHES + scale * keys, 1.2 + scale * queries), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8).set_label("attention weight")
    if tokens is not None:
        length = scale * max(keys, queries)  # inches along the longer side of the pattern
        fit = labels_that_fit(length)
        step = _set_token_ticks(ax, tokens, "x", rotate=True, max_labels=fit)
        _set_token_ticks(ax, list(tokens)[keys - queries:], "y", max_labels=fit)
        if step > 1:
            warnings.warn(f"attention figure: labelled every {_ordinal(step)} token, since "
                          f"{max(keys, queries)} labels at {TICK_FONT_SIZE} pt need "
                          f"{_inches_for_labels(max(keys, queries)):.1f} inches and the pattern is "
                          f"{length:.1f} inches across", stacklevel=2)
    ax.set_xlabel("key position (token attended to)")
    ax.set_ylabel("query position (token attending)")
    ax.set_title(f"Attention pattern, layer {layer}, head {head}")
    return fig


def plot_attention_layer(attentions, layer: int, num_key_value_heads: int,
                         tokens: Sequence[str] | None = None, batch_index: int = 0,
                         attention_mask=None) -> Figure:
    """Every head of one layer, the query heads that share a key/value head side by side.

    With GQA, query head j reads key/value head j // (H / KV): each row of the grid holds whole
    groups, and the heads of one group share a frame colour and the label "kv g".
    """
    pattern = _blank_padding(_layer_pattern(attentions, layer)[batch_index], attention_mask, batch_index)
    num_heads, queries, keys = pattern.shape
    if num_heads % num_key_value_heads:
        raise InputError(f"{num_heads} query heads cannot be grouped over {num_key_value_heads} "
                         "key/value heads: H must be a multiple of KV")
    group_size = num_heads // num_key_value_heads
    columns = group_size * max(1, 4 // group_size)
    rows = math.ceil(num_heads / columns)
    panel = min(LAYER_PANEL_INCHES, (MAX_FIGURE_WIDTH_INCHES - 1) / columns)
    fig = Figure(figsize=(panel * columns + 1, panel * rows + 1), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
    colours = [f"C{g % 10}" for g in range(num_key_value_heads)]
    fit = labels_that_fit(PANEL_IMAGE_SHARE * panel)
    show_tokens = tokens is not None and keys <= fit
    if tokens is not None and not show_tokens:
        warnings.warn(f"attention figure: token labels left out, since {keys} labels at {TICK_FONT_SIZE} pt "
                      f"need {_inches_for_labels(keys):.1f} inches and each head's panel is about "
                      f"{PANEL_IMAGE_SHARE * panel:.1f} inches across (room for {fit}); plot one head "
                      "(plot_attention_head, or llama-np attention --head) to see them", stacklevel=2)
    for index, ax in enumerate(axes.flat):
        if index >= num_heads:
            ax.set_axis_off()
            continue
        group = index // group_size
        image = ax.imshow(pattern[index], cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {index} · kv {group}", fontsize=9, color=colours[group])
        for spine in ax.spines.values():
            spine.set_edgecolor(colours[group])
            spine.set_linewidth(2.5)
        if show_tokens:
            _set_token_ticks(ax, tokens, "x", rotate=True)
            _set_token_ticks(ax, list(tokens)[keys - queries:], "y")
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.6).set_label("attention weight")
    fig.suptitle(f"Layer {layer}: {num_heads} query heads in {num_key_value_heads} groups of "
                 f"{group_size} sharing a key/value head (same frame colour)")
    fig.supxlabel("key position (token attended to)")
    fig.supylabel("query position (token attending)")
    return fig


# ---------------------------------------------------------------------------- RoPE


def plot_rope_frequencies(inv_freqs, max_position_embeddings: int | None = None) -> Figure:
    """The angular frequency θ_i of each dimension pair, and its wavelength in positions.

    inv_freqs: one inv_freq (hd/2,) or a dict {label: inv_freq} to compare scaling types.
    Pair i holds dimensions i and i + hd/2 (HF layout) and turns by position · θ_i.
    """
    if not isinstance(inv_freqs, dict):
        inv_freqs = {"inv_freq": inv_freqs}
    fig = Figure(figsize=(11, 4), layout="constrained")
    frequency_ax, wavelength_ax = fig.subplots(1, 2)
    for label, inv_freq in inv_freqs.items():
        inv_freq = np.asarray(inv_freq, dtype=np.float64)
        pairs = np.arange(inv_freq.shape[0])
        frequency_ax.plot(pairs, inv_freq, marker=".", label=label)
        wavelength_ax.plot(pairs, 2 * np.pi / inv_freq, marker=".", label=label)
    frequency_ax.set_yscale("log")
    frequency_ax.set_xlabel("dimension pair i (dimensions i and i + hd/2)")
    frequency_ax.set_ylabel("θ_i (radians per position)")
    frequency_ax.set_title("Frequency of each pair")
    wavelength_ax.set_yscale("log")
    wavelength_ax.set_xlabel("dimension pair i (dimensions i and i + hd/2)")
    wavelength_ax.set_ylabel("wavelength 2π/θ_i (positions per full turn)")
    wavelength_ax.set_title("Wavelength of each pair")
    if max_position_embeddings:
        wavelength_ax.axhline(max_position_embeddings, color="grey", linestyle="--",
                              label=f"max_position_embeddings = {max_position_embeddings}")
    for ax in (frequency_ax, wavelength_ax):
        ax.legend(fontsize=8)
    fig.suptitle("RoPE: fast-turning pairs first, slow ones last")
    return fig


def plot_rope_rotation(vector, inv_freq, num_positions: int = 32,
                       pairs: Sequence[int] | None = None) -> Figure:
    """Where RoPE moves one query or key vector (hd,) at positions 0 … num_positions − 1.

    Each panel is one dimension pair (i, i + hd/2): the point turns on a circle by θ_i per
    position, so fast pairs (small i) go round many times and slow pairs barely move. Computed
    with ``layers.apply_rope``, the function the model uses.
    """
    vector = np.asarray(vector, dtype=np.float32)
    inv_freq = np.asarray(inv_freq, dtype=np.float32)
    half = vector.shape[-1] // 2
    if pairs is None:
        pairs = sorted({0, half // 4, half // 2, half - 1})
    positions = np.arange(num_positions)[None, :]  # (1, P)
    cos, sin = layers.rope_cos_sin(positions, inv_freq)  # (1, P, hd)
    copies = np.broadcast_to(vector, (1, 1, num_positions, vector.shape[-1]))  # (1, 1, P, hd)
    rotated = layers.apply_rope(copies, cos, sin)[0, 0]  # (P, hd)
    fig = Figure(figsize=(3.2 * len(pairs) + 1, 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(pairs)))
    for ax, pair in zip(axes, pairs):
        first, second = rotated[:, pair], rotated[:, pair + half]
        radius = float(np.hypot(vector[pair], vector[pair + half])) or 1.0
        circle = np.linspace(0, 2 * np.pi, 200)
        ax.plot(radius * np.cos(circle), radius * np.sin(circle), color="lightgrey", linewidth=1, zorder=1)
        points = ax.scatter(first, second, c=np.arange(num_positions), cmap="plasma", s=18, zorder=2)
        ax.scatter(first[:1], second[:1], marker="*", s=120, color="black", zorder=3)
        ax.set_xlim(-1.15 * radius, 1.15 * radius)
        ax.set_ylim(-1.15 * radius, 1.15 * radius)
        ax.set_aspect("equal")
        ax.set_xlabel(f"dimension {pair}")
        ax.set_ylabel(f"dimension {pair + half}")
        ax.set_title(f"pair {pair}: θ = {inv_freq[pair]:.3g} rad/position", fontsize=9)
    fig.colorbar(points, ax=axes, shrink=0.8).set_label("position")
    fig.suptitle(f"RoPE rotates each pair of one vector by position × θ_i (★ position 0, then 1 … {num_positions - 1})")
    return fig


# ---------------------------------------------------------------------------- logit lens and norms


def plot_logit_lens(model, cache, tokens: Sequence[str], id_to_token, batch_index: int = 0) -> Figure:
    """The most likely next token read from each layer's residual stream, at each position.

    model: a LlamaForCausalLM; cache: from ``run_with_cache`` with every layer's
    ``hook_resid_post``; tokens: the T input pieces (column labels); id_to_token: a
    tokenizer's ``convert_ids_to_tokens``, any callable id -> piece, or a list of pieces.
    Colour is the probability of that top token; the last row is the model's own prediction.
    """
    lens = logit_lens(model, cache)[:, batch_index].astype(np.float64)  # (L, T, V)
    lens -= lens.max(axis=-1, keepdims=True)
    probabilities = np.exp(lens) / np.exp(lens).sum(axis=-1, keepdims=True)
    top_ids = probabilities.argmax(axis=-1)  # (L, T)
    top_probabilities = probabilities.max(axis=-1)
    num_layers, length = top_ids.shape
    fig = Figure(figsize=(2 + 0.7 * length, 1.5 + 0.45 * num_layers), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(top_probabilities, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    if top_ids.size <= MAX_ANNOTATED_CELLS:
        lookup = _token_lookup(id_to_token)
        for layer in range(num_layers):
            for position in range(length):
                colour = "white" if top_probabilities[layer, position] > 0.6 else "black"
                ax.text(position, layer, _tick_label(lookup(top_ids[layer, position])),
                        ha="center", va="center", fontsize=7, color=colour)
    _set_token_ticks(ax, tokens, "x", rotate=True)
    ax.set_yticks(np.arange(num_layers), [f"layer {layer}" for layer in range(num_layers)], fontsize=8)
    ax.set_xlabel("input token (the prediction is for the token after it)")
    ax.set_ylabel("residual stream after layer")
    ax.set_title("Logit lens: the top next token if the model stopped after each layer")
    fig.colorbar(image, ax=ax, shrink=0.8).set_label("probability of the top token")
    return fig


DEFAULT_NORM_POINTS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")


def plot_activation_norms(cache, attention_mask=None, points: Sequence[str] = DEFAULT_NORM_POINTS) -> Figure:
    """The L2 norm of each token's activation vector, per layer: mean (line) and range (band).

    cache: from ``run_with_cache`` with every layer's ``points``; attention_mask (B, T)
    optional — padded positions are left out, they carry no meaning.
    """
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for point in points:
        norms = np.linalg.norm(cache.stack(point).astype(np.float64), axis=-1)  # (L, B, T)
        if attention_mask is not None:
            real = np.asarray(attention_mask).astype(bool)
            norms = norms[:, real]  # (L, tokens)
        norms = norms.reshape(norms.shape[0], -1)
        layer_index = np.arange(norms.shape[0])
        line, = ax.plot(layer_index, norms.mean(axis=-1), marker="o", label=point)
        ax.fill_between(layer_index, norms.min(axis=-1), norms.max(axis=-1), color=line.get_color(), alpha=0.15)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    ax.set_xlabel("layer")
    ax.set_ylabel("L2 norm per token (mean, band = min to max)")
    ax.set_title("Activation norms through the layers")
    ax.legend(fontsize=8)
    return fig


def plot_embedding_pad_row(embed_tokens, pad_token_id: int | None) -> Figure:
    """The pad token's embedding row against all the others.

    embed_tokens (V, D). A freshly initialised model has an all-zero pad row (``padding_idx``);
    a trained or resized checkpoint may not. Left: the norm of every row, pad row marked.
    Right: the pad row's values per dimension over the 5–95% band of the other rows.
    """
    if pad_token_id is None:
        raise InputError("this model has no pad token (config.pad_token_id is None), so there is no "
                         "pad row to show; add one first (tokenizer.add_special_tokens and "
                         "model.resize_token_embeddings)")
    embed_tokens = np.asarray(embed_tokens, dtype=np.float64)
    pad_row = embed_tokens[pad_token_id]
    others = np.delete(embed_tokens, pad_token_id, axis=0)
    fig = Figure(figsize=(12, 4), layout="constrained")
    norm_ax, value_ax = fig.subplots(1, 2)
    norm_ax.hist(np.linalg.norm(others, axis=-1), bins=40, color="C0", label="other rows")
    norm_ax.axvline(np.linalg.norm(pad_row), color="C3", linewidth=2,
                    label=f"pad row (id {pad_token_id}): {np.linalg.norm(pad_row):.3g}")
    norm_ax.set_xlabel("L2 norm of the embedding row")
    norm_ax.set_ylabel("number of rows")
    norm_ax.set_title("Row norms")
    norm_ax.legend(fontsize=8)
    dimensions = np.arange(embed_tokens.shape[1])
    low, high = np.percentile(others, [5, 95], axis=0)
    value_ax.fill_between(dimensions, low, high, color="C0", alpha=0.25, label="other rows, 5–95%")
    value_ax.plot(dimensions, others.mean(axis=0), color="C0", linewidth=1, label="mean of other rows")
    value_ax.plot(dimensions, pad_row, color="C3", linewidth=1.5, label="pad row")
    value_ax.set_xlabel("hidden dimension")
    value_ax.set_ylabel("value")
    value_ax.set_title("Values per dimension")
    value_ax.legend(fontsize=8)
    fig.suptitle(f"Embedding: the pad row (id {pad_token_id}) against the other {others.shape[0]} rows")
    return fig
