"""``llama-np compare``, ``dump``, ``diff`` and ``attention``: checking a checkpoint's numbers
against stored ones, and looking inside a forward pass.

``compare`` runs the model on a reference's input ids and checks its logits; ``dump`` saves every
named activation of a forward pass (golden activations), and ``diff`` names the first place two
dumps part ways, to debug a port layer by layer; ``attention`` draws a layer's attention.
"""

from __future__ import annotations

import difflib
import io
from pathlib import Path

import numpy as np

from llama_np.cli.common import (DEFAULT_CLASSIFIER, DEFAULT_MODEL, EXIT_FAILED, EXIT_OK, UsageError,
                                 check_output_path, load_model, load_with_tokenizer, model_class_for, plural,
                                 prompt_text)
from llama_np.errors import InputError
from llama_np.formats.files import atomic_write
from llama_np.formats.model_files import open_model_files
from llama_np.formats.npz import read_npz, save_npz
from llama_np.weights.memory import human_bytes
from llama_np.interp.hooks import forward_order, hook_names
from llama_np.model import LlamaForCausalLM, LlamaForSequenceClassification

# ============================================================================================
# compare
# ============================================================================================


def read_reference(path: Path, prefix: str | None) -> dict[str, np.ndarray]:
    """input_ids (B, T), logits (B, T, V) or (B, labels), optional attention_mask and
    position_ids (B, T), from an .npz file; InputError naming the problem otherwise.

    With ``prefix``, the arrays are ``<prefix>.input_ids`` etc., as in llama_np's test data.
    """
    arrays = read_npz(path)
    names = list(arrays)
    key = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    missing = [key(name) for name in ("input_ids", "logits") if key(name) not in arrays]
    if missing:
        raise InputError(f"{path} has no {' or '.join(missing)}; {describe_keys(names, prefix)}")
    reference = {name: arrays[key(name)] for name in ("input_ids", "logits", "attention_mask", "position_ids")
                 if key(name) in arrays}
    return check_reference(path, reference)


def describe_keys(names: list[str], prefix: str | None) -> str:
    prefixes = sorted(name[: -len(".input_ids")] for name in names
                      if name.endswith(".input_ids") and name[: -len("input_ids")] + "logits" in names)
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    hint = f"; choose one with --prefix ({', '.join(prefixes[:8])})" if prefixes and not prefix else ""
    return f"it holds {shown or 'no arrays'}{hint}"


def check_reference(path: Path, reference: dict) -> dict:
    ids, logits = reference["input_ids"], reference["logits"]
    if ids.ndim == 1:
        ids = ids[None, :]
    if not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 2 or ids.size == 0:
        raise InputError(f"{path}: input_ids must be a non-empty integer array (B, T), got {ids.dtype} {ids.shape}")
    if not np.issubdtype(logits.dtype, np.floating):
        raise InputError(f"{path}: logits must be floating point, got {logits.dtype}")
    batch, length = ids.shape
    if logits.ndim == 3 and logits.shape[:2] != (batch, length):
        raise InputError(f"{path}: logits has shape {logits.shape}; input_ids {ids.shape} needs "
                         f"({batch}, {length}, vocabulary)")
    if logits.ndim == 2 and logits.shape[0] != batch:
        raise InputError(f"{path}: classifier logits has shape {logits.shape}; input_ids {ids.shape} needs "
                         f"({batch}, labels)")
    if logits.ndim not in (2, 3):
        raise InputError(f"{path}: logits must be (B, T, V) for a language model or (B, labels) for a "
                         f"classifier, got shape {logits.shape}")
    checked = {"input_ids": ids.astype(np.int64), "logits": logits}
    for name in ("attention_mask", "position_ids"):
        if name in reference:
            value = reference[name]
            value = value[None, :] if value.ndim == 1 else value
            if value.shape != ids.shape or not np.issubdtype(value.dtype, np.integer):
                raise InputError(f"{path}: {name} must be integers of the shape of input_ids {ids.shape}, "
                                 f"got {value.dtype} {value.shape}")
            checked[name] = value.astype(np.int64)
    if "attention_mask" in checked and not np.isin(checked["attention_mask"], (0, 1)).all():
        raise InputError(f"{path}: attention_mask must hold only 0 and 1")
    return checked


