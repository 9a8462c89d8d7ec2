"""The ``llama-np`` argument parser: one sub-parser per verb, with its help text, example and
defaults, and the function that runs it (``args.run``).

A bad argument raises ``UsageError`` rather than printing argparse's usage text and exiting, so
``main`` reports it as one line.
"""

from __future__ import annotations

import argparse
import difflib
import textwrap

import llama_np
from llama_np.cli.checkpoints import run_convert, run_inspect, run_quantize
from llama_np.cli.classify import CLASSIFY_EXAMPLES, run_classify, run_logits
from llama_np.cli.common import DEFAULT_ATOL, DEFAULT_CLASSIFIER, DEFAULT_MODEL, UsageError
from llama_np.cli.compare import run_attention, run_compare, run_diff, run_dump
from llama_np.cli.generate import DEFAULT_MAX_NEW_TOKENS, run_chat, run_generate
from llama_np.cli.perplexity import DEFAULT_PERPLEXITY_CONTEXT, run_perplexity
from llama_np.formats.convert import OUTPUT_DTYPES
from llama_np.weights.codecs import Q8_0, WRITTEN_TYPES


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument raises UsageError instead of printing usage and exiting.

    argparse's own report is the usage text plus a line; ``main`` prints just one line. An
    unknown flag gets the nearest known one ("--max_new_tokens": did you mean
    --max-new-tokens?), and abbreviations are off: ``--max-new-token`` is a typo, not a flag.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(f"{message}{self._nearest_flags(message)} (see '{self.prog} --help')")

    def _nearest_flags(self, message: str) -> str:
        """"; did you mean --x?" for each unknown flag of an "unrecognized arguments" message."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        known = [flag for action in self._actions for flag in action.option_strings]
        hints = []
        for word in message.split(":", 1)[1].split():
            if word.startswith("-"):
                flag = word.split("=", 1)[0]
                close = difflib.get_close_matches(flag.replace("_", "-"), known, n=1, cutoff=0.6)
                if close:
                    hints.append(f"{flag}: did you mean {close[0]}?")
        return "; " + "; ".join(hints) if hints else ""


class HelpFormatter(argparse.HelpFormatter):
    """Wrap prose to the terminal, but keep lines indented by two spaces (examples) as written."""

    def _fill_text(self, text, width, indent):
        lines = []
        for line in text.splitlines():
            if line.startswith("  ") or not line.strip():
                lines.append(indent + line)
            else:
                lines.append(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent,
                                           break_on_hyphens=False))
        return "\n".join(lines)


def parse_arguments(argv) -> argparse.Namespace:
    """``argv`` parsed by ``build_parser()``; an unknown flag is reported by its verb's parser,
    which knows that verb's flags (and so the nearest one)."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        verbs = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
        verbs.choices.get(args.verb, parser).error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def build_parser() -> ArgumentParser:
    """Every verb's parser; ``args.run(args)`` runs the verb given."""
    parser = ArgumentParser(
        prog="llama-np",
        description="Llama 2 in plain NumPy: generate, chat, classify, look at logits, compare "
                    "with reference logits, inspect checkpoints, and dump and diff activations.",
        epilog="examples:\n"
               "  llama-np generate \"ROMEO.\" --max-new-tokens 40\n"
               "  llama-np inspect --model ~/models/Llama-2-7b-hf\n"
               "run 'llama-np VERB --help' for the options of each verb",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llama-np {llama_np.__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def model_option(default):
        common = ArgumentParser(add_help=False)
        shown = default or f"{DEFAULT_MODEL}, or {DEFAULT_CLASSIFIER} for classifier logits (B, labels)"
        common.add_argument("--model", default=default, metavar="NAME_OR_PATH",
                            help="a checkpoint directory (config.json, *.safetensors, tokenizer.model "
                                 "or tokenizer.json; or Meta's params.json, consolidated.NN.pth, "
                                 "tokenizer.model), a bundled model name, or a repo id in the "
                                 f"local Hugging Face cache (default: {shown})")
        return common

    sampling = ArgumentParser(add_help=False)
    group = sampling.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                       help=f"most tokens to generate (default: {DEFAULT_MAX_NEW_TOKENS}); "
                            "generation stops earlier at end-of-sequence")
    group.add_argument("--temperature", type=float, metavar="T", help="sample with this temperature (> 0)")
    group.add_argument("--top-k", type=int, metavar="K",
                       help="sample from the K most likely tokens (0: no limit, as in Transformers)")
    group.add_argument("--top-p", type=float, metavar="P",
                       help="sample from the smallest set of most likely tokens whose probabilities add up "
                            "to >= P, in (0, 1]")
    group.add_argument("--repetition-penalty", type=float, metavar="R",
                       help="penalise tokens already in the text: their logits are divided by R when positive, "
                            "multiplied by R when negative (R > 0; > 1 repeats less, 1 is no penalty)")
    group.add_argument("--seed", type=int, help="seed (>= 0) for sampling, for reproducible output")
    group.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    group.add_argument("--allow-past-context", action="store_true",
                       help="go on generating past the model's context length (max_position_embeddings), "
                            "where it was never trained; by default generation stops there, with a warning")

    def add_verb(name, help, example, parents=(), description=None):
        return verbs.add_parser(
            name, help=help, description=description or help, parents=list(parents),
            epilog="example:\n  " + example, formatter_class=HelpFormatter, allow_abbrev=False)

    generate = add_verb(
        "generate", "continue a prompt, printing the text as it is generated",
        'llama-np generate "HAMLET. To be, or not to be" --max-new-tokens 60 --temperature 0.8 --seed 1',
        [model_option(DEFAULT_MODEL), sampling],
        description="Continue PROMPT, printing the text as it is generated. Without sampling options "
                    "the checkpoint's generation_config.json decides between sampling and greedy. "
                    "The speed, counting only the new tokens, is printed on stderr at the end.")
    generate.add_argument("prompt", metavar="PROMPT",
                          help="the text to continue; - reads it from stdin (less one final newline)")
    generate.set_defaults(run=run_generate)

    chat = add_verb(
        "chat", "chat with a chat model, one message per line of input",
        'llama-np chat --model ~/models/Llama-2-7b-chat-hf --system "Answer in one sentence."',
        [model_option(DEFAULT_MODEL), sampling],
        description="Chat with a chat checkpoint, in its own chat format: the chat_template of its "
                    "tokenizer_config.json (TinyLlama's Zephyr format, say), or Meta's Llama 2 format "
                    "([INST] ... [/INST]) for a model without one. Each line read from stdin is one "
                    "user message; the whole dialog is the context of each answer. An empty line, "
                    "'exit', 'quit' or end of input stops; in a terminal, Ctrl-C stops an answer and "
                    "returns to the prompt. Off a terminal each message is echoed as '> message'.")
    chat.add_argument("--system", metavar="TEXT", help="a system prompt (the template's system message; "
                                                       "<<SYS>> ... <</SYS>> in the Llama 2 format)")
    chat.add_argument("--speed", action="store_true", help="print each answer's speed on stderr")
    chat.set_defaults(run=run_chat)

    classify = add_verb(
        "classify", "label texts with a sequence classifier",
        "llama-np classify " + " ".join(f"$'{text}'".replace("\n", "\\n") for text, _ in CLASSIFY_EXAMPLES),
        [model_option(DEFAULT_CLASSIFIER)],
        description="Print the predicted label and the probability of every label for each TEXT. "
                    "Texts are run as one right-padded batch when the config has a pad_token_id, "
                    "else one at a time; the numbers are the same either way. The bundled "
                    f"{DEFAULT_CLASSIFIER} names the genre of 69% of 128-token passages from six plays "
                    "it never saw (from 25% on Macbeth to 90% on Julius Caesar; see its MODEL_CARD.md); "
                    "on a single line it guesses, swayed by the speaker's name (a KING reads as history). "
                    "The example's lines, written as in its training text (speaker, newline, speech), "
                    "come from two of those plays, and it labels them right.")
    classify.add_argument("texts", nargs="+", metavar="TEXT")
    classify.set_defaults(run=run_classify)

    logits = add_verb(
        "logits", "show the most likely next tokens after a prompt",
        'llama-np logits "But, soft! what light through yonder window" --top 5 --out romeo.npz',
        [model_option(DEFAULT_MODEL)],
        description="Print the most likely next tokens after PROMPT with their probabilities. "
                    "--out saves input_ids (1, T), attention_mask (1, T) and the logits of every "
                    "position (1, T, V) as float32, a reference file for 'llama-np compare'.")
    logits.add_argument("prompt", metavar="PROMPT", help="the text to run; - reads it from stdin")
    logits.add_argument("--top", type=int, default=10, metavar="N", help="how many tokens to show (default: 10)")
    logits.add_argument("--out", metavar="FILE.npz", help="save the full logits with the input ids")
    logits.set_defaults(run=run_logits)

    compare = add_verb(
        "compare", "check the model's logits against a stored reference (exit 1 on mismatch)",
        "llama-np compare reference.npz --model ./Llama-2-7b-converted --atol 1e-3",
        [model_option(None)],
        description="Run the model on the input ids stored in REFERENCE.npz and compare with its "
                    "logits: 'input_ids' (B, T) and 'logits' (B, T, V) -- or (B, labels) for a "
                    "sequence classifier -- with optional 'attention_mask' and 'position_ids' "
                    "(B, T). Positions where attention_mask is 0 are skipped. Prints the max "
                    "|Δlogit| and the argmax of both at every position, then PASS (exit 0) or "
                    "FAIL (exit 1). A logit passes when |ours - reference| <= ATOL * max(1, "
                    "|reference|): absolute for logits near zero, relative for large ones.")
    compare.add_argument("reference", metavar="REFERENCE.npz")
    compare.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                         help=f"tolerance, scaled by max(1, |reference logit|) (default: {DEFAULT_ATOL:g})")
    compare.add_argument("--prefix", metavar="NAME",
                         help="read NAME.input_ids, NAME.logits, ... (files holding several references)")
    compare.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                         help="compute dtype of the model (default: float32)")
    compare.set_defaults(run=run_compare)

    perplexity_parser = add_verb(
        "perplexity", "perplexity of a text file (Transformers' or llama.cpp's recipe), or KL against a reference",
        "llama-np perplexity held_out.txt --context 256 --stride 128 --json\n"
        "  llama-np perplexity held_out.txt --recipe llama.cpp --context 128\n"
        "  llama-np perplexity held_out.txt --model model-Q8_0.gguf --kl-divergence model-F32.gguf --context 128",
        [model_option(DEFAULT_MODEL)],
        description="Tokenize FILE once (bos at the start) and score it. --recipe transformers (the "
                    "default) is the sliding window of Transformers' 'Perplexity of fixed-length "
                    "models': windows of --context tokens whose starts are --stride apart, each "
                    "scoring only the tokens no earlier window scored, the window losses weighted as "
                    "that recipe weights them. --recipe llama.cpp is llama.cpp's llama-perplexity: "
                    "non-overlapping chunks of --context tokens (the tokens left over at the end are "
                    "not run), bos replacing each chunk's first token, only the second half of each "
                    "chunk scored; the two recipes give different numbers for the same model. Prints "
                    "the perplexity, the mean negative log-likelihood in nats per token and the "
                    "tokens scored; --json prints them as one JSON object. --kl-divergence REF runs "
                    "llama.cpp's chunks through --model (a quantised file, say) and REF (its "
                    "original) and prints llama.cpp's --kl-divergence summary: both perplexities, "
                    "their ratio and difference, the mean KL(p_REF || p_model) per token, the RMS "
                    "change of the true token's probability and how often both put the same token "
                    "on top.")
    perplexity_parser.add_argument("file", metavar="FILE", help="a UTF-8 text file")
    perplexity_parser.add_argument("--context", type=int, metavar="N",
                                   help="tokens per window or chunk, 2 to max_position_embeddings (default: the smaller "
                                        f"of max_position_embeddings and {DEFAULT_PERPLEXITY_CONTEXT})")
    perplexity_parser.add_argument("--stride", type=int, metavar="N",
                                   help="tokens between window starts, 1 to --context; after the first window every "
                                        "scored token sees at least context - stride tokens before it (default: half "
                                        "the context); transformers recipe only")
    perplexity_parser.add_argument("--recipe", choices=("transformers", "llama.cpp"),
                                   help="how the text is cut into windows (default: transformers; "
                                        "--kl-divergence uses llama.cpp)")
    perplexity_parser.add_argument("--kl-divergence", metavar="REF",
                                   help="the reference model (a path or bundled name, e.g. the float original of "
                                        "--model): print llama.cpp's KL-divergence statistics of --model against it")
    perplexity_parser.add_argument("--json", action="store_true",
                                   help="print {\"perplexity\", \"nll\", \"tokens\", \"recipe\", \"context\", "
                                        "\"stride\"} as JSON (with --kl-divergence, the statistics)")
    perplexity_parser.set_defaults(run=run_perplexity)

    inspect = add_verb(
        "inspect", "summarise a checkpoint: config, parameters, dtypes, sizes, memory",
        "llama-np inspect --model ~/models/TinyLlama-1.1B-Chat-v1.0 --seq-len 2048",
        [model_option(DEFAULT_MODEL)],
        description="Print the config summary, parameter count, storage dtype(s), GQA ratio, RoPE "
                    "type and scaling, bytes on disk, and a rough float32 memory estimate: the "
                    "weights widened to float32 plus the activations of one forward pass over "
                    "--seq-len tokens (key/value cache, one layer's attention and MLP, logits).")
    inspect.add_argument("--seq-len", type=int, metavar="T",
                         help="sequence length for the memory estimate (default: max_position_embeddings)")
    inspect.set_defaults(run=run_inspect)

    dump = add_verb(
        "dump", "save every named activation of a forward pass (golden activations) to an .npz",
        'llama-np dump "ROMEO. But soft" --out golden.npz --names hook_resid_post hook_pattern',
        [model_option(DEFAULT_MODEL)],
        description="Run PROMPT once and save input_ids, attention_mask, logits and every traced "
                    "activation under its TransformerLens-style hook name (hook_embed, "
                    "blocks.{l}.attn.hook_q, blocks.{l}.hook_resid_post, ...; see docs/trace.md), "
                    "as float32. Write the same names from your own implementation, on the same "
                    "input_ids, and 'llama-np diff' finds the first place the two part ways.")
    dump.add_argument("prompt", metavar="PROMPT", help="the text to run; - reads it from stdin")
    dump.add_argument("--out", required=True, metavar="FILE.npz", help="where to save the activations")
    dump.add_argument("--names", nargs="+", metavar="PART",
                      help="keep only hook names containing one of these parts (default: all)")
    dump.set_defaults(run=run_dump)

    diff = add_verb(
        "diff", "compare two activation dumps and name the first divergence (exit 1 if any)",
        "llama-np diff my_port.npz golden.npz --atol 1e-4",
        description="Compare the arrays two .npz dumps share, in the order the forward pass "
                    "computes them, print max |Δ| for each, and name the first one outside the "
                    "tolerance: |a - b| <= ATOL * max(1, |b|). Exit 0 when all agree, 1 otherwise. "
                    "Both dumps must come from the same input_ids.")
    diff.add_argument("first", metavar="A.npz")
    diff.add_argument("second", metavar="B.npz", help="the reference: tolerances scale with its values")
    diff.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                      help=f"tolerance, scaled by max(1, |value|) (default: {DEFAULT_ATOL:g})")
    diff.set_defaults(run=run_diff)

    attention = add_verb(
        "attention", "save a figure of a layer's (or one head's) attention over a prompt",
        'llama-np attention "ROMEO. But soft, what light" --layer 2 --head 1 --out head.png',
        [model_option(DEFAULT_MODEL)],
        description="Run PROMPT and save the attention weights of --layer as a figure: one head's "
                    "pattern with --head, else every head of the layer with the query heads that "
                    "share a key/value head grouped together.")
    attention.add_argument("prompt", metavar="PROMPT", help="the text to run; - reads it from stdin")
    attention.add_argument("--layer", type=int, required=True, metavar="L", help="layer index, from 0")
    attention.add_argument("--head", type=int, metavar="H", help="one query head (default: the whole layer)")
    attention.add_argument("--out", required=True, metavar="FILE.png", help="a .png, .svg or .pdf to write")
    attention.set_defaults(run=run_attention)

    convert = add_verb(
        "convert", "convert Meta's original checkpoint into a Hugging Face directory",
        "llama-np convert ~/llama/llama-2-13b ~/models/Llama-2-13b-hf --dtype float16",
        description="Write META_DIR (Meta's download: params.json, consolidated.NN.pth, "
                    "tokenizer.model) as a Hugging Face directory OUT_DIR, tensor for tensor what "
                    "Transformers' convert_llama_weights_to_hf.py writes: config.json, "
                    "generation_config.json, tokenizer files and safetensors shards of about 5 GB "
                    "with their index. No torch is needed and no pickle is run; tensors are written "
                    "one at a time, so the memory in use is a few tensors. OUT_DIR must be new or "
                    "empty. Progress is shown on a terminal. Meta directories also run as they are: "
                    "pass one to --model of any verb.")
    convert.add_argument("meta_dir", metavar="META_DIR")
    convert.add_argument("out_dir", metavar="OUT_DIR")
    convert.add_argument("--dtype", choices=tuple(OUTPUT_DTYPES),
                         help="dtype of the written weights (default: the stored one; Meta ships "
                              "bfloat16); float16 refuses weights too large for it, by name")
    convert.add_argument("--llama-version", choices=("1", "2"), default="2",
                         help="sets max_position_embeddings, which Meta's files do not record: 2048 "
                              "for Llama 1, 4096 for Llama 2, 16384 if rope_theta > 10000 (Code "
                              "Llama) (default: 2)")
    convert.set_defaults(run=run_convert)

    quantize = add_verb(
        "quantize", "write a checkpoint as a GGUF file for llama.cpp, in float or quantised",
        "llama-np quantize ~/models/Llama-2-7b-hf llama-2-7b-Q8_0.gguf --type Q8_0",
        description="Write MODEL (a Hugging Face or Meta directory, a bundled model name, or a GGUF "
                    "file in a float type) as the GGUF file OUT, byte for byte what llama.cpp "
                    "writes: from a directory as convert_hf_to_gguf.py --outtype (llama.* and "
                    "tokenizer.ggml.* metadata, llama.cpp's tensor names with q/k rows in its RoPE "
                    "layout), from a GGUF file as llama-quantize --pure (the file's own metadata); "
                    "norms in F32 and the matrices in --type, quantised by round-to-nearest as ggml "
                    "does. A "
                    "matrix whose rows are not a multiple of the block size (32 numbers) stays F16, "
                    "as in the converter; the output says which. No torch is needed; tensors are "
                    "encoded one at a time, and OUT appears whole or not at all.")
    quantize.add_argument("model", metavar="MODEL", help="the checkpoint to write (a path or bundled name)")
    quantize.add_argument("out", metavar="OUT.gguf", help="the GGUF file to write (replaced if it exists)")
    quantize.add_argument("--type", choices=WRITTEN_TYPES, default=Q8_0.name,
                          help="type of the matrices (default: Q8_0)")
    quantize.add_argument("--name", help="general.name (default: the source's, else its directory's name)")
    quantize.add_argument("--gptq", metavar="CALIBRATION.txt",
                          help="quantise the linear layers with GPTQ on the inputs they see for this text "
                               "(--type Q4_0 or Q4_1; the file is an ordinary one of that type)")
    quantize.add_argument("--calibration-tokens", type=int, default=512, metavar="N",
                          help="tokens of CALIBRATION.txt to run (default: 512)")
    quantize.add_argument("--act-order", action="store_true",
                          help="GPTQ visits the columns by decreasing input size (act-order)")
    quantize.set_defaults(run=run_quantize)
    return parser
