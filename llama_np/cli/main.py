"""The ``llama-np`` command line (also ``python -m llama_np``).

    llama-np generate PROMPT    stream a continuation; tokens/s for the new tokens on stderr
    llama-np chat               talk to a chat checkpoint in the Llama 2 chat format
    llama-np classify TEXT...   label and probabilities from a sequence classifier
    llama-np logits PROMPT      the most likely next tokens; --out saves the full logits
    llama-np compare REF.npz    run the model on stored input ids and check stored logits
    llama-np perplexity FILE    sliding-window perplexity of a text file (Transformers' recipe)
    llama-np inspect            config, parameter count, dtypes, sizes and memory
    llama-np dump PROMPT        save every named activation (golden activations) to an .npz
    llama-np diff A.npz B.npz   the first activation where two dumps part ways
    llama-np attention PROMPT   save a figure of one head's or one layer's attention
    llama-np convert META OUT   Meta's consolidated.NN.pth checkpoint -> a Hugging Face directory

Every verb takes ``--model NAME_OR_PATH`` (a checkpoint directory in Hugging Face's or Meta's
layout, a bundled model name, or a repo id such as ``meta-llama/Llama-2-7b-hf`` already in the
local Hugging Face cache) and defaults to the bundled ``tiny-shakespeare``
(``tiny-shakespeare-genre`` for classify). A PROMPT of ``-`` is read from stdin.

User mistakes (a missing path, a corrupt file, a bad argument) end with one line
``llama-np: error: ...`` on stderr and exit status 2, never a traceback. ``compare`` and ``diff``
exit with 1 when the numbers differ by more than the tolerance (``compare`` also when nothing
was compared). Ctrl-C exits with 130. Characters stdout's encoding cannot hold are written as
Python escapes (é as \\xe9).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import math
import os
import re
import sys
import textwrap
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

import llama_np
from llama_np import layers
from llama_np.formats.files import atomic_write
from llama_np.formats.locate import resolve_model_path
from llama_np.formats.convert import OUTPUT_DTYPES, convert_meta_checkpoint
from llama_np.errors import InputError, LlamaNPError
from llama_np.formats.model_files import open_model_files
from llama_np.model import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel
from llama_np.perplexity import perplexity, read_text_file, sliding_windows
from llama_np.weights.memory import keep_widened_limit, streamed_widened_budget
from llama_np.text.tokenizer import LlamaTokenizer
from llama_np.text.streaming import TextStreamer
from llama_np.interp.hooks import forward_order, hook_names

DEFAULT_MODEL = "tiny-shakespeare"
DEFAULT_CLASSIFIER = "tiny-shakespeare-genre"
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_ATOL = 1e-4
# The classify example in --help: lines from two plays the bundled classifier never saw (Twelfth
# Night, Henry V), with the genre it gives them; tests/test_cli.py checks that it still does.
CLASSIFY_EXAMPLES = (("DUKE.\nIf music be the food of love, play on", "comedy"),
                     ("KING HENRY.\nOnce more unto the breach, dear friends, once more;", "history"))

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A bad command-line argument; reported as one line with exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument raises UsageError instead of printing usage and exiting.

    argparse's own report is the usage text plus a line; ``main`` prints just one line.
    """

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


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


# ============================================================================================
# loading
# ============================================================================================


def model_class_for(name_or_path):
    """The model class a checkpoint holds, read from its tensor names (not from config.json,
    whose ``architectures`` field is optional): ``score.weight`` means a sequence classifier,
    ``lm_head.weight`` or tied embeddings a causal LM, neither a bare ``LlamaModel``."""
    config, checkpoint = open_model_files(name_or_path)
    if "score.weight" in checkpoint:
        return LlamaForSequenceClassification
    if "lm_head.weight" in checkpoint or config.tie_word_embeddings:
        return LlamaForCausalLM
    return LlamaModel


