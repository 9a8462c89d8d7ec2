"""``llama-np perplexity``: the perplexity of a text file by Transformers' or llama.cpp's recipe,
and llama.cpp's KL statistics of a model against a reference (``llama_np.perplexity``), with the
flags checked before a model is loaded.
"""

from __future__ import annotations

import json
import sys

from llama_np.cli.common import EXIT_OK, UsageError, load_model, load_with_tokenizer
from llama_np.errors import InputError
from llama_np.formats.model_files import open_model_files
from llama_np.model import LlamaForCausalLM
from llama_np.perplexity import (ENCODE_PIECE_CHARACTERS, encode_long_text, kl_divergence, kl_statistics,
                                 llama_cpp_chunks, perplexity, read_text_file, sliding_windows)

# llama.cpp's default window for its perplexity tool; attention costs grow as the window squared.
DEFAULT_PERPLEXITY_CONTEXT = 512


def run_perplexity(args) -> int:
    """Perplexity of a text file by ``--recipe``, or with ``--kl-divergence REF`` llama.cpp's
    statistics of ``--model`` against REF. Every flag is checked before a model is loaded."""
    recipe = check_recipe(args)
    least_context = 3 if recipe == "llama.cpp" else 2  # llama.cpp's chunk of 2 scores no token
    for flag, value, least in (("--context", args.context, least_context), ("--stride", args.stride, 1)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    max_positions = open_model_files(args.model)[0].max_position_embeddings
    context = min(max_positions, DEFAULT_PERPLEXITY_CONTEXT) if args.context is None else args.context
    if context > max_positions:
        raise UsageError(f"--context must be at most the model's max_position_embeddings, {max_positions}, "
                         f"got {context}")
    stride = None
    if recipe == "transformers":
        stride = max(1, context // 2) if args.stride is None else args.stride
        if stride > context:
            raise UsageError(f"--stride must be in [1, {context}] (at most --context), got {stride}")
    if args.kl_divergence is not None:
        reference_positions = open_model_files(args.kl_divergence)[0].max_position_embeddings
        if context > reference_positions:
            raise UsageError(f"--context {context} is more than --kl-divergence's max_position_embeddings, "
                             f"{reference_positions}")
    text = read_text_file(args.file)
    model, tokenizer = load_with_tokenizer(LlamaForCausalLM, args.model)
    input_ids = encode_long_text(tokenizer, text, progress=tokenizing_progress(len(text)))  # bos once
    if len(input_ids) < 2:
        raise InputError(f"{args.file} gives {len(input_ids)} token(s); perplexity needs at least 2")
    if recipe == "llama.cpp" and len(input_ids) < 2 * context:
        raise InputError(f"{args.file} gives {len(input_ids)} tokens; the llama.cpp recipe needs at least "
                         f"2 * --context = {2 * context}")
    if args.kl_divergence is not None:
        return print_kl_divergence(args, model, input_ids, context)
    if recipe == "llama.cpp":
        steps, what = len(input_ids) // context, "chunk"
    else:
        steps, what = len(sliding_windows(len(input_ids), context, stride)), "window"
    progress = window_progress(steps, what) if steps > 1 and sys.stderr.isatty() else None
    result = perplexity(model, input_ids, context, stride, recipe=recipe, progress=progress)
    if args.json:
        print(json.dumps({"perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens,
                          "recipe": recipe, "context": context, "stride": stride}))
        return EXIT_OK
    print(f"perplexity  {result.perplexity:.4f}")
    print(f"nll         {result.nll:.4f} nats/token")
    if recipe == "llama.cpp":
        print(f"tokens      {result.tokens} scored of {len(input_ids)} ({steps} chunk{'s' if steps != 1 else ''} "
              f"of {context} tokens, bos first, the last {context - 1 - context // 2} of each scored; "
              f"{len(input_ids) % context} left over at the end not run)")
    else:
        print(f"tokens      {result.tokens} scored of {len(input_ids)} ({steps} window{'s' if steps != 1 else ''} "
              f"of up to {context} tokens, stride {stride})")
    return EXIT_OK


def check_recipe(args) -> str:
    """The recipe to run: --kl-divergence and --stride each allow only one."""
    recipe = args.recipe
    if args.kl_divergence is not None:
        if recipe == "transformers":
            raise UsageError("--kl-divergence uses llama.cpp's chunks; it cannot be combined with "
                             "--recipe transformers")
        recipe = "llama.cpp"
    recipe = recipe or "transformers"
    if recipe == "llama.cpp" and args.stride is not None:
        raise UsageError("--stride is not used by --recipe llama.cpp (its chunks do not overlap)"
                         + (" or --kl-divergence" if args.kl_divergence is not None else ""))
    return recipe


def print_kl_divergence(args, model, input_ids, context: int) -> int:
    """Load the reference, compare, and print llama.cpp's summary (or it as JSON)."""
    reference = load_model(LlamaForCausalLM, args.kl_divergence)
    if reference.config.vocab_size != model.config.vocab_size:
        raise UsageError(f"--kl-divergence {args.kl_divergence} has a vocabulary of {reference.config.vocab_size} "
                         f"tokens, --model {args.model} one of {model.config.vocab_size}: they must be the same")
    chunks = len(llama_cpp_chunks(input_ids, context, model.config.bos_token_id))
    progress = window_progress(chunks, "chunk") if chunks > 1 and sys.stderr.isatty() else None
    statistics = kl_statistics(kl_divergence(model, reference, input_ids, context, progress=progress))
    if args.json:
        print(json.dumps({**statistics, "recipe": "llama.cpp", "context": context}))
        return EXIT_OK
    s = statistics
    print(f"{s['tokens']} tokens scored ({chunks} chunks of {context}, llama.cpp's recipe); "
          f"Q = {args.model}, base = {args.kl_divergence}")
    print(f"Mean PPL(Q)                   : {s['ppl']:10.6f} ± {s['ppl_error']:10.6f}")
    print(f"Mean PPL(base)                : {s['ppl_reference']:10.6f} ± {s['ppl_reference_error']:10.6f}")
    print(f"Mean ln(PPL(Q)/PPL(base))     : {s['ln_ppl_ratio']:10.6f} ± {s['ln_ppl_ratio_error']:10.6f}")
    print(f"Mean PPL(Q)/PPL(base)         : {s['ppl_ratio']:10.6f} ± {s['ppl_ratio_error']:10.6f}")
    print(f"Mean PPL(Q)-PPL(base)         : {s['ppl_difference']:10.6f} ± {s['ppl_difference_error']:10.6f}")
    print(f"Mean    KLD: {s['mean_kl']:10.6f} ± {s['mean_kl_error']:10.6f}")
    print(f"Maximum KLD: {s['max_kl']:10.6f}")
    print(f"Median  KLD: {s['median_kl']:10.6f}")
    print(f"RMS Δp    : {100 * s['rms_probability_difference']:6.3f} ± "
          f"{100 * s['rms_probability_difference_error']:5.3f} %")
    print(f"Same top p: {100 * s['same_top']:6.3f} ± {100 * s['same_top_error']:5.3f} %")
    return EXIT_OK


def window_progress(total: int, what: str = "window"):
    """progress(done, total) for a terminal: a tqdm bar when tqdm is installed, else a counter
    of ``what`` (windows or chunks)."""
    try:
        from tqdm import tqdm  # optional: a bar when installed, else the counter below
    except ImportError:
        def show(done, total):
            print(f"\r{what} {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
        return show
    bar = tqdm(total=total, unit=what, file=sys.stderr, leave=False)

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
