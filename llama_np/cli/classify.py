"""``llama-np classify`` and ``llama-np logits``: what a checkpoint predicts for a text -- a
label with the probability of every label, or the most likely next tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from llama_np import layers
from llama_np.cli.common import (EXIT_OK, UsageError, check_output_path, label_names, load_with_tokenizer, plural,
                                 prompt_text, require_model_class, shorten)
from llama_np.formats.npz import save_npz
from llama_np.model import LlamaForCausalLM, LlamaForSequenceClassification

# The classify example in --help: lines from two plays the bundled classifier never saw (Twelfth
# Night, Henry V), with the genre it gives them; tests/test_cli.py checks that it still does.
CLASSIFY_EXAMPLES = (("DUKE.\nIf music be the food of love, play on", "comedy"),
                     ("KING HENRY.\nOnce more unto the breach, dear friends, once more;", "history"))


# ============================================================================================
# classify
# ============================================================================================


def pad_right(rows: list[list[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of different lengths -> input_ids (B, T) padded on the right, attention_mask (B, T).

    Right padding leaves every real token at the position it has alone, and causal attention
    never lets it see the pads after it, so each row's pooled logits equal those of the text
    classified on its own.
    """
    width = max(len(row) for row in rows)
    ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


def classify_logits(model, rows: list[list[int]]) -> np.ndarray:
    """Pooled logits (B, num_labels): one padded batch when the config names a pad token,
    else one text at a time (without a pad token the last real token of a row cannot be found)."""
    pad = model.config.pad_token_id
    # The classifier reads each row at its last token that is not the pad id, so a text that
    # itself ends in that id would be read too early in a padded batch; such a batch runs alone.
    if len(rows) == 1 or pad is None or any(row[-1] == pad for row in rows):
        return np.concatenate([model(np.array([row])).logits for row in rows])
    ids, mask = pad_right(rows, pad)
    return model(ids, attention_mask=mask).logits


def run_classify(args) -> int:
    require_model_class(args.model, LlamaForSequenceClassification, "classify")
    model, tokenizer = load_with_tokenizer(LlamaForSequenceClassification, args.model)
    rows = [tokenizer.encode(text) for text in args.texts]
    logits = classify_logits(model, rows).astype(np.float64)  # (B, num_labels)
    names = label_names(model.config)
    problem = model.config.problem_type
    if problem is None:
        problem = "regression" if model.config.num_labels == 1 else "single_label_classification"
    for text, row in zip(args.texts, logits):
        if problem == "regression":
            scores = ", ".join(f"{name} {value:.4f}" for name, value in zip(names, row))
            print(f"{scores}\t{shorten(text)}")
            continue
        if problem == "multi_label_classification":
            probabilities = 0.5 * (1 + np.tanh(row / 2))  # sigmoid, each label on its own
            chosen = [name for name, p in zip(names, probabilities) if p > 0.5]
            label = "+".join(chosen) if chosen else "(none)"
        else:
            probabilities = layers.softmax(row)  # in float64, as row is
            label = names[int(np.argmax(row))]
        shown = ", ".join(f"{name} {p:.3f}" for name, p in zip(names, probabilities))
        print(f"{label}\t({shown})\t{shorten(text)}")
    return EXIT_OK


# ============================================================================================
# logits
# ============================================================================================


def run_logits(args) -> int:
    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    if args.out:
        check_output_path(Path(args.out))
    require_model_class(args.model, LlamaForCausalLM, "logits")
    prompt = prompt_text(args)
    model, tokenizer = load_with_tokenizer(LlamaForCausalLM, args.model)
    input_ids = np.array([tokenizer.encode(prompt)], dtype=np.int64)  # (1, T)
    logits = model(input_ids).logits  # (1, T, V)
    last = logits[0, -1].astype(np.float64)  # (V,)
    probabilities = layers.softmax(last)  # in float64, as last is
    top = np.argsort(-last, kind="stable")[: args.top]
    print(f"next token after {plural(input_ids.shape[1], 'prompt token')} (top {len(top)} of {last.shape[0]}):")
    print(f"{'rank':>4}  {'id':>6}  {'probability':>11}  {'logit':>9}  token")
    for rank, token_id in enumerate(top, start=1):
        piece = tokenizer.convert_ids_to_tokens(int(token_id))
        print(f"{rank:>4}  {token_id:>6}  {probabilities[token_id]:>11.4%}  {last[token_id]:>9.4f}  {piece!r}")
    if args.out:
        save_npz(Path(args.out), input_ids=input_ids, attention_mask=np.ones_like(input_ids),
                 logits=logits.astype(np.float32))
        print(f"saved input_ids {input_ids.shape} and logits {logits.shape} to {args.out}", file=sys.stderr)
    return EXIT_OK