def require_model_class(name_or_path, wanted, verb: str) -> None:
    """UsageError naming the verb that fits when a checkpoint holds another kind of model.

    Loading a classifier as a causal LM would otherwise fail on a missing ``lm_head.weight``,
    true but no help to someone who picked the wrong verb.
    """
    found = model_class_for(name_or_path)
    if found is wanted:
        return
    if found is LlamaForSequenceClassification:
        raise UsageError(f"{name_or_path} is a sequence classifier (LlamaForSequenceClassification: a "
                         f"score.weight head, no lm_head.weight), so '{verb}' cannot use it; "
                         "'llama-np classify' is the verb for it")
    if found is LlamaForCausalLM:
        raise UsageError(f"{name_or_path} is a causal language model (LlamaForCausalLM: no score.weight "
                         f"head), so '{verb}' cannot use it; 'llama-np generate' or 'llama-np logits' is "
                         "the verb for it")
    raise UsageError(f"{name_or_path} holds a bare LlamaModel (neither lm_head.weight nor score.weight, "
                     f"embeddings not tied), so '{verb}' has no head to use; 'llama-np dump' and "
                     "'llama-np inspect' work on it")


def plural(count: int, word: str) -> str:
    """'1 token', '2 tokens', '0 tokens'."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def read_stdin(what: str, one_line: bool = False) -> str:
    """All of stdin (or its next line) as text, for ``what`` ("the prompt"); a closed or
    undecodable stdin is an InputError rather than a crash."""
    if sys.stdin is None:
        raise InputError(f"cannot read {what} from stdin: stdin is closed")
    try:
        return sys.stdin.readline() if one_line else sys.stdin.read()
    except UnicodeDecodeError as error:
        raise InputError(f"cannot read {what} from stdin: it is not {error.encoding} text ({error.reason} "
                         f"at byte {error.start}); set PYTHONIOENCODING=utf-8") from None


def prompt_text(args) -> str:
    """The PROMPT argument; ``-`` reads it from stdin, less one final newline: the one ``echo``
    or an editor adds, which the user did not mean as part of the prompt (stdin is read in text
    mode, so a Windows line end arrives as "\\n" too)."""
    if args.prompt != "-":
        return args.prompt
    text = read_stdin("the prompt")
    return text[:-1] if text.endswith("\n") else text


# ============================================================================================
# generate and chat
# ============================================================================================


def sampling_settings(args) -> dict:
    """generate() keyword arguments from the sampling options; None = the checkpoint's default.

    Giving any sampling option turns sampling on; ``--greedy`` turns it off and cannot be
    combined with them (they would be silently ignored). Every option is checked here, before
    anything is printed, so an error names the flag rather than generate()'s argument.
    """
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    given = [f"--{name.replace('_', '-')}" for name, value in sampling.items() if value is not None]
    if args.greedy and given:
        raise UsageError(f"--greedy picks the most likely token; it cannot be combined with {', '.join(given)}")
    check_sampling_options(args)
    do_sample = False if args.greedy else (True if given else None)
    return dict(max_new_tokens=args.max_new_tokens, do_sample=do_sample,
                repetition_penalty=args.repetition_penalty, seed=args.seed, **sampling)


def check_sampling_options(args) -> None:
    """UsageError naming the first generation flag that generate() could not use."""
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UsageError(f"--temperature must be a finite number > 0, got {args.temperature:g}; "
                         "for greedy decoding use --greedy")
    if args.top_k is not None and args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 turns the top-k limit off), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:  # False for NaN too
        raise UsageError(f"--top-p must be in (0, 1] (1 keeps every token), got {args.top_p:g}")
    penalty = args.repetition_penalty
    if penalty is not None and not (math.isfinite(penalty) and penalty > 0):
        raise UsageError(f"--repetition-penalty must be a finite number > 0 (1 means no penalty), got {penalty:g}")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")


class EchoingStreamer(TextStreamer):
    """A TextStreamer that prints ``echo`` (the prompt as typed) when generate() hands it the
    prompt ids. generate() does so only after checking every setting, so a setting it refuses
    (say, from generation_config.json) is reported before any output, not after the prompt."""

    def __init__(self, tokenizer, echo: str | None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.echo = echo

    def put(self, token_ids) -> str:
        if self.echo is not None:
            print(self.echo, end="", flush=True)
            self.echo = None
        return super().put(token_ids)


def stream_continuation(model, tokenizer, prompt_ids: list[int], settings: dict, stats: dict,
                        echo: str | None = None) -> list[int]:
    """Generate after ``prompt_ids`` and print ``echo`` then the new text as it comes; return
    the new ids.

    The streamer is first given the prompt (printing only ``echo``) so that each new piece is
    decoded as part of the whole sequence: a word decoded alone would lose its leading space
    (docs/reference.md §5.3).
    """
    streamer = EchoingStreamer(tokenizer, echo)
    sequences = model.generate(np.array([prompt_ids], dtype=np.int64), streamer=streamer,
                               stats=stats, **settings)
    return [int(i) for i in sequences[0, len(prompt_ids):]]


def speed_report(stats: dict, prompt_length: int) -> str:
    """Generation speed over the new tokens only, as llama.cpp reports its eval rate.

    The pass over the prompt also yields the first new token, so the rate is the cached decode
    steps after it divided by their time; the prompt pass is reported apart.
    """
    steps, seconds = stats["decode_steps"], stats["decode_seconds"]
    rate = f"{steps / seconds:.1f} tokens/s" if steps and seconds > 0 else "- tokens/s"
    return (f"{plural(stats['new_tokens'], 'new token')}; {rate} over the {plural(steps, 'step')} after the "
            f"first (prompt of {plural(prompt_length, 'token')} read in {stats['prompt_seconds']:.2f} s, "
            "not counted)")


def check_checkpoint_temperature(model, settings: dict, name_or_path) -> None:
    """A generation_config.json may hold temperature 0, harmless while it decodes greedily; a
    sampling flag other than --temperature turns sampling on and would then use it."""
    defaults = model.generation_config
    sampling = defaults.do_sample if settings["do_sample"] is None else settings["do_sample"]
    temperature = defaults.temperature
    usable = isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0
    if sampling and settings["temperature"] is None and not usable:
        raise UsageError(f"sampling needs a temperature > 0, and the generation_config.json of {name_or_path} "
                         f"has temperature {temperature!r}; give --temperature too")


def load_for_generation(args, verb: str, settings: dict):
    """The causal LM and tokenizer for generate and chat, refused before any output when the
    checkpoint is of another kind or its defaults cannot serve the sampling flags."""
    require_model_class(args.model, LlamaForCausalLM, verb)
    model, tokenizer = LlamaForCausalLM.from_pretrained(args.model), LlamaTokenizer.from_pretrained(args.model)
    check_checkpoint_temperature(model, settings, args.model)
    return model, tokenizer


def run_generate(args) -> int:
    settings = sampling_settings(args)
    model, tokenizer = load_for_generation(args, "generate", settings)
    prompt = prompt_text(args)
    prompt_ids = tokenizer.encode(prompt)
    stats: dict = {}
    stream_continuation(model, tokenizer, prompt_ids, settings, stats, echo=prompt)
    print(speed_report(stats, len(prompt_ids)), file=sys.stderr)
    return EXIT_OK


CHAT_EXIT_WORDS = ("exit", "quit")


def warn_without_chat_template(tokenizer, name_or_path) -> None:
    """Warn when a model with no chat_template gets the Llama 2 format without being a Llama 2
    chat model (judged by its name or path, e.g. meta-llama/Llama-2-7b-chat-hf)."""
    if tokenizer.chat_template is not None:
        return
    names = f"{name_or_path} {resolve_model_path(name_or_path)}".lower()
    if re.search(r"llama-?2[^/]*chat", names):
        return
    warnings.warn(f"{name_or_path} has no chat_template in its tokenizer_config.json and is not a "
                  "Llama 2 chat model; the conversation is written in Llama 2's [INST] format, "
                  "which this model may not have been trained on")


def run_chat(args) -> int:
    """Read one user turn per line from stdin; answer each with the whole dialog as context.

    The dialog is written by the tokenizer's ``apply_chat_template``: in the model's own
    ``chat_template`` from tokenizer_config.json when it has one, else in Meta's Llama 2 format
    (``<s>[INST] <<SYS>>…<</SYS>> user [/INST] answer </s><s>[INST] …``), with one warning when
    the model is not a Llama 2 chat model. The session ends at end of input, an empty line, or
    "exit" / "quit".
    """
    settings = sampling_settings(args)
    if sys.stdin is None:
        raise InputError("chat reads one message per line from stdin, and stdin is closed; run it in a "
                         "terminal or give it input (a pipe or a file)")
    model, tokenizer = load_for_generation(args, "chat", settings)
    warn_without_chat_template(tokenizer, args.model)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message; an empty line, 'exit' or Ctrl-D ends the chat.", file=sys.stderr)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = read_stdin("a message", one_line=True)
        text = line.strip()
        if not line or not text or text.lower() in CHAT_EXIT_WORDS:
            return EXIT_OK
        messages.append({"role": "user", "content": text})
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        stats: dict = {}
        new_ids = stream_continuation(model, tokenizer, prompt_ids, settings, stats)
        print(speed_report(stats, len(prompt_ids)), file=sys.stderr)
        answer = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": answer})


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


def label_names(config) -> list[str]:
    if config.id2label:
        return [config.id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]
    return [f"LABEL_{i}" for i in range(config.num_labels)]


def run_classify(args) -> int:
    require_model_class(args.model, LlamaForSequenceClassification, "classify")
    model = LlamaForSequenceClassification.from_pretrained(args.model)
    tokenizer = LlamaTokenizer.from_pretrained(args.model)
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
            probabilities = softmax(row)
            label = names[int(np.argmax(row))]
        shown = ", ".join(f"{name} {p:.3f}" for name, p in zip(names, probabilities))
        print(f"{label}\t({shown})\t{shorten(text)}")
    return EXIT_OK


def shorten(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def softmax(z: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, computed in float64 for printing."""
    return layers.softmax(np.asarray(z, dtype=np.float64))


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
    model, tokenizer = LlamaForCausalLM.from_pretrained(args.model), LlamaTokenizer.from_pretrained(args.model)
    input_ids = np.array([tokenizer.encode(prompt)], dtype=np.int64)  # (1, T)
    logits = model(input_ids).logits  # (1, T, V)
    last = logits[0, -1].astype(np.float64)  # (V,)
    probabilities = softmax(last)
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