def run_compare(args) -> int:
    if not args.atol > 0:
        raise UsageError(f"--atol must be positive, got {args.atol}")
    path = Path(args.reference)
    reference = read_reference(path, args.prefix)
    ref_logits = reference["logits"]
    classifier = ref_logits.ndim == 2
    dtype = np.dtype(args.dtype)
    model_class = LlamaForSequenceClassification if classifier else LlamaForCausalLM
    if args.model is None:  # a classifier reference (B, labels) defaults to the bundled classifier
        args.model = DEFAULT_CLASSIFIER if classifier else DEFAULT_MODEL
    if model_class_for(args.model) is not model_class:
        kind = "classifier logits (B, labels)" if classifier else "language-model logits (B, T, V)"
        raise InputError(f"{path} holds {kind} of shape {ref_logits.shape}, but {args.model} is "
                         f"{'not a sequence classifier' if classifier else 'not a causal language model'}; "
                         "compare it with a checkpoint of the kind that wrote the reference")
    model = load_model(model_class, args.model, dtype=dtype)
    width = model.config.num_labels if classifier else model.config.vocab_size
    if ref_logits.shape[-1] != width:
        what = "labels" if classifier else "vocabulary entries"
        raise InputError(f"{path}: logits have {ref_logits.shape[-1]} {what} per position; the model "
                         f"{args.model} has {width}")
    ids = reference["input_ids"]
    # (B, T) True where a position is compared. Logits at padding positions mean nothing
    # (Transformers' and ours may differ there); a classifier has one pooled "position" per row.
    mask = (np.ones((ids.shape[0], 1), dtype=bool) if classifier else
            reference.get("attention_mask", np.ones(ids.shape, dtype=np.int64)).astype(bool))
    if not mask.any():  # nothing to check is not a pass
        print(f"FAIL: nothing was compared: attention_mask is 0 at every position of {path}")
        return EXIT_FAILED
    out = model(ids, attention_mask=reference.get("attention_mask"),
                **({"position_ids": reference["position_ids"]} if "position_ids" in reference else {}))
    ours = out.logits.astype(np.float64)
    ref = ref_logits.astype(np.float64)
    if classifier:
        ours, ref = ours[:, None, :], ref[:, None, :]
    return report_comparison(ours, ref, mask, ids, args.atol, classifier)


def report_comparison(ours, ref, mask, ids, atol, classifier) -> int:
    """Print max |Δlogit| and argmax agreement per compared position, then PASS or FAIL.

    ours, ref (B, T, V); mask (B, T) True where a position is compared. A position passes when
    every logit satisfies |ours − ref| <= atol · max(1, |ref|): absolute near zero, relative for
    large logits.
    """
    difference = np.abs(ours - ref)  # (B, T, V)
    allowed = atol * np.maximum(1.0, np.abs(ref))
    worst_ratio = (difference / allowed).max(axis=-1)  # (B, T): > 1 means outside the tolerance
    max_difference = difference.max(axis=-1)
    ours_top, ref_top = ours.argmax(axis=-1), ref.argmax(axis=-1)
    what = "row" if classifier else "row  pos   token"
    print(f"{what}  max|Δlogit|  argmax ours/ref")
    for b, t in zip(*np.nonzero(mask)):
        place = f"{b:>3}" if classifier else f"{b:>3}  {t:>3}  {ids[b, t]:>6}"
        flag = "" if worst_ratio[b, t] <= 1 else "  <- outside tolerance"
        agree = "same" if ours_top[b, t] == ref_top[b, t] else "DIFFERENT"
        print(f"{place}  {max_difference[b, t]:>11.3e}  {ours_top[b, t]}/{ref_top[b, t]} {agree}{flag}")
    compared = int(mask.sum())
    agreeing = int((ours_top == ref_top)[mask].sum())
    b, t = np.unravel_index(np.argmax(np.where(mask, max_difference, -1.0)), mask.shape)
    passed = bool((worst_ratio[mask] <= 1).all())
    where = f"row {b}" if classifier else f"row {b}, position {t}"
    unit = "row" if classifier else "position"
    print(f"max |Δlogit| {max_difference[b, t]:.3e} at {where}; argmax agrees at {agreeing}/"
          f"{plural(compared, unit)}")
    print(f"{'PASS' if passed else 'FAIL'}: tolerance |Δ| <= {atol:g} * max(1, |reference logit|)")
    return EXIT_OK if passed else EXIT_FAILED


