"""Checks at the boundary: every argument a user passes to a model call or to ``generate``.

The forward pass in ``model.py`` trusts its arrays; this module is where they earn that trust.
Each check returns the value in the form the model uses (int64 ids, a (B, S) mask) or raises an
``InputError`` that names the argument and says what was expected.

One integer rule holds everywhere: a Python ``int`` or a NumPy integer (``np.int64(3)``), never
a ``bool`` (``True`` is an ``int`` to Python, but a flag passed where a count belongs is a bug).

Shape legend: B batch, T query positions, S key positions (past + current), H query heads.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from llama_np.cache import KVCache
from llama_np.weights.memory import check_fits
from llama_np.errors import InputError


def is_integer(value) -> bool:
    """An int or a NumPy integer, but not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    """A real number, NumPy scalars (np.float32(0.7)) included, but not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_compute_dtype(dtype) -> np.dtype:
    """The dtype the model computes in: float32 (as Transformers' references) or float64."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:  # a name NumPy does not know, such as "bfloat16"
        raise InputError(f"dtype must be np.float32 or np.float64, got {dtype!r}") from None
    if dtype not in (np.float32, np.float64):
        raise InputError(f"dtype must be np.float32 or np.float64, got {dtype.name}")
    return dtype


def _as_2d(value, name: str) -> np.ndarray:
    """An array with a batch axis: a 1-D sequence becomes one row. Ragged rows are refused."""
    try:
        array = np.asarray(value)
    except ValueError:  # NumPy refuses rows of different lengths
        raise InputError(f"{name} rows have different lengths; pad them to one length "
                         "(and pass an attention_mask)") from None
    return array[None, :] if array.ndim == 1 else array


def check_input_ids(input_ids, vocab_size: int) -> np.ndarray:
    """input_ids as an int64 (B, T) array of token ids in [0, vocab_size)."""
    ids = _as_2d(input_ids, "input_ids")
    if ids.dtype.kind in "US" or isinstance(input_ids, str):
        raise InputError(f"input_ids must be integers (token ids), got text ({input_ids!r:.40}): tokenize it first, "
                         "e.g. np.array([tokenizer.encode(text)])")
    if not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise InputError(f"input_ids must be integers, got dtype {ids.dtype}")
    if ids.ndim != 2:
        raise InputError(f"input_ids must have shape (batch, sequence), got {ids.shape}")
    if ids.size == 0:
        raise InputError(f"input_ids is empty (shape {ids.shape}): give at least one token")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InputError(f"input_ids holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    return ids.astype(np.int64, copy=False)


def check_attention_mask(attention_mask, batch: int, key_length: int) -> np.ndarray | None:
    """attention_mask as int64 (B, S) of 0 (padding) and 1 (token), or None."""
    if attention_mask is None:
        return None
    mask = _as_2d(attention_mask, "attention_mask")
    if mask.shape != (batch, key_length):
        raise InputError(f"attention_mask has shape {mask.shape}; expected (batch, past + new tokens) = "
                         f"{(batch, key_length)}")
    if not np.isin(mask, (0, 1)).all():
        raise InputError("attention_mask must hold only 0 (padding) and 1 (token)")
    return mask.astype(np.int64)


def check_position_ids(position_ids, batch: int, length: int) -> np.ndarray:
    """position_ids as non-negative integers (B, T); one row is shared by the whole batch."""
    ids = _as_2d(position_ids, "position_ids")
    if (ids.ndim != 2 or ids.shape[-1] != length or ids.shape[0] not in (1, batch)
            or not np.issubdtype(ids.dtype, np.integer)):
        raise InputError(f"position_ids must be integers of shape {(batch, length)}, got {ids.dtype} {ids.shape}")
    if ids.min() < 0:
        raise InputError(f"position_ids must be non-negative, got {int(ids.min())}")
    return np.broadcast_to(ids, (batch, length))


def check_labels(labels, shape, name: str = "labels") -> np.ndarray:
    """Token labels as int64 of the given (B, T) shape (−100 marks a position to ignore)."""
    labels = _as_2d(labels, name)
    if labels.shape != tuple(shape) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{name} must be integers of shape {tuple(shape)}, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def check_class_labels(labels) -> np.ndarray:
    """Sequence-classification labels: class indices or float targets, as an array of numbers."""
    try:
        labels = np.asarray(labels)
    except ValueError:  # NumPy refuses rows of different lengths
        raise InputError("labels rows have different lengths: give one label (or one row of "
                         "targets) per sequence") from None
    if labels.dtype.kind not in "iuf":
        raise InputError(f"labels must be numbers (class indices or targets), got dtype {labels.dtype}")
    return labels


def check_logits_to_keep(logits_to_keep) -> int:
    if not is_integer(logits_to_keep) or logits_to_keep < 0:
        raise InputError(f"logits_to_keep must be a non-negative integer, got {logits_to_keep!r}")
    return int(logits_to_keep)


def check_cache(cache, config, batch: int) -> None:
    """past_key_values must be a KVCache this model filled for these same rows."""
    if not isinstance(cache, KVCache):
        raise InputError(f"past_key_values must be the KVCache a previous call returned, got {type(cache).__name__}")
    if len(cache) != config.num_hidden_layers:
        raise InputError(f"past_key_values holds {len(cache)} layers; this model has {config.num_hidden_layers}")
    if cache.get_seq_length() == 0:
        return
    rows, kv_heads, _, head_dim = cache.keys[0].shape  # (B, KV, capacity, hd)
    if (rows, kv_heads, head_dim) != (batch, config.num_key_value_heads, config.head_dim):
        raise InputError(
            f"past_key_values holds keys for B={rows} rows, KV={kv_heads} heads of size hd={head_dim}; "
            f"this call needs B={batch}, KV={config.num_key_value_heads}, hd={config.head_dim}: "
            "pass the cache this model returned for the same rows")


def warn_if_past_max_positions(config, positions: int) -> None:
    """Warn, do not refuse, when a sequence is longer than max_position_embeddings.

    Transformers computes such sequences, so we compute the same numbers; but only ``dynamic``
    RoPE is designed to stretch past the configured length at run time. For the other types
    (default, linear, llama3, yarn: their max_position_embeddings already includes any scaling)
    the model has never seen these positions and its outputs degrade.
    """
    rope_type = config.rope_parameters["rope_type"]
    if positions > config.max_position_embeddings and rope_type != "dynamic":
        warnings.warn(
            f"the sequence reaches position {positions - 1}, past max_position_embeddings="
            f"{config.max_position_embeddings}; with rope type {rope_type!r} the model was not "
            "trained on such positions and its outputs may be poor", stacklevel=5)


@dataclass
class ForwardInputs:
    """A forward call's arguments, checked and completed."""

    input_ids: np.ndarray  # (B, T) int64
    attention_mask: np.ndarray | None  # (B, S) of 0/1, or None for "every position is a token"
    position_ids: np.ndarray  # (B, T)
    cache: KVCache | None  # the cache to read and extend, or None
    past_length: int  # positions already in the cache
    max_position: int  # the largest position + 1


def check_forward(config, dtype, input_ids, attention_mask, position_ids, past_key_values,
                  use_cache: bool) -> ForwardInputs:
    """Every argument of a forward call checked against the model, before any work is done."""
    ids = check_input_ids(input_ids, config.vocab_size)
    batch, length = ids.shape
    cache = past_key_values
    if cache is None and use_cache:
        cache = KVCache(config.num_hidden_layers)
    if cache is not None:
        check_cache(cache, config, batch)
    past_length = cache.get_seq_length() if cache is not None else 0
    mask = check_attention_mask(attention_mask, batch, past_length + length)
    if position_ids is None:  # the positions that follow the cached ones
        position_ids = np.arange(past_length, past_length + length)[None, :].repeat(batch, axis=0)
    position_ids = check_position_ids(position_ids, batch, length)
    max_position = int(position_ids.max()) + 1
    warn_if_past_max_positions(config, max_position)
    check_attention_fits(config, batch, length, past_length + length, np.dtype(dtype).itemsize)
    return ForwardInputs(ids, mask, position_ids, cache, past_length, max_position)


# ---------------------------------------------------------------------------- memory


def attention_bytes(config, batch: int, length: int, key_length: int, itemsize: int) -> dict[str, int]:
    """The bytes of the arrays one layer's attention holds at once, by name: the (B, 1, T, S)
    mask and three (B, H, T, S) arrays -- the scores, their exponentials, the weights
    (``layers.attention``) -- for ``length`` queries over ``key_length`` keys.

    Their sum is what ``check_attention_fits`` asks of the memory; ``llama-np inspect`` shows
    the scores and the weights in its estimate.
    """
    one_head = batch * length * key_length * itemsize  # one (B, 1, T, S) array
    heads = config.num_attention_heads
    return {"mask": one_head, "scores": heads * one_head, "exponentials": heads * one_head,
            "weights": heads * one_head}


def check_attention_fits(config, batch: int, length: int, key_length: int, itemsize: int) -> None:
    """Refuse a forward whose attention arrays cannot fit in memory (see ``check_fits``).

    Attention holds, per layer, the arrays of ``attention_bytes`` (a mask, and the scores, their
    exponentials and the weights of every head): a 100,000-token prompt would need terabytes.
    """
    heads = config.num_attention_heads
    check_fits(sum(attention_bytes(config, batch, length, key_length, itemsize).values()),
               f"a forward over {length} tokens ({key_length} keys, batch {batch}), with its "
               f"(batch, {heads} heads, {length}, {key_length}) attention arrays,",
               "Use a shorter prompt or a smaller batch (or feed a long prompt in chunks with "
               "past_key_values)")