def check_output_path(path: Path) -> None:
    """Refuse a bad --out before the model runs rather than after."""
    if path.suffix != ".npz":
        raise UsageError(f"--out must name a .npz file, got {path}")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: the directory {path.parent} does not exist")


def save_npz(path: Path, **arrays) -> None:
    """np.savez through ``atomic_write`` (a temporary file beside ``path``, then a rename)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, [buffer.getvalue()])


# ============================================================================================
# compare
# ============================================================================================


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file (a zip archive of NAME.npy members), each checked before it
    is read.

    An .npy header declares a shape and a dtype, and NumPy allocates that much before it reads
    any data: a 200-byte file declaring (1, 3, 2**40) would ask for terabytes. So each member's
    declared size must equal the bytes it holds (the zip's uncompressed size, ``file_size``),
    and all the arrays together must fit in ``npz_size_limit()`` -- a member that inflates from
    a few bytes to terabytes (a deflate bomb) is refused on its declared size, before reading.
    Pickled object arrays are refused (allow_pickle=False): loading one could run code.
    """
    if not path.is_file():
        raise InputError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            start = f.read(len(NPY_MAGIC))
        if start == NPY_MAGIC:
            raise InputError(f"{path} holds a single array, not an .npz archive of named arrays")
        raise InputError(f"{path} is not an .npz file: an .npz is a zip archive of .npy arrays, and this "
                         "file is not a zip archive")
    try:
        with zipfile.ZipFile(path) as archive:
            sizes = {info.filename: npy_member_size(path, archive, info) for info in archive.infolist()}
            total, limit = sum(sizes.values()), npz_size_limit()
            if total > limit:
                largest = max(sizes, key=sizes.get)
                raise InputError(f"{path}: its arrays would take {human_bytes(total)} in memory (the largest, "
                                 f"{largest.removesuffix('.npy')}, {human_bytes(sizes[largest])}), more than "
                                 f"the {human_bytes(limit)} read from one file (half the memory available "
                                 "now, at least 2 GiB)")
            arrays = {}
            for member in sizes:
                with archive.open(member) as f:
                    arrays[member.removesuffix(".npy")] = np.lib.format.read_array(f, allow_pickle=False)
            return arrays
    except InputError:
        raise
    except (ValueError, OSError, EOFError, NotImplementedError, zipfile.BadZipFile, zlib.error) as error:
        raise InputError(f"{path} is not a readable .npz file: {error}") from None


