"""Perplexity of a long text with a sliding window, as Transformers documents it.

A model with a context of ``context`` tokens cannot score a longer text in one pass. The text is
cut into windows of ``context`` tokens whose starts are ``stride`` apart; each window is run
once, and only its tokens that no earlier window scored count (the labels of the overlap are
−100), so a scored token sees at least ``context − stride`` tokens before it. This is the recipe
of "Perplexity of fixed-length models" in the Transformers documentation
(https://huggingface.co/docs/transformers/perplexity), and what llama.cpp's ``perplexity``
command is checked against after converting or quantising a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llama_np.errors import InputError
from llama_np.formats.files import read_bytes
from llama_np.inputs import is_integer

IGNORE_INDEX = -100  # a label the loss skips, as in Transformers

# The largest text perplexity reads: 256 MiB is about 60 million tokens, days of scoring here.
MAX_TEXT_BYTES = 256 * 1024**2


@dataclass(frozen=True)
class PerplexityResult:
    """perplexity = exp(nll); nll in nats per token; tokens = the weights summed (see ``perplexity``)."""

    perplexity: float
    nll: float
    tokens: int


@dataclass(frozen=True)
class Window:
    """input_ids[begin:end] is run; its last ``targets`` labels are kept, the rest are −100.
    ``loss_tokens`` (targets − 1) is the weight the recipe gives the window's mean loss."""

    begin: int
    end: int
    targets: int

    @property
    def loss_tokens(self) -> int:
        return self.targets - 1


def sliding_windows(length: int, context: int, stride: int) -> list[Window]:
    """The windows of the documented recipe over a text of ``length`` tokens.

        for begin in range(0, length, stride):
            end = min(begin + context, length)
            targets = end - previous_end       # the tokens no earlier window reached
            ...
            if end == length: stop

    The last window may be shorter than ``context`` and than ``stride``.
    """
    windows, previous_end = [], 0
    for begin in range(0, length, stride):
        end = min(begin + context, length)
        windows.append(Window(begin, end, end - previous_end))
        previous_end = end
        if end == length:
            break
    return windows


def perplexity(model, input_ids, context: int, stride: int, progress=None) -> PerplexityResult:
    """Perplexity of one token sequence under a causal LM, with the sliding window of the
    Transformers documentation.

    input_ids: (T,) or (1, T), the whole text tokenized once (bos only at the start).
    context: tokens per window, 2 <= context. stride: 1 <= stride <= context.
    progress: optional ``progress(windows_done, windows_total)``, called after each window.

    For each window w (``sliding_windows``) with labels −100 on all but its last targets_w
    tokens, loss_w = model(window, labels=labels).loss — the mean next-token NLL over the
    labels the shift keeps — and

        nll = Σ_w loss_w · (targets_w − 1) / Σ_w (targets_w − 1),   perplexity = exp(nll),
        tokens = Σ_w (targets_w − 1) = T − number of windows.

    The weight targets_w − 1 is the recipe's: the loss shifts the labels left by one, so the
    first window's first token is never scored and that window's mean is over targets_w − 1
    tokens. In a window that overlaps the previous one, though, every kept label has a logit
    before it and the mean is over targets_w tokens, still weighted by targets_w − 1. The
    result is therefore not the plain mean over the scored tokens; it is what the documented
    recipe prints, to which llama_np is compared. Windows whose weight is 0 are skipped: the
    recipe multiplies their loss by 0, which is NaN for a one-token window with no overlap.
    """
    ids = _check_sequence(input_ids)
    _check_window(context, stride)
    windows = sliding_windows(ids.shape[1], context, stride)
    nll_sum, weight_sum = 0.0, 0
    for done, window in enumerate(windows, start=1):
        if window.loss_tokens > 0:
            window_ids = ids[:, window.begin:window.end]  # (1, end - begin)
            labels = window_ids.copy()
            labels[:, : window_ids.shape[1] - window.targets] = IGNORE_INDEX
            loss = model(window_ids, labels=labels).loss
            nll_sum += loss * window.loss_tokens
            weight_sum += window.loss_tokens
        if progress is not None:
            progress(done, len(windows))
    nll = nll_sum / weight_sum
    # exp of a mean NLL above ~709 nats is beyond a float: inf, as torch.exp gives it
    return PerplexityResult(perplexity=math.exp(nll) if nll < math.log(np.finfo(np.float64).max) else math.inf,
                            nll=nll, tokens=weight_sum)


# A long text is tokenized this many characters at a time (at a line boundary): one encode
# of a 50 MB text took 2.8 GB and 90 s here, and a 100 MB one ran out of memory.
ENCODE_PIECE_CHARACTERS = 1024**2


