"""Perplexity of a long text, by the recipe of Transformers' documentation or of llama.cpp,
and llama.cpp's KL-divergence statistics of a model (a quantised one) against a reference.

A model with a context of ``context`` tokens cannot score a longer text in one pass; the two
recipes cut it differently, so their perplexities differ by a few percent on the same model.

- ``recipe="transformers"`` (``perplexity_sliding_window``): windows of ``context`` tokens whose
  starts are ``stride`` apart; each window scores only the tokens no earlier window scored. This
  is "Perplexity of fixed-length models" in the Transformers documentation
  (https://huggingface.co/docs/transformers/perplexity).
- ``recipe="llama.cpp"`` (``perplexity_chunks``): non-overlapping chunks of ``context`` tokens,
  the first token of each replaced by bos, only the second half of each chunk scored. This is
  what llama.cpp's ``llama-perplexity`` prints (examples/perplexity/perplexity.cpp,
  https://github.com/ggml-org/llama.cpp), the number quoted for GGUF files.

``kl_divergence`` runs llama.cpp's chunks through a model and a reference model and returns, per
scored token, KL(p_reference || p_model); ``kl_statistics`` reduces them as
``llama-perplexity --kl-divergence`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llama_np.errors import InputError
from llama_np.formats.files import read_bytes
from llama_np.inputs import is_integer
from llama_np.losses import log_softmax

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


RECIPES = ("transformers", "llama.cpp")


def perplexity(model, input_ids, context: int, stride: int | None = None, recipe: str = "transformers",
               progress=None) -> PerplexityResult:
    """Perplexity of one token sequence (bos once, at the start) by one of the two recipes:
    ``perplexity_sliding_window`` ("transformers", needs ``stride``) or ``perplexity_chunks``
    ("llama.cpp", which takes no stride)."""
    if recipe == "transformers":
        return perplexity_sliding_window(model, input_ids, context, stride, progress=progress)
    if recipe == "llama.cpp":
        if stride is not None:
            raise InputError(f"stride is not used by the llama.cpp recipe (its chunks do not overlap), got {stride!r}")
        return perplexity_chunks(model, input_ids, context, progress=progress)
    raise InputError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")


def perplexity_sliding_window(model, input_ids, context: int, stride: int, progress=None) -> PerplexityResult:
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
    return PerplexityResult(perplexity=_exp(nll), nll=nll, tokens=weight_sum)


def _exp(nll: float) -> float:
    # exp of a mean NLL above ~709 nats is beyond a float: inf, as torch.exp gives it
    return math.exp(nll) if nll < math.log(np.finfo(np.float64).max) else math.inf


# ============================================================================================
# llama.cpp's recipe: non-overlapping chunks, bos first, the second half scored
# ============================================================================================


def llama_cpp_chunks(input_ids, context: int, bos_token_id: int) -> np.ndarray:
    """The chunks llama.cpp's ``llama-perplexity -c context`` runs, as an int64 (N, context) array.

    The text is tokenized once with bos at the start (as ``common_tokenize(..., true)``); it
    must give at least 2 · context tokens. It is cut into N = T // context chunks of ``context``
    tokens; the T mod context tokens left over at the end are dropped. The first token of each
    chunk is replaced by bos (for chunk 0 it already is bos); llama.cpp does so when its
    vocabulary adds bos, as Llama 2's does, and llama_np always does.
    """
    ids = _check_sequence(input_ids)[0]
    if not is_integer(context) or context < 3:  # context 2 would score no token: nothing after its half
        raise InputError(f"context must be an integer >= 3 for the llama.cpp recipe, got {context!r}")
    if len(ids) < 2 * context:
        raise InputError(f"the text gives {len(ids)} tokens; the llama.cpp recipe needs at least "
                         f"2 * context = {2 * context} (two chunks)")
    chunks = ids[: len(ids) // context * context].reshape(-1, context).copy()  # (N, context)
    chunks[:, 0] = bos_token_id
    return chunks


def scored_log_probs(model, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log p(next token) over the vocabulary at the scored positions of one chunk, float64
    (context − 1 − context // 2, V), and the targets (context − 1 − context // 2,).

    llama.cpp scores positions first = context // 2 up to context − 2: the logits at position i
    predict token i + 1, and the last position has no next token in the chunk.
    """
    context = len(chunk)
    first = context // 2
    logits = model(chunk[None, :], logits_to_keep=context - first).logits[0, :-1]  # (context-1-first, V)
    return log_softmax(logits), chunk[first + 1:]


def perplexity_chunks(model, input_ids, context: int, progress=None) -> PerplexityResult:
    """Perplexity of one token sequence by llama.cpp's recipe (``llama-perplexity``).

    For each chunk of ``llama_cpp_chunks`` (bos first), only the tokens of its second half are
    scored: targets at positions context // 2 + 1 … context − 1, so every scored token is
    predicted from at least context // 2 + 1 tokens of its chunk. Over all N chunks,

        nll = mean over the N · (context − 1 − context // 2) scored tokens of −log p(token),
        perplexity = exp(nll),   tokens = N · (context − 1 − context // 2).

    A plain mean over tokens, unlike the Transformers recipe's weighting of window means.
    ``progress(chunks_done, chunks_total)`` is called after each chunk.
    """
    chunks = llama_cpp_chunks(input_ids, context, model.config.bos_token_id)
    nll_sum, count = 0.0, 0
    for done, chunk in enumerate(chunks, start=1):
        log_probs, targets = scored_log_probs(model, chunk)
        nll_sum -= log_probs[np.arange(len(targets)), targets].sum()
        count += len(targets)
        if progress is not None:
            progress(done, len(chunks))
    nll = nll_sum / count
    return PerplexityResult(perplexity=_exp(nll), nll=nll, tokens=count)


