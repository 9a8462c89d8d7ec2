"""Text generation: the logit processors, sampling and ``generate``.

One step of generation runs the model on the newest token only, with the keys and values of every
earlier position read from the KV cache (``llama_np/cache.py``).

The logit processing order is Transformers' (docs/reference.md §6.2):
repetition penalty -> temperature -> top-k -> top-p -> softmax -> sample (or argmax for greedy).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from llama_np import layers
from llama_np.formats.files import read_json_object
from llama_np.errors import CheckpointError, InputError
from llama_np.inputs import check_attention_mask, check_input_ids, is_integer, is_number

# ---------------------------------------------------------------------------- settings


@dataclass
class GenerationConfig:
    """Defaults for ``generate``, read from a checkpoint's ``generation_config.json`` when present.

    The field names and defaults are Transformers' (top_k 50 applies only when sampling).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None
    max_length: int = 20
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_model_config(cls, config) -> "GenerationConfig":
        return cls(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                   pad_token_id=config.pad_token_id)

    @classmethod
    def from_pretrained(cls, directory, config) -> "GenerationConfig":
        """The checkpoint's generation_config.json over the model config's token ids."""
        base = cls.from_model_config(config)
        path = Path(directory) / "generation_config.json"
        if not path.is_file():
            return base
        values = read_json_object(path)
        known = {f.name for f in fields(cls)} - {"extra"}
        for name, value in values.items():
            if name in known:
                setattr(base, name, value)
            else:
                base.extra[name] = value
        try:
            base.check(config.vocab_size)
        except InputError as error:
            raise CheckpointError(f"{path}: {error}") from None
        return base

    def check(self, vocab_size: int) -> None:
        """InputError naming the first setting that ``generate`` could not use."""
        if not is_integer(self.max_length) or self.max_length < 0:
            raise InputError(f"max_length must be a non-negative integer, got {self.max_length!r}")
        max_new_tokens = 0 if self.max_new_tokens is None else self.max_new_tokens
        _check_generation_arguments(vocab_size, max_new_tokens, self.do_sample, self.temperature,
                                    self.top_k, self.top_p, self.repetition_penalty,
                                    self.eos_token_id, self.pad_token_id)


# ---------------------------------------------------------------------------- logit processors
#
# Each takes logits (B, V) and returns new logits (B, V); removed tokens get −inf.


def apply_repetition_penalty(logits: np.ndarray, input_ids: np.ndarray, penalty: float,
                             attention_mask: np.ndarray | None = None) -> np.ndarray:
    """CTRL's repetition penalty (Keskar et al., 2019) on every id already in the sequence.

    logits (B, V); input_ids (B, S). A seen token's logit z becomes z / penalty when z > 0 and
    z · penalty when z <= 0, so penalty > 1 always makes it less likely. With attention_mask
    (B, S), the left padding before a row's first real token is not counted, as in Transformers'
    generate (its prompt_ignore_length).
    """
    if penalty == 1.0:
        return logits
    logits = logits.copy()
    rows = np.broadcast_to(np.arange(logits.shape[0])[:, None], input_ids.shape)  # (B, S)
    counted = np.ones(input_ids.shape, dtype=bool)
    if attention_mask is not None:
        counted = np.cumsum(np.asarray(attention_mask) != 0, axis=-1) > 0  # from the first real token on
    rows, ids = rows[counted], input_ids[counted]
    seen = logits[rows, ids]
    logits[rows, ids] = np.where(seen < 0, seen * penalty, seen / penalty)
    return logits


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """z / temperature: below 1 sharpens the distribution, above 1 flattens it.

    A temperature so small that z / temperature overflows the logits' dtype (1e-50 is 0 in
    float32) would turn every probability into NaN: that is refused, pointing at greedy
    decoding, the limit it approaches.
    """
    with np.errstate(over="ignore"):  # an overflow is refused just below
        scaled = logits / logits.dtype.type(temperature) if logits.dtype.type(temperature) > 0 else None
    if scaled is None or not np.isfinite(scaled[np.isfinite(logits)]).all():
        raise InputError(f"temperature={temperature!r} is so small that logits / temperature overflow "
                         f"{logits.dtype}; use do_sample=False (greedy decoding), its limit")
    return scaled