NPY_MAGIC = b"\x93NUMPY"


def npz_size_limit() -> int:
    """The most bytes read_npz loads from one file: half the memory available now, at least
    2 GiB -- the rule that decides whether widened weights are kept (``keep_widened_limit``)."""
    return keep_widened_limit()


def npy_member_size(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """The bytes one .npz member's array takes, from its .npy header alone; InputError naming
    the file and the array when the header is unreadable, asks for a pickle, or declares more
    (or less) data than the member holds."""
    name = info.filename.removesuffix(".npy")
    if not info.filename.endswith(".npy"):
        raise InputError(f"{path}: member {info.filename} is not an .npy array (an .npz holds NAME.npy members)")
    if info.flag_bits & 0x1:
        raise InputError(f"{path}: array {name} is encrypted")
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with archive.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version not in readers:
                raise InputError(f"{path}: array {name} is in .npy format version {version[0]}.{version[1]}; "
                                 "only 1.0 and 2.0 are read (3.0 only adds Unicode field names)")
            shape, _, dtype = readers[version](f)
        except InputError:
            raise
        except ValueError as error:
            raise InputError(f"{path}: array {name} has no readable .npy header: {error}") from None
        header_bytes = f.tell()
    if any(n < 0 for n in shape):
        raise InputError(f"{path}: array {name} declares a negative size in its shape {shape}")
    if dtype.hasobject:
        raise InputError(f"{path}: array {name} holds Python objects, stored as a pickle; refused, since "
                         "loading a pickle can run code (allow_pickle=False)")
    declared = math.prod(shape) * dtype.itemsize
    held = info.file_size - header_bytes
    if declared != held:
        raise InputError(f"{path}: array {name} declares shape {shape} {dtype} ({human_bytes(declared)}) but "
                         f"holds {held:,} bytes of data; the file is damaged or was not written by NumPy")
    return max(declared, math.prod(shape))  # a zero-size dtype still costs per element


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
    model = model_class.from_pretrained(args.model, dtype=dtype)
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
# perplexity
# ============================================================================================

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
    model, tokenizer = LlamaForCausalLM.from_pretrained(args.model), LlamaTokenizer.from_pretrained(args.model)
    input_ids = tokenizer.encode(text)  # bos once, at the start
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


# ============================================================================================
# inspect
# ============================================================================================


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def activation_bytes(config, length: int, head_width: int, itemsize: int = 4) -> dict[str, int]:
    """A rough peak of what one forward pass over ``length`` tokens (batch 1) holds besides the
    weights: the key/value cache of every layer, one layer's attention scores and weights, one
    layer's MLP intermediates, a few (T, D) residual-stream arrays, and the head's output
    (T, head_width): the logits over the vocabulary, or the per-position class scores."""
    T, D, I, V = length, config.hidden_size, config.intermediate_size, head_width
    H, KV, hd, L = (config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                    config.num_hidden_layers)
    return {
        "key/value cache": 2 * L * KV * hd * T * itemsize,
        "attention scores + weights (one layer)": 2 * H * T * T * itemsize,
        "MLP gate, up, product (one layer)": 3 * T * I * itemsize,
        "hidden states (a few T x D)": 4 * T * D * itemsize,
        ("logits (T x V)" if head_width == config.vocab_size else "class scores (T x labels)"): T * V * itemsize,
    }


def run_inspect(args) -> int:
    if args.seq_len is not None and args.seq_len < 1:
        raise UsageError(f"--seq-len must be at least 1, got {args.seq_len}")
    model_class = model_class_for(args.model)
    model = model_class.from_pretrained(args.model)
    classifier = model_class is LlamaForSequenceClassification
    print(f"model            {args.model} ({model.checkpoint.directory})")
    print(f"class            {model_class.__name__}")
    print(f"layout           {model.checkpoint.layout}")
    print_architecture(model.config, classifier)
    parameters = model.num_parameters()
    print(f"parameters       {parameters:,}")
    print_storage(model.checkpoint)
    length = model.config.max_position_embeddings if args.seq_len is None else args.seq_len
    half_precision = any(dtype in ("F16", "BF16") for dtype in model.checkpoint.storage_dtypes)
    print_memory(model.config, parameters, model.checkpoint.nbytes, length, classifier, half_precision)
    return EXIT_OK


def print_architecture(config, classifier: bool) -> None:
    print(f"layers           {config.num_hidden_layers}")
    print(f"hidden size      {config.hidden_size} (MLP intermediate {config.intermediate_size}, SwiGLU)")
    print(f"heads            {config.num_attention_heads} query, {config.num_key_value_heads} key/value, "
          f"head_dim {config.head_dim}")
    gqa = config.num_key_value_groups
    kind = ("multi-head attention" if gqa == 1 else
            "multi-query attention" if config.num_key_value_heads == 1 else "grouped-query attention")
    print(f"GQA ratio        {gqa}:1 ({plural(gqa, 'query head')} per key/value head; {kind})")
    print(f"vocabulary       {config.vocab_size}")
    print(f"max positions    {config.max_position_embeddings}")
    rope = dict(config.rope_parameters)
    rope_type, theta = rope.pop("rope_type"), rope.pop("rope_theta")
    scaling = ", ".join(f"{k}={v}" for k, v in rope.items()) or "none"
    print(f"RoPE             type {rope_type}, theta {theta:g}, scaling: {scaling}")
    print(f"rms_norm_eps     {config.rms_norm_eps:g}")
    print(f"tied embeddings  {config.tie_word_embeddings}; attention bias {config.attention_bias}; "
          f"MLP bias {config.mlp_bias}")
    print(f"token ids        bos {config.bos_token_id}, eos {config.eos_token_id}, pad {config.pad_token_id}")
    if classifier:
        print(f"labels           {', '.join(label_names(config))} (problem type {config.problem_type or 'inferred'})")


def print_storage(checkpoint) -> None:
    counts: dict[str, int] = {}
    for tensor in checkpoint.tensors.values():
        counts[tensor.dtype] = counts.get(tensor.dtype, 0) + 1
    dtypes = ", ".join(f"{name} ({plural(n, 'tensor')})" for name, n in sorted(counts.items()))
    print(f"storage dtype    {dtypes}")
    file_bytes = sum(Path(f).stat().st_size for f in checkpoint.files)
    files = len(checkpoint.files)
    print(f"bytes on disk    {human_bytes(file_bytes)} ({file_bytes:,} bytes in "
          f"{plural(files, 'file')}; tensor data {checkpoint.nbytes:,})")


def print_memory(config, parameters: int, stored_bytes: int, length: int, classifier: bool,
                 half_precision: bool) -> None:
    """The float32 weights plus ``activation_bytes``; a rough guide, not a measurement."""
    weights = parameters * 4
    head_width = config.num_labels if classifier else config.vocab_size
    activations = activation_bytes(config, length, head_width)
    print(f"memory (float32) about {human_bytes(weights + sum(activations.values()))} for one sequence of "
          f"{plural(length, 'token')}, batch 1:")
    print(f"  {'weights widened to float32':<40} {human_bytes(weights)}")
    for name, size in activations.items():
        print(f"  {name:<40} {human_bytes(size)}")
    limit = keep_widened_limit()
    if weights > limit and half_precision:
        budget = streamed_widened_budget(stored_bytes)
        print(f"  (above {human_bytes(limit)}, half the memory available now, so not all kept widened: up to "
              f"{human_bytes(budget)} of the float16/bfloat16 matrices are, the rest are streamed from the "
              f"{human_bytes(stored_bytes)} memory-mapped file and widened tile by tile where they are used; "
              "private memory is then about that budget plus the activations, see docs/checkpoints.md)")
    print("  rough estimate: NumPy temporaries and the Python process itself are not counted")


# ============================================================================================
# the parser
# ============================================================================================


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
    model, tokenizer = model_class.from_pretrained(args.model), LlamaTokenizer.from_pretrained(args.model)
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
    model, tokenizer = model_class.from_pretrained(args.model), LlamaTokenizer.from_pretrained(args.model)
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


def build_parser() -> ArgumentParser:
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

    def add_verb(name, help, example, parents=(), description=None):
        return verbs.add_parser(
            name, help=help, description=description or help, parents=list(parents),
            epilog="example:\n  " + example, formatter_class=HelpFormatter)

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
        "chat", "chat in the Llama 2 chat format, one message per line of input",
        'llama-np chat --model ~/models/Llama-2-7b-chat-hf --system "Answer in one sentence."',
        [model_option(DEFAULT_MODEL), sampling],
        description="Chat with a chat checkpoint in Meta's Llama 2 format ([INST] ... [/INST]). "
                    "Each line read from stdin is one user message; the whole dialog is the "
                    "context of each answer. An empty line, 'exit', 'quit' or end of input stops.")
    chat.add_argument("--system", metavar="TEXT", help="a system prompt (<<SYS>> ... <</SYS>>)")
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
        "perplexity", "perplexity of a text file, with a sliding window over the tokens",
        "llama-np perplexity held_out.txt --context 256 --stride 128 --json",
        [model_option(DEFAULT_MODEL)],
        description="Tokenize FILE once (bos at the start) and score it with the sliding window of "
                    "Transformers' 'Perplexity of fixed-length models': windows of --context tokens "
                    "whose starts are --stride apart, each scoring only the tokens no earlier window "
                    "scored, the window losses weighted as that recipe weights them. Prints the "
                    "perplexity, the mean negative log-likelihood in nats per token and the tokens "
                    "scored; --json prints them as one JSON object. The check to run after "
                    "converting or quantising a checkpoint: compare with the same command on the "
                    "original, or with the recipe run in Transformers.")
    perplexity_parser.add_argument("file", metavar="FILE", help="a UTF-8 text file")
    perplexity_parser.add_argument("--context", type=int, metavar="N",
                                   help="tokens per window, 2 to max_position_embeddings (default: the smaller "
                                        f"of max_position_embeddings and {DEFAULT_PERPLEXITY_CONTEXT})")
    perplexity_parser.add_argument("--stride", type=int, metavar="N",
                                   help="tokens between window starts, 1 to --context; after the first window every "
                                        "scored token sees at least context - stride tokens before it (default: half "
                                        "the context)")
    perplexity_parser.add_argument("--json", action="store_true",
                                   help="print {\"perplexity\", \"nll\", \"tokens\", \"context\", \"stride\"} as JSON")
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
        "llama-np diff golden.npz my_port.npz --atol 1e-4",
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
    return parser


