"""The checker for ablating one attention head: its output removed before ``o_proj``.

``check_head_ablation(fn)`` takes ``fn(z, o_proj, head)``: the per-head attention outputs z
(B, T, H, hd) as recorded at ``attn.hook_z``, the layer's ``o_proj`` weight (D, H·hd) and a head
index, and returns the attention output (B, T, D) with that head zero-ablated. Like the other
checkers it runs cases built from the bundled model, prints a report and returns a
``CheckResult``; the wrong versions below are the mistakes its hints name.

Head h reaches the residual stream only through its block of o_proj columns,
attn_out = Σ_h z_h · o_proj[:, h·hd:(h+1)·hd]ᵀ, so zeroing z_h and zeroing those columns are the
same ablation (notebooks/11_activation_patching.ipynb, section 1).
"""

from __future__ import annotations

import numpy as np

from llama_np import layers
from llama_np.exercises.checking import Case, CheckResult, Mistake, run_check
from llama_np.exercises.samples import model_sample


def _project(z, o_proj):
    """o_proj applied to z (B, T, H, hd): the heads side by side, as the model concatenates them."""
    batch, length, heads, head_dim = z.shape
    return layers.linear(z.reshape(batch, length, heads * head_dim), o_proj)  # (B, T, D)


def _without_head(z, o_proj, head):
    z = z.copy()
    z[:, :, head] = 0.0
    return _project(z, o_proj)


# ---------------------------------------------------------------------------- the wrong versions


def _whole_layer(z, o_proj, head):
    return np.zeros(z.shape[:2] + (o_proj.shape[0],), dtype=z.dtype)


def _rows_of_o_proj(z, o_proj, head):
    head_dim = z.shape[-1]
    o_proj = o_proj.copy()
    o_proj[head * head_dim:(head + 1) * head_dim, :] = 0.0
    return _project(z, o_proj)


def _after_o_proj(z, o_proj, head):
    head_dim = z.shape[-1]
    out = _project(z, o_proj)
    out[..., head * head_dim:(head + 1) * head_dim] = 0.0
    return out


def _zeroed_position(z, o_proj, head):
    z = z.copy()
    z[:, head] = 0.0
    return _project(z, o_proj)


def _zeroed_dimension(z, o_proj, head):
    z = z.copy()
    z[..., head] = 0.0
    return _project(z, o_proj)


def _kept_only_head(z, o_proj, head):
    kept = np.zeros_like(z)
    kept[:, :, head] = z[:, :, head]
    return _project(kept, o_proj)


def _strided_columns(z, o_proj, head):
    o_proj = o_proj.copy()
    o_proj[:, head::z.shape[2]] = 0.0
    return _project(z, o_proj)


def _one_column(z, o_proj, head):
    o_proj = o_proj.copy()
    o_proj[:, head] = 0.0
    return _project(z, o_proj)


def _untransposed(z, o_proj, head):
    batch, length, heads, head_dim = z.shape
    z = z.copy()
    z[:, :, head] = 0.0
    return z.reshape(batch, length, heads * head_dim) @ o_proj  # runs only when o_proj is square