def top_k_filter(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Keep the k largest logits of each row (and any tied with the k-th); the rest become −inf."""
    top_k = min(top_k, logits.shape[-1])
    kth_largest = np.sort(logits, axis=-1)[:, -top_k][:, None]  # (B, 1)
    return np.where(logits < kth_largest, -np.inf, logits)


def top_p_filter(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Nucleus sampling (Holtzman et al., 2019): keep the smallest set of most likely tokens whose
    probabilities add up to at least top_p.

    Sorted ascending, a token is dropped when the cumulative probability up to and including it
    is <= 1 − top_p; the token that crosses the threshold is kept, and so is the most likely
    token whatever top_p is. Even top_p = 1 drops tokens whose probability rounds to 0.

    The arithmetic is Transformers' on CPU, so that a cut falling exactly on a tie (e.g. 200 equal
    logits and top_p = 0.5) removes as many tokens: probabilities in the logits' dtype, a
    cumulative sum accumulated in float64 and rounded back to that dtype at every step (torch's
    cumsum), compared with 1 − top_p in that dtype. Which of several tied tokens at the cut go
    is not reproducible: torch's sort is not stable; ours is.
    """
    order = np.argsort(logits, axis=-1, kind="stable")  # ascending
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    probabilities = layers.softmax(sorted_logits)
    cumulative = np.cumsum(probabilities, axis=-1, dtype=np.float64).astype(probabilities.dtype)
    remove_sorted = cumulative <= probabilities.dtype.type(1 - float(top_p))
    remove_sorted[:, -1] = False  # always keep at least one token
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, logits)