# ============================================================================================
# convert
# ============================================================================================


def run_convert(args) -> int:
    """Meta's layout -> Hugging Face's (``llama_np.formats.convert.convert_meta_checkpoint``)."""
    result = convert_meta_checkpoint(args.meta_dir, args.out_dir, dtype=args.dtype,
                                     llama_version=args.llama_version)
    files = len(result.weight_files)
    print(f"wrote {result.tensors} tensors ({human_bytes(result.bytes)}, "
          f"{', '.join(sorted(result.dtypes))}) in {files} safetensors file{'s' if files != 1 else ''}, "
          f"with config.json, generation_config.json and the tokenizer, to {result.directory} "
          f"in {result.seconds:.1f} s")
    return EXIT_OK


# ============================================================================================
# main
# ============================================================================================


def _warning_printer():
    """showwarning that prints ``llama-np: warning: ...`` once per place in the code.

    A warning raised at every generation step (e.g. "the sequence reaches position N, past
    max_position_embeddings") would otherwise fill the terminal with one line per token.
    """
    seen = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if (filename, lineno) not in seen:
            seen.add((filename, lineno))
            print(f"llama-np: warning: {message}", file=sys.stderr)

    return show


def main(argv=None) -> int:
    """Run one ``llama-np`` command; returns the exit status."""
    with escapes_for_unencodable_output():
        return _run(argv)


