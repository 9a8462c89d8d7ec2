"""What several ``llama-np`` verbs share: the default models, exit statuses, UsageError,
loading a checkpoint as the model class it holds, and reading the prompt.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llama_np.cli.progress import LayerProgress
from llama_np.errors import InputError
from llama_np.formats.model_files import open_model_files
from llama_np.model import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel
from llama_np.text.tokenizer import LlamaTokenizer

DEFAULT_MODEL = "tiny-shakespeare"
DEFAULT_CLASSIFIER = "tiny-shakespeare-genre"
DEFAULT_ATOL = 1e-4

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A bad command-line argument; reported as one line with exit status 2."""


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


def load_model(model_class, name_or_path, **options):
    """``model_class.from_pretrained(name_or_path, **options)`` with a terminal bar for passes
    over the layers that take seconds (``progress.LayerProgress``)."""
    return model_class.from_pretrained(name_or_path, progress=LayerProgress(), **options)


def load_with_tokenizer(model_class, name_or_path):
    """The model (see ``load_model``) and its tokenizer."""
    return load_model(model_class, name_or_path), LlamaTokenizer.from_pretrained(name_or_path)


def label_names(config) -> list[str]:
    """A classifier's label names by index, ``LABEL_i`` where config.json names none."""
    if config.id2label:
        return [config.id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]
    return [f"LABEL_{i}" for i in range(config.num_labels)]


# ============================================================================================
# input and output
# ============================================================================================


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


def check_output_path(path: Path) -> None:
    """Refuse a bad --out before the model runs rather than after."""
    if path.suffix != ".npz":
        raise UsageError(f"--out must name a .npz file, got {path}")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: the directory {path.parent} does not exist")


def plural(count: int, word: str) -> str:
    """'1 token', '2 tokens', '0 tokens'."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def shorten(text: str, width: int = 60) -> str:
    """``text`` on one line, cut to ``width`` characters with '...'."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."