# ============================================================================================
# dump and diff: golden activations for debugging a port layer by layer
# ============================================================================================

DUMP_INPUTS = ("input_ids", "attention_mask")
DUMP_ALWAYS = (*DUMP_INPUTS, "logits")


def check_name_parts(parts: list[str], config) -> None:
    """UsageError for a --names part that no hook name contains (it would select nothing),
    with the closest hook names: a typo would otherwise save an empty dump and exit 0."""
    names = hook_names(config)
    for part in parts:
        if any(part in name for name in (*names, *DUMP_ALWAYS)):
            continue
        # Close matches among the full names and their forms without "blocks.{l}.", the way
        # the names are usually written ("hook_resid_post", "attn.hook_pattern").
        candidates = sorted({form for name in names for form in (name, *name_suffixes(name))})
        close = difflib.get_close_matches(part, candidates, n=3, cutoff=0.6)
        if close:
            listed = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
            hint = f"did you mean {listed}?"
        else:
            hint = "hook names look like hook_embed, blocks.0.attn.hook_q or hook_resid_post"
        raise UsageError(f"--names {part} matches no hook name; {hint} (all names: docs/trace.md)")


def name_suffixes(name: str) -> list[str]:
    """blocks.0.attn.hook_q -> [attn.hook_q, hook_q]; the parts a --names filter is written with."""
    pieces = name.split(".")
    return [".".join(pieces[i:]) for i in range(1, len(pieces)) if not pieces[i].isdigit()]


def run_dump(args) -> int:
    """Save the prompt's ids, logits and every traced activation (float32) under its hook name."""
    out = Path(args.out)
    check_output_path(out)
    model_class = model_class_for(args.model)
    if args.names:
        check_name_parts(args.names, open_model_files(args.model)[0])
    prompt = prompt_text(args)
    model, tokenizer = load_with_tokenizer(model_class, args.model)
    input_ids = np.array([tokenizer.encode(prompt)], dtype=np.int64)  # (1, T)
    names_filter = (lambda name: any(part in name for part in args.names)) if args.names else None
    logits, cache = model.run_with_cache(input_ids, names_filter=names_filter)
    arrays = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
              "logits": np.asarray(logits, dtype=np.float32)}
    arrays.update((name, np.asarray(value, dtype=np.float32)) for name, value in cache.items())
    save_npz(out, **arrays)
    size = sum(a.nbytes for a in arrays.values())
    print(f"saved {plural(len(cache), 'activation')}, logits {arrays['logits'].shape} and input_ids "
          f"{input_ids.shape} ({human_bytes(size)}) to {out}")
    return EXIT_OK