def sample(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row drawn from softmax(logits) (B, V) -> (B,), by inverting the CDF."""
    # probabilities in float64, so that cumulative sums over a large vocabulary stay exact
    cumulative = np.cumsum(layers.softmax(logits.astype(np.float64)), axis=-1)
    u = rng.random(logits.shape[0])[:, None] * cumulative[:, -1:]
    return np.minimum((cumulative <= u).sum(axis=-1), logits.shape[-1] - 1)


def next_token_logits(logits, input_ids, do_sample, temperature, top_k, top_p, repetition_penalty,
                      attention_mask=None):
    """Apply the processors in Transformers' order; greedy decoding uses only the penalty.

    Like Transformers' generate, each processor runs only when it changes something
    (temperature != 1, top_k not 0 or None, top_p < 1).
    """
    logits = apply_repetition_penalty(logits, input_ids, repetition_penalty, attention_mask)
    if not do_sample:
        return logits
    if temperature != 1.0:
        logits = apply_temperature(logits, temperature)
    if top_k:
        logits = top_k_filter(logits, top_k)
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return logits


# ---------------------------------------------------------------------------- generate


@contextlib.contextmanager
def progress_held_back(model):
    """No progress calls inside this block (the model's ``weights.progress`` is set aside)."""
    weights = model.weights
    held, weights.progress = weights.progress, None
    try:
        yield
    finally:
        weights.progress = held


def generate(model, input_ids, attention_mask=None, max_new_tokens=None, do_sample=None,
             temperature=None, top_k=None, top_p=None, repetition_penalty=None, seed=None,
             eos_token_id=None, pad_token_id=None, streamer=None, stats=None,
             allow_past_context: bool = False, max_length=None) -> np.ndarray:
    """Continue each prompt; returns prompt + new tokens, shape (B, T + new).

    Arguments left as None come from ``model.generation_config`` (the checkpoint's
    generation_config.json), as in Transformers. Rows stop at an end-of-sequence id (one id or a
    list); a finished row is filled with ``pad_token_id`` (or the first eos id) while the others
    go on; generation ends when every row has finished or after ``max_new_tokens``.

    Left-padded batches need ``attention_mask``: positions are then cumsum(mask) − 1 (0 on pads)
    so every row's first real token sits at position 0. ``seed`` makes sampling reproducible.
    ``streamer`` follows Transformers' protocol: an object whose ``put`` receives the prompt ids
    (B, T) first, then every step's new tokens (B,), and whose ``end()`` is called at the end
    (e.g. ``llama_np.text.streaming.TextStreamer(tokenizer, skip_prompt=True)``); a plain callable
    receives only the new tokens (B,). ``stats``, a dict if given, receives ``new_tokens``,
    ``prompt_seconds`` (the pass over the prompt, which also yields the first new token) and
    ``decode_seconds`` for the ``decode_steps`` = new_tokens − 1 cached steps after it.

    ``max_length``, as in Transformers, counts the prompt: max_new_tokens = max_length − T.
    Generation stops at the model's context length (``max_position_embeddings``), with a
    warning, unless ``allow_past_context=True`` or the RoPE type is ``dynamic`` (made to stretch
    at run time): past it the model has never seen its positions and writes gibberish, as
    llama.cpp stops at its context size. Transformers goes on (and warns).
    """
    settings = model.generation_config
    do_sample = settings.do_sample if do_sample is None else do_sample
    temperature = settings.temperature if temperature is None else temperature
    top_k = settings.top_k if top_k is None else top_k
    top_p = settings.top_p if top_p is None else top_p
    repetition_penalty = settings.repetition_penalty if repetition_penalty is None else repetition_penalty
    eos_token_id = settings.eos_token_id if eos_token_id is None else eos_token_id
    pad_token_id = settings.pad_token_id if pad_token_id is None else pad_token_id

    ids = check_input_ids(input_ids, model.config.vocab_size)  # (B, T) int64
    if max_length is not None:  # Transformers' older spelling: the prompt counts in it
        if max_new_tokens is not None:
            raise InputError("give max_new_tokens or max_length, not both")
        if not is_integer(max_length) or max_length < 0:
            raise InputError(f"max_length must be a non-negative integer, got {max_length!r}")
        max_new_tokens = max(int(max_length) - ids.shape[-1], 0)
    if max_new_tokens is None:
        max_new_tokens = settings.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = max(settings.max_length - ids.shape[-1], 0)
    _check_generation_arguments(model.config.vocab_size, max_new_tokens, do_sample, temperature, top_k,
                                top_p, repetition_penalty, eos_token_id, pad_token_id, seed)
    if not isinstance(allow_past_context, bool):
        raise InputError(f"allow_past_context must be True or False, got {allow_past_context!r}")
    if not allow_past_context:
        max_new_tokens = _within_context(model.config, ids.shape[-1], max_new_tokens)
    _check_callbacks(streamer, stats)
    eos_ids = np.array([] if eos_token_id is None else np.atleast_1d(eos_token_id), dtype=np.int64)
    if pad_token_id is None and eos_ids.size:
        pad_token_id = int(eos_ids[0])

    batch = ids.shape[0]
    if attention_mask is None:
        attention_mask = _infer_attention_mask(ids, pad_token_id, eos_ids)
    mask = check_attention_mask(attention_mask, *ids.shape)
    if (mask.sum(axis=-1) == 0).any():
        raise InputError("a row of attention_mask is all zeros: every prompt needs at least one token")
    with contextlib.ExitStack() as quiet:  # a progress line only where it cannot mix with text
        rng = np.random.default_rng(seed)
        if streamer is not None and hasattr(streamer, "put"):
            streamer.put(ids)
        if streamer is not None:  # the streamed text owns the terminal: no progress line at all
            quiet.enter_context(progress_held_back(model))
        positions = np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 0)
        unfinished = np.ones(batch, dtype=bool)
        started = time.perf_counter()
        out = model(ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
        prompt_seconds = time.perf_counter() - started
        cache, sequences = out.past_key_values, ids
        logits = out.logits[:, -1]
        steps = 0
        quiet.enter_context(progress_held_back(model))  # decoding steps: never a progress line between tokens
        for steps in range(1, max_new_tokens + 1):
            scores = next_token_logits(logits.astype(np.float32), sequences, do_sample, temperature,
                                       top_k, top_p, repetition_penalty, attention_mask=mask)
            tokens = sample(scores, rng) if do_sample else np.argmax(scores, axis=-1)
            if pad_token_id is not None:
                tokens = np.where(unfinished, tokens, pad_token_id)
            sequences = np.concatenate([sequences, tokens[:, None]], axis=-1)
            _stream(streamer, tokens)
            unfinished &= ~np.isin(tokens, eos_ids)
            if not unfinished.any() or steps == max_new_tokens:
                break
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=-1)
            positions = positions[:, -1:] + 1
            out = model(tokens[:, None], attention_mask=mask, position_ids=positions,
                        past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1]
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    if stats is not None:
        stats.update(new_tokens=steps, prompt_seconds=prompt_seconds, decode_steps=max(steps - 1, 0),
                     decode_seconds=time.perf_counter() - started - prompt_seconds)
    return sequences


def _stream(streamer, tokens: np.ndarray) -> None:
    if streamer is None:
        return
    if hasattr(streamer, "put"):
        streamer.put(tokens)
    else:
        streamer(tokens)


def _infer_attention_mask(ids, pad_token_id, eos_ids) -> np.ndarray:
    """Transformers' rule: pads in the prompt are masked when the pad id is not an eos id."""
    if pad_token_id is not None and (ids == pad_token_id).any() and pad_token_id not in eos_ids:
        return (ids != pad_token_id).astype(np.int64)
    return np.ones(ids.shape, dtype=np.int64)


def check_generate_arguments(kwargs: dict) -> None:
    """InputError for a keyword ``generate`` does not take, with the nearest one it does."""
    known = [name for name in inspect.signature(generate).parameters if name not in ("model", "input_ids")]
    for name in kwargs:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; it takes {', '.join(known)}"
            raise InputError(f"generate() has no argument {name!r}{hint}")


def _within_context(config, prompt_length: int, max_new_tokens: int) -> int:
    """``max_new_tokens``, cut (with a warning) so that prompt + new tokens fit the context."""
    context = config.max_position_embeddings
    if config.rope_parameters["rope_type"] == "dynamic" or prompt_length + max_new_tokens <= context:
        return max_new_tokens
    room = max(0, context - prompt_length)
    warnings.warn(f"generation stops at the context length, max_position_embeddings={context}: "
                  f"{room} new tokens after a prompt of {prompt_length}, not {max_new_tokens}; "
                  "past it the model writes from positions it was never trained on "
                  "(allow_past_context=True, or llama-np's --allow-past-context, goes on)", stacklevel=3)
    return room


def _check_generation_arguments(vocab_size, max_new_tokens, do_sample, temperature, top_k, top_p,
                                repetition_penalty, eos_token_id=None, pad_token_id=None, seed=None):
    if not is_integer(max_new_tokens) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not isinstance(do_sample, (bool, np.bool_)):
        raise InputError(f"do_sample must be True or False, got {do_sample!r}")
    if do_sample and not (is_number(temperature) and temperature > 0):
        raise InputError(f"temperature must be > 0 when sampling, got {temperature!r} "
                         "(use do_sample=False for greedy decoding)")
    if top_k is not None and (not is_integer(top_k) or top_k < 0):
        raise InputError(f"top_k must be a non-negative integer or None, got {top_k!r}")
    if not (is_number(top_p) and 0 < top_p <= 1):
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    if not (is_number(repetition_penalty) and repetition_penalty > 0):
        raise InputError(f"repetition_penalty must be > 0, got {repetition_penalty!r}")
    # Both ids end up in the output: pad fills finished rows and is fed back to the model.
    eos_ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple, np.ndarray)) else [eos_token_id]
    if eos_token_id is not None and not all(is_integer(i) and 0 <= i < vocab_size for i in eos_ids):
        raise InputError(f"eos_token_id must be a token id in [0, {vocab_size}), a list of them or None, "
                         f"got {eos_token_id!r}")
    if pad_token_id is not None and not (is_integer(pad_token_id) and 0 <= pad_token_id < vocab_size):
        raise InputError(f"pad_token_id must be a token id in [0, {vocab_size}) or None, got {pad_token_id!r}")
    if seed is not None and not (is_integer(seed) and seed >= 0):
        raise InputError(f"seed must be a non-negative integer or None, got {seed!r}")


def _check_callbacks(streamer, stats) -> None:
    if streamer is not None and not (hasattr(streamer, "put") or callable(streamer)):
        raise InputError(f"streamer must have put() and end() (like TextStreamer) or be callable, "
                         f"got {type(streamer).__name__}")
    if stats is not None and not isinstance(stats, dict):
        raise InputError(f"stats must be a dict to fill in, got {type(stats).__name__}")
