"""``llama-np perplexity``: the sliding-window perplexity of a text file
(``llama_np.perplexity``), with its flags checked before the model is loaded.
"""

from __future__ import annotations

import json
import sys

from llama_np.cli.common import EXIT_OK, UsageError, load_with_tokenizer
from llama_np.errors import InputError
from llama_np.formats.model_files import open_model_files
from llama_np.model import LlamaForCausalLM
from llama_np.perplexity import ENCODE_PIECE_CHARACTERS, encode_long_text, perplexity, read_text_file, sliding_windows

# llama.cpp's default window for its perplexity tool; attention costs grow as the window squared.
DEFAULT_PERPLEXITY_CONTEXT = 512


def run_perplexity(args) -> int:
    """Sliding-window perplexity of a text file, as Transformers documents it
    (``llama_np.perplexity``). Every flag is checked before the model is loaded."""
    for flag, value, least in (("--context", args.context, 2), ("--stride", args.stride, 1)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    max_positions = open_model_files(args.model)[0].max_position_embeddings
    context = min(max_positions, DEFAULT_PERPLEXITY_CONTEXT) if args.context is None else args.context
    if context > max_positions:
        raise UsageError(f"--context must be at most the model's max_position_embeddings, {max_positions}, "
                         f"got {context}")
    stride = max(1, context // 2) if args.stride is None else args.stride
    if stride > context:
        raise UsageError(f"--stride must be in [1, {context}] (at most --context), got {stride}")
    text = read_text_file(args.file)
    model, tokenizer = load_with_tokenizer(LlamaForCausalLM, args.model)
    input_ids = encode_long_text(tokenizer, text, progress=tokenizing_progress(len(text)))  # bos once
    if len(input_ids) < 2:
        raise InputError(f"{args.file} gives {len(input_ids)} token(s); perplexity needs at least 2")
    windows = len(sliding_windows(len(input_ids), context, stride))
    progress = window_progress(windows) if windows > 1 and sys.stderr.isatty() else None
    result = perplexity(model, input_ids, context, stride, progress=progress)
    if args.json:
        print(json.dumps({"perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens,
                          "context": context, "stride": stride}))
    else:
        print(f"perplexity  {result.perplexity:.4f}")
        print(f"nll         {result.nll:.4f} nats/token")
        print(f"tokens      {result.tokens} scored of {len(input_ids)} ({windows} window{'s' if windows != 1 else ''} "
              f"of up to {context} tokens, stride {stride})")
    return EXIT_OK


def window_progress(total: int):
    """progress(done, total) for a terminal: a tqdm bar when tqdm is installed, else a counter."""
    try:
        from tqdm import tqdm  # optional: a bar when installed, else the counter below
    except ImportError:
        def show(done, total):
            print(f"\rwindow {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
        return show
    bar = tqdm(total=total, unit="window", file=sys.stderr, leave=False)

    def show(done, total):
        bar.update(1)
        if done == total:
            bar.close()
    return show


def tokenizing_progress(characters: int):
    """progress(done, total) for tokenizing a long text: a percentage line on a terminal, and
    off one a single line saying what takes the time; None for a text tokenized in one go."""
    if characters <= ENCODE_PIECE_CHARACTERS:
        return None
    if not sys.stderr.isatty():
        print(f"tokenizing {characters:,} characters in pieces of {ENCODE_PIECE_CHARACTERS:,}",
              file=sys.stderr, flush=True)
        return None

    def show(done, total):
        print(f"\rtokenizing {100 * done // total}%", end="\r\033[K" if done == total else "",
              file=sys.stderr, flush=True)
    return show