@contextlib.contextmanager
def escapes_for_unencodable_output():
    """Write what stdout's encoding cannot hold as Python escapes (é -> \\xe9), as Python
    already does on stderr, instead of failing.

    With an ASCII-only stdout (PYTHONIOENCODING=ascii, a C locale, some pipes) a prompt or a
    generated word with an accent would otherwise end the command in UnicodeEncodeError half
    way through its output. The stream's own setting is restored afterwards: ``main`` can be
    called from Python.
    """
    stream = sys.stdout
    if getattr(stream, "errors", None) != "strict" or not hasattr(stream, "reconfigure"):
        yield
        return
    stream.reconfigure(errors="backslashreplace")
    try:
        yield
    finally:
        try:
            stream.reconfigure(errors="strict")
        except (OSError, ValueError):  # a closed or broken stream: nothing left to write anyway
            pass


def _run(argv) -> int:
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer()
            args = build_parser().parse_args(argv)
            return args.run(args)
    except SystemExit as exit_request:  # --help and --version
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_OK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        _silence_stdout()
        return EXIT_FAILED
    except (UsageError, LlamaNPError) as error:
        return _fail(str(error))
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        return _fail(f"{where}{error.strerror or error}")


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's final flush does not fail a second time."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _fail(message: str) -> int:
    first_line = " ".join(message.split())  # one line, whatever the message held
    print(f"llama-np: error: {first_line}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