def run_diff(args) -> int:
    """Compare two dumps name by name, in forward order, and name the first divergence.

    Works on any two .npz files holding arrays under the same names: two llama_np dumps, or a
    llama_np dump and one written by another implementation with the hook names of
    ``docs/trace.md``. Both must come from the same input ids.
    """
    if not args.atol > 0:
        raise UsageError(f"--atol must be positive, got {args.atol}")
    first, second = read_npz(Path(args.first)), read_npz(Path(args.second))
    if "input_ids" in first and "input_ids" in second and not np.array_equal(first["input_ids"], second["input_ids"]):
        raise InputError(f"{args.first} and {args.second} were made from different input_ids; "
                         "dump both from the same ids")
    common = sorted((set(first) & set(second)) - set(DUMP_INPUTS), key=forward_order)
    if not common:
        raise InputError(f"{args.first} and {args.second} share no arrays to compare")
    for path, arrays in ((args.first, first), (args.second, second)):
        # Activations are real numbers; a complex array would lose its imaginary part unseen.
        odd = [f"{name} ({arrays[name].dtype})" for name in common if arrays[name].dtype.kind not in "biuf"]
        if odd:
            raise InputError(f"{path}: these arrays are not real numbers: {', '.join(odd[:6])}")
    print(f"{'activation':<36} {'shape':<18} {'max|Δ|':>10}  scaled")
    first_divergence = None
    for name in common:
        a, b = first[name].astype(np.float64), second[name].astype(np.float64)
        if a.shape != b.shape:
            print(f"{name:<36} {str(a.shape) + ' vs ' + str(b.shape):<18}  shapes differ")
            first_divergence = first_divergence or name
            continue
        difference = np.abs(a - b)
        scaled = float((difference / np.maximum(1.0, np.abs(b))).max()) if a.size else 0.0
        if not np.isfinite(scaled):
            scaled = np.inf
        outside = scaled > args.atol
        flag = "  <- outside tolerance" if outside else ""
        print(f"{name:<36} {str(a.shape):<18} {float(difference.max()) if a.size else 0.0:>10.3e}  "
              f"{scaled:.2e}{flag}")
        if outside and first_divergence is None:
            first_divergence = name
    for label, only in ((args.first, set(first) - set(second)), (args.second, set(second) - set(first))):
        if only:
            shown = sorted(only, key=forward_order)
            print(f"only in {label}: {', '.join(shown[:6])}{', ...' if len(shown) > 6 else ''}")
    if first_divergence is not None:
        print(f"FAIL: first divergence at {first_divergence} (tolerance {args.atol:g} x max(1, |value|))")
        return EXIT_FAILED
    print(f"PASS: {plural(len(common), 'array')} within {args.atol:g} x max(1, |value|)")
    return EXIT_OK


# ============================================================================================
# attention figure
# ============================================================================================


def run_attention(args) -> int:
    """Save one head's attention pattern, or a whole layer's heads grouped by key/value head."""
    from llama_np.interp.plotting import plot_attention_head, plot_attention_layer  # matplotlib: only here

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"--out must name a .png, .svg or .pdf file, got {out}")
    if not out.parent.is_dir():
        raise InputError(f"cannot write {out}: the directory {out.parent} does not exist")
    model_class = model_class_for(args.model)
    model, tokenizer = load_with_tokenizer(model_class, args.model)
    config = model.config
    if not 0 <= args.layer < config.num_hidden_layers:
        raise UsageError(f"--layer must be in [0, {config.num_hidden_layers}), got {args.layer}")
    if args.head is not None and not 0 <= args.head < config.num_attention_heads:
        raise UsageError(f"--head must be in [0, {config.num_attention_heads}), got {args.head}")
    input_ids = np.array([tokenizer.encode(prompt_text(args))], dtype=np.int64)
    _, cache = model.run_with_cache(input_ids, names_filter=f"blocks.{args.layer}.attn.hook_pattern")
    tokens = tokenizer.convert_ids_to_tokens(input_ids[0].tolist())
    if args.head is None:
        figure = plot_attention_layer(cache, args.layer, config.num_key_value_heads, tokens=tokens)
    else:
        figure = plot_attention_head(cache, args.layer, args.head, tokens=tokens)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=out.suffix.lower()[1:], dpi=figure_dpi(figure))
    atomic_write(out, [buffer.getvalue()])
    what = f"head {args.head}" if args.head is not None else "all heads"
    print(f"saved layer {args.layer}, {what}, over {plural(input_ids.shape[1], 'token')} to {out}")
    return EXIT_OK


FIGURE_DPI = 120
MAX_FIGURE_PIXELS = 1200


def figure_dpi(figure) -> float:
    """120 dpi, lowered for a wide figure so the image is at most 1200 pixels wide: shown
    whole on a laptop screen, its text (plotting keeps figures narrow enough) stays readable."""
    return min(FIGURE_DPI, MAX_FIGURE_PIXELS / figure.get_figwidth())