@dataclass(frozen=True)
class TokenComparison:
    """Per scored token (N,) of ``kl_divergence``: the model's and the reference's −log p of
    the true next token, KL(p_reference || p_model), the model's minus the reference's
    probability of the true token, and whether both put the same token on top."""

    nll: np.ndarray
    nll_reference: np.ndarray
    kl_divergence: np.ndarray
    probability_difference: np.ndarray
    same_top: np.ndarray


def kl_divergence(model, reference_model, input_ids, context: int, progress=None) -> TokenComparison:
    """Compare ``model`` (a quantised one, say) with ``reference_model`` on llama.cpp's chunks.

    At each token ``perplexity_chunks`` scores, with p the reference's next-token distribution
    and q the model's (both float64 from float32 logits):

        KL(p || q) = Σ_v p_v (log p_v − log q_v)

    llama.cpp reads p from a file of saved log-probabilities (``--kl-divergence-base``), stored
    in 16 bits per entry over the 16 nats below the top one; here p is exact. For a
    block-quantised model, llama.cpp's ggml also rounds each activation row before the product
    (to Q8_0 blocks for a Q8_0 matrix), which llama_np does not: its KL is the weights' rounding
    alone, and smaller (docs/cli.md, "perplexity", gives the measured numbers).
    """
    if reference_model.config.vocab_size != model.config.vocab_size:
        raise InputError(f"reference_model has a vocabulary of {reference_model.config.vocab_size} tokens, "
                         f"model one of {model.config.vocab_size}: they must be the same")
    chunks = llama_cpp_chunks(input_ids, context, model.config.bos_token_id)
    parts = []
    for done, chunk in enumerate(chunks, start=1):
        log_q, targets = scored_log_probs(model, chunk)            # (n, V)
        log_p, _ = scored_log_probs(reference_model, chunk)        # (n, V)
        rows = np.arange(len(targets))
        parts.append((-log_q[rows, targets], -log_p[rows, targets],
                      (np.exp(log_p) * (log_p - log_q)).sum(axis=-1),
                      np.exp(log_q[rows, targets]) - np.exp(log_p[rows, targets]),
                      log_q.argmax(axis=-1) == log_p.argmax(axis=-1)))
        if progress is not None:
            progress(done, len(chunks))
    return TokenComparison(*(np.concatenate(column) for column in zip(*parts)))


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """The mean and its standard error sqrt((mean(x²) − mean(x)²) / (N − 1)), as llama.cpp
    computes them (0 for the error when N <= 10)."""
    count = len(values)
    mean = float(values.mean())
    variance = float((values * values).mean()) - mean * mean
    return mean, math.sqrt(variance / (count - 1)) if variance > 0 and count > 10 else 0.0


def kl_statistics(comparison: TokenComparison) -> dict[str, float]:
    """The summary ``llama-perplexity --kl-divergence`` prints, with its formulas:

    ppl / ppl_reference = exp(mean nll) ± exp(mean nll) · standard error of the nll;
    ln_ppl_ratio = mean nll − mean nll_reference, its error from both errors and their
    covariance cov(nll, nll_reference) / (N − 1); ppl_ratio = exp(ln_ppl_ratio);
    ppl_difference = ppl − ppl_reference; mean_kl ± standard error, median and maximum;
    rms_probability_difference = sqrt(mean Δp²); same_top = the share of tokens whose top
    token agrees, ± sqrt(s (1 − s) / (N − 1)).
    """
    count = len(comparison.nll)
    log_ppl, log_ppl_error = mean_and_uncertainty(comparison.nll)
    log_ppl_reference, log_ppl_reference_error = mean_and_uncertainty(comparison.nll_reference)
    covariance = (float((comparison.nll * comparison.nll_reference).mean()) - log_ppl * log_ppl_reference) / (count - 1)
    ln_ratio = log_ppl - log_ppl_reference
    ln_ratio_error = math.sqrt(max(0.0, log_ppl_error**2 + log_ppl_reference_error**2 - 2 * covariance))
    ppl, ppl_reference = math.exp(log_ppl), math.exp(log_ppl_reference)
    ppl_error, ppl_reference_error = ppl * log_ppl_error, ppl_reference * log_ppl_reference_error
    ppl_difference_error = math.sqrt(max(0.0, ppl_error**2 + ppl_reference_error**2
                                         - 2 * ppl * ppl_reference * covariance))
    mean_kl, mean_kl_error = mean_and_uncertainty(comparison.kl_divergence)
    mean_squared_dp, mean_squared_dp_error = mean_and_uncertainty(comparison.probability_difference**2)
    rms_dp = math.sqrt(mean_squared_dp)
    same_top = float(comparison.same_top.mean())
    return {
        "tokens": count,
        "ppl": ppl, "ppl_error": ppl_error,
        "ppl_reference": ppl_reference, "ppl_reference_error": ppl_reference_error,
        "ln_ppl_ratio": ln_ratio, "ln_ppl_ratio_error": ln_ratio_error,
        "ppl_ratio": math.exp(ln_ratio), "ppl_ratio_error": math.exp(ln_ratio) * ln_ratio_error,
        "ppl_difference": ppl - ppl_reference, "ppl_difference_error": ppl_difference_error,
        "mean_kl": mean_kl, "mean_kl_error": mean_kl_error,
        "median_kl": float(np.median(comparison.kl_divergence)),
        "max_kl": float(comparison.kl_divergence.max()),
        "rms_probability_difference": rms_dp,
        "rms_probability_difference_error": 0.5 / rms_dp * mean_squared_dp_error if rms_dp > 0 else 0.0,
        "same_top": same_top,
        "same_top_error": math.sqrt(same_top * (1 - same_top) / (count - 1)),
    }


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