HEAD_ABLATION_MISTAKES = (
    Mistake("whole layer",
            "You ablated the whole layer: every head's output is gone. Ablating head h removes only "
            "its share — zero z[:, :, h] (or the columns h·hd … (h+1)·hd − 1 of o_proj) and keep the "
            "other heads.", (_whole_layer,)),
    Mistake("rows instead of columns, or after o_proj",
            "You zeroed rows instead of columns of o_proj — or, which gives the same numbers, you "
            "ablated after o_proj by zeroing a slice of its output. o_proj is (D, H·hd): a row is one "
            "dimension of the residual stream and mixes every head, so that cuts a piece out of all "
            "of them. Head h enters through the *columns* h·hd … (h+1)·hd − 1: zero those, or zero "
            "z[:, :, h] before o_proj.", (_rows_of_o_proj, _after_o_proj)),
    Mistake("zeroed a position",
            "z is (B, T, H, hd): you zeroed position `head` (axis 1) of every head, not head `head` "
            "(axis 2). Use z[:, :, head].", (_zeroed_position,)),
    Mistake("zeroed a dimension of every head",
            "You zeroed one component of every head's hd-vector (the last axis of z). The heads are "
            "axis 2 of z (B, T, H, hd): use z[:, :, head].", (_zeroed_dimension,)),
    Mistake("kept only the head",
            "You kept head `head` and removed all the others. Ablating a head removes *it*; the "
            "other heads stay.", (_kept_only_head,)),
    Mistake("strided columns",
            "The columns of o_proj are grouped by head, in the order of z.reshape(B, T, H·hd): head h "
            "owns the block h·hd … (h+1)·hd − 1, not every H-th column.", (_strided_columns,)),
    Mistake("one column",
            "Each head owns hd columns of o_proj, not one: zero o_proj[:, h·hd:(h+1)·hd].",
            (_one_column,)),
    Mistake("o_proj not transposed",
            "Weights are stored (out, in) like torch.nn.Linear: the projection is "
            "z.reshape(B, T, H·hd) @ o_proj.T. Without the transpose it runs only because this "
            "o_proj is square (D = H·hd).", (_untransposed,)),
)

HEAD_ABLATION_TAG_HINTS = {
    "d_not_h_hd": "Only the cases whose hidden size D differs from H·hd fail: take H and hd from "
                  "z.shape (B, T, H, hd), not from o_proj's D — D = H·hd holds for Llama 2, not for "
                  "every model.",
}


def head_ablation_cases(prefer_bundled: bool = True) -> list[Case]:
    sample = model_sample(prefer_bundled)
    config = sample.config
    H, n_rep, last = config.num_attention_heads, config.num_key_value_groups, config.num_hidden_layers - 1
    middle = config.num_hidden_layers // 2
    second_group = n_rep if n_rep < H else H // 2  # the first head of the second key/value group
    rng = np.random.default_rng(14)
    odd_z, odd_o_proj = rng.normal(size=(2, 5, 3, 4)).astype(np.float32), rng.normal(size=(7, 12)).astype(np.float32)
    square_z, square_o_proj = rng.normal(size=(1, 3, 2, 3)).astype(np.float32), rng.normal(size=(6, 6)).astype(np.float32)

    def case(name, z, o_proj, head):
        tags = frozenset(["d_not_h_hd"]) if o_proj.shape[0] != z.shape[2] * z.shape[3] else frozenset()
        return Case(name, (z, o_proj, head), _without_head(z, o_proj, head), tags=tags)

    def layer_case(name, layer, head):
        return case(name, sample.activation("attn.hook_z", layer), sample.layer(layer).o_proj, head)

    z0 = sample.activation("attn.hook_z", 0)
    return [
        layer_case(f"layer-0 z of {sample.source}, shape {z0.shape}, head 0", 0, 0),
        layer_case(f"layer {last}, head {H - 1} (the last head)", last, H - 1),
        layer_case(f"layer {middle}, head {second_group} (the first head of the second key/value group)",
                   middle, second_group),
        case("odd sizes: z (2, 5, 3, 4) and o_proj (7, 12), so D ≠ H·hd; head 1", odd_z, odd_o_proj, 1),
        case("a square o_proj: z (1, 3, 2, 3) and o_proj (6, 6); head 1", square_z, square_o_proj, 1),
    ]


def check_head_ablation(fn, verbose: bool = True, prefer_bundled: bool = True) -> CheckResult:
    """Check ``fn(z, o_proj, head) -> (B, T, D)``: the attention output without head ``head``.

    z (B, T, H, hd) as at ``attn.hook_z``; o_proj (D, H·hd). The expected value is
    o_proj applied to z with z[:, :, head] set to zero.
    """
    return run_check("check_head_ablation", fn, head_ablation_cases(prefer_bundled), HEAD_ABLATION_MISTAKES,
                     HEAD_ABLATION_TAG_HINTS, verbose=verbose)