def encode_long_text(tokenizer, text: str, piece_characters: int = ENCODE_PIECE_CHARACTERS,
                     progress=None) -> np.ndarray:
    """``tokenizer.encode(text)`` (bos once, at the start) for a text of any length, in pieces.

    The text is cut after a newline followed by the start of a new line of text (a letter,
    not a space or another newline), every ``piece_characters`` or so. Each later piece is
    encoded as a continuation: ``encode("\n" + piece)`` without special tokens, less the ids of
    "\n" alone, so that no dummy prefix or bos appears mid-text. Each cut is checked: the last
    line before it and the first line after it, encoded whole, must give the same ids as
    encoded apart; where they do not, the two pieces are encoded together. The ids are the
    whole-text encode's. ``progress(done_characters, total_characters)`` is told after each
    piece. Returns int64 ids (T,).
    """
    if len(text) <= piece_characters:
        return np.asarray(tokenizer.encode(text), dtype=np.int64)
    pieces = _line_pieces(text, piece_characters)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    parts, merged, done = [], pieces[0], 0
    for piece in pieces[1:]:
        if _cut_is_exact(tokenizer, merged, piece, newline):
            parts.append(_encode_piece(tokenizer, merged, newline, first=not parts))
            done += len(merged)
            merged = piece
            if progress is not None:
                progress(done, len(text))
        else:
            merged += piece
    parts.append(_encode_piece(tokenizer, merged, newline, first=not parts))
    if progress is not None:
        progress(len(text), len(text))
    return np.concatenate(parts)


def _line_pieces(text: str, piece_characters: int) -> list[str]:
    """The text cut, every ``piece_characters`` or so, just after "\n" where a new line starts
    with a character that is neither whitespace nor a newline."""
    pieces, start = [], 0
    while len(text) - start > piece_characters:
        position = start + piece_characters
        while True:
            position = text.find("\n", position)
            if position < 0 or position + 1 >= len(text):
                break
            if not text[position + 1].isspace():
                break
            position += 1
        if position < 0 or position + 1 >= len(text):
            break
        pieces.append(text[start:position + 1])
        start = position + 1
    pieces.append(text[start:])
    return pieces


def _encode_piece(tokenizer, piece: str, newline: list[int], first: bool) -> np.ndarray:
    if first:
        return np.asarray(tokenizer.encode(piece), dtype=np.int64)
    ids = tokenizer.encode("\n" + piece, add_special_tokens=False)
    return np.asarray(ids[len(newline):], dtype=np.int64)


def _cut_is_exact(tokenizer, before: str, after: str, newline: list[int]) -> bool:
    """Whether encoding across the cut between ``before`` (ending in "\n") and ``after`` gives
    the ids of the two sides encoded apart, on the lines on either side of it."""
    last_line = before[before.rfind("\n", 0, len(before) - 1) + 1:]
    first_line = after[:after.find("\n") + 1] if "\n" in after else after
    whole = tokenizer.encode("\n" + last_line + first_line, add_special_tokens=False)
    left = tokenizer.encode("\n" + last_line, add_special_tokens=False)
    right = tokenizer.encode("\n" + first_line, add_special_tokens=False)
    return (whole[:len(newline)] == newline and left[:len(newline)] == newline
            and right[:len(newline)] == newline and whole == left + right[len(newline):])


def read_text_file(path, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The whole of a UTF-8 text file, exactly as stored (no newline translation).

    InputError naming the file when it is missing, unreadable, not a regular file (a FIFO, a
    device: refused rather than waited on or read for ever), larger than ``max_bytes``, empty
    or not UTF-8.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    data = read_bytes(path, InputError, max_bytes)
    if not data:
        raise InputError(f"{path} is empty: there is no text to score")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{path} is not UTF-8 text: byte {error.start} is {data[error.start]:#04x}") from None


def _check_sequence(input_ids) -> np.ndarray:
    """One sequence of at least 2 token ids as an int64 (1, T) array."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise InputError(f"input_ids must be one sequence, (T,) or (1, T), got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"input_ids must be integers, got dtype {ids.dtype}")
    if ids.shape[1] < 2:
        raise InputError(f"input_ids has {ids.shape[1]} token(s); perplexity needs at least 2 "
                         "(the first token is never predicted)")
    return ids.astype(np.int64, copy=False)


def _check_window(context, stride) -> None:
    if not is_integer(context) or context < 2:
        raise InputError(f"context must be an integer >= 2, got {context!r}")
    if not is_integer(stride) or not 1 <= stride <= context:
        raise InputError(f"stride must be an integer in [1, context={context}], got {stride!r}")
